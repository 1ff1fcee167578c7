"""Backends: one interface (:class:`Backend`), a registry, and one folder per backend.

``import cryodeploy.backends`` imports no torch, onnxruntime or TensorRT; a backend's module
is imported only when it is asked about or used (see :mod:`.registry`).
"""

from __future__ import annotations

from cryodeploy.backends.base import PRECISIONS, Backend, BackendOptions
from cryodeploy.backends.registry import (
    BACKEND_PREFERENCE,
    BACKENDS,
    BackendSpec,
    BenchVariant,
    availability,
    backend_help,
    bench_variants,
    create_auto,
    create_backend,
)

__all__ = [
    "BACKENDS",
    "BACKEND_PREFERENCE",
    "PRECISIONS",
    "Backend",
    "BackendOptions",
    "BackendSpec",
    "BenchVariant",
    "availability",
    "backend_help",
    "bench_variants",
    "create_auto",
    "create_backend",
]
