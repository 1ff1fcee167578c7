"""The engine a TensorRT backend runs: an engine file as given, or one from the engine cache
(built there from the model's ONNX export when missing or stale)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cryodeploy.backends.base import BackendOptions
from cryodeploy.backends.trt.build import build_engines
from cryodeploy.backends.trt.cache import ENGINE_PRECISIONS, BuildConfig
from cryodeploy.backends.trt.loader import device_index
from cryodeploy.backends.trt.profile import DEFAULT_SHAPES, ProfileShapes, parse_shapes
from cryodeploy.errors import ConfigError

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = ["engine_for_source"]


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
    from cryodeploy.export.onnx import cached_onnx
    from cryodeploy.files import cache_root

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
