"""Batches simulated on the fly, and the default model's recipe (models/train_default.py) on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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
    spec = importlib.util.spec_from_file_location("train_default", ROOT / "models" / "train_default.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_recipe_trains_a_loadable_model_that_denoises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from cryodeploy import Denoiser

    td = _train_default()
    monkeypatch.setitem(td.CANDIDATES, "tiny", (8, 2, 3e-3))  # the recipe's code, a CPU-sized U-Net
    args = argparse.Namespace(worker="tiny", out=str(tmp_path), device="cpu", sim_size=128, crop=64,
                              crops_per_image=2, batch=4, lr=0.0, weight_decay=1e-4, seconds=600.0,
                              val_count=2, val_size=128, val_every=1e9, val_reserve=0.0, max_steps=25,
                              deadline=time.time() + 600.0, init=None)
    td.train_worker(args)
    run = tmp_path / "candidates" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 25 and summary["samples"] == 100
    spec = json.loads((run / "best.json").read_text())
    assert spec["params"] == {"base_channels": 8, "depth": 2}
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
    with pytest.raises(SystemExit, match="is not"):
        td.train_worker(argparse.Namespace(**{**vars(again), "lr": 0.0}))
