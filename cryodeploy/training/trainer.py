"""The training loop behind :func:`cryodeploy.training.train.train`: one :class:`Trainer` per process (rank).

Exact resume: the batch order is a function of (seed, epoch) (:mod:`cryodeploy.training.loader`);
per-step randomness (Neighbor2Neighbor's sub-sampling) comes from a generator seeded by
(seed, epoch, batch) and drawn for the global batch; ``state.pt`` holds weights, optimizer
and scaler state, the position and RNG states. So on the CPU a resumed run ends with the same
weights as an uninterrupted one, bit for bit.

DDP: each step's global batch is the single-process batch of that step, split between the
ranks (:class:`~cryodeploy.training.distributed.GlobalBatchLoader`; each rank reads only its part), and
DDP averages the gradients: K processes with global batch B follow one process with batch B
up to float rounding. Validation shares are disjoint and their sums all-reduced.

Speed: bf16/fp16 autocast (fp16 with a grad scaler), channels_last (_3d for volumes), cuDNN's benchmarked
algorithms (set by :func:`~cryodeploy.training.train.train`) and fused optimizers on CUDA, the loader's
reader threads and non-blocking copies from pinned buffers overlap loading with compute, and
the loss is accumulated on the device and read only at log points (and when the resume state
is saved).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, CryoDeployError
from cryodeploy.training.config import TrainConfig, TrainResult

if TYPE_CHECKING:
    import torch

    from cryodeploy.models import ModelSpec
    from cryodeploy.training.distributed import DistContext
    from cryodeploy.training.sources import ArrayData, SimulatedData

__all__ = ["MAY_CHANGE_ON_RESUME", "Trainer", "channels_last", "device_batches"]

log = logging.getLogger(__name__)

#: config fields a resumed run may change; every other field must match the saved state
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "max_batches", "log_every", "device", "resume", "buffers",
                                  "loader_threads"})


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p + 1 for p in parts]).generate_state(1)[0])


def channels_last(ndim: int) -> torch.memory_format:
    """The channels-last memory format of ``ndim``-D patches (images: channels_last, volumes: _3d)."""
    import torch

    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def device_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]], device: torch.device,
                   paired: bool, ndim: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Loader batches of ``ndim``-D patches on ``device`` (targets only if ``paired``).

    On CUDA the next batch is copied (non-blocking, from the loader's pinned buffer, channels_last)
    on a side stream while the current one computes; the loader's buffer is released only after
    that stream's copy, and the compute stream waits for the copy. On the CPU batches pass through.
    """
    import torch

    if device.type != "cuda":
        for x, t in batches:
            yield x, t if paired else None
        return
    stream, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    layout = channels_last(ndim)
    pending: tuple[torch.Tensor, torch.Tensor | None, torch.cuda.Event] | None = None
    while True:
        with torch.cuda.stream(stream):  # next() releases the previous buffer after this stream's copies
            item = next(batches, None)
            if item is not None:
                x = item[0].to(device, non_blocking=True, memory_format=layout)
                t = (item[1].to(device, non_blocking=True, memory_format=layout)
                     if paired and item[1] is not None else None)
                copied = torch.cuda.Event()
                copied.record(stream)
        if pending is not None:
            px, pt, ready = pending
            compute.wait_event(ready)
            for tensor in (px, pt):
                if tensor is not None:
                    tensor.record_stream(compute)  # allocated on the copy stream, used on compute
            yield px, pt
        if item is None:
            return
        pending = (x, t, copied)


