"""Training from a patch store: ``train(store, rundir, TrainConfig(...))``, single process or DDP.

A run folder holds ``best.safetensors``/``best.json`` (lowest validation loss) beside
``last.*`` (end of the latest epoch, or the batch where the run was stopped), ``state.pt``
(exact resume state), ``metrics.jsonl`` and ``loss.png`` (see :mod:`cryodeploy.runfiles`).
The loop itself, resume and DDP details are in :mod:`cryodeploy.trainer`; the methods
(supervised, Noise2Noise, Neighbor2Neighbor) in :mod:`cryodeploy.objectives`.
Under ``torchrun --nproc-per-node K`` the same call trains with DDP (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .objectives import METHODS

__all__ = ["TrainConfig", "TrainResult", "train"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. ``batch`` is the global batch (split over DDP ranks); ``max_batches``
    caps the batches per epoch; ``buffers`` is the loader's batches in memory, ``loader_threads`` its
    parallel reads per batch."""

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

    def __post_init__(self) -> None:
        from .models import ModelSpec

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


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """First Ctrl-C sets the event (finish the batch, save, stop); a second one aborts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("interrupted: finishing this batch, then saving a resumable state (Ctrl-C again: abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(store_path: str | os.PathLike[str], rundir: str | os.PathLike[str], config: TrainConfig,
          quiet: bool = False, on_step: Callable[[int], bool | None] | None = None) -> TrainResult:
    """Train ``config.model`` on the store at ``store_path``, writing the run folder ``rundir``.

    Under ``torchrun`` every rank calls this; rank 0 writes the files. ``on_step(step)`` is called
    after every optimizer step; returning True stops like Ctrl-C does (save a resumable state)
    and the result says ``interrupted``. Ctrl-C saves the same state, then raises KeyboardInterrupt.
    """
    import torch

    from .distributed import setup_distributed
    from .trainer import Trainer

    ctx = setup_distributed(config.device)
    benchmark = torch.backends.cudnn.benchmark
    try:
        # fixed shapes: let cuDNN time its algorithms once (fp16 on an H100: 1.3x the heuristic's)
        torch.backends.cudnn.benchmark = benchmark or ctx.device.type == "cuda"
        out = Path(rundir)
        run = Trainer(Path(store_path), out, config, ctx)
        run.restore()
        ctx.barrier()
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        with _stop_on_sigint() as stop:
            result = run.fit(quiet, on_step, stop)
        if stop.is_set():
            raise KeyboardInterrupt
        return result
    finally:
        torch.backends.cudnn.benchmark = benchmark
        ctx.close()
