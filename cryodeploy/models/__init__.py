"""Model registry: each architecture is built from a typed config alone and declares its geometry."""

from __future__ import annotations

from cryodeploy.models.registry import ARCHITECTURES, ModelSpec, build_model, get_architecture

__all__ = ["ARCHITECTURES", "ModelSpec", "build_model", "get_architecture"]
