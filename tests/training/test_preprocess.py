"""Streaming preprocess: exact patch contents, per-micrograph test split, determinism, bounded memory, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import smooth_image

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, InputError, OutputError
from cryodeploy.imaging.noise import NoiseSpec, to_unit_range
from cryodeploy.imaging.normalize import NormStats, norm_stats, normalize
from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.training.preprocess import PreprocessConfig, preprocess, split_micrographs
from cryodeploy.training.store import MANIFEST, PatchStore

SHAPE = (160, 200)  # patch 64, stride 48: 3 x 3 patches per micrograph


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("mics")
    rng = np.random.default_rng(5)
    return [write_micrograph(d / f"m{i}.mrc", 100 + 40 * smooth_image(rng, SHAPE)) for i in range(6)]


def _cfg(**kw: object) -> PreprocessConfig:
    base: dict[str, object] = {"patch": 64, "stride": 48, "test_fraction": 0.34, "seed": 3}
    return PreprocessConfig(**{**base, **kw})  # type: ignore[arg-type]


def _cut(image: np.ndarray) -> np.ndarray:
    return np.stack([image[y : y + 64, x : x + 64] for y in (0, 48, 96) for x in (0, 48, 96)])


def test_pairs_patches_are_exact_cuts_of_the_normalized_micrographs(
    tmp_path: Path, micrographs: list[Path]
) -> None:
    tgt_dir = tmp_path / "b"
    tgt_dir.mkdir()
    for p in micrographs:  # target = a scaled copy, so input and target differ
        write_micrograph(tgt_dir / p.name, 2 * read_micrograph(p).data)
    store = preprocess(micrographs, tmp_path / "s", _cfg(targets="pairs", target_dir=tgt_dir), quiet=True)
    m = store.manifest
    assert m["targets"] == "pairs" and m["noise"] is None and m["normalization"]["method"] == "robust"
    assert store.count("train") == 4 * 9 and store.count("test") == 2 * 9
    for src in m["sources"]:
        image = read_micrograph(src["path"]).data
        stats = norm_stats(image)
        assert (src["center"], src["scale"]) == (stats.center, stats.scale)
        idx = range(src["start"], src["start"] + src["count"])
        np.testing.assert_array_equal(store.read(src["split"], idx), _cut(normalize(image, stats)))
        np.testing.assert_array_equal(
            store.read(src["split"], idx, "target"), _cut(normalize(2 * image, stats))
        )


def test_test_split_is_by_micrograph_and_deterministic(tmp_path: Path, micrographs: list[Path]) -> None:
    store = preprocess(micrographs, tmp_path / "s", _cfg(), quiet=True)
    sources = store.manifest["sources"]
    test = {s["path"] for s in sources if s["split"] == "test"}
    train = {s["path"] for s in sources if s["split"] == "train"}
    assert len(test) == 2 and len(train) == 4 and not test & train
    for split in ("train", "test"):  # the sources tile each split exactly, in order
        groups = store.groups(split)
        assert groups is not None and [s for s, _ in groups] == list(range(0, store.count(split), 9))
    mask = split_micrographs(6, 0.34, 3)
    assert test == {str(micrographs[i].resolve()) for i in np.flatnonzero(mask)}
    assert any((split_micrographs(6, 0.34, s) != mask).any() for s in range(1, 6))
    assert split_micrographs(2, 0.1, 0).sum() == 1 and split_micrographs(1, 0.5, 0).sum() == 0
    assert split_micrographs(10, 0.0, 0).sum() == 0


def test_noise_targets_and_noise_statistics(tmp_path: Path, micrographs: list[Path]) -> None:
    spec = NoiseSpec(dose=10.0, sigma=0.05)
    store = preprocess(micrographs, tmp_path / "s", _cfg(noise=spec, stride=64, test_fraction=0), quiet=True)
    m = store.manifest
    assert m["targets"] == "noise" and m["noise"] == spec.to_dict() and store.count("test") == 0
    for src in m["sources"][:3]:
        clean01 = to_unit_range(read_micrograph(src["path"]).data)
        stats = NormStats(src["center"], src["scale"])
        idx = range(src["start"], src["start"] + src["count"])
        target = store.read("train", idx, "target")
        expected = normalize(clean01, stats)
        np.testing.assert_array_equal(
            target, np.stack([expected[y : y + 64, x : x + 64] for y in (0, 64) for x in (0, 64, 128)])
        )
        # the input is normalize(noisy): back on the [0, 1] scale the residual is the noise model's
        residual = (store.read("train", idx) - target) * stats.scale
        clean = target * stats.scale + stats.center
        assert abs(residual.mean()) < 0.01
        assert residual.var() == pytest.approx(clean.mean() / spec.dose + spec.sigma**2, rel=0.1)
        # and normalize(noisy) is centred like any inference input
        noisy_patches = store.read("train", idx) * stats.scale + stats.center
        assert abs(normalize(noisy_patches, norm_stats(noisy_patches)).mean()) < 0.2


def test_noise2noise_draws_are_independent(tmp_path: Path, micrographs: list[Path]) -> None:
    spec = NoiseSpec(dose=10.0, sigma=0.05, dose_range=(5.0, 50.0))
    store = preprocess(micrographs[:2], tmp_path / "s", _cfg(targets="noise2noise", noise=spec), quiet=True)
    src = store.manifest["sources"][0]
    assert 5.0 <= src["dose"] <= 50.0 and store.manifest["targets"] == "noise2noise"
    idx = range(src["start"], src["start"] + src["count"])
    a, b = store.read(src["split"], idx), store.read(src["split"], idx, "target")
    diff = (a - b) * src["scale"]
    clean = to_unit_range(read_micrograph(src["path"]).data)
    assert diff.var() == pytest.approx(2 * (clean.mean() / src["dose"] + spec.sigma**2), rel=0.15)


def test_same_bytes_with_and_without_worker_threads(tmp_path: Path, micrographs: list[Path]) -> None:
    preprocess(micrographs, tmp_path / "a", _cfg(workers=0), quiet=True)
    preprocess(micrographs, tmp_path / "b", _cfg(workers=3), quiet=True)
    for name in ("train_input.bin", "train_target.bin", "test_input.bin", "test_target.bin", MANIFEST):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    preprocess(micrographs, tmp_path / "c", _cfg(seed=4), quiet=True)
    assert (tmp_path / "c" / "train_input.bin").read_bytes() != (
        tmp_path / "a" / "train_input.bin"
    ).read_bytes()


def _same_files(a: Path, b: Path) -> bool:
    names = ("train_input.bin", "train_target.bin", "test_input.bin", "test_target.bin", MANIFEST)
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def test_torch_sampler_store_is_the_same_for_any_number_of_workers(
    tmp_path: Path, micrographs: list[Path]
) -> None:
    import torch

    for targets in ("noise", "noise2noise"):
        torch_cfg = _cfg(targets=targets, sampler="torch", device="cpu")
        for workers in (1, 3):
            cfg = dataclasses.replace(torch_cfg, workers=workers)
            preprocess(micrographs, tmp_path / f"{targets}{workers}", cfg, quiet=True)
        assert _same_files(tmp_path / f"{targets}1", tmp_path / f"{targets}3"), targets
    manifest = PatchStore(tmp_path / "noise1").manifest
    assert manifest["sampler"] == {"name": "torch", "poisson": "inversion of float64 uniforms",
                                   "device": "cpu", "torch": torch.__version__}
    numpy_store = preprocess(micrographs, tmp_path / "numpy", _cfg(), quiet=True)
    assert numpy_store.manifest["sampler"] == {"name": "numpy", "numpy": np.__version__}
    assert not _same_files(tmp_path / "numpy", tmp_path / "noise1")
    # the target (the [0, 1] image, normalized) is the numpy path's [0, 1] map, with the torch input's stats
    for src in manifest["sources"][:2]:
        idx = range(src["start"], src["start"] + src["count"])
        clean01 = to_unit_range(read_micrograph(src["path"]).data)
        stats = NormStats(src["center"], src["scale"])
        np.testing.assert_array_equal(PatchStore(tmp_path / "noise1").read(src["split"], idx, "target"),
                                      _cut(normalize(clean01, stats)))


def _reference_store(config: PreprocessConfig, micrographs: list[Path]) -> dict[str, np.ndarray]:
    """The recipe one micrograph and one band at a time, as the store's definition: each band of 64
    rows drawn from the stream (seed, 1, micrograph; frame 0, draw, band), the input's statistics
    normalizing both; torch's sampler: :func:`noisy_frame` on the frame (streams frame 0, draw)."""
    from cryodeploy.imaging.noise import add_noise, unit_range
    from cryodeploy.imaging.noise_torch import noisy_frame

    mask = split_micrographs(len(micrographs), config.test_fraction, config.seed)
    out: dict[str, list[np.ndarray]] = {f"{s}_{w}": [] for s in ("train", "test")
                                        for w in ("input", "target")}
    draws = 2 if config.targets == "noise2noise" else 1
    for i, path in enumerate(micrographs):
        image = read_micrograph(path).data
        def stream(*key: int) -> np.random.SeedSequence:
            return np.random.SeedSequence([config.seed, 1, i], spawn_key=(0, *key))  # noqa: B023

        if config.sampler == "torch":
            seq = [stream(d) for d in range(draws)]
            inp, tgt, _ = noisy_frame(image, config.noise, config.noise.dose, seq, config.normalization,
                                      "cpu")
        else:
            lo, hi = unit_range(image)
            clean01 = np.clip((image - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, dtype=np.float32)
            bands = [[add_noise(clean01[r : r + 64], config.noise, np.random.default_rng(stream(d, r // 64)),
                                dose=config.noise.dose) for r in range(0, image.shape[0], 64)]
                     for d in range(draws)]
            noisy = [np.concatenate(b) for b in bands]
            stats = norm_stats(noisy[0], config.normalization)
            inp, tgt = normalize(noisy[0], stats), normalize(noisy[-1] if draws == 2 else clean01, stats)
        split = "test" if mask[i] else "train"
        out[f"{split}_input"].append(_cut(inp))
        out[f"{split}_target"].append(_cut(tgt))
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("sampler", ["numpy", "torch"])
def test_store_is_the_recipe_for_any_number_of_workers(
    tmp_path: Path, micrographs: list[Path], sampler: str
) -> None:
    """Workers 0, 1 and 4 (0: no look-ahead, 1 and 4: ``AHEAD`` micrographs prepared at once, patches
    normalized as they are cut, frames written behind) give byte-identical stores, and those are the
    recipe computed one micrograph at a time (:func:`_reference_store`), for noise and noise2noise
    targets and both samplers (torch's on CPU tensors)."""
    for targets in ("noise", "noise2noise"):
        base = _cfg(targets=targets, sampler=sampler, noise=NoiseSpec(dose=15.0, sigma=0.1))
        for workers in (0, 1, 4):
            cfg = dataclasses.replace(base, workers=workers)
            preprocess(micrographs, tmp_path / f"{targets}{workers}", cfg, quiet=True)
        assert _same_files(tmp_path / f"{targets}0", tmp_path / f"{targets}1"), targets
        assert _same_files(tmp_path / f"{targets}0", tmp_path / f"{targets}4"), targets
        store = PatchStore(tmp_path / f"{targets}4")
        for name, expected in _reference_store(base, micrographs).items():
            split, which = name.split("_")
            assert store.count(split) == len(expected)
            np.testing.assert_array_equal(store.read(split, range(len(expected)), which), expected)


def test_torch_sampler_noise_statistics(tmp_path: Path, micrographs: list[Path]) -> None:
    """Residual (input - target, on the [0, 1] scale) of the 6 micrographs' 36 patches (147,456 pixels):
    mean 0 and variance mean(clean) / dose + sigma^2, each within 5 standard errors (sqrt(var / n) for
    the mean; var * sqrt((2 + k) / n) for the variance, k <= 0.5 bounding the excess kurtosis)."""
    spec = NoiseSpec(dose=10.0, sigma=0.05)
    cfg = _cfg(noise=spec, stride=64, test_fraction=0, sampler="torch", device="cpu")
    store = preprocess(micrographs, tmp_path / "s", cfg, quiet=True)
    residuals, cleans = [], []
    for src in store.manifest["sources"]:
        idx = range(src["start"], src["start"] + src["count"])
        target = store.read("train", idx, "target").astype(np.float64)
        residuals.append((store.read("train", idx) - target) * src["scale"])
        cleans.append(target * src["scale"] + src["center"])
    residual, clean = np.concatenate(residuals).ravel(), np.concatenate(cleans).ravel()
    n, var = residual.size, clean.mean() / spec.dose + spec.sigma**2
    assert n == 36 * 64 * 64
    assert abs(residual.mean()) < 5 * np.sqrt(var / n)
    assert abs(residual.var() - var) < 5 * var * np.sqrt(2.5 / n)


def test_sampler_choices_are_checked(tmp_path: Path, micrographs: list[Path]) -> None:
    with pytest.raises(ConfigError, match=r"draws noise and noise2noise targets of micrographs, not 'thin'"):
        _cfg(targets="thin", sampler="torch")
    with pytest.raises(ConfigError, match="noise2noise targets of micrographs, not volumes"):
        PreprocessConfig(patch=16, ndim=3, sampler="torch")
    with pytest.raises(ConfigError, match="device 'cuda' needs the torch sampler"):
        _cfg(device="cuda")
    with pytest.raises(ConfigError, match="sampler 'jax' unknown"):
        _cfg(sampler="jax")
    with pytest.raises(ConfigError, match="device 'tpu' unknown"):
        preprocess(micrographs, tmp_path / "s", _cfg(sampler="torch", device="tpu"), quiet=True)
    assert not (tmp_path / "s").exists()  # refused before any work


def test_refuses_to_overwrite_and_cleans_up_after_errors(tmp_path: Path, micrographs: list[Path]) -> None:
    preprocess(micrographs[:2], tmp_path / "s", _cfg(), quiet=True)
    with pytest.raises(OutputError, match="already exists"):
        preprocess(micrographs[:2], tmp_path / "s", _cfg(), quiet=True)
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an mrc file at all" * 100)
    with pytest.raises(InputError, match=r"bad\.mrc: not a readable MRC file"):  # headers first: no work
        preprocess([*micrographs[:2], bad], tmp_path / "s", _cfg(overwrite=True), quiet=True)
    assert PatchStore(tmp_path / "s").count("train") == 9  # the old store is untouched
    write_micrograph(bad, np.ones(SHAPE, np.float32))  # a valid header, bad pixels: found while writing
    with pytest.raises(InputError, match=r"bad\.mrc: image is constant"):
        preprocess([*micrographs[:2], bad], tmp_path / "s", _cfg(overwrite=True), quiet=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []  # no manifest, no partial data
    store = preprocess(micrographs[:3], tmp_path / "s", _cfg(), quiet=True)
    assert store.count("train") + store.count("test") == 27


def test_small_micrographs_and_pair_mismatches(
    tmp_path: Path, micrographs: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    small = write_micrograph(tmp_path / "small.mrc", smooth_image(rng, (48, 48)))
    with caplog.at_level(logging.WARNING):
        store = preprocess([micrographs[0], small], tmp_path / "s", _cfg(test_fraction=0), quiet=True)
    assert store.count("train") == 9 and "smaller than the 64x64 patch" in caplog.text
    with pytest.raises(ConfigError, match="no training patches"):
        preprocess([small], tmp_path / "s2", _cfg(), quiet=True)
    b = tmp_path / "b"
    b.mkdir()
    write_micrograph(b / "m0.mrc", smooth_image(rng, (64, 64)))
    with pytest.raises(InputError, match="differs from"):
        preprocess(micrographs[:1], tmp_path / "s3", _cfg(targets="pairs", target_dir=b), quiet=True)
    with pytest.raises(InputError, match=r"m1.mrc: no such file, expected the target"):
        preprocess(micrographs[1:2], tmp_path / "s4", _cfg(targets="pairs", target_dir=b), quiet=True)
    with pytest.raises(ConfigError):
        PreprocessConfig(targets="pairs")


def test_cli(tmp_path: Path, micrographs: list[Path]) -> None:
    folder = str(micrographs[0].parent)
    res = CliRunner().invoke(
        cli,
        [
            "preprocess",
            f"{folder}/m*.mrc",
            "-o",
            str(tmp_path / "s"),
            "--patch",
            "64",
            "--stride",
            "48",
            "--noise2noise",
            "--dose-range",
            "5",
            "40",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "train 45, test 9 patches of 64x64 from 6 micrographs" in res.output
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["targets"] == "noise2noise" and m["noise"]["dose_range"] == [5.0, 40.0]
    res = CliRunner().invoke(
        cli,
        [
            "preprocess",
            "--pairs",
            folder,
            folder,
            "-o",
            str(tmp_path / "p"),
            "--patch",
            "64",
            "-q",
            "--test-fraction",
            "0",
        ],
    )
    assert res.exit_code == 0 and PatchStore(tmp_path / "p").count("train") == 6 * 6
    for args, msg in [
        (["--pairs", folder, folder, "--sigma", "0.1"], "--pairs takes no"),
        ([folder, "--dose", "3", "--dose-range", "1", "2"], "not both"),
        ([folder, "--adopt", folder], "--adopt DIR takes only"),
    ]:
        res = CliRunner().invoke(cli, ["preprocess", *args, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and msg in res.output, res.output
    res = CliRunner().invoke(cli, ["preprocess", folder, "-o", str(tmp_path / "s"), "--patch", "64"])
    assert res.exit_code == 1 and res.output.startswith("error:") and "--overwrite" in res.output


def test_cli_noise_options_reach_the_manifest(tmp_path: Path, micrographs: list[Path]) -> None:
    base = ["preprocess", str(micrographs[0]), "--patch", "64", "--test-fraction", "0", "-q", "-o"]
    for name, extra, want in [
        ("given", ["--noise", "poisson-gaussian", "--sigma", "0.1", "--dose", "7"],
         NoiseSpec(dose=7, sigma=0.1)),
        ("defaults", [], NoiseSpec()),
    ]:
        res = CliRunner().invoke(cli, [*base, str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / name / MANIFEST).read_text())["noise"] == want.to_dict()


def test_cli_device(tmp_path: Path, micrographs: list[Path]) -> None:
    import torch

    base = ["preprocess", str(micrographs[0]), "--patch", "64", "--test-fraction", "0", "-q", "-o"]
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "cpu"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lib = preprocess(micrographs[:1], tmp_path / "lib", PreprocessConfig(patch=64, test_fraction=0.0),
                     quiet=True)
    assert _same_files(tmp_path / "cpu", lib.path)  # --device cpu: numpy's sampler, the library default
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "auto")])
    assert res.exit_code == 0, res.output
    sampler = json.loads((tmp_path / "auto" / MANIFEST).read_text())["sampler"]
    assert sampler["name"] == ("torch" if torch.cuda.is_available() else "numpy")
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "t"), "--thin", "--device", "cuda"])
    assert res.exit_code == 2 and "only noise and --noise2noise targets are drawn on a GPU" in res.output
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "v"), "--volumes", "--device", "cuda"])
    assert res.exit_code == 2 and "--volumes draws its noise on the cpu" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, [*base, str(tmp_path / "g"), "--device", "cuda"])
        assert res.exit_code == 2 and res.output.startswith("error: device 'cuda' requested, but torch")
        assert not (tmp_path / "g").exists()


