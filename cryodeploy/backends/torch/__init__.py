"""PyTorch backend: eager, channels_last, autocast for fp16/bf16; fp32 without TF32 unless asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryodeploy.backends.base import BackendOptions
from cryodeploy.backends.torch.runner import TorchBackend

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = ["TorchBackend", "availability", "create"]


def availability(options: BackendOptions) -> tuple[bool, str]:
    """PyTorch runs on the CPU always, on CUDA when a GPU is visible."""
    try:
        import torch
    except ImportError:
        return False, "torch: not installed"
    if options.get("cuda_graphs", False) and not options.device.startswith("cuda"):
        return False, "torch: CUDA graphs need a CUDA device"
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        return False, "torch: no CUDA device visible (CPU only)"
    return True, "available"


def create(source: ModelSource, options: BackendOptions) -> TorchBackend:
    """A torch backend for a checkpoint or raw-weight model."""
    return TorchBackend(source.torch_module(), options)
