"""Batches simulated on the fly, and the default model's recipe (models/train_default.py) on the CPU."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_plugin

from cryodeploy.errors import ConfigError
from cryodeploy.files import file_sha256
from cryodeploy.imaging.metrics import psnr
from cryodeploy.imaging.normalize import norm_stats, normalize
from cryodeploy.imaging.simulate import SimConfig, simulate
from cryodeploy.training.simsource import SimSource, batch_psnr, normalized_pair, sim_batches

ROOT = Path(__file__).resolve().parents[2]


def test_normalized_pair_is_the_runners_normalization_of_both_images() -> None:
    b = simulate(SimConfig(shape=(96, 96)), 2, 5)
    x, y = normalized_pair(b.noisy, b.clean)
    for i in range(2):
        stats = norm_stats(b.noisy[i].numpy())
        np.testing.assert_allclose(x[i, 0].numpy(), normalize(b.noisy[i].numpy(), stats), rtol=0, atol=2e-6)
        np.testing.assert_allclose(y[i, 0].numpy(), normalize(b.clean[i].numpy(), stats), rtol=0, atol=2e-6)


def test_sim_batches_are_a_function_of_seed_and_step() -> None:
    source = SimSource(SimConfig(shape=(96, 96)), crop=32, crops_per_image=2, batch=4, seed=3)
    first = [next(sim_batches(source, start=s, prefetch=False)) for s in (0, 1)]
    it = sim_batches(source, prefetch=True)  # the background thread gives the same steps
    again = [next(it) for _ in range(2)]
    it.close()  # type: ignore[attr-defined]
    for (x0, y0), (x1, y1) in zip(first, again, strict=True):
        assert x0.shape == y0.shape == (4, 1, 32, 32)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(first[0][0], first[1][0])
    # the clean target is far less noisy than the input: residual std over input std
    x, y = first[0]
    assert float((x - y).std()) > 0.5 * float(x.std())


def test_redraw_is_simulate_at_the_new_dose() -> None:
    """Same scenes at 4x the dose: the clean image scales exactly, the counts are fresh Poisson."""
    b = simulate(SimConfig(shape=(96, 96), dose_e_per_px=(10.0, 10.0)), 2, 5)
    noisy, clean = b.redraw(torch.tensor([4.0, 4.0]), 77)
    np.testing.assert_allclose(clean.numpy(), 4.0 * b.clean.numpy(), rtol=1e-6)
    again = simulate(SimConfig(shape=(96, 96), dose_e_per_px=(40.0, 40.0)), 2, 5)
    np.testing.assert_allclose(again.clean.numpy(), clean.numpy(), rtol=2e-5, atol=1e-4)
    assert not torch.equal(noisy, 4.0 * b.noisy)
    # Poisson: mean and variance of the residual, where there is no gain and no interpolation
    plain = [i for i, m in enumerate(b.meta) if not m["gain"] and not any(m["shift_px"])]
    for i in plain:
        r = (noisy[i] - clean[i]).double()
        assert abs(float(r.mean())) < 0.05 * float(clean[i].mean()) ** 0.5
        assert float(r.var()) == pytest.approx(float(clean[i].double().mean()), rel=0.05)


def test_redraws_reuse_each_simulation_at_fresh_doses() -> None:
    base = SimSource(SimConfig(shape=(96, 96)), crop=32, crops_per_image=2, batch=4, seed=3)
    source = SimSource(SimConfig(shape=(96, 96)), crop=32, crops_per_image=2, batch=4, seed=3, redraws=2)
    steps = [next(sim_batches(source, start=s, prefetch=False)) for s in range(4)]
    it = sim_batches(source, prefetch=True)
    for x, y in steps:  # the background thread and the cache give the same steps
        x1, y1 = next(it)
        assert torch.equal(x, x1) and torch.equal(y, y1)
    it.close()  # type: ignore[attr-defined]
    # step 0 is the plain source's step 0; step 3 starts the next simulation, at its own seed
    assert torch.equal(steps[0][0], next(sim_batches(base, start=0, prefetch=False))[0])
    assert torch.equal(steps[3][0], next(sim_batches(base, start=3, prefetch=False))[0])
    assert not torch.equal(steps[1][0], steps[0][0]) and not torch.equal(steps[2][0], steps[1][0])
    assert source.to_dict()["redraws"] == 2
    with pytest.raises(ConfigError, match="redraws -1"):
        SimSource(SimConfig(shape=(96, 96)), crop=32, redraws=-1)


def test_candidate_init_per_candidate() -> None:
    td = _train_default()
    assert td.candidate_init(None, "unet_b32d3") is None
    assert td.candidate_init("default", "unet_b16d4") == "default"
    spec = "unet_b32d3=default,unet_b16d4=/x/b.safetensors"
    assert td.candidate_init(spec, "unet_b32d3") == "default"
    assert td.candidate_init(spec, "unet_b16d4") == "/x/b.safetensors"
    assert td.candidate_init(spec, "unet_b20d4") is None
    with pytest.raises(SystemExit, match="unknown candidate nope"):
        td.candidate_init("nope=default", "unet_b32d3")


def test_start_from_loads_or_grows_the_checkpoint(tmp_path: Path) -> None:
    """--init with the candidate's own architecture loads it; a narrower U-Net of the same depth is
    grown to the candidate's width, one a level shallower deepened, both computing the same; anything
    else is refused."""
    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    td = _train_default()
    torch.manual_seed(0)
    small = ModelSpec("unet", {"base_channels": 4, "depth": 2})
    trained = build_model(small)
    ckpt = tmp_path / "small.safetensors"
    save_checkpoint(ckpt, trained, small)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = trained(x)
    for base, grown in ((4, False), (6, True)):
        spec = ModelSpec("unet", {"base_channels": base, "depth": 2})
        net, start_spec, widened = td.start_from(str(ckpt), build_model(spec), spec)
        assert (widened, start_spec.params, net.enc[0][0].out_channels) == (grown, small.params, base)
        with torch.no_grad():
            assert float((net(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    deep = ModelSpec("unet", {"base_channels": 4, "depth": 3, "max_channels": 16})
    net, start_spec, grown = td.start_from(str(ckpt), build_model(deep), deep)
    assert (grown, net.depth, net.mid[0].out_channels) == (True, 3, 16)
    with torch.no_grad():
        assert float((net(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    capped = ModelSpec("unet", {"base_channels": 4, "depth": 3, "max_channels": 8})
    with pytest.raises(SystemExit, match="max_channels 8 is below the bottleneck's 16"):
        td.start_from(str(ckpt), build_model(capped), capped)
    for params in ({"base_channels": 6, "depth": 3}, {"base_channels": 2, "depth": 2},
                   {"base_channels": 4, "depth": 4}):
        spec = ModelSpec("unet", params)
        with pytest.raises(SystemExit, match="is neither"):
            td.start_from(str(ckpt), build_model(spec), spec)


def test_training_simulation_ranges() -> None:
    """--pixel-size / --dose replace the training simulation's ranges; nonsense is a one-line exit."""
    td = _train_default()
    assert td._sim_config(64).pixel_size_a == td.TRAIN_SIM["pixel_size_a"]
    cfg = td._sim_config(64, "0.5,2.5", "4,100")
    assert (cfg.pixel_size_a, cfg.dose_e_per_px, cfg.shape) == ((0.5, 2.5), (4.0, 100.0), (64, 64))
    with pytest.raises(SystemExit, match=r"--dose '4': expected LO,HI"):
        td._sim_config(64, None, "4")
    with pytest.raises(SystemExit, match="dose_e_per_px"):
        td._sim_config(64, None, "100,4")


