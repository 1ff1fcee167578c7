"""Cross-backend parity through the whole runner: PyTorch vs ONNX Runtime CPU on synthetic micrographs,
the definitions of the numbers, and a real mismatch that must fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cryodeploy.backends.sources import load_source
from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError
from cryodeploy.export.onnx import export_onnx
from cryodeploy.imaging.synth import SynthConfig, synth_micrographs
from cryodeploy.verify.parity import (
    REFERENCE,
    PairResult,
    ParityConfig,
    VariantResult,
    _judge,
    compare_arrays,
    run_parity,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic 200x152 micrographs (noisy/ with clean/ targets beside)."""
    return synth_micrographs(tmp_path_factory.mktemp("synth"), SynthConfig(2, size=(200, 152), seed=3))


def test_compare_arrays_definitions() -> None:
    b = np.array([[0.0, 2.0], [-4.0, 1.0]])
    a = b.copy()
    a[0, 1] += 1e-3
    max_abs, rel, psnr = compare_arrays(a, b)
    assert max_abs == pytest.approx(1e-3)
    assert rel == pytest.approx(1e-3 / 4.0)  # max|a-b| / max|b|
    assert psnr == pytest.approx(10 * np.log10(6.0**2 / (1e-6 / 4)))  # range(b)^2 / mse
    assert compare_arrays(b, b) == (0.0, 0.0, float("inf"))


def test_judge_thresholds() -> None:
    variants = [VariantResult("x", "fp32", "x/cpu/fp32", "ok", denoising_psnr=30.0),
                VariantResult("x", "fp16", "x/cpu/fp16", "ok", denoising_psnr=29.85),
                VariantResult("x", "bf16", "x/cpu/bf16", "ok", denoising_psnr=29.95)]
    pairs = [PairResult("x/cpu/fp16", "x/cpu/fp32", "psnr-loss"),
             PairResult("x/cpu/bf16", "x/cpu/fp32", "psnr-loss"),
             PairResult("x/cpu/fp32", REFERENCE, "fp32", rel=2e-5),
             PairResult("y/cpu/fp32", REFERENCE, "fp32", rel=1e-5)]
    _judge(pairs, variants, ParityConfig(backends=("torch",)))
    assert [p.ok for p in pairs] == [False, True, False, True]
    assert pairs[0].psnr_loss_db == pytest.approx(0.15)
    assert pairs[0].limit == "denoising PSNR loss 0.150 dB, expected <= 0.1"


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="backends \\['nope'\\] unknown"):
        ParityConfig(backends=("nope",))
    with pytest.raises(ConfigError, match="precisions"):
        ParityConfig(precisions=("fp8",))


@pytest.mark.parametrize(("which", "tile"), [("cnn3", 64), ("unet", 96)])
def test_torch_vs_ort_through_runner(which: str, tile: int, micrographs: list[Path], tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    source = load_source(request.getfixturevalue(f"{which}_checkpoint"))
    targets = {p: p.parent.parent / "clean" / p.name for p in micrographs}
    config = ParityConfig(backends=("torch", "ort"), threads=1, tile=tile, batch=4)
    report = run_parity(source, micrographs, tmp_path / "work", config, targets)
    assert report.ok, report.failures
    assert [v.status for v in report.variants] == ["ok", "ok"]
    pairs = {(p.a, p.b): p for p in report.pairs}
    ort_vs_torch = pairs[("ort/cpu/fp32", "torch/cpu/fp32")]
    assert ort_vs_torch.check == "fp32" and ort_vs_torch.rel <= 1e-5
    for label in ("torch/cpu/fp32", "ort/cpu/fp32"):
        vs_ref = pairs[(label, REFERENCE)]
        # fp32 against float64 is never exact, and must stay within the fp32 tolerance (tiled vs whole image)
        assert 0 < vs_ref.rel <= 1e-5, (label, vs_ref.rel)
        assert vs_ref.psnr > 100
    psnrs = [v.denoising_psnr for v in report.variants]
    assert psnrs[0] is not None and psnrs[0] == pytest.approx(psnrs[1], abs=1e-4)
    saved = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert saved["ok"] is True and saved["definitions"]["rel"].startswith("max|a-b| / max|b|")


def _poison_cache(good: Path, other_seed: int, tmp_path: Path) -> None:
    """Put an ONNX exported from a *different* checkpoint into the cache slot of ``good``, with
    metadata claiming ``good`` as its source, and sealed: what a faulty export would look like (an
    entry changed after it was written is rebuilt instead, see tests/export/test_onnx_cache.py)."""
    import torch

    from cryodeploy.files import cache_root, seal
    from cryodeploy.models import build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    src = load_source(good)
    torch.manual_seed(other_seed)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(src.spec), src.spec)
    model = onnx.load(str(export_onnx(load_source(other), tmp_path / "other.onnx")))
    for entry in model.metadata_props:
        if entry.key == "source_sha256":
            entry.value = src.sha256
    entry = cache_root("onnx") / f"{src.sha256}-opset17.onnx"
    onnx.save(model, str(entry))
    seal(entry)  # sealed: the cache's content check passes, as for a faulty export


