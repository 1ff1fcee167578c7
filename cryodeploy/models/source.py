"""A resolved model: what every backend and the exporter load from.

Resolving a name or path to one is :mod:`cryodeploy.backends.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryodeploy.errors import ModelError
from cryodeploy.models.registry import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["Kind", "ModelSource"]

Kind = Literal["checkpoint", "raw", "onnx", "engine"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its kind, file, spec (geometry and normalization) and content hash."""

    kind: Kind
    path: Path
    spec: ModelSpec
    sha256: str

    def torch_module(self) -> torch.nn.Module:
        """The model as an eval-mode CPU torch module (checkpoints and raw folders only)."""
        if self.kind == "checkpoint":
            from cryodeploy.models.checkpoint import load_checkpoint

            return load_checkpoint(self.path)[0]
        if self.kind == "raw":
            from cryodeploy.models.rawweights import load_raw

            return load_raw(self.path)[0]
        what = "an ONNX model" if self.kind == "onnx" else "a TensorRT engine"
        raise ModelError(f"{self.path}: {what} cannot be run by PyTorch; use a checkpoint")