def test_sim_source_refuses_bad_geometry() -> None:
    with pytest.raises(ConfigError, match="crop 200 px does not fit"):
        SimSource(SimConfig(shape=(96, 96)), crop=200)
    with pytest.raises(ConfigError, match="batch 6 is not a positive multiple of crops_per_image 4"):
        SimSource(SimConfig(shape=(96, 96)), crop=32, crops_per_image=4, batch=6)


def test_batch_psnr_matches_metrics_psnr() -> None:
    rng = np.random.default_rng(0)
    clean = rng.random((2, 1, 16, 16))
    pred = clean + 0.1 * rng.standard_normal(clean.shape)
    got = batch_psnr(torch.from_numpy(pred), torch.from_numpy(clean)).numpy()
    np.testing.assert_allclose(got, [psnr(p[0], c[0]) for p, c in zip(pred, clean, strict=True)], rtol=1e-12)


def _train_default() -> Any:
    return load_plugin(ROOT / "models" / "train_default.py", "train_default")


def _worker_args(td: Any, *argv: str) -> argparse.Namespace:
    """The options of one CPU worker ("tiny") as the script parses them: ``argv`` on top of a 10-minute
    budget, 2 crops per image, no validation until the end."""
    return td.parse_args(["--worker", "tiny", "--device", "cpu", "--minutes", "10", "--crops-per-image", "2",
                          "--val-every", "1e9", "--val-reserve", "0", "--deadline", str(time.time() + 600.0),
                          *argv])