_RSS_SCRIPT = """
import sys
from pathlib import Path
from cryodeploy.training.preprocess import PreprocessConfig, preprocess
paths = sorted(Path(sys.argv[1]).glob("*.mrc"))[: int(sys.argv[2])]
preprocess(paths, sys.argv[3], PreprocessConfig(patch=128, workers=int(sys.argv[4])), quiet=True)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_peak_memory_does_not_grow_with_the_number_of_micrographs(tmp_path: Path) -> None:
    """Peak RSS over 40 micrographs of 512x512 (1 MiB each as float32) minus that over 8 (twice
    the 1 + AHEAD micrographs in flight, so both runs reach the steady state) is < 16 MiB with 0, 2
    or 8 worker threads (measured: +0.1 MiB with none, +2 to +7 MiB with 8, whose peaks also vary by
    5 MiB from run to run, and once +10.4 MiB with 2 on a 2-core CI machine; 8 workers need 15-20
    MiB more than none at all, their stacks and temporaries). The runs use MALLOC_ARENA_MAX=2: with
    glibc's default of one malloc arena per thread, how far the threads' arenas fragment depends on
    timing and grows over the first dozens of micrographs before it settles (up to +10 MiB here),
    which is the allocator, not what preprocess holds.

    The bound is half the smallest failure it guards against: holding the patches would add
    2 x 36 MiB, a leak of one micrograph per file 32 MiB (the 32 extra files).
    """
    rng = np.random.default_rng(1)
    base = smooth_image(rng, (64, 64))
    for i in range(40):
        img = np.kron(np.roll(base, i, axis=0), np.ones((8, 8), np.float32))
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        write_micrograph(tmp_path / f"m{i:02d}.mrc", img + 0.1 * noise)

    def peak(n: int, workers: int) -> int:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _RSS_SCRIPT,
                str(tmp_path),
                str(n),
                str(tmp_path / f"s{n}{workers}"),
                str(workers),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},
        )
        return int(out.stdout)

    one = 512 * 512 * 4
    for workers in (0, 2, 8):
        rss8, rss40 = peak(8, workers), peak(40, workers)
        assert PatchStore(tmp_path / f"s40{workers}").count("train") == 36 * 16
        assert rss40 - rss8 < 16 * one, (workers, rss8, rss40)
