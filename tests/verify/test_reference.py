"""Reference bundles: make, check, and detect a damaged or wrong implementation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, ModelError
from cryodeploy.models.checkpoint import load_checkpoint
from cryodeploy.verify.reference import check_reference, make_reference


@pytest.fixture(scope="module")
def bundle(cnn3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reference(cnn3_checkpoint, tmp_path_factory.mktemp("ref") / "bundle", batch=2, size=32,
                          seed=0)


def test_bundle_contents_match_an_independent_computation(bundle: Path, cnn3_checkpoint: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    arrays = manifest["arrays"]
    assert sorted(arrays) == sorted(["input", "target", "output", "loss"]
                                    + [f"grad_conv{i}_{k}" for i in (1, 2, 3) for k in ("weight", "bias")])
    assert arrays["input"]["shape"] == [2, 1, 32, 32] and arrays["loss"]["shape"] == []
    assert arrays["grad_conv2_weight"]["shape"] == [16, 16, 3, 3]

    def read(name: str) -> np.ndarray:
        raw = (bundle / arrays[name]["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == arrays[name]["sha256"]
        return np.frombuffer(raw, "<f4").reshape(arrays[name]["shape"])

    x, t = read("input"), read("target")
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # normalized per image
    model, _ = load_checkpoint(cnn3_checkpoint)
    out = model(torch.from_numpy(x.copy()))
    loss = torch.mean((out - torch.from_numpy(t.copy())) ** 2)
    loss.backward()
    assert np.array_equal(read("output"), out.detach().numpy())
    assert abs(float(read("loss")) - loss.item()) < 1e-7 and loss.item() > 0.1  # random weights: a large loss
    np.testing.assert_allclose(read("grad_conv1_weight"), model.conv1.weight.grad.numpy(), atol=1e-7)
    # the bundle's weights are the raw interchange of the same model
    w = np.frombuffer((bundle / "weights" / "conv2_weight.bin").read_bytes(), "<f4").reshape(16, 16, 3, 3)
    assert np.array_equal(w, model.conv2.weight.detach().numpy())


def test_check_passes_and_reports_each_array(bundle: Path) -> None:
    report = check_reference(bundle)
    assert report.ok
    assert len(report.arrays) == 8
    assert all(a.status == "ok" and a.max_abs_error is not None and a.max_abs_error <= 1e-5
               for a in report.arrays)


def test_check_fails_for_a_different_implementation(bundle: Path, tmp_path: Path) -> None:
    """A port with one weight off by 1e-3 is caught in output, loss and gradients."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    out_entry = manifest["arrays"]["output"]
    out = np.frombuffer((bad / "output.bin").read_bytes(), "<f4").copy()
    out[5] += 3e-5  # what a slightly wrong port would have written
    (bad / "output.bin").write_bytes(out.astype("<f4").tobytes())
    out_entry["sha256"] = hashlib.sha256(out.astype("<f4").tobytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    report = check_reference(bad)
    status = {a.name: a.status for a in report.arrays}
    assert not report.ok and status["output"] == "FAIL" and status["loss"] == "ok"
    err = next(a.max_abs_error for a in report.arrays if a.name == "output")
    assert err == pytest.approx(3e-5, rel=0.05)


def test_damaged_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "target.bin").write_bytes(b"\0" * (bad / "target.bin").stat().st_size)
    with pytest.raises(ModelError, match=r"target\.bin: sha256 differs from manifest\.json"):
        check_reference(bad)


def test_unet_size_must_match_stride(unet_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of the model stride 4"):
        make_reference(unet_checkpoint, tmp_path / "r", size=30)
    report = check_reference(make_reference(unet_checkpoint, tmp_path / "u", batch=1, size=32))
    assert report.ok and len(report.arrays) == 2 + 2 * 11


def test_cli_make_and_check(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["reference", "make", str(cnn3_checkpoint), str(tmp_path / "b"), "--size", "16"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["reference", "check", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "grad_conv3_bias" in res.output and res.output.strip().splitlines()[-1].startswith("PASS")
    # a changed weight file (and its hash updated, as a port would) makes the check fail with exit 1
    layers = json.loads((tmp_path / "b" / "weights" / "layers.json").read_text())
    bias_file = tmp_path / "b" / "weights" / "conv3_bias.bin"
    bias = np.frombuffer(bias_file.read_bytes(), "<f4") + np.float32(1e-3)
    bias_file.write_bytes(bias.astype("<f4").tobytes())
    layers["layers"][2]["bias"]["sha256"] = hashlib.sha256(bias.astype("<f4").tobytes()).hexdigest()
    (tmp_path / "b" / "weights" / "layers.json").write_text(json.dumps(layers))
    res = runner.invoke(cli, ["reference", "check", str(tmp_path / "b")])
    assert res.exit_code == 1 and "FAIL" in res.output
    assert runner.invoke(cli, ["reference", "--help"]).exit_code == 0


def test_ort_backend_checks_the_forward_pass(bundle: Path) -> None:
    pytest.importorskip("onnxruntime")
    report = check_reference(bundle, backend="ort")
    status = {a.name: a.status for a in report.arrays}
    assert report.ok and status["output"] == "ok" and status["loss"] == "ok"
    assert {status[n] for n in status if n.startswith("grad_")} == {"skipped"}
    err = next(a.max_abs_error for a in report.arrays if a.name == "output")
    assert err is not None and err <= 1e-5


MANIFEST_CASES = {
    "format": (lambda m: m.update(format="cryodeploy-reference/0"),
               "found format 'cryodeploy-reference/0', expected 'cryodeploy-reference/1'"),
    "no-arrays": (lambda m: m.pop("arrays"), "found no 'arrays', expected one"),
    "no-target": (lambda m: m["arrays"].pop("target"),
                  "found no 'target' array with role 'target', expected one"),
    "text-tolerance": (lambda m: m.update(tolerance="1e-5"),
                       "found tolerance '1e-5', expected a valid number"),
    "zero-tolerance": (lambda m: m.update(tolerance=0), "found tolerance 0, expected greater than 0"),
    "escape": (lambda m: m["arrays"]["loss"].update(file="../loss.bin"),
               "file '../loss.bin' invalid, expected a name inside the bundle"),
    "weights-escape": (lambda m: m.update(weights="/etc"),
                       "file '/etc' invalid, expected a name inside the bundle"),
    "role": (lambda m: m["arrays"]["loss"].update(role="metric"),
             "found arrays.loss.role 'metric', expected 'input', 'target', 'output', 'loss' or 'gradient'"),
    "negative-shape": (lambda m: m["arrays"]["output"].update(shape=[2, -1]),
                       "found shape [2, -1], expected non-negative sizes"),
    "text-shape": (lambda m: m["arrays"]["output"].update(shape=["2"]),
                   "found arrays.output.shape.0 '2', expected a valid integer"),
    "unknown-field": (lambda m: m["arrays"]["output"].update(scale=1),
                      "found unknown field 'arrays.output.scale'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_fields_are_one_error_naming_the_field(bundle: Path, tmp_path: Path, case: str) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    change, message = MANIFEST_CASES[case]
    change(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError) as err:
        check_reference(bad)
    assert str(err.value) == f"{bad / 'manifest.json'}: {message}"


def test_array_of_the_wrong_size_for_its_shape_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["arrays"]["loss"]["shape"] = [2]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError) as err:
        check_reference(bad)
    assert str(err.value) == f"{bad / 'loss.bin'}: found 4 bytes, expected 8 for shape (2,)"
