"""Training a volume model (unet3d) on 5-D batches [B, 1, D, H, W] from volumes in memory (ArrayData)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import norm_stats, normalize
from cryodeploy.imaging.simulate.tomogram import simulate_tomogram
from cryodeploy.imaging.simulate.tomoscene import TomoConfig
from cryodeploy.models.checkpoint import load_checkpoint
from cryodeploy.training.config import TrainConfig
from cryodeploy.training.sources import ArrayData
from cryodeploy.training.train import train

FAST = TrainConfig(model="unet3d", model_params={"base_channels": 4, "depth": 1}, epochs=2, batch=2, lr=3e-3,
                   val_split=0.2, log_every=2, loader_threads=1)


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 synthetic 16^3 tomograms: clean, even and odd halves, normalized with the even half's statistics."""
    config = TomoConfig(shape=(16, 16, 16), voxel_size=20.0, seed=5, particles=4, vesicles=0, sheets=0,
                        dose=5.0)
    clean, even, odd = [], [], []
    for i in range(10):
        t = simulate_tomogram(config, i)
        s = norm_stats(t.even.numpy())
        clean.append(normalize(t.clean.numpy(), s))
        even.append(normalize(t.even.numpy(), s))
        odd.append(normalize(t.odd.numpy(), s))
    return tuple(np.stack(v)[:, None] for v in (clean, even, odd))  # type: ignore[return-value]


def _weights_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def test_supervised_and_noise2noise_train_a_volume_model(volumes, tmp_path) -> None:
    clean, even, odd = volumes
    sup = train(ArrayData(even, clean), tmp_path / "sup", dataclasses.replace(FAST, epochs=4), quiet=True)
    assert sup.steps == 16 and sup.best is not None  # 8 training volumes, batch 2
    rows = [json.loads(line) for line in (tmp_path / "sup" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    print(f"unet3d supervised validation MSE by epoch: {val}")
    assert len(val) == 4 and all(b < a for a, b in itertools.pairwise(val)) and val[-1] < 0.85 * val[0]
    _, spec = load_checkpoint(sup.best)
    assert spec.architecture == "unet3d" and spec.ndim == 3 and spec.training["arrays"] == [10, 1, 16, 16, 16]
    n2n = train(ArrayData(even, odd), tmp_path / "n2n", dataclasses.replace(FAST, method="noise2noise"),
                quiet=True)
    assert n2n.steps == 8 and n2n.best_val_loss is not None and np.isfinite(n2n.best_val_loss)


def test_resume_of_a_volume_run_equals_uninterrupted(volumes, tmp_path) -> None:
    clean, even, _ = volumes
    data = ArrayData(even, clean)
    full = train(data, tmp_path / "full", FAST, quiet=True)
    part = train(data, tmp_path / "part", FAST, quiet=True, on_step=lambda step: step == 5)
    assert part.interrupted and part.steps == 5
    resumed = train(data, tmp_path / "part", dataclasses.replace(FAST, resume=True), quiet=True)
    assert (resumed.steps, resumed.epochs_completed) == (full.steps, full.epochs_completed) == (8, 2)
    assert _weights_diff(tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors") == 0


def test_volume_training_refuses_mismatched_data(volumes, tmp_path) -> None:
    clean, even, _ = volumes
    images = ArrayData(even[:, :, 0], clean[:, :, 0])
    message = r"^training arrays \[10, 1, 16, 16\] with targets: patches \(16, 16\) have 2 sides, but unet3d"
    with pytest.raises(ConfigError, match=message):
        train(images, tmp_path / "a", FAST, quiet=True)
    cnn3 = dataclasses.replace(FAST, model="cnn3", model_params={})
    with pytest.raises(ConfigError, match=r"\(16, 16, 16\) have 3 sides, but cnn3 is a 2-D image model"):
        train(ArrayData(even, clean), tmp_path / "b", cnn3, quiet=True)
    n2n = dataclasses.replace(FAST, method="neighbor2neighbor")
    with pytest.raises(ConfigError, match="neighbor2neighbor sub-samples 2x2 pixel cells of images"):
        train(ArrayData(even), tmp_path / "c", n2n, quiet=True)
    with pytest.raises(ConfigError, match="no targets, expected them for --method supervised"):
        train(ArrayData(even), tmp_path / "d", FAST, quiet=True)


def test_cli_trains_unet3d_on_an_even_odd_3d_store(tmp_path) -> None:
    """``cryodeploy train STORE --model unet3d`` on a real 3-D patch store (preprocess of even/odd pairs)."""
    from click.testing import CliRunner

    from cryodeploy.cli import cli
    from cryodeploy.io.tomopairs import TomoPair
    from cryodeploy.io.volumes import write_volume
    from cryodeploy.training.preprocess import PreprocessConfig
    from cryodeploy.training.volumes import preprocess_volumes

    pairs = []
    for i in range(2):
        t = simulate_tomogram(TomoConfig(shape=(20, 32, 32), seed=2, particles=6, vesicles=0), i)
        even = write_volume(tmp_path / f"t{i}_even.mrc", t.even.numpy())
        odd = write_volume(tmp_path / f"t{i}_odd.mrc", t.odd.numpy())
        pairs.append(TomoPair(f"t{i}", even, odd))
    config = PreprocessConfig(patch=16, ndim=3, targets="pairs", test_fraction=0.0, stride=(4, 8, 8))
    store = preprocess_volumes(pairs, tmp_path / "store", config, quiet=True)
    assert store.ndim == 3 and store.count("train") == 2 * 2 * 3 * 3
    args = ["--model", "unet3d", "--param", "base_channels=4", "--param", "depth=1",
            "--method", "noise2noise", "--epochs", "1", "--batch", "4", "--loader-threads", "1", "-q"]
    run = CliRunner().invoke(cli, ["train", str(tmp_path / "store"), "-o", str(tmp_path / "run"), *args])
    assert run.exit_code == 0, run.output
    _, spec = load_checkpoint(tmp_path / "run")
    assert spec.ndim == 3 and spec.training["method"] == "noise2noise"
    assert spec.training["train_patches"] == 18  # whole tomograms validate: one of the two
