"""What a training run is asked to do (:class:`TrainConfig`) and what it reports (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryodeploy.errors import ConfigError
from cryodeploy.training.objectives import METHODS

__all__ = ["OPTIMIZERS", "PRECISIONS", "TrainConfig", "TrainResult"]

OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. ``batch`` is the global batch (split over DDP ranks); ``max_batches``
    caps the batches per epoch; ``buffers`` is the loader's batches in memory, ``loader_threads`` its
    parallel reads per batch; ``init`` a checkpoint (or ``default``) to fine-tune, of the same model."""

    model: str = "cnn3"
    model_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    batch: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"
    val_split: float = 0.1
    max_batches: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    method: str = "supervised"
    log_every: int = 50
    resume: bool = False
    buffers: int = 3
    loader_threads: int = 4
    init: str | None = None

    def __post_init__(self) -> None:
        from cryodeploy.models import ModelSpec

        ModelSpec(self.model, dict(self.model_params))  # unknown architecture or parameters
        for name, values in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("method", METHODS)):
            found = getattr(self, name)
            if found not in values:
                raise ConfigError(f"{name} {found!r} unknown, expected one of {', '.join(values)}")
        for name in ("epochs", "batch", "log_every", "buffers", "loader_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"max_batches must be >= 1, found {self.max_batches}")
        if not 0.0 < self.val_split < 1.0:
            raise ConfigError(f"val_split {self.val_split} invalid, expected 0 < f < 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, found {self.lr}")
        if self.precision == "fp16" and self.device == "cpu":  # CPU fp16 convolutions: hours, not seconds
            raise ConfigError("precision fp16 on device cpu is too slow to train (one batch > 400 s); "
                              "use fp32 or bf16 on cpu, or fp16 on cuda")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, found {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Where the run's files are and how it went; ``best`` is None if no epoch finished."""

    rundir: Path
    best: Path | None
    last: Path | None
    best_val_loss: float | None
    best_epoch: int | None
    epochs_completed: int
    steps: int
    interrupted: bool
    samples_per_s: float | None
