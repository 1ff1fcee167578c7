"""Streaming loader: shuffles, sharding across ranks, bounded memory, clean shutdown, validation split."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.errors import ConfigError, StoreError
from cryodeploy.training.adopt import adopt_raw_store
from cryodeploy.training.loader import LoaderConfig, StreamingLoader, epoch_order, split_indices
from cryodeploy.training.store import PatchStore, StoreWriter


def _indexed_store(path: Path, n: int, patch: int = 8) -> PatchStore:
    """Patch i is constant i (input) and -i (target), so a batch tells which patches it holds."""
    values = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, patch, patch), np.float32)
    with StoreWriter(path, patch) as w:
        w.append("train", values, -values)
        return w.finish()


def _epoch(loader: StreamingLoader) -> list[np.ndarray]:
    seen = []
    for inputs, targets in loader:
        assert inputs.dtype.is_floating_point and inputs.shape[1:] == (1, *loader.store.patch)
        assert targets is not None and (targets == -inputs).all()
        ids = inputs[:, 0, 0, 0].numpy()
        assert (inputs == inputs[:, :, :1, :1]).all()  # every pixel of a patch is its id
        seen.append(ids.astype(np.int64))
    return seen


@pytest.fixture(scope="module")
def store48(tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    return _indexed_store(tmp_path_factory.mktemp("s48") / "s", 48)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_patch_exactly_once_per_epoch_across_ranks(store48: PatchStore, world: int) -> None:
    config = LoaderConfig(batch_size=4, seed=7, chunk=8)
    for epoch in (0, 1):
        got: list[int] = []
        lengths = set()
        for rank in range(world):
            loader = StreamingLoader(store48, "train", None, config, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            batches = _epoch(loader)
            assert len(batches) == len(loader) == 48 // (4 * world)
            assert [list(b) for b in batches] == [list(b) for b in loader.batch_indices()]
            lengths.add(len(batches))
            got.extend(np.concatenate(batches))
        assert len(lengths) == 1
        np.testing.assert_array_equal(np.sort(got), np.arange(48))


def test_truncate_and_pad_give_equal_batches_per_rank(tmp_path: Path) -> None:
    store = _indexed_store(tmp_path / "s", 50)
    trunc = [StreamingLoader(store, "train", None, LoaderConfig(4, seed=1), r, 3) for r in range(3)]
    assert [len(x) for x in trunc] == [4, 4, 4]
    dropped = []
    for epoch in (0, 1):
        ids: list[int] = []
        for x in trunc:
            x.set_epoch(epoch)
            ids.extend(np.concatenate(x.batch_indices()))
        assert len(ids) == len(set(ids)) == 48  # at most once, 2 skipped
        dropped.append(set(range(50)) - set(ids))
    assert dropped[0] != dropped[1]  # a different pair is skipped each epoch
    pad = [
        StreamingLoader(store, "train", None, LoaderConfig(4, seed=1, drop_last=False), r, 3)
        for r in range(3)
    ]
    assert [len(x) for x in pad] == [5, 5, 5]  # 17 patches each, the last batch holds 1
    padded = np.concatenate([np.concatenate(_epoch(x)) for x in pad])
    assert padded.size == 51 and set(padded) == set(range(50))  # every patch, one repeated


def test_shuffle_is_deterministic_by_seed_and_epoch(store48: PatchStore) -> None:
    def order(seed: int, epoch: int, **kw: object) -> list[int]:
        loader = StreamingLoader(store48, "train", None, LoaderConfig(4, seed=seed, chunk=16, **kw))  # type: ignore[arg-type]
        loader.set_epoch(epoch)
        return [int(i) for b in loader.batch_indices() for i in b]

    assert order(3, 5) == order(3, 5)
    assert order(3, 5) != order(3, 6) and order(3, 5) != order(4, 5)
    assert order(3, 5, shuffle=False) == list(range(48)) == order(9, 1, shuffle=False)
    loader = StreamingLoader(store48, "train", None, LoaderConfig(4, seed=3, chunk=16))
    loader.set_epoch(2)
    for batch in loader.batch_indices():  # chunk 16 = 4 batches: a batch never leaves its chunk
        assert len(set(batch // 16)) == 1
    assert sorted(int(b[0] // 16) for b in loader.batch_indices()[::4]) == [0, 1, 2]
    chunk_orders = set()
    for epoch in range(8):
        loader.set_epoch(epoch)
        chunk_orders.add(tuple(int(b[0] // 16) for b in loader.batch_indices()[::4]))
    assert len(chunk_orders) > 1  # the chunk order is shuffled, too
    np.testing.assert_array_equal(np.sort(epoch_order(np.arange(10), 3, 0, 0)), np.arange(10))


def test_subset_indices_and_validation_split(store48: PatchStore) -> None:
    train, val = split_indices(48, 0.25, seed=11)
    assert train.size == 36 and val.size == 12 and not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(48))
    t2, v2 = split_indices(48, 0.25, seed=11)
    assert (
        (t2 == train).all() and (v2 == val).all() and not (split_indices(48, 0.25, seed=12)[1] == val).all()
    )
    groups = [(0, 10), (10, 20), (30, 18)]
    gt, gv = split_indices(48, 0.3, seed=0, groups=groups)
    assert any(set(gv) == set(range(s, s + c)) for s, c in groups)  # exactly one whole micrograph
    assert not set(gt) & set(gv) and gt.size + gv.size == 48
    loader = StreamingLoader(store48, "train", val, LoaderConfig(3, seed=0))
    assert sorted(np.concatenate(_epoch(loader))) == sorted(val)
    with pytest.raises(ConfigError, match="groups cover 10 patches, expected 48"):
        split_indices(48, 0.1, 0, groups=[(0, 10)])


def test_split_without_targets(tmp_path: Path) -> None:
    np.arange(6 * 16, dtype="<f4").tofile(tmp_path / "train_input.bin")
    store = adopt_raw_store(tmp_path, 4)
    loader = StreamingLoader(store, "train", None, LoaderConfig(2, shuffle=False), pin_memory=True)
    assert loader.memory_bytes == 2 * 2 * 64
    batches = list((x.clone(), y) for x, y in loader)
    assert len(batches) == 3 and all(y is None for _, y in batches)
    assert float(batches[2][0][1, 0, 3, 3]) == 6 * 16 - 1


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loader")]


def test_next_epoch_reuses_the_buffers(store48: PatchStore) -> None:
    loader = StreamingLoader(store48, "train", None, LoaderConfig(4, buffers=3, seed=1))
    pointers = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        pointers.append(set())
        for (x, _), ids in zip(loader, loader.batch_indices(), strict=True):
            np.testing.assert_array_equal(x[:, 0, 0, 0].numpy(), ids)
            pointers[-1].add(x.data_ptr())
    assert len(pointers[0]) == 3 and pointers[0] == pointers[1]


def test_breaking_out_early_stops_the_reader(store48: PatchStore) -> None:
    loader = StreamingLoader(store48, "train", None, LoaderConfig(2, buffers=3, threads=3))
    t0 = time.perf_counter()
    for k, _ in enumerate(loader):
        if k == 1:
            break
    gc.collect()
    assert _loader_threads() == [] and time.perf_counter() - t0 < 5
    it = iter(loader)
    next(it)
    it.close()  # explicit close, too
    assert _loader_threads() == []
    with pytest.raises(StopIteration):
        next(it)


def test_read_errors_reach_the_consumer(tmp_path: Path) -> None:
    store = _indexed_store(tmp_path / "s", 20)
    loader = StreamingLoader(store, "train", None, LoaderConfig(4, shuffle=False))
    with open(tmp_path / "s" / "train_input.bin", "r+b") as fh:
        fh.truncate(8 * 8 * 4 * 10)  # the store shrinks after it was opened
    with pytest.raises(StoreError, match="shorter than its manifest"):
        _epoch(loader)
    assert _loader_threads() == []


def test_bad_loader_arguments(store48: PatchStore) -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        LoaderConfig(0)
    with pytest.raises(ConfigError, match="rank 3 invalid"):
        StreamingLoader(store48, "train", None, LoaderConfig(4), rank=3, world_size=3)
    with pytest.raises(ConfigError, match="expected at least 64"):
        StreamingLoader(store48, "train", None, LoaderConfig(16), world_size=4)


_RSS_SCRIPT = """
import sys
from cryodeploy.training.loader import LoaderConfig, StreamingLoader
from cryodeploy.training.store import PatchStore
store = PatchStore(sys.argv[1])
loader = StreamingLoader(store, "train", None, LoaderConfig(16, chunk=64))
n = sum(x.shape[0] for x, _ in loader)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(n, hwm * 1024)
"""


def _loader_peak(store: Path) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(store)], capture_output=True, text=True, check=True
    )
    n, peak = out.stdout.split()
    return int(n), int(peak)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_loader_memory_does_not_grow_with_store_size(tmp_path: Path) -> None:
    """One epoch over 4,000 64x64 pairs (131 MB) vs 400 (13 MB): peak RSS within 10 MB."""
    small, big = _indexed_store(tmp_path / "small", 400, 64), _indexed_store(tmp_path / "big", 4000, 64)
    (n_small, rss_small), (n_big, rss_big) = _loader_peak(small.path), _loader_peak(big.path)
    assert (n_small, n_big) == (400, 4000)
    held = 4000 * 2 * 64 * 64 * 4
    assert rss_big - rss_small < 10 * 2**20, (rss_small, rss_big, held)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_pinned_buffers_survive_late_non_blocking_copies(tmp_path: Path) -> None:
    """The copy of batch k is queued behind a long GPU kernel, and batch k+1 is requested at once;
    the loader must wait for that copy (CUDA event) before refilling the pinned buffer."""
    import torch

    store = _indexed_store(tmp_path / "s", 1024, 64)
    loader = StreamingLoader(store, "train", None, LoaderConfig(64, seed=0), pin_memory=True)
    copies, expected = [], []
    for epoch in (0, 1):  # the second epoch reuses the first one's buffers
        loader.set_epoch(epoch)
        expected += loader.batch_indices()
        for inputs, targets in loader:
            assert inputs.is_pinned() and targets is not None and targets.is_pinned()
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU work ahead of the copies on this stream
            copies.append((inputs.to("cuda", non_blocking=True), targets.to("cuda", non_blocking=True)))
    torch.cuda.synchronize()
    for (x, y), ids in zip(copies, expected, strict=True):
        assert (x[:, 0, 0, 0].cpu().numpy() == ids).all() and bool((y == -x).all())
