"""Checkpoints: safetensors weights + a JSON :class:`ModelSpec`; never unpickles user data.

A checkpoint is a pair ``NAME.safetensors`` + ``NAME.json``. Wherever a checkpoint is taken,
the ``.safetensors`` file, the ``.json`` file, or a training run folder (meaning its
``best`` checkpoint) are accepted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryodeploy.errors import ConfigError, ModelError
from cryodeploy.models import ModelSpec, build_model

if TYPE_CHECKING:
    import torch

__all__ = ["load_checkpoint", "resolve_checkpoint", "save_checkpoint"]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Map a run folder, ``.json`` or ``.safetensors`` path to the checkpoint's ``.safetensors`` file."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise ModelError(
            f"{p}: folder holds no checkpoint (best.safetensors, last.safetensors or model.safetensors)"
        )
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.suffix != ".safetensors":
        raise ModelError(f"{p}: not a checkpoint, expected a .safetensors file or a run folder")
    if not p.is_file():
        raise ModelError(f"{p}: no such checkpoint file")
    return p


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` config atomically; returns the weights path."""
    from safetensors.torch import save

    from cryodeploy.files import atomic_write

    weights = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"format": "cryodeploy-model/1", "architecture": spec.architecture})
    with atomic_write(weights) as tmp:  # written by us, so the file gets the usual permissions
        tmp.write_bytes(blob)
    with atomic_write(weights.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    return weights


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a checkpoint (file or run folder) into an eval-mode CPU model and its spec.

    Raises :class:`ModelError` for a missing, truncated or mismatched checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = resolve_checkpoint(path)
    cfg_path = weights.with_suffix(".json")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ConfigError(f"found {type(config).__name__}, expected a JSON object")
        spec = ModelSpec.from_dict(config)
    except FileNotFoundError as err:
        raise ModelError(f"{cfg_path}: checkpoint config missing (expected beside {weights.name})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{cfg_path}: not valid JSON ({err})") from err
    except (ConfigError, KeyError, TypeError) as err:
        raise ModelError(f"{cfg_path}: invalid model config ({err})") from err
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: not a readable safetensors file ({err})") from err
    import torch

    try:  # shapes from a model on the meta device: a config can declare sizes no memory holds
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelError(
            f"{cfg_path}: invalid model config (cannot build {spec.architecture} with {spec.params}: {err})"
        ) from err
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        detail = "; ".join(
            s
            for s in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k}: found {found[k]}, expected {expected[k]}" for k in wrong),
            )
            if s
        )
        raise ModelError(f"{weights}: weights do not match architecture {spec.architecture} ({detail})")
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    return model, spec
