"""Where the trainer's batches come from: a patch store (:class:`StoreBatches`), micrographs simulated
on the fly (:class:`SimBatches`, from a :class:`SimulatedData`) or patches in memory
(:class:`ArrayBatches`, from an :class:`ArrayData`: 2-D images or 3-D volumes). All give the
:class:`~cryodeploy.training.trainer.Trainer` the same things: the batches of an epoch from a given
batch on, a fixed validation set, the images' normalization and the facts a resume must find unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cryodeploy.errors import ConfigError, StoreError
from cryodeploy.imaging.normalize import NormSpec

if TYPE_CHECKING:
    import torch

    from cryodeploy.imaging.simulate import SimConfig
    from cryodeploy.training.config import TrainConfig
    from cryodeploy.training.distributed import DistContext

__all__ = ["ArrayBatches", "ArrayData", "BatchSource", "SimBatches", "SimulatedData", "StoreBatches",
           "make_source", "sampler_label"]

log = logging.getLogger(__name__)


class Batches(Protocol):
    """An epoch's batches (input, target or None); ``close`` releases the loader's threads and buffers."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def close(self) -> None: ...


#: Seed offset of the simulated validation set (never a training step's seed: those are hashed).
VAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class SimulatedData:
    """``train --simulate``: micrographs of ``sim`` simulated every step, ``crops_per_image`` crops of
    ``crop`` px from each, each simulation serving ``redraws`` more steps at fresh doses
    (:class:`~cryodeploy.training.simsource.SimSource`); an epoch is ``steps_per_epoch`` batches;
    validation on ``val_images`` whole simulated micrographs of their own seed."""

    sim: SimConfig
    crop: int = 256
    crops_per_image: int = 4
    steps_per_epoch: int = 200
    val_images: int = 8
    redraws: int = 0

    def __post_init__(self) -> None:
        for name in ("crop", "crops_per_image", "steps_per_epoch", "val_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"simulated data: {name} must be >= 1, found {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in the checkpoints)."""
        return {"sim": self.sim.to_dict(), "crop": self.crop, "crops_per_image": self.crops_per_image,
                "steps_per_epoch": self.steps_per_epoch, "val_images": self.val_images,
                "redraws": self.redraws}


@dataclass(frozen=True, eq=False, repr=False)
class ArrayData:
    """Training patches in memory: ``inputs`` ``[N, 1, H, W]`` images or ``[N, 1, D, H, W]`` volumes,
    already normalized (as a store's patches are, with ``normalization``); ``targets`` of the same
    shape (clean, or an independent noisy draw for Noise2Noise), or None for self-supervision."""

    inputs: np.ndarray
    targets: np.ndarray | None = None
    normalization: NormSpec = field(default_factory=NormSpec)

    def __post_init__(self) -> None:
        shape = self.inputs.shape
        if self.inputs.ndim not in (4, 5) or shape[1] != 1 or shape[0] < 2:
            raise ConfigError(f"training arrays of shape {shape}, expected [N, 1, H, W] or [N, 1, D, H, W] "
                              "with N >= 2")
        if self.targets is not None and self.targets.shape != shape:
            raise ConfigError(f"training targets of shape {self.targets.shape}, expected the inputs' {shape}")

    def __repr__(self) -> str:
        """One line for messages: the shape, and whether there are targets."""
        targets = " with targets" if self.targets is not None else ""
        return f"training arrays {list(self.inputs.shape)}{targets}"


class BatchSource:
    """The interface: ``paired``, ``patch``, ``normalization``, ``describe``, ``key``, ``n_train``,
    ``n_val``, ``steps_per_epoch``, ``train_batches(epoch, skip)``, ``val_batches()``; ``on_device``
    says the batches are already on the training device. ``patch`` has two sides (images) or three
    (volumes)."""

    paired: bool
    on_device: bool = False
    patch: tuple[int, ...]
    normalization: NormSpec
    n_train: int
    n_val: int
    steps_per_epoch: int

    def describe(self) -> dict[str, Any]:
        """What the checkpoint's ``training`` field records about the data."""
        raise NotImplementedError

    @property
    def key(self) -> list[Any]:
        """The data facts a resumed run must find unchanged."""
        raise NotImplementedError

    def train_batches(self, epoch: int, skip: int) -> Batches:
        """This rank's batches of ``epoch`` from batch ``skip`` on (close it when done)."""
        raise NotImplementedError

    def val_batches(self) -> Batches:
        """This rank's share of the fixed validation set."""
        raise NotImplementedError


def sampler_label(record: dict[str, Any]) -> str:
    """A store manifest's ``sampler`` in one string, e.g. "numpy" or "torch cuda NVIDIA H200"."""
    return " ".join(str(record[k]) for k in ("name", "device", "device_name") if record.get(k))


class StoreBatches(BatchSource):
    """Batches of a patch store (:mod:`cryodeploy.training.loader`); whole micrographs go to validation."""

    def __init__(self, store_path: Path, config: TrainConfig, ctx: DistContext) -> None:
        from cryodeploy.training.distributed import GlobalBatchLoader
        from cryodeploy.training.loader import LoaderConfig, StreamingLoader, split_indices
        from cryodeploy.training.store import PatchStore

        self.store = store = PatchStore(store_path)
        if "train" not in store.splits:
            raise StoreError(f"{store_path}: no 'train' split, found {', '.join(store.splits)}")
        self.paired = config.method != "neighbor2neighbor"
        if self.paired and not store.has_target("train"):
            raise StoreError(f"{store_path}: split 'train' has no targets, expected input/target pairs for "
                             f"--method {config.method}; use --method neighbor2neighbor")
        self.patch = tuple(store.patch)  # type: ignore[assignment]
        if not store.manifest.get("normalization"):
            log.warning("%s: the store records no normalization; the model assumes the default (robust)",
                        store.path)
        self.normalization = NormSpec.from_dict(store.manifest.get("normalization") or {})
        c = config
        n = store.count("train")
        groups = store.groups("train")
        groups = groups if groups and len(groups) > 1 else None  # no patch leaks across
        train_idx, val_idx = split_indices(n, c.val_split, c.seed, groups)
        if val_idx.size < ctx.world_size:
            raise ConfigError(f"{store_path}: {val_idx.size} validation patches for {ctx.world_size} "
                              f"process(es) (val_split {c.val_split} of {n}); need at least one each")
        pin = ctx.device.type == "cuda"
        per_rank = c.batch // ctx.world_size
        self.train_loader = GlobalBatchLoader(store, "train", train_idx, LoaderConfig(
            per_rank, shuffle=True, seed=c.seed, buffers=c.buffers, threads=c.loader_threads),
            ctx.rank, ctx.world_size, pin)
        # validation: a disjoint strided share per rank, no padding, sums all-reduced -> the exact mean
        val_config = LoaderConfig(per_rank, shuffle=False, drop_last=False, buffers=c.buffers,
                                  threads=c.loader_threads)
        self.val_loader = StreamingLoader(store, "train", val_idx[ctx.rank::ctx.world_size], val_config,
                                          pin_memory=pin)
        self.steps_per_epoch = min(len(self.train_loader), c.max_batches or len(self.train_loader))
        self.n_train, self.n_val = int(train_idx.size), int(val_idx.size)
        self.sampler = store.manifest.get("sampler")

    def describe(self) -> dict[str, Any]:
        manifest = self.store.manifest
        return {"store": str(self.store.path), "targets": manifest.get("targets"),
                "noise": dict(manifest.get("noise") or {}), "sampler": self.sampler}

    @property
    def key(self) -> list[Any]:
        """(patch H, W, train, val), and the sampler that drew the store's noise when the manifest
        records one: a run resumed on a store remade by another sampler would mix two draws."""
        sampler = [sampler_label(self.sampler)] if self.sampler else []
        return [*self.patch, self.n_train, self.n_val, *sampler]

    def train_batches(self, epoch: int, skip: int) -> Batches:
        self.train_loader.set_epoch(epoch)
        self.train_loader.skip = skip
        return iter(self.train_loader)

    def val_batches(self) -> Batches:
        return iter(self.val_loader)


class SimBatches(BatchSource):
    """Supervised batches simulated on the training device (:mod:`cryodeploy.training.simsource`).

    Rank ``r`` of ``K`` simulates global steps ``k * K + r``: its own images, the same ones for a given
    (seed, step, rank), so a resumed run continues with the batches it would have seen.
    """

    paired = True
    on_device = True

    def __init__(self, data: SimulatedData, config: TrainConfig, ctx: DistContext) -> None:
        from cryodeploy.training.simsource import SimSource

        if config.method != "supervised":
            raise ConfigError(f"--simulate trains with --method supervised (exact clean targets), "
                              f"found {config.method}")
        if config.batch % ctx.world_size or (config.batch // ctx.world_size) % data.crops_per_image:
            raise ConfigError(f"batch {config.batch} per process must be a multiple of crops_per_image "
                              f"{data.crops_per_image}")
        self.data, self.ctx, self.batch = data, ctx, config.batch // ctx.world_size
        self.source = SimSource(data.sim, crop=data.crop, crops_per_image=data.crops_per_image,
                                batch=self.batch, seed=config.seed, redraws=data.redraws)
        self.patch = (data.crop, data.crop)
        self.normalization = self.source.normalization
        self.steps_per_epoch = min(data.steps_per_epoch, config.max_batches or data.steps_per_epoch)
        self.n_train = self.steps_per_epoch * config.batch
        self.n_val = data.val_images
        self.val_seed = config.seed + VAL_SEED_OFFSET
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        return {"simulated": self.data.to_dict(), "targets": "clean (simulated, exact)",
                "val_seed": self.val_seed}

    @property
    def key(self) -> list[Any]:
        """(patch H, W, train, val), and the redraws when there are any: they change every batch."""
        redraws = [f"redraws {self.data.redraws}"] if self.data.redraws else []
        return [*self.patch, self.n_train, self.n_val, *redraws]

    def train_batches(self, epoch: int, skip: int) -> Batches:
        from cryodeploy.training.simsource import sim_batches

        k, r = self.ctx.world_size, self.ctx.rank
        start = (epoch * self.steps_per_epoch + skip) * k + r
        batches = sim_batches(self.source, self.ctx.device, start=start, stride=k)
        try:
            for _ in range(skip, self.steps_per_epoch):
                yield next(batches)
        finally:
            batches.close()  # type: ignore[attr-defined]

    def val_batches(self) -> Batches:
        from cryodeploy.training.simsource import sim_images

        if self._val is None:
            x, y = sim_images(self.data.sim, self.data.val_images, self.val_seed, self.ctx.device)
            self._val = (x[self.ctx.rank::self.ctx.world_size], y[self.ctx.rank::self.ctx.world_size])
        x, y = self._val
        for i in range(0, x.shape[0], self.batch):
            yield x[i:i + self.batch], y[i:i + self.batch]


class ArrayBatches(BatchSource):
    """Batches of an :class:`ArrayData`: a deterministic split
    (:func:`~cryodeploy.training.loader.split_indices`) and a shuffle per (seed, epoch); each step's
    global batch is split between the ranks, as the store loader does."""

    def __init__(self, data: ArrayData, config: TrainConfig, ctx: DistContext) -> None:
        from cryodeploy.training.loader import split_indices

        self.paired = config.method != "neighbor2neighbor"
        if self.paired and data.targets is None:
            raise ConfigError(f"training arrays have no targets, expected them for --method {config.method}")
        self.data, self.config, self.ctx = data, config, ctx
        self.patch = tuple(int(n) for n in data.inputs.shape[2:])
        self.normalization = data.normalization
        self.train_idx, self.val_idx = split_indices(data.inputs.shape[0], config.val_split, config.seed)
        if self.val_idx.size < ctx.world_size:
            raise ConfigError(f"training arrays: {self.val_idx.size} validation patches for {ctx.world_size} "
                              f"process(es); need at least one each")
        full = self.train_idx.size // config.batch
        if full < 1:
            raise ConfigError(f"training arrays: {self.train_idx.size} training patches, fewer than a batch "
                              f"of {config.batch}")
        self.steps_per_epoch = min(full, config.max_batches or full)
        self.n_train, self.n_val = int(self.train_idx.size), int(self.val_idx.size)

    def describe(self) -> dict[str, Any]:
        return {"arrays": list(self.data.inputs.shape), "targets": "given" if self.paired else None}

    @property
    def key(self) -> list[Any]:
        return [*self.patch, self.n_train, self.n_val]

    def _batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.data.inputs[idx], np.float32))
        t = self.data.targets
        if not self.paired or t is None:
            return x, None
        return x, torch.from_numpy(np.ascontiguousarray(t[idx], np.float32))

    def train_batches(self, epoch: int, skip: int) -> Batches:
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_idx)
        b, k, r = self.config.batch, self.ctx.world_size, self.ctx.rank
        for step in range(skip, self.steps_per_epoch):
            yield self._batch(order[step * b:(step + 1) * b][r::k])

    def val_batches(self) -> Batches:
        share = self.val_idx[self.ctx.rank::self.ctx.world_size]
        per_rank = self.config.batch // self.ctx.world_size
        for i in range(0, share.size, per_rank):
            yield self._batch(share[i:i + per_rank])


def make_source(data: str | Path | SimulatedData | ArrayData, config: TrainConfig, ctx: DistContext
                ) -> BatchSource:
    """A store path's, a :class:`SimulatedData`'s or an :class:`ArrayData`'s batch source."""
    if isinstance(data, SimulatedData):
        return SimBatches(data, config, ctx)
    if isinstance(data, ArrayData):
        return ArrayBatches(data, config, ctx)
    return StoreBatches(Path(data), config, ctx)