def test_default_recipe_trains_a_loadable_model_that_denoises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from cryodeploy import Denoiser

    td = _train_default()
    monkeypatch.setitem(td.CANDIDATES, "tiny", (8, 2, 3e-3))  # the recipe's code, a CPU-sized U-Net
    args = _worker_args(td, "--out", str(tmp_path), "--sim-size", "128", "--crop", "64", "--batch", "4",
                        "--val-count", "2", "--val-size", "128", "--max-steps", "25")
    td.train_worker(args)
    run = tmp_path / "candidates" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 25 and summary["samples"] == 100
    spec = json.loads((run / "best.json").read_text())
    assert spec["params"] == {"base_channels": 8, "depth": 2, "max_channels": 0}
    assert spec["normalization"] == {"method": "robust", "low_percentile": 1.0, "high_percentile": 99.0}
    assert spec["training"]["source"]["sim"]["shape"] == [128, 128] and spec["training"]["lr"] == 3e-3
    b = simulate(SimConfig(shape=(128, 128), dose_e_per_px=(20.0, 20.0)), 2, 4242)
    noisy, clean = b.noisy.numpy(), b.clean.numpy()
    with Denoiser.load(run / "best.safetensors", device="cpu") as d:
        out = d(noisy)
    before = np.mean([psnr(n, c) for n, c in zip(noisy, clean, strict=True)])
    after = np.mean([psnr(o, c) for o, c in zip(out, clean, strict=True)])
    assert after > before + 1.0, (before, after)  # measured: 4.74 -> 6.41 dB after 25 steps
    # --init: a second run starts from this one's weights (recorded), and refuses another geometry
    again = argparse.Namespace(**{**vars(args), "out": str(tmp_path / "ft"), "max_steps": 1,
                                  "init": str(run / "best.safetensors"), "lr": 0.0})
    td.train_worker(again)
    ft = json.loads((tmp_path / "ft" / "candidates" / "tiny" / "best.json").read_text())
    assert ft["training"]["init"]["from"] == str(run / "best.safetensors")
    assert ft["training"]["init"]["sha256"] == file_sha256(run / "best.safetensors")
    assert ft["training"]["init"]["training"]["step"] == spec["training"]["step"]
    monkeypatch.setitem(td.CANDIDATES, "tiny", (4, 2, 3e-3))
    with pytest.raises(SystemExit, match="is neither"):
        td.train_worker(argparse.Namespace(**{**vars(again), "lr": 0.0}))


def test_ema_keeps_the_averaged_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--ema: the checkpoint holds the moving average, not the last weights. With a decay of ~1 the
    average stays at its first value (the weights after step 1), so three steps with it save what one
    step without it does, while three steps without it save something else."""
    from cryodeploy.models.checkpoint import load_checkpoint

    td = _train_default()
    monkeypatch.setitem(td.CANDIDATES, "tiny", (4, 2, 3e-3))
    weights = {}
    for label, steps, ema in (("one", 1, 0.0), ("three", 3, 0.0), ("three_ema", 3, 1.0 - 1e-9)):
        td.train_worker(_worker_args(td, "--out", str(tmp_path / label), "--sim-size", "96", "--crop", "32",
                                     "--batch", "2", "--val-count", "1", "--val-size", "64",
                                     "--max-steps", str(steps), "--ema", repr(ema)))
        model, spec = load_checkpoint(tmp_path / label / "candidates" / "tiny" / "best.safetensors")
        weights[label] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert ("ema_decay" in spec.training) == (ema > 0)
    assert torch.allclose(weights["three_ema"], weights["one"], rtol=0, atol=1e-6)
    assert float((weights["three"] - weights["one"]).abs().max()) > 1e-4