def test_cli_fails_on_a_real_mismatch(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["parity", str(cnn3_checkpoint), "--synth", "1", "--size", "96", "80", "--backends", "torch,ort",
            "--precisions", "fp32,fp16", "--threads", "1", "--device", "cpu", "-q", "--json"]
    good = runner.invoke(cli, [*args, str(tmp_path / "good.json")])
    assert good.exit_code == 0, good.output
    assert "parity: PASS" in good.output
    report = json.loads((tmp_path / "good.json").read_text())
    status = {v["label"]: (v["status"], v["reason"]) for v in report["variants"]}
    assert status["ort/cpu/fp16"] == ("unavailable", "ort: fp16 is offered on CUDA only "
                                      "(the CPU provider has no fast fp16 convolutions)")
    fp16 = next(p for p in report["pairs"] if p["a"] == "torch/cpu/fp16" and p["b"] == "torch/cpu/fp32")
    assert fp16["check"] == "psnr-loss" and abs(fp16["psnr_loss_db"]) < 0.1 and fp16["ok"] is True

    _poison_cache(cnn3_checkpoint, other_seed=1, tmp_path=tmp_path)
    bad = runner.invoke(cli, [*args, str(tmp_path / "bad.json")])
    assert bad.exit_code == 1, bad.output
    assert "parity: FAIL" in bad.output
    report = json.loads((tmp_path / "bad.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert pairs[("ort/cpu/fp32", "torch/cpu/fp32")]["ok"] is False
    assert pairs[("ort/cpu/fp32", "torch/cpu/fp32")]["rel"] > 0.01
    assert pairs[("torch/cpu/fp32", REFERENCE)]["ok"] is True
    assert report["failures"][0].startswith("ort/cpu/fp32 vs torch/cpu/fp32: relative error")


def test_cli_onnx_model_and_usage(unet_checkpoint: Path, micrographs: list[Path], tmp_path: Path) -> None:
    onnx_path = export_onnx(load_source(unet_checkpoint), tmp_path / "unet.onnx")
    runner = CliRunner()
    res = runner.invoke(cli, ["parity", str(onnx_path), str(micrographs[0]), "--backends", "torch,ort",
                              "--threads", "1", "-q", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    torch_row = report["variants"][0]
    assert torch_row["status"] == "unavailable" and "cannot be run by PyTorch" in torch_row["reason"]
    assert report["reference"].startswith("unavailable")
    assert res.exit_code == 1  # one result and no reference: nothing was checked, which must not pass
    assert report["failures"][0].startswith("torch: requested but did not run (")  # not "PASS"
    assert "cannot be run by PyTorch" in report["failures"][0] and "parity: FAIL" in res.output
    assert report["failures"][1:] == ["nothing was checked: fewer than two results and no float64 reference"]

    assert runner.invoke(cli, ["parity", str(onnx_path)]).exit_code == 2  # neither INPUTS nor --synth
    unknown = runner.invoke(cli, ["parity", str(onnx_path), "--synth", "1", "--backends", "nope"])
    assert unknown.exit_code == 2 and "backends ['nope'] unknown" in unknown.output
    assert runner.invoke(cli, ["parity", "--help"]).exit_code == 0
