"""Backend registry: choosing a backend is a lookup, not an if-chain.

Each backend lives in ``cryodeploy/backends/<name>/`` and registers here by module path, with
its description (CLI help), its benchmark variants and its place in the ``auto`` preference,
so ``import cryodeploy.backends`` imports no torch, onnxruntime or TensorRT and nothing outside
this package branches on backend names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.errors import BackendUnavailable, ConfigError, ModelError

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = [
    "BACKENDS",
    "BACKEND_PREFERENCE",
    "BackendSpec",
    "BenchVariant",
    "auto_device_options",
    "availability",
    "backend_help",
    "bench_variants",
    "create_auto",
    "create_backend",
]


@dataclass(frozen=True)
class BenchVariant:
    """One way of running a model: backend, precision and backend-specific options."""

    label: str
    backend: str
    precision: str
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend's code lives, what it is, and how the bench runs it.

    ``module`` must define ``availability(options)`` and ``create(source, options)``;
    ``gradients``: the backend's model is a PyTorch module that can recompute gradients.
    """

    name: str
    module: str
    description: str
    variants: tuple[BenchVariant, ...] = ()
    gradients: bool = False


def _bench(name: str, *rows: tuple[str, str]) -> tuple[BenchVariant, ...]:
    """Benchmark variants of backend ``name`` from (label, precision) rows."""
    return tuple(BenchVariant(label, name, precision) for label, precision in rows)


#: name -> spec; modules are imported only when the backend is asked about or used.
BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec(
        "torch", "cryodeploy.backends.torch", "PyTorch eager (channels_last, autocast)",
        (*_bench("torch", ("eager fp32", "fp32"), ("eager fp16 + channels_last", "fp16"),
                 ("eager bf16 + channels_last", "bf16")),
         BenchVariant("CUDA graphs fp16", "torch", "fp16", (("cuda_graphs", True),)),
         BenchVariant("torch.compile fp16", "torch", "fp16", (("compile", True),))),
        gradients=True,
    ),
    "ort": BackendSpec(
        "ort", "cryodeploy.backends.ort", "ONNX Runtime (CPU EP; CUDA EP with IOBinding, fp16)",
        _bench("ort", ("ONNX Runtime fp32", "fp32"), ("ONNX Runtime fp16", "fp16")),
    ),
    "trt": BackendSpec(
        "trt", "cryodeploy.backends.trt", "TensorRT 10 engines (CUDA, fp32/fp16)",
        _bench("trt", ("TensorRT fp32", "fp32"), ("TensorRT fp16", "fp16")),
    ),
    "fused": BackendSpec(
        "fused", "cryodeploy.backends.fused", "fused CNN3 Triton kernel (CUDA, fp16/bf16)",
        _bench("fused", ("fused Triton fp16", "fp16"), ("fused Triton bf16", "bf16")),
    ),
}

#: ``backend="auto"``: the first of these that is registered, available and can load the model.
#: CPU: ONNX Runtime (CNN3 2048^2, 2 threads: ORT 203 ms, torch channels_last 627 ms).
#: CUDA: the fused Triton kernel where it applies (CNN3 at fp16/bf16: 2.3 ms vs 4.8 ms for eager
#: fp16 at 4096^2 on an H200, docs/benchmarks.md), then torch (no build step) for checkpoints;
#: TensorRT, then ONNX Runtime for ONNX files and engines.
BACKEND_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("ort", "torch"),
    "cuda": ("fused", "torch", "trt", "ort"),
}


def bench_variants() -> tuple[BenchVariant, ...]:
    """Every registered backend's benchmark variants, the first (the bench's baseline) first."""
    return tuple(v for spec in BACKENDS.values() for v in spec.variants)


def backend_help() -> str:
    """One line for the CLI: ``auto`` and every registered backend with its description."""
    return "auto (the first that runs here), " + ", ".join(
        f"{s.name} ({s.description})" for s in BACKENDS.values()
    )


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


def auto_device_options(name: str, options: BackendOptions, precision_chosen: bool = False) -> BackendOptions:
    """What ``device="auto"`` means for backend ``name``: ``options`` as they are, or on the CPU where
    they ask for CUDA, the backend cannot run there and can on the CPU (ONNX Runtime without its
    CUDA provider). ``precision_chosen``: the precision was picked automatically, so fp32 on the CPU."""
    if not options.device.startswith("cuda") or availability(name, options)[0]:
        return options
    cpu = replace(options, device="cpu", precision="fp32" if precision_chosen else options.precision)
    return cpu if availability(name, cpu)[0] else options


def create_backend(name: str, source: ModelSource, options: BackendOptions) -> Backend:
    """Build backend ``name`` for ``source``; raises :class:`BackendUnavailable` with the reason."""
    ok, reason = availability(name, options)
    if not ok:
        raise BackendUnavailable(reason)
    backend = _module(name).create(source, options)
    assert isinstance(backend, Backend)
    return backend


def create_auto(source: ModelSource, options: BackendOptions) -> Backend:
    """The first backend of :data:`BACKEND_PREFERENCE` for the device that can run ``source``."""
    reasons = []
    for name in BACKEND_PREFERENCE[options.device.split(":")[0]]:
        if name not in BACKENDS:
            continue
        try:
            return create_backend(name, source, options)
        except (BackendUnavailable, ModelError) as err:
            reasons.append(str(err))
    raise BackendUnavailable(
        f"{source.path}: no backend can run it on {options.device} "
        f"({'; '.join(reasons) or 'none registered'})"
    )
