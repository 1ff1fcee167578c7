"""Fine-tuning: ``train --init CKPT|default`` starts from a checkpoint's weights, its architecture taken
from it; a run whose architecture, parameters or normalization differ is refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryodeploy.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from cryodeploy.imaging.normalize import NormSpec
    from cryodeploy.models import ModelSpec
    from cryodeploy.training.config import TrainConfig

__all__ = ["init_path", "init_spec", "load_init"]


def init_path(init: str | os.PathLike[str]) -> Path:
    """``default`` (the shipped model's checkpoint in package data) or a checkpoint path/run folder."""
    from cryodeploy.models.checkpoint import resolve_checkpoint

    if str(init) == "default":
        from importlib.resources import files

        return resolve_checkpoint(Path(str(files("cryodeploy"))) / "data" / "default" / "best.safetensors")
    return resolve_checkpoint(init)


def init_spec(init: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` of the checkpoint ``init`` names (its architecture and parameters)."""
    from cryodeploy.models.checkpoint import load_checkpoint

    return load_checkpoint(init_path(init))[1]


def load_init(net: torch.nn.Module, config: TrainConfig, normalization: NormSpec) -> ModelSpec:
    """Load ``config.init``'s weights into ``net``; returns the checkpoint's spec. Refuses (one line) a
    checkpoint of another architecture, other parameters or another normalization than the run's."""
    from cryodeploy.models import ModelSpec
    from cryodeploy.models.checkpoint import load_checkpoint

    assert config.init is not None
    path = init_path(config.init)
    model, spec = load_checkpoint(path)
    wanted = ModelSpec(config.model, dict(config.model_params))
    if (spec.architecture, spec.params) != (wanted.architecture, wanted.params):
        raise ConfigError(f"--init {path}: the checkpoint is {spec.architecture} {spec.params}, the run asks "
                          f"for {wanted.architecture} {wanted.params}; leave out --model/--param to take its")
    if spec.normalization != normalization:
        raise ConfigError(f"--init {path}: the checkpoint normalizes with {spec.normalization.to_dict()}, "
                          f"the training data with {normalization.to_dict()}")
    net.load_state_dict(model.state_dict())
    return spec
