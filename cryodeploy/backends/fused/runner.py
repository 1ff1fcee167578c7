"""The fused CNN3 runner: host batch -> pinned staging -> device -> Triton kernel -> host."""

from __future__ import annotations

import numpy as np
import torch

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.backends.fused.kernel import fused_cnn3_forward, pack_weights

__all__ = ["FusedBackend"]


class FusedBackend(Backend):
    """CNN3 through :func:`fused_cnn3_forward`; ``extra`` options rows, chunk, programs tune it."""

    name = "fused"

    def __init__(self, module: torch.nn.Module, options: BackendOptions) -> None:
        super().__init__(options)
        self._device = torch.device(options.device)
        dtype = torch.float16 if options.precision == "fp16" else torch.bfloat16
        self._weights = pack_weights(module, dtype, self._device)
        self._rows = int(options.get("rows", 28))
        self._chunk = int(options.get("chunk", 1))
        self._programs = options.get("programs")

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Run on a device tensor [N,1,H,W] float32 (no host copies)."""
        return fused_cnn3_forward(x, self._weights, self._rows, self._chunk, self._programs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).pin_memory().to(self._device, non_blocking=True)
        return self.run_device(x).cpu().numpy()
