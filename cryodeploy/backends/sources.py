"""Resolve what the user calls a model (``default``, a checkpoint, a run folder, a raw weight
folder, ``model.onnx``, a TensorRT engine) into a :class:`ModelSource` the backends load from.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryodeploy.errors import ModelError
from cryodeploy.models import ModelSpec
from cryodeploy.models.source import Kind, ModelSource

__all__ = ["ModelSource", "default_model_path", "load_source"]

def _detect_kind(p: Path) -> Kind:
    if p.is_dir():
        if (p / "layers.json").exists():
            return "raw"
        return "checkpoint"
    suffix = p.suffix.lower()
    if suffix in (".safetensors", ".json"):
        return "checkpoint"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan", ".trt"):
        return "engine"
    raise ModelError(
        f"{p}: unrecognised model file (expected a run folder, .safetensors, a raw weight folder "
        "with layers.json, .onnx, or a TensorRT .engine)"
    )


def default_model_path() -> Path:
    """The shipped default model in package data ``cryodeploy/data/default/`` (checkpoint or ONNX)."""
    from importlib.resources import files

    folder = Path(str(files("cryodeploy"))) / "data" / "default"
    for name in ("best.safetensors", "model.onnx"):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(
        f"{folder}: no default model is installed (expected best.safetensors + best.json or model.onnx); "
        "pass a model path instead"
    )


def load_source(model: str | os.PathLike[str]) -> ModelSource:
    """Resolve ``model`` (a path, or ``"default"`` for the shipped model) to a :class:`ModelSource`."""
    from cryodeploy.files import file_sha256
    from cryodeploy.models.checkpoint import load_checkpoint, resolve_checkpoint

    p = default_model_path() if str(model) == "default" else Path(model)
    if not p.exists():
        raise ModelError(f"{p}: no such model file or folder")
    kind = _detect_kind(p)
    if kind == "checkpoint":
        weights = resolve_checkpoint(p)
        _, spec = load_checkpoint(weights)
        return ModelSource("checkpoint", weights, spec, file_sha256(weights))
    if kind == "raw":
        from cryodeploy.models.rawweights import load_raw

        _, spec = load_raw(p)  # verifies every file against layers.json, so its hash names the content
        return ModelSource("raw", p, spec, file_sha256(p / "layers.json"))
    if kind == "onnx":
        from cryodeploy.export.onnx import read_onnx_spec

        return ModelSource("onnx", p, read_onnx_spec(p), file_sha256(p))
    from cryodeploy.backends.trt.cache import read_sidecar
    from cryodeploy.errors import ConfigError

    try:  # an engine: the spec comes from the JSON sidecar written beside it when it was built
        spec = ModelSpec.from_dict(read_sidecar(p).model)
    except ConfigError as err:
        raise ModelError(f"{p.with_suffix('.json')}: invalid model spec ({err})") from err
    return ModelSource("engine", p, spec, file_sha256(p))
