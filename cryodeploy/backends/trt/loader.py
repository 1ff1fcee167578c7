"""Find, check and deserialize TensorRT engines.

An engine runs only on the GPU model and TensorRT version it was built with: its sidecar says
which, and a mismatch is a :class:`~cryodeploy.errors.ModelError` naming both, never a crash
inside TensorRT.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tensorrt as trt
import torch

from ...errors import ConfigError, ModelError
from ...export.engine_cache import ENGINE_PRECISIONS, BuildConfig, EngineSidecar, check_gate, check_platform
from ...export.profile import DEFAULT_SHAPES, ProfileShapes, parse_shapes
from ...export.tensorrt import TrtLogger, build_engines, current_platform
from ..base import BackendOptions

if TYPE_CHECKING:
    from ...source import ModelSource

__all__ = ["LoadedEngine", "device_index", "engine_for_source", "load_engine"]


@dataclass(frozen=True)
class LoadedEngine:
    """A deserialized engine with the runtime and logger it needs to stay alive."""

    logger: TrtLogger
    runtime: trt.Runtime
    engine: trt.ICudaEngine


def device_index(device: str) -> int:
    """CUDA device ordinal of ``"cuda"`` / ``"cuda:N"`` (``"cuda"`` means the current device)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(f"TensorRT needs a CUDA device, found {device!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def load_engine(
    path: Path, sidecar: EngineSidecar, device: int, allow_accuracy_loss: bool = False
) -> LoadedEngine:
    """Deserialize the engine at ``path`` on ``device`` after checking its sidecar: same GPU and
    TensorRT version, unchanged file, and (fp16) a passed accuracy gate unless loss is allowed."""
    check_platform(path, sidecar.key.platform, current_platform(device))
    check_gate(path, sidecar, allow_accuracy_loss)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read the engine ({err.strerror or err})") from err
    if hashlib.sha256(data).hexdigest() != sidecar.engine_sha256:
        raise ModelError(f"{path}: engine file differs from the one its sidecar describes (sha256 mismatch)")
    logger = TrtLogger()
    with torch.cuda.device(device):
        runtime = trt.Runtime(logger)
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ModelError(f"{path}: TensorRT could not deserialize the engine (see its log)")
    return LoadedEngine(logger, runtime, engine)


def _profile(options: BackendOptions, stride: int) -> ProfileShapes:
    shapes = options.get("shapes")
    if shapes is None:
        return DEFAULT_SHAPES
    return shapes if isinstance(shapes, ProfileShapes) else parse_shapes(str(shapes), stride)


def engine_for_source(source: ModelSource, options: BackendOptions) -> Path:
    """The engine file to run for ``source``: the file itself for an engine, else the engine of
    this model, GPU, TensorRT version, precision and profile from the engine cache (built there
    if missing or stale). Options: ``shapes`` (a ProfileShapes or ``--shapes`` text),
    ``engine_cache`` (a folder), ``allow_accuracy_loss``."""
    if source.kind == "engine":
        return source.path
    from ...export.cache import cache_root
    from ...export.onnx import cached_onnx

    if options.precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"trt: precision {options.precision!r} not supported, expected fp32 or fp16")
    folder = options.get("engine_cache")
    config = BuildConfig(
        precisions=(options.precision,),
        shapes=_profile(options, source.spec.stride),
        allow_accuracy_loss=bool(options.get("allow_accuracy_loss", False)),
        device=device_index(options.device),
    )
    cache = Path(folder) if folder else cache_root("engines")
    return build_engines(cached_onnx(source), cache, config)[0].path
