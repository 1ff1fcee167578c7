"""A double-buffered streaming loader over a :class:`~cryodeploy.training.store.PatchStore`.

Memory: ``buffers x batch bytes`` (batch bytes = batch_size x patch voxels x 4, twice that with
targets), allocated once per epoch and reused; the data set is never held. A background
thread fills free buffers while the training loop consumes the current one.

Order: an epoch's order is a pure function of (seed, epoch): the sorted indices are cut into
chunks of ``chunk`` consecutive patches, the chunk order is shuffled and each chunk is
shuffled inside, so disk reads stay mostly local. Within a batch, patches are read (and
returned) in ascending index order, merging consecutive ones into one read.

Sharding (DDP): the epoch order is cut into ``world_size`` contiguous, disjoint blocks, one
per rank, each of the same length. ``drop_last=True`` (default) truncates the order to a
multiple of ``world_size x batch_size`` (every batch full; fewer than that many patches are
skipped per epoch, different ones each epoch). ``drop_last=False`` pads the order with its own
first patches to a multiple of ``world_size`` (every patch at least once, fewer than
``world_size`` repeated; the last batch of a rank may be smaller). Either way every rank
yields the same number of batches, as DDP requires.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.training.store import PatchStore, held_out_mask

if TYPE_CHECKING:
    import torch

__all__ = ["LoaderConfig", "StreamingLoader", "epoch_order", "split_indices"]


@dataclass(frozen=True)
class LoaderConfig:
    """Batch size, shuffling (``seed``, ``chunk`` consecutive patches), ``buffers`` in memory,
    ``threads`` reading each batch in parallel, and what to do with a last partial batch."""

    batch_size: int
    shuffle: bool = True
    seed: int = 0
    buffers: int = 2
    chunk: int = 64
    drop_last: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_size", "buffers", "chunk", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loader {name} must be >= 1, found {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"loader seed must be >= 0, found {self.seed}")


def split_indices(
    n: int, val_fraction: float, seed: int, groups: Sequence[tuple[int, int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) split of patch indices 0..n-1, both sorted int64.

    With ``groups`` ((start, count) per source micrograph, e.g. :meth:`PatchStore.groups`) whole
    micrographs go to validation, so no micrograph has patches on both sides. With
    ``val_fraction`` > 0 and at least two units, both sides get at least one unit.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction {val_fraction} invalid, expected 0 <= f < 1")
    units = [np.arange(s, s + c) for s, c in groups] if groups else [np.arange(i, i + 1) for i in range(n)]
    if sum(u.size for u in units) != n:
        raise ConfigError(f"groups cover {sum(u.size for u in units)} patches, expected {n}")
    is_val = held_out_mask(len(units), val_fraction, seed, stream=2)
    pick = [u for u, v in zip(units, is_val, strict=True) if v]
    val = np.sort(np.concatenate(pick)) if pick else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return train.astype(np.int64), val.astype(np.int64)


def epoch_order(indices: np.ndarray, chunk: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of one epoch: chunks of ``chunk`` sorted indices, chunk order and chunk contents shuffled."""
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    if not shuffle:
        return idx
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(0, idx.size, chunk)
    return np.concatenate([rng.permutation(idx[s : s + chunk]) for s in rng.permutation(starts)] or [idx])


