"""ONNX Runtime backend: CPU execution provider, or CUDA with IOBinding on device buffers.

fp32 everywhere; fp16 on CUDA only, from an fp16 copy of the ONNX model (float32 input and
output kept). A checkpoint or raw-weight source is exported to ONNX in the cache first.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from cryodeploy.backends.base import BackendOptions
from cryodeploy.backends.ort.loader import build_session, import_ort, model_path
from cryodeploy.backends.ort.runner import OrtBackend

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = ["OrtBackend", "availability", "create"]


def availability(options: BackendOptions) -> tuple[bool, str]:
    """Whether ONNX Runtime can run ``options`` here, and if not, why."""
    if options.precision == "bf16":
        return False, "ort: bf16 is not offered (use fp16 on CUDA, or the torch backend for bf16)"
    if options.precision == "fp16" and not options.device.startswith("cuda"):
        return False, "ort: fp16 is offered on CUDA only (the CPU provider has no fast fp16 convolutions)"
    if options.precision == "fp16" and importlib.util.find_spec("onnxconverter_common") is None:
        return False, "ort: fp16 needs onnxconverter-common (pip install 'cryodeploy[onnx]')"
    try:
        ort = import_ort(options.device)
    except ImportError:
        return False, "onnxruntime: not installed (pip install 'cryodeploy[ort]')"
    if options.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, "ort: CUDAExecutionProvider not available (install onnxruntime-gpu)"
        import torch

        if not torch.cuda.is_available():
            return False, "ort: no CUDA device visible"
    return True, "available"


def create(source: ModelSource, options: BackendOptions) -> OrtBackend:
    """An ONNX Runtime backend for any model source (checkpoints are exported to ONNX in the cache)."""
    path = model_path(source, options.precision)
    return OrtBackend(build_session(path, options), options, path)
