"""Fused CNN3 backend: one Triton kernel computes all three layers per tile (fp16/bf16, fp32 accumulate).

Only for the CNN3 architecture on a CUDA GPU with Triton; elsewhere ``availability`` says why.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from cryodeploy.backends.base import BackendOptions
from cryodeploy.errors import BackendUnavailable

if TYPE_CHECKING:
    from cryodeploy.backends.fused.runner import FusedBackend
    from cryodeploy.models.source import ModelSource

__all__ = ["availability", "create"]


def availability(options: BackendOptions) -> tuple[bool, str]:
    """Needs a CUDA device, Triton, and fp16 or bf16 precision."""
    if not options.device.startswith("cuda"):
        return False, "fused: CUDA only (Triton kernel)"
    if options.precision not in ("fp16", "bf16"):
        return False, f"fused: fp16/bf16 only, not {options.precision}"
    if importlib.util.find_spec("triton") is None:
        return False, "fused: triton not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "fused: no CUDA device visible"
    return True, "available"


def create(source: ModelSource, options: BackendOptions) -> FusedBackend:
    """A fused backend for a CNN3 model (checkpoint or raw weights)."""
    if source.spec.architecture != "cnn3" or source.spec.params.get("channels", 16) != 16:
        raise BackendUnavailable(f"fused: only for cnn3 with 16 channels, not {source.spec.architecture}")
    from cryodeploy.backends.fused.runner import FusedBackend

    return FusedBackend(source.torch_module(), options)