class Trainer:
    """One training run on one rank: data, model, optimizer and position."""

    def __init__(self, data: Path | SimulatedData | ArrayData, rundir: Path, config: TrainConfig,
                 ctx: DistContext) -> None:
        import torch

        from cryodeploy.models import build_model
        from cryodeploy.training.objectives import make_objective
        from cryodeploy.training.sources import make_source

        self.rundir, self.config, self.ctx, self.dev = rundir, config, ctx, ctx.device
        if config.batch % ctx.world_size:
            raise ConfigError(f"batch {config.batch} is not a multiple of the world size {ctx.world_size}")
        self.source = make_source(data, config, ctx)
        self.paired = self.source.paired
        self.spec = self._spec()
        if len(self.source.patch) != self.spec.ndim:
            kind = {2: "a 2-D image model", 3: "a 3-D volume model"}[self.spec.ndim]
            raise ConfigError(f"{data}: patches {self.source.patch} have {len(self.source.patch)} sides, but "
                              f"{config.model} is {kind}")
        need = self.spec.stride * (1 if self.paired else 2)
        if min(self.source.patch) < need:
            raise ConfigError(f"{data}: patches {self.source.patch} are smaller than {need} px, the "
                              f"minimum for {config.model} with --method {config.method}")
        self.steps_per_epoch = self.source.steps_per_epoch
        self.n_train, self.n_val = self.source.n_train, self.source.n_val
        cuda = self.dev.type == "cuda"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = build_model(self.spec)
        if config.init is not None:
            from cryodeploy.training.finetune import load_init

            base = load_init(self.net, config, self.spec.normalization)
            self.spec = dataclasses.replace(self.spec, training={**self.spec.training,
                                                                 "init_training": base.training})
        self.net = self.net.to(self.dev)
        if cuda:
            self.net = self.net.to(memory_format=channels_last(self.spec.ndim))  # type: ignore[call-overload]
        self.model: torch.nn.Module = self.net
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net, device_ids=[self.dev.index] if cuda else None)
        extra = {"fused": True} if cuda else {}
        self.opt: torch.optim.Optimizer = (
            torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8, **extra)
            if config.optimizer == "adam" else torch.optim.SGD(self.net.parameters(), lr=config.lr, **extra))
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=config.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.objective = make_objective(config.method, self.spec.stride, self.spec.ndim)
        self.gen = torch.Generator(self.dev)
        self.epoch = self.batch = self.step = 0
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.window = torch.zeros((), device=self.dev)
        self.window_n = 0
        self.window_seconds = 0.0
        self.rates: list[float] = []

    def _spec(self) -> ModelSpec:
        import torch

        from cryodeploy._version import __version__
        from cryodeploy.models import ModelSpec

        facts = self.source.describe()
        return ModelSpec(
            self.config.model, dict(self.config.model_params), normalization=self.source.normalization,
            noise=facts.pop("noise", {}),
            training={**self.config.to_dict(), **facts, "world_size": self.ctx.world_size},
            versions={"cryodeploy": __version__, "torch": torch.__version__, "numpy": np.__version__})

    @property
    def store_key(self) -> list[Any]:
        """(patch H, W, train, val[, sampler]): the data facts a resumed run must find unchanged."""
        return list(self.source.key)

    # --- resume -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``state.pt``, or refuse to overwrite an existing run."""
        import torch

        from cryodeploy.training.runfiles import (
            check_resumable,
            load_state,
            refuse_existing_run,
            remove_temps,
            truncate_metrics,
        )

        if self.ctx.is_main:
            remove_temps(self.rundir)
        if not self.config.resume:
            refuse_existing_run(self.rundir, clean=self.ctx.is_main)
            return
        state = load_state(self.rundir)
        check_resumable(self.rundir, state, self.config.to_dict(), MAY_CHANGE_ON_RESUME, self.store_key)
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.window.fill_(float(state["window"][0]))
        self.window_n = int(state["window"][1])
        torch.set_rng_state(state["rng"]["torch"])
        if self.dev.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.dev)
        if self.ctx.is_main:
            truncate_metrics(self.rundir, self.step)
        log.info("resuming %s at epoch %d, batch %d (step %d)", self.rundir, self.epoch + 1, self.batch,
                 self.step)

    def save_state(self) -> None:
        """Write ``state.pt`` (rank 0), the exact position after the last completed batch."""
        import torch

        from cryodeploy.training.runfiles import save_state

        rng = {"torch": torch.get_rng_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)
        save_state(self.rundir, {
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "store": self.store_key,
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "best_val": self.best_val, "best_epoch": self.best_epoch,
            "window": [float(self.window.item()), self.window_n],
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
            "world_size": self.ctx.world_size,
        })

    def save_checkpoint(self, name: str, val_loss: float | None) -> Path:
        """Write ``NAME.safetensors``/``.json`` with the training facts in the spec."""
        from cryodeploy.models.checkpoint import save_checkpoint

        training = {**self.spec.training, "epochs_completed": self.epoch, "step": self.step,
                    "val_loss": val_loss, "best_epoch": self.best_epoch,
                    "train_patches": self.n_train, "val_patches": self.n_val}
        return save_checkpoint(self.rundir / f"{name}.safetensors", self.net,
                               dataclasses.replace(self.spec, training=training))

    def _on_device(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return batches if self.source.on_device else device_batches(batches, self.dev, self.paired,
                                                                    self.spec.ndim)

    # --- the loop -----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, t: torch.Tensor | None) -> None:
        """One optimizer step on a device batch; the loss stays on the device."""
        import torch

        self.gen.manual_seed(_step_seed(self.config.seed, self.epoch, self.batch))
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.objective(self.model, self.net, x, t, self.gen, (self.ctx.rank, self.ctx.world_size))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.window += loss.detach()
        self.window_n += 1
        self.batch += 1
        self.step += 1

    def log_window(self, t0: float) -> dict[str, Any]:
        """Read the accumulated loss (the one host sync) and append a metrics row (rank 0) whose
        rate counts the window's time from ``t0`` until its device work is done."""
        from cryodeploy.training.runfiles import append_metrics

        loss = float(self.window.item()) / self.window_n
        seconds = self.window_seconds + time.perf_counter() - t0
        self.window_seconds = 0.0
        if not math.isfinite(loss):
            raise CryoDeployError(f"training diverged at step {self.step} (loss {loss}); lower --lr "
                                  "or use --precision fp32")
        rate = self.window_n * self.config.batch / seconds
        self.rates.append(rate)
        row = {"kind": "train", "epoch": self.epoch + 1, "step": self.step, "loss": loss,
               "rmse": math.sqrt(loss), "samples_per_s": rate}
        if self.ctx.is_main:
            append_metrics(self.rundir, row)
            log.info("epoch %d step %d loss %.6f rmse %.5f %.1f samples/s", row["epoch"], self.step, loss,
                     row["rmse"], rate)
        self.window.zero_()
        self.window_n = 0
        return row

    def validate(self) -> float:
        """Mean validation loss over all ranks' shares (the method's objective, fixed sub-sampling:
        each image's draw seeded by its position in the validation set, so the loss does not depend
        on the number of ranks)."""
        import torch

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        count = 0
        rank, world = self.ctx.rank, self.ctx.world_size
        per_rank = max(1, self.config.batch // world)  # the validation loader's batch: rank's share, in order
        gens: list[torch.Generator] = []
        self.net.eval()
        with torch.no_grad(), torch.autocast(self.dev.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None):
            for i, (x, t) in enumerate(self._on_device(self.source.val_batches())):
                n = x.shape[0]
                gens += [torch.Generator(self.dev) for _ in range(n - len(gens))]
                for j in range(n):  # image j of this rank's batch i: its position in the validation set
                    position = rank + (i * per_rank + j) * world
                    gens[j].manual_seed(_step_seed(self.config.seed, 1 << 20, position))
                loss = self.objective(self.net, self.net, x, t, gens[:n], (0, 1))
                loss_sum += loss.double() * x.shape[0]  # batch means weighted by images: the mean over all
                count += x.shape[0]
        self.net.train()
        total = self.ctx.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), device=self.dev,
                                                                            dtype=torch.float64)]))
        return float(total[0].item() / total[1].item())

    def _finish_time(self, t0: float) -> float:
        """Seconds since ``t0`` once the queued device work is done (once per epoch, not per step)."""
        if self.dev.type == "cuda":
            import torch

            torch.cuda.synchronize(self.dev)
        return time.perf_counter() - t0

    def fit(self, quiet: bool, on_step: Callable[[int], bool | None] | None,
            stop: threading.Event) -> TrainResult:
        """Train from the current position to the last epoch, or until stopped."""
        from cryodeploy.progress import progress
        from cryodeploy.training.runfiles import plot_losses, read_metrics

        c, main = self.config, self.ctx.is_main
        interrupted = False
        status: dict[str, str] = {}
        with progress(c.epochs * self.steps_per_epoch, "train", quiet or not main) as task:
            task.advance(self.epoch * self.steps_per_epoch + self.batch)
            while self.epoch < c.epochs and not interrupted:
                batches = self.source.train_batches(self.epoch, self.batch)
                on_device = self._on_device(batches)
                t0 = time.perf_counter()
                try:
                    while self.batch < self.steps_per_epoch and not interrupted:
                        self.train_step(*next(on_device))
                        task.advance(1)
                        if self.step % c.log_every == 0:
                            row = self.log_window(t0)
                            status.update(loss=f"{row['loss']:.5f}", rmse=f"{row['rmse']:.4f}",
                                          samples_s=f"{row['samples_per_s']:.1f}")
                            task.advance(0, **status)
                            t0 = time.perf_counter()
                        interrupted = bool(on_step is not None and on_step(self.step)) or stop.is_set()
                finally:
                    batches.close()
                self.window_seconds += self._finish_time(t0)  # a window may span epochs, not validation
                if not interrupted:
                    status["val_loss"] = f"{self.end_epoch():.5f}"
                    task.advance(0, **status)
                    interrupted = stop.is_set()
                elif main:
                    self.save_checkpoint("last", None)
                    self.save_state()
                if main:
                    plot_losses(self.rundir, read_metrics(self.rundir))
        if interrupted and main:
            log.warning("saved a resumable state in %s at step %d; continue with --resume", self.rundir,
                        self.step)
        best, last = self.rundir / "best.safetensors", self.rundir / "last.safetensors"
        return TrainResult(self.rundir, best if best.exists() else None, last if last.exists() else None,
                           self.best_val, self.best_epoch, self.epoch, self.step, interrupted,
                           statistics.median(self.rates[1:] or self.rates) if self.rates else None)

    def end_epoch(self) -> float:
        """Validate, keep the best checkpoint, write last + state (rank 0); returns the validation loss."""
        from cryodeploy.training.runfiles import append_metrics

        val = self.validate()
        self.epoch, self.batch = self.epoch + 1, 0
        improved = self.best_val is None or val < self.best_val
        if improved:
            self.best_val, self.best_epoch = val, self.epoch
        if self.ctx.is_main:
            append_metrics(self.rundir, {"kind": "val", "epoch": self.epoch, "step": self.step,
                                         "val_loss": val, "val_rmse": math.sqrt(val), "best": improved})
            log.info("epoch %d validation loss %.6f%s", self.epoch, val, " (best)" if improved else "")
            if improved:
                self.save_checkpoint("best", val)
            self.save_checkpoint("last", val)
            self.save_state()
        self.ctx.barrier()
        return val
