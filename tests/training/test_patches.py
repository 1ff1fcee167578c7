"""Patch store format: exact round trips, adopting raw seeds-style files, one-line errors for bad stores."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.errors import OutputError, StoreError
from cryodeploy.training.adopt import adopt_raw_store
from cryodeploy.training.store import FORMAT, MANIFEST, PatchStore, StoreWriter


def _write_store(
    path: Path, rng: np.random.Generator, counts: dict[str, int], patch: tuple[int, int] = (16, 24)
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data = {
        s: (
            rng.standard_normal((n, *patch)).astype(np.float32),
            rng.standard_normal((n, *patch)).astype(np.float32),
        )
        for s, n in counts.items()
    }
    with StoreWriter(path, patch) as w:
        for split, (inp, tgt) in data.items():
            for lo in range(0, inp.shape[0], 7):  # several appends, as preprocess does
                w.append(split, inp[lo : lo + 7], tgt[lo : lo + 7])
        w.finish(sources=[])
    return data


def test_round_trip_is_exact_in_any_order(tmp_path: Path, rng: np.random.Generator) -> None:
    data = _write_store(tmp_path / "s", rng, {"train": 30, "test": 5})
    store = PatchStore(tmp_path / "s")
    assert store.patch == (16, 24) and store.splits == ("train", "test")
    assert store.count("train") == 30 and store.count("test") == 5 and store.has_target("train")
    m = store.manifest
    assert m["format"] == FORMAT and m["dtype"] == "float32" and m["byte_order"] == "little"
    assert m["splits"]["train"] == {"input": "train_input.bin", "target": "train_target.bin", "count": 30}
    order = np.array([29, 3, 4, 5, 6, 0, 0, 17, 16])  # reversed, runs, repeats
    np.testing.assert_array_equal(store.read("train", order), data["train"][0][order])
    np.testing.assert_array_equal(store.read("train", order, "target"), data["train"][1][order])
    np.testing.assert_array_equal(store.read("test", range(5), "target"), data["test"][1])
    out = np.full((2, 16, 24), np.nan, np.float32)
    assert store.read("train", [10, 11], out=out) is out
    np.testing.assert_array_equal(out, data["train"][0][10:12])
    assert (tmp_path / "s" / "train_input.bin").stat().st_size == 30 * 16 * 24 * 4
    with pytest.raises(IndexError):
        store.read("train", [30])
    with pytest.raises(StoreError, match="no split 'val'"):
        store.count("val")
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read("test", [4]), data["test"][0][4:5])


def test_reserved_slots_filled_from_threads_in_any_order(tmp_path: Path, rng: np.random.Generator) -> None:
    from concurrent.futures import ThreadPoolExecutor

    inp = rng.standard_normal((40, 8, 8)).astype(np.float32)
    with StoreWriter(tmp_path / "s", 8) as w:
        starts = [w.reserve("train", 10) for _ in range(4)]
        assert starts == [0, 10, 20, 30]
        with pytest.raises(ValueError, match=r"slots 35\.\.44 of 'train' were not reserved"):
            w.write_at("train", 35, inp[:10], -inp[:10])
        with ThreadPoolExecutor(4) as pool:  # last reservation first
            list(pool.map(lambda a: w.write_at("train", a, inp[a : a + 10], -inp[a : a + 10]), starts[::-1]))
        store = w.finish()
    np.testing.assert_array_equal(store.read("train", range(40)), inp)
    np.testing.assert_array_equal(store.read("train", range(40), "target"), -inp)


def test_write_behind_keeps_the_bytes(tmp_path: Path, rng: np.random.Generator) -> None:
    """Slots handed to the disk early (also those of a store without targets, and none at all) read
    back exactly, as do the slots written after them."""
    inp = rng.standard_normal((40, 8, 8)).astype(np.float32)
    for targets in (True, False):
        with StoreWriter(tmp_path / f"s{targets}", 8, targets=targets) as w:
            for first in range(0, 40, 10):
                w.append("train", inp[first : first + 10], -inp[first : first + 10] if targets else None)
                w.write_behind("train", first, 10)
            w.write_behind("test", 0, 0)
            store = w.finish()
        np.testing.assert_array_equal(store.read("train", range(40)), inp)
        assert store.has_target("train") == targets
        if targets:
            np.testing.assert_array_equal(store.read("train", range(40), "target"), -inp)


def test_writer_refuses_existing_and_incomplete_stores(tmp_path: Path, rng: np.random.Generator) -> None:
    _write_store(tmp_path / "s", rng, {"train": 3})
    with pytest.raises(OutputError, match="already exists"):
        StoreWriter(tmp_path / "s", 16)
    (tmp_path / "s" / MANIFEST).unlink()
    with pytest.raises(OutputError, match="incomplete"):
        StoreWriter(tmp_path / "s", 16)
    with pytest.raises(StoreError, match=r"no manifest\.json.*--adopt"):
        PatchStore(tmp_path / "s")
    data = _write_store(tmp_path / "s2", rng, {"train": 2})
    w = StoreWriter(tmp_path / "s2", (16, 24), overwrite=True)
    assert not (tmp_path / "s2" / MANIFEST).exists()  # incomplete from the first write on
    w.append("train", data["train"][0][:1], data["train"][1][:1])
    assert w.finish().count("train") == 1


def test_writer_abort_removes_data(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", 8) as w:
        w.append("train", np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32))
        raise RuntimeError("boom")
    assert list((tmp_path / "s").iterdir()) == []


def _raw(path: Path, name: str, n: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    arr = rng.standard_normal((n, patch, patch)).astype("<f4")
    path.mkdir(exist_ok=True)
    arr.tofile(path / name)
    return arr


def test_adopt_raw_store(tmp_path: Path, rng: np.random.Generator) -> None:
    d = tmp_path / "raw"
    tr_in, tr_tg = _raw(d, "train_input.bin", 12, 32, rng), _raw(d, "train_target.bin", 12, 32, rng)
    te_in = _raw(d, "test_input.bin", 3, 32, rng)
    store = adopt_raw_store(d, 32)
    assert store.count("train") == 12 and store.count("test") == 3
    assert store.has_target("train") and not store.has_target("test")
    assert store.manifest["normalization"] is None and store.manifest["adopted"] is True
    np.testing.assert_array_equal(store.read("train", [11, 0]), tr_in[[11, 0]])
    np.testing.assert_array_equal(store.read("train", [5], "target"), tr_tg[[5]])
    np.testing.assert_array_equal(PatchStore(d).read("test", [2]), te_in[[2]])
    with pytest.raises(StoreError, match=r"already has a manifest\.json"):
        adopt_raw_store(d, 32)
    assert adopt_raw_store(d, 32, overwrite=True).count("train") == 12


@pytest.mark.parametrize(
    ("files", "patch", "match"),
    [
        (
            {"train_input.bin": 12},
            24,
            "train_input.bin: size 49152 bytes is not a multiple .* \\(2304 bytes = 24x24",
        ),
        (
            {"train_input.bin": 12, "train_target.bin": 11},
            32,
            "train_target.bin: found 11 patches, expected 12",
        ),
        (
            {"train_input.bin": 12, "test_target.bin": 2},
            32,
            "test_target.bin: found a target file, expected test_input",
        ),
        ({"test_input.bin": 2}, 32, "found no train_input.bin"),
    ],
)
def test_adopt_rejects_wrong_sizes(
    tmp_path: Path, rng: np.random.Generator, files: dict[str, int], patch: int, match: str
) -> None:
    for name, n in files.items():
        _raw(tmp_path, name, n, 32, rng)
    with pytest.raises(StoreError, match=match) as err:
        adopt_raw_store(tmp_path, patch)
    assert "\n" not in str(err.value)
    assert not (tmp_path / MANIFEST).exists()


def test_cli_adopt(tmp_path: Path, rng: np.random.Generator) -> None:
    _raw(tmp_path, "train_input.bin", 4, 16, rng)
    _raw(tmp_path, "train_target.bin", 4, 16, rng)
    res = CliRunner().invoke(cli, ["preprocess", "--adopt", str(tmp_path), "--patch", "16"])
    assert res.exit_code == 0, res.output
    assert "train=4" in res.output and PatchStore(tmp_path).count("train") == 4
    res = CliRunner().invoke(cli, ["preprocess", "--adopt", str(tmp_path), "--patch", "24", "--overwrite"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "error:" in res.output
    assert "not a multiple" in res.output
    res = CliRunner().invoke(cli, ["preprocess", "--adopt", str(tmp_path), "--patch", "16", "--sigma", "1"])
    assert res.exit_code == 2 and "--adopt DIR takes only" in res.output


def _corrupt(store: Path, how: str) -> str:
    m = json.loads((store / MANIFEST).read_text())
    if how == "missing":
        (store / "test_target.bin").unlink()
        return "test_target.bin: missing data file"
    if how == "not-multiple":
        with open(store / "train_input.bin", "ab") as fh:
            fh.write(b"\0" * 10)
        return "train_input.bin: size 15370 bytes is not a multiple of the patch size"
    if how == "count":
        m["splits"]["train"]["count"] = 4
        (store / MANIFEST).write_text(json.dumps(m))
        return r"train_input.bin: found 5 patches, expected 4 \(the manifest's count\)"
    if how == "format":
        m["format"] = "cryodeploy-patches/9"
        (store / MANIFEST).write_text(json.dumps(m))
        return "found format 'cryodeploy-patches/9', expected 'cryodeploy-patches/1'"
    if how == "dtype":
        m["dtype"] = "float16"
        (store / MANIFEST).write_text(json.dumps(m))
        return "found dtype 'float16', expected 'float32'"
    if how == "json":
        (store / MANIFEST).write_text("{not json")
        return "manifest.json: not readable JSON"
    if how == "escape":
        m["splits"]["train"]["input"] = "../x.bin"
        (store / MANIFEST).write_text(json.dumps(m))
        return "data file '../x.bin' invalid"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "not-multiple", "count", "format", "dtype", "json", "escape"])
def test_bad_stores_give_one_line_errors(tmp_path: Path, rng: np.random.Generator, how: str) -> None:
    _write_store(tmp_path / "s", rng, {"train": 5, "test": 1}, patch=(16, 48))
    match = _corrupt(tmp_path / "s", how)
    with pytest.raises(StoreError, match=match) as err:
        PatchStore(tmp_path / "s")
    assert "\n" not in str(err.value) and str(tmp_path / "s") in str(err.value)


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such patch store"):
        PatchStore(tmp_path / "nope")
