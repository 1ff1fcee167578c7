"""Whether TensorRT's runtime is here (not just its type stubs), and how to install it."""

from __future__ import annotations

import importlib
from typing import Any

from cryodeploy.errors import BackendUnavailable

__all__ = ["INSTALL_HINT", "require_tensorrt", "tensorrt_runtime"]

INSTALL_HINT = "install TensorRT on a CUDA machine: pip install tensorrt (or pip install 'cryodeploy[gpu]')"


def tensorrt_runtime() -> tuple[Any | None, str]:
    """The ``tensorrt`` module if its runtime is present, else None and why.

    The type stubs make ``import tensorrt`` succeed without a runtime, so the test is
    whether ``tensorrt.Builder`` exists.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        return None, "tensorrt: not installed (pip install cryodeploy[gpu] on a CUDA machine)"
    if not hasattr(trt, "Builder"):
        return (
            None,
            "tensorrt: only type stubs are installed, no TensorRT runtime (install the tensorrt package)",
        )
    return trt, "available"


def require_tensorrt(device: int = 0) -> None:
    """Raise :class:`BackendUnavailable` saying how to install TensorRT unless its runtime (not just
    the type stubs) and CUDA device ``device`` are here."""
    found, reason = tensorrt_runtime()
    if found is None:
        raise BackendUnavailable(f"TensorRT engines cannot be built or run here: {reason}; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        raise BackendUnavailable(f"TensorRT engines cannot be built or run here: no CUDA device {device}")
