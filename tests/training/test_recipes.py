"""Training recipes through the one trainer: ``--simulate`` (on-the-fly simulation), ``--init``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec
from cryodeploy.imaging.simulate import SimConfig
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import load_checkpoint, save_checkpoint
from cryodeploy.training.config import TrainConfig
from cryodeploy.training.sources import SimulatedData
from cryodeploy.training.train import train

SIM = SimulatedData(SimConfig(shape=(64, 64)), crop=64, crops_per_image=1, steps_per_epoch=4, val_images=2)
FAST = TrainConfig(model="unet", model_params={"base_channels": 8, "depth": 2}, epochs=2, batch=2, lr=3e-3,
                   seed=0, log_every=2, loader_threads=1)


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(str(a)), load_file(str(b))
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_simulate_trains_through_the_trainer_and_resumes_exactly(tmp_path: Path) -> None:
    full = train(SIM, tmp_path / "full", FAST, quiet=True)
    assert (full.steps, full.epochs_completed) == (8, 2)
    _, spec = load_checkpoint(tmp_path / "full")
    assert spec.training["simulated"]["sim"]["shape"] == [64, 64]
    assert spec.training["targets"] == "clean (simulated, exact)" and spec.normalization == NormSpec()
    val = [json.loads(x)["val_loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "val"]
    assert len(val) == 2 and all(v > 0 for v in val)
    part = train(SIM, tmp_path / "part", FAST, quiet=True, on_step=lambda step: step == 3)
    assert part.interrupted and part.steps == 3
    resumed = train(SIM, tmp_path / "part", dataclasses.replace(FAST, resume=True), quiet=True)
    assert resumed.steps == 8
    assert _max_diff(tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors") == 0.0
    assert resumed.best_val_loss == full.best_val_loss


def test_simulate_is_supervised_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--simulate trains with --method supervised"):
        train(SIM, tmp_path / "r", dataclasses.replace(FAST, method="neighbor2neighbor"), quiet=True)


def test_init_starts_from_the_checkpoint_weights(tmp_path: Path, unet_checkpoint: Path) -> None:
    # lr 1e-12 for one step: the run's weights are the checkpoint's to float rounding (seed 1: the
    # checkpoint is seed 0's initialization)
    config = dataclasses.replace(FAST, epochs=1, max_batches=1, lr=1e-12, seed=1, init=str(unet_checkpoint))
    train(SIM, tmp_path / "ft", config, quiet=True)
    assert _max_diff(unet_checkpoint, tmp_path / "ft" / "last.safetensors") < 1e-9
    fresh = train(SIM, tmp_path / "fresh", dataclasses.replace(config, init=None), quiet=True)
    assert fresh.steps == 1
    assert _max_diff(unet_checkpoint, tmp_path / "fresh" / "last.safetensors") > 1e-3  # another init


def test_init_refuses_other_architecture_or_normalization(tmp_path: Path, unet_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint is unet .* the run asks for cnn3"):
        train(SIM, tmp_path / "a", TrainConfig(model="cnn3", init=str(unet_checkpoint)), quiet=True)
    spec = ModelSpec("unet", {"base_channels": 8, "depth": 2}, normalization=NormSpec("robust", 2.0, 98.0))
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(spec), spec)
    with pytest.raises(ConfigError, match=r"the checkpoint normalizes with .*'low_percentile': 2\.0"):
        train(SIM, tmp_path / "b", dataclasses.replace(FAST, init=str(other)), quiet=True)


def test_cli_simulate_with_init_default(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    small = ["--sim-size", "64", "--crop", "64", "--steps-per-epoch", "1", "--epochs", "1", "--batch", "1"]
    res = runner.invoke(cli, ["train", "--simulate", *small, "--init", "default", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    _, spec = load_checkpoint(out)
    _, default = load_checkpoint(Path(__file__).parents[2] / "cryodeploy/data/default")
    assert (spec.architecture, spec.params) == (default.architecture, default.params)
    assert spec.training["init"] == "default" and "init_training" in spec.training
    res = runner.invoke(cli, ["train", "--simulate", "--init", "default", "--model", "cnn3", "-o",
                              str(tmp_path / "x")])
    assert res.exit_code != 0 and "error: --init default: the checkpoint is unet" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["train", "-o", str(tmp_path / "y")])
    assert res.exit_code != 0 and "missing STORE: give a patch store folder, or --simulate" in res.output


def test_cli_simulate_redraws_are_recorded_and_bounded(tmp_path: Path) -> None:
    runner = CliRunner()
    small = ["--sim-size", "64", "--crop", "64", "--steps-per-epoch", "3", "--epochs", "1", "--batch", "1",
             "--model", "unet", "--param", "base_channels=4", "--param", "depth=1"]
    res = runner.invoke(cli, ["train", "--simulate", *small, "--redraws", "2", "-o", str(tmp_path / "r"),
                              "-q"])
    assert res.exit_code == 0, res.output
    _, spec = load_checkpoint(tmp_path / "r")
    assert spec.training["simulated"]["redraws"] == 2 and spec.training["step"] == 3
    # an exact resume needs the same batches: other redraws are refused, the same ones go on
    more = [*small[:7], "2", *small[8:]]  # --epochs 2
    res = runner.invoke(cli, ["train", "--simulate", *more, "-o", str(tmp_path / "r"), "-q", "--resume"])
    assert res.exit_code != 0 and "'redraws 2'], found [64, 64, 3, 8]" in res.output, res.output
    res = runner.invoke(cli, ["train", "--simulate", *more, "--redraws", "2", "-o", str(tmp_path / "r"), "-q",
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "r" / "last.safetensors")[1].training["step"] == 6
    res = runner.invoke(cli, ["train", "--simulate", *small, "--redraws", "65", "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "'--redraws': 65 is not in the range 0<=x<=64" in res.output


def test_cli_sim_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.json"
    cfg.write_text(json.dumps({"dose_e_per_px": [10, 20], "pixel_size_a": [1.0, 1.5]}))
    out = tmp_path / "run"
    small = ["--sim-size", "64", "--crop", "64", "--steps-per-epoch", "1", "--epochs", "1", "--batch", "1"]
    res = CliRunner().invoke(cli, ["train", "--simulate", "--sim-config", str(cfg), *small, "--model", "unet",
                                   "--param", "base_channels=4", "--param", "depth=2", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    sim = load_checkpoint(out)[1].training["simulated"]["sim"]
    assert sim["dose_e_per_px"] == [10.0, 20.0] and sim["shape"] == [64, 64]
    cfg.write_text(json.dumps({"dose": [10, 20]}))
    res = CliRunner().invoke(cli, ["train", "--simulate", "--sim-config", str(cfg), "-o",
                                   str(tmp_path / "z")])
    assert res.exit_code != 0 and f"error: {cfg}: SimConfig: found unknown field(s) dose" in res.output


def test_simulated_batches_differ_by_rank_share() -> None:
    from cryodeploy.training.simsource import SimSource, sim_batches

    source = SimSource(SIM.sim, crop=64, crops_per_image=1, batch=1)
    evens = sim_batches(source, start=0, stride=2, prefetch=False)
    all_steps = sim_batches(source, start=0, stride=1, prefetch=False)
    a0, a1 = next(all_steps), next(all_steps)
    e0, e1 = next(evens), next(evens)
    assert torch.equal(a0[0], e0[0]) and not torch.equal(a1[0], e1[0])
