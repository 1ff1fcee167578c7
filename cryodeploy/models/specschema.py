"""A model config (the checkpoint's ``.json``, ``model_spec`` metadata, the ``model`` of layers.json and
sidecars) as a schema: the document's field rules in one place (pydantic, strict). What depends on
the architecture (parameter ranges, stride, receptive radius) is checked by
:class:`~cryodeploy.models.ModelSpec` against it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["ModelDoc"]


class ModelDoc(BaseModel):
    """The fields :meth:`ModelSpec.from_dict <cryodeploy.models.ModelSpec.from_dict>` reads."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    format: str
    architecture: str
    params: dict[str, Any] = {}
    receptive_radius: int | None = None
    stride: int | None = None
    ndim: int | None = None
    normalization: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    training: dict[str, Any] = {}
    versions: dict[str, Any] = {}