class StreamingLoader:
    """Batches ``(inputs, targets)`` of float32 tensors [B, 1, H, W] ([B, 1, D, H, W] from a store of
    volumes) from one split of a store.

    ``indices`` (None = the whole split) are taken as a set. ``targets`` is None when the split
    has none. Memory is ``buffers x batch bytes``
    (see :attr:`memory_bytes`); buffers are pinned when ``pin_memory`` and CUDA is available.
    The yielded tensors are views of a reused buffer, valid until the next batch is requested
    (buffers pass from one epoch to the next):
    copy them (``.to(device, non_blocking=True)`` on the current CUDA stream is safe: a CUDA
    event makes the loader wait for the copy before refilling) or ``.clone()`` them to keep them.
    Call :meth:`set_epoch` before each epoch (as with DistributedSampler); leaving a loop early
    stops the reader thread.
    """

    def __init__(
        self,
        store: PatchStore,
        split: str,
        indices: Sequence[int] | np.ndarray | None,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} invalid for world size {world_size}")
        n_split = store.count(split)
        idx = (
            np.arange(n_split, dtype=np.int64)
            if indices is None
            else np.unique(np.asarray(indices, np.int64))
        )
        if idx.size and (idx[0] < 0 or idx[-1] >= n_split):
            raise ConfigError(f"loader indices out of range 0..{n_split - 1} of split {split!r}")
        b = config.batch_size
        self.per_rank = (
            (idx.size // (world_size * b)) * b if config.drop_last else math.ceil(idx.size / world_size)
        )
        if self.per_rank == 0:
            raise ConfigError(
                f"{store.path}: split {split!r} has {idx.size} patches to load, expected at least "
                f"{world_size * b if config.drop_last else 1} (world size {world_size} x batch {b})"
            )
        self.store, self.split, self.indices, self.config = store, split, idx, config
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.epoch = 0
        # the buffers of the last finished epoch, reused by the next (pinning memory is slow)
        self._spare: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, found {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.config.batch_size)

    @property
    def has_target(self) -> bool:
        """Whether batches carry targets."""
        return self.store.has_target(self.split)

    @property
    def batch_bytes(self) -> int:
        """Bytes of one full batch (inputs and targets)."""
        return self.config.batch_size * self.store.patch_bytes * (2 if self.has_target else 1)

    @property
    def memory_bytes(self) -> int:
        """The loader's data memory: buffers x batch bytes."""
        return self.config.buffers * self.batch_bytes

    def batch_indices(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, each a sorted array of patch indices."""
        c = self.config
        order = epoch_order(self.indices, c.chunk, c.seed, self.epoch, c.shuffle)
        total = self.per_rank * self.world_size
        order = order[:total] if total <= order.size else np.concatenate([order, order[: total - order.size]])
        mine = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return [np.sort(mine[i : i + c.batch_size]) for i in range(0, mine.size, c.batch_size)]

    def __iter__(self) -> _EpochIterator:
        return _EpochIterator(self)


def _allocate(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    import torch

    return torch.empty(shape, dtype=torch.float32, pin_memory=pin)


def _produce(
    store: PatchStore,
    split: str,
    batches: list[np.ndarray],
    bufs: list[list[Any]],
    free: queue.Queue[Any],
    ready: queue.Queue[Any],
    stop: threading.Event,
    threads: int,
) -> None:
    """Reader thread: fill free buffers with the batches in order until done or ``stop`` is set."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="loader-read") if threads > 1 else None
    try:
        for idx in batches:
            item = free.get()
            if item is None or stop.is_set():
                return
            slot, event = item
            if event is not None:
                event.synchronize()
            present = [
                (which, arr)
                for which, arr in zip(("input", "target"), bufs[slot], strict=True)
                if arr is not None
            ]
            parts = min(idx.size, math.ceil(threads / len(present)))
            jobs = [
                (which, idx[p[0] : p[-1] + 1], arr[p[0] : p[-1] + 1])
                for which, arr in present
                for p in np.array_split(np.arange(idx.size), parts)
            ]
            if pool is None:
                for which, sub, out in jobs:
                    store.read(split, sub, which, out=out)
            else:
                for fut in [pool.submit(store.read, split, sub, which, out) for which, sub, out in jobs]:
                    fut.result()
            ready.put((slot, idx.size))
    except BaseException as err:  # handed to the consumer, which re-raises it
        ready.put(err)
    finally:
        if pool is not None:
            pool.shutdown()


class _EpochIterator:
    """One epoch of a :class:`StreamingLoader`; owns the buffers and the reader thread."""

    def __init__(self, loader: StreamingLoader) -> None:
        import torch

        self._loader = loader
        self._batches = loader.batch_indices()
        self._pin = loader.pin_memory and torch.cuda.is_available()
        b, patch, c = loader.config.batch_size, tuple(loader.store.patch), loader.config
        spare, loader._spare = loader._spare, None
        self._tensors = spare or [
            (
                _allocate((b, 1, *patch), self._pin),
                _allocate((b, 1, *patch), self._pin) if loader.has_target else None,
            )
            for _ in range(c.buffers)
        ]
        arrays = [
            [t.numpy().reshape(b, *patch) if t is not None else None for t in pair] for pair in self._tensors
        ]
        self._free: queue.Queue[Any] = queue.Queue()
        self._ready: queue.Queue[Any] = queue.Queue()
        for slot in range(c.buffers):
            self._free.put((slot, None))
        self._held: int | None = None
        self._next = 0
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            name="loader",
            daemon=True,
            args=(
                loader.store,
                loader.split,
                self._batches,
                arrays,
                self._free,
                self._ready,
                self._stop,
                c.threads,
            ),
        )
        self._thread.start()

    def __iter__(self) -> _EpochIterator:
        return self

    def __len__(self) -> int:
        return len(self._batches) - self._next

    def _release(self) -> None:
        if self._held is None:
            return
        event = None
        if self._pin:
            import torch

            event = torch.cuda.Event()
            event.record()
        self._free.put((self._held, event))
        self._held = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._release()
        if self._closed or self._next >= len(self._batches):
            self.close()
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        slot, n = item
        self._held = slot
        self._next += 1
        inputs, targets = self._tensors[slot]
        return inputs[:n], targets[:n] if targets is not None else None

    def close(self) -> None:
        """Stop the reader thread (it finishes at most the batch it is reading) and hand the
        buffers to the loader's next epoch, once no device copy from them is pending."""
        if self._closed:
            return
        self._stop_reader()
        if self._pin:
            import torch

            torch.cuda.synchronize()  # once per epoch: copies queued on any stream have read the buffers
        self._loader._spare = self._tensors

    def _stop_reader(self) -> None:
        self._closed = True
        self._stop.set()
        self._free.put(None)
        self._thread.join()

    def __del__(self) -> None:
        if hasattr(self, "_thread") and not self._closed:
            self._stop_reader()  # its buffers are dropped, not handed on
