"""TensorRT backend: runs a cached (or freshly built) TensorRT 10 engine on a CUDA GPU.

A loader (:mod:`.loader`: check an engine's sidecar against this GPU and TensorRT version,
deserialize; or pick/build the engine for a checkpoint or ONNX model from the engine cache)
and a runner (:mod:`.runner`: inference only). Importing this package imports no TensorRT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryodeploy.backends.base import Backend, BackendOptions

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = ["availability", "create"]


def availability(options: BackendOptions) -> tuple[bool, str]:
    """TensorRT runs only with its runtime (not just type stubs) and a CUDA device."""
    from cryodeploy.backends.trt.probe import tensorrt_runtime

    found, reason = tensorrt_runtime()
    if found is None:
        return False, reason
    if not options.device.startswith("cuda"):
        return False, f"trt: needs a CUDA device, found device {options.device!r}"
    import torch

    if not torch.cuda.is_available():
        return False, "trt: no CUDA device visible"
    return True, "available"


def create(source: ModelSource, options: BackendOptions) -> Backend:
    """A TensorRT backend for an engine file, or for the cached engine of a checkpoint/ONNX model
    on this GPU (built into the engine cache first if missing)."""
    from cryodeploy.backends.trt.engines import engine_for_source
    from cryodeploy.backends.trt.runner import TrtBackend

    return TrtBackend(engine_for_source(source, options), options)
