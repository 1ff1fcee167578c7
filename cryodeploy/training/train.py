"""Training from a patch store, ``train(store, rundir, TrainConfig(...))``, from micrographs simulated
on the fly, ``train(SimulatedData(SimConfig(...)), rundir, TrainConfig(...))``, or from patches in
memory, ``train(ArrayData(inputs, targets), ...)`` (images, or volumes for ``model="unet3d"``);
single process or DDP.

A run folder holds ``best.safetensors``/``best.json`` (lowest validation loss) beside
``last.*`` (end of the latest epoch, or the batch where the run was stopped), ``state.pt``
(exact resume state), ``metrics.jsonl`` and ``loss.png`` (see :mod:`cryodeploy.training.runfiles`).
The loop itself, resume and DDP details are in :mod:`cryodeploy.training.trainer`; the methods
(supervised, Noise2Noise, Neighbor2Neighbor) in :mod:`cryodeploy.training.objectives`.
Under ``torchrun --nproc-per-node K`` the same call trains with DDP (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cryodeploy.training.config import TrainConfig, TrainResult
from cryodeploy.training.sources import ArrayData, SimulatedData

__all__ = ["train"]

log = logging.getLogger(__name__)

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


def train(store_path: str | os.PathLike[str] | SimulatedData | ArrayData, rundir: str | os.PathLike[str],
          config: TrainConfig, quiet: bool = False,
          on_step: Callable[[int], bool | None] | None = None) -> TrainResult:
    """Train ``config.model`` on the store at ``store_path`` (or on simulation), writing the run folder
    ``rundir``.

    Under ``torchrun`` every rank calls this; rank 0 writes the files. ``on_step(step)`` is called
    after every optimizer step; returning True stops like Ctrl-C does (save a resumable state)
    and the result says ``interrupted``. Ctrl-C saves the same state, then raises KeyboardInterrupt.
    """
    import torch

    from cryodeploy.training.distributed import setup_distributed
    from cryodeploy.training.trainer import Trainer

    ctx = setup_distributed(config.device)
    benchmark = torch.backends.cudnn.benchmark
    try:
        # fixed shapes: let cuDNN time its algorithms once (fp16 on an H100: 1.3x the heuristic's)
        torch.backends.cudnn.benchmark = benchmark or ctx.device.type == "cuda"
        out = Path(rundir)
        data = store_path if isinstance(store_path, SimulatedData | ArrayData) else Path(store_path)
        run = Trainer(data, out, config, ctx)
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
