"""Stores of 3-D patches from volumes: layout, exact patches, worker independence, the loader's shapes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import ConfigError, InputError, StoreError
from cryodeploy.imaging.normalize import NormStats, normalize
from cryodeploy.io.tomopairs import TomoPair
from cryodeploy.io.volumes import write_volume
from cryodeploy.training.loader import LoaderConfig, StreamingLoader
from cryodeploy.training.manifest import FORMAT, FORMAT_ND
from cryodeploy.training.preprocess import PreprocessConfig, preprocess
from cryodeploy.training.store import MANIFEST, PatchStore, StoreWriter
from cryodeploy.training.volumes import preprocess_volumes

SHAPE = (20, 40, 36)  # nz, ny, nx


def _vol(rng: np.random.Generator, shape=SHAPE, counts: bool = False) -> np.ndarray:
    if counts:
        return rng.poisson(4.0, shape).astype(np.float32)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (np.sin(x / 3.0) + np.cos(y / 4.0) * np.sin(z / 2.0) + 0.3 * rng.standard_normal(shape)).astype(
        np.float32
    )


@pytest.fixture
def pairs(tmp_path: Path, rng: np.random.Generator) -> list[TomoPair]:
    out = []
    for i in range(3):
        shape = SHAPE if i < 2 else (18, 36, 40)
        even, odd = (
            write_volume(tmp_path / f"t{i}_even.mrc", _vol(rng, shape)),
            write_volume(tmp_path / f"t{i}_odd.mrc", _vol(rng, shape)),
        )
        out.append(TomoPair(f"t{i}", even, odd))
    return out


def _config(**kw) -> PreprocessConfig:
    return PreprocessConfig(**{"patch": 16, "ndim": 3, "targets": "pairs", "test_fraction": 0.0, **kw})


def test_pairs_store_layout_and_exact_patches(tmp_path: Path, pairs: list[TomoPair]) -> None:
    store = preprocess_volumes(pairs, tmp_path / "s", _config(stride=(4, 12, 10)), quiet=True)
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert (m["format"], m["ndim"], m["patch"], m["stride"]) == (FORMAT_ND, 3, [16, 16, 16], [4, 12, 10])
    assert store.ndim == 3 and store.patch == (16, 16, 16) and store.patch_bytes == 16**3 * 4
    per = [
        len(range(0, d - 15, 4)) * len(range(0, h - 15, 12)) * len(range(0, w - 15, 10))
        for d, h, w in (SHAPE, SHAPE, (18, 36, 40))
    ]
    assert store.count("train") == sum(per) and store.groups("train") == [
        (0, per[0]),
        (per[0], per[1]),
        (per[0] + per[1], per[2]),
    ]
    src = m["sources"][1]
    stats = NormStats(src["center"], src["scale"])
    with mrcfile.open(pairs[1].even) as e, mrcfile.open(pairs[1].odd) as o:
        even, odd = np.array(e.data), np.array(o.data)
    # patch 5 of volume 1, corners in (z, y, x) order
    corners = [(z, y, x) for z in range(0, 5, 4) for y in range(0, 25, 12) for x in range(0, 21, 10)]
    z, y, x = corners[5]
    got_in = store.read("train", [per[0] + 5])[0]
    got_tg = store.read("train", [per[0] + 5], "target")[0]
    assert np.array_equal(got_in, normalize(even, stats)[z : z + 16, y : y + 16, x : x + 16])
    assert np.array_equal(
        got_tg, normalize(odd, stats)[z : z + 16, y : y + 16, x : x + 16]
    )  # the input's affine map


def test_store_is_byte_identical_for_any_number_of_workers(tmp_path: Path, rng: np.random.Generator) -> None:
    clean = [write_volume(tmp_path / f"c{i}.mrc", _vol(rng, (40, 40, 36))) for i in range(2)]
    digests = []
    for w in (0, 1, 3):
        s = preprocess_volumes(
            clean,
            tmp_path / f"s{w}",
            _config(targets="noise2noise", workers=w, test_fraction=0.5),
            quiet=True,
        )
        assert s.count("test") > 0 and s.count("train") > 0
        digests.append(
            [
                (tmp_path / f"s{w}" / n).read_bytes()
                for n in ("train_input.bin", "train_target.bin", "test_input.bin", "test_target.bin")
            ]
        )
    assert digests[0] == digests[1] == digests[2]
    assert digests[0][0] != digests[0][1]  # two independent draws


def test_loader_yields_five_dimensional_batches(tmp_path: Path, pairs: list[TomoPair]) -> None:
    store = preprocess_volumes(pairs[:2], tmp_path / "s", _config(), quiet=True)
    loader = StreamingLoader(store, "train", None, LoaderConfig(batch_size=3, seed=1))
    assert loader.batch_bytes == 3 * 16**3 * 4 * 2
    seen = 0
    for idx, (x, t) in zip(loader.batch_indices(), loader, strict=True):
        assert tuple(x.shape) == (3, 1, 16, 16, 16) and t is not None and tuple(t.shape) == (3, 1, 16, 16, 16)
        assert np.array_equal(x.numpy()[:, 0], store.read("train", idx))
        assert np.array_equal(t.numpy()[:, 0], store.read("train", idx, "target"))
        seen += 1
    assert seen == len(loader) == store.count("train") // 3


def test_self_supervised_store_has_no_targets(tmp_path: Path, pairs: list[TomoPair]) -> None:
    store = preprocess_volumes(
        [p.even for p in pairs[:2]], tmp_path / "s", _config(targets="none"), quiet=True
    )
    assert not store.has_target("train") and not (tmp_path / "s" / "train_target.bin").exists()
    x, t = next(iter(StreamingLoader(store, "train", None, LoaderConfig(batch_size=2))))
    assert tuple(x.shape) == (2, 1, 16, 16, 16) and t is None


def test_thin_targets_add_up_to_the_counts(tmp_path: Path, rng: np.random.Generator) -> None:
    counts = _vol(rng, (16, 32, 32), counts=True)
    store = preprocess_volumes(
        [write_volume(tmp_path / "n.mrc", counts)],
        tmp_path / "s",
        _config(targets="thin", patch=(16, 32, 32)),
        quiet=True,
    )
    src = store.manifest["sources"][0]
    assert src["gain_from"] == "integer" and src["gain"] == 1.0
    a, b = (
        store.read("train", [0], w)[0].astype(np.float64) * src["scale"] + src["center"]
        for w in ("input", "target")
    )
    assert np.allclose(a + b, counts, atol=1e-3)
    assert np.allclose(np.round(a), a, atol=1e-3)


def test_refusals_name_the_problem(tmp_path: Path, pairs: list[TomoPair], rng: np.random.Generator) -> None:
    bad = TomoPair("x", pairs[0].even, pairs[2].odd)
    with pytest.raises(
        InputError,
        match=r"t2_odd.mrc: shape \(18, 36, 40\) differs from .*t0_even.mrc's "
        r"\(20, 40, 36\), expected halves",
    ):
        preprocess_volumes([bad], tmp_path / "s", _config(), quiet=True)
    with pytest.raises(InputError, match=r"t0_even.mrc: has no odd half, but targets are 'pairs'"):
        preprocess_volumes([pairs[0].even], tmp_path / "s", _config(), quiet=True)
    with pytest.raises(
        ConfigError, match=r"no training patches: no train volume is at least 64x64x64 voxels"
    ):
        preprocess_volumes(pairs, tmp_path / "s", _config(patch=64), quiet=True)
    assert not (tmp_path / "s").exists()  # nothing left behind
    with pytest.raises(ConfigError, match="preprocess cuts micrographs"):
        preprocess([pairs[0].even], tmp_path / "s", _config())
    with pytest.raises(
        ConfigError, match=r"patch \(16, 16\) invalid, expected a positive int or \(D, H, W\)"
    ):
        _config(patch=(16, 16))
    with pytest.raises(ConfigError, match="targets 'none' unknown"):
        PreprocessConfig(targets="none")
    with pytest.raises(ConfigError, match="volumes take their pairs with the inputs"):
        _config(target_dir=tmp_path)


def test_two_d_stores_keep_format_one_and_three_d_manifests_are_checked(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    with StoreWriter(tmp_path / "two", 8) as w:
        w.append("train", rng.standard_normal((2, 8, 8)), rng.standard_normal((2, 8, 8)))
        store = w.finish()
    m = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert m["format"] == FORMAT and "ndim" not in m and store.ndim == 2 and store.patch == (8, 8)
    with StoreWriter(tmp_path / "three", (4, 8, 8)) as w:
        w.append("train", rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 8)))
        w.finish()
    path = tmp_path / "three" / MANIFEST
    good = json.loads(path.read_text())
    for edit, message in (
        (
            {"format": FORMAT},
            "found patch [4, 8, 8] and ndim 3 in format 'cryodeploy-patches/1', expected [H, W] and no ndim",
        ),
        ({"ndim": 2}, "found patch [4, 8, 8] and ndim 2, expected ndim = the number of patch sides"),
        ({"patch": [4, 8, 4]}, "train_input.bin: found 4 patches, expected 2 (the manifest's count)"),
    ):
        path.write_text(json.dumps({**good, **edit}))
        with pytest.raises(StoreError) as err:
            PatchStore(tmp_path / "three")
        assert str(err.value).endswith(message)


def test_ambiguous_relion_volumes_are_read_as_volumes(tmp_path: Path, rng: np.random.Generator) -> None:
    p = tmp_path / "relion.mrc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.new(p) as mrc:
            mrc.set_data(_vol(rng, (16, 32, 32)))
            mrc.header.ispg = 0  # RELION 5: space group 0, mz = nz
    store = preprocess_volumes([p], tmp_path / "s", _config(targets="none"), quiet=True)
    assert store.count("train") == 4
