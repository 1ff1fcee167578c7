"""Backend registry: choosing a backend is a lookup, not an if-chain.

Each backend lives in ``cryodeploy/backends/<name>/`` and registers here by module path, so
``import cryodeploy.backends`` imports no torch, onnxruntime or TensorRT.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, ConfigError
from .base import PRECISIONS, Backend, BackendOptions

if TYPE_CHECKING:
    from ..source import ModelSource

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendOptions",
    "BackendSpec",
    "availability",
    "create_backend",
]


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend's code lives.

    ``module`` must define ``availability(options)`` and ``create(source, options)``.
    """

    name: str
    module: str
    description: str


#: name -> spec; modules are imported only when the backend is asked about or used.
BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec("torch", "cryodeploy.backends.torch", "PyTorch eager (channels_last, autocast)"),
    "ort": BackendSpec(
        "ort", "cryodeploy.backends.ort", "ONNX Runtime (CPU EP; CUDA EP with IOBinding, fp16)"
    ),
    "fused": BackendSpec("fused", "cryodeploy.backends.fused", "fused CNN3 Triton kernel (CUDA, fp16/bf16)"),
    "trt": BackendSpec("trt", "cryodeploy.backends.trt", "TensorRT 10 engines (CUDA, fp32/fp16)"),
}


def _module(name: str):  # type: ignore[no-untyped-def]
    try:
        spec = BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"backend {name!r} unknown, expected one of {', '.join(sorted(BACKENDS))} or 'auto'"
        ) from None
    return importlib.import_module(spec.module)


def availability(name: str, options: BackendOptions | None = None) -> tuple[bool, str]:
    """Whether backend ``name`` can run here with ``options``, and if not, why (one line)."""
    try:
        mod = _module(name)
    except ImportError as err:
        return False, f"{name}: cannot import ({err})"
    ok, reason = mod.availability(options or BackendOptions())
    return bool(ok), str(reason)


def create_backend(name: str, source: ModelSource, options: BackendOptions) -> Backend:
    """Build backend ``name`` for ``source``; raises :class:`BackendUnavailable` with the reason."""
    ok, reason = availability(name, options)
    if not ok:
        raise BackendUnavailable(reason)
    backend = _module(name).create(source, options)
    assert isinstance(backend, Backend)
    return backend
