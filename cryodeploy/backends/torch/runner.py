"""The PyTorch runner: inference only; the module is loaded by :mod:`cryodeploy.source`."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..base import Backend, BackendOptions

__all__ = ["TorchBackend"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    """Eager PyTorch; channels_last on CUDA; autocast for fp16/bf16 (fp32 accumulate)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, options: BackendOptions) -> None:
        super().__init__(options)
        self._device = torch.device(options.device)
        self._module = module.to(self._device).eval()
        self._cuda = self._device.type == "cuda"
        if self._cuda:
            self._module = self._module.to(memory_format=torch.channels_last)
        if options.threads and not self._cuda:
            torch.set_num_threads(options.threads)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=_DTYPES[self.precision])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch)
        if self._cuda:
            x = x.pin_memory().to(self._device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        tf32 = self.options.tf32
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32), self._autocast():
            y = self._module(x)
        return y.float().contiguous().cpu().numpy()
