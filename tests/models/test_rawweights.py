"""Raw per-layer weights (the seeds' interchange) and regression tests for the seeds' layout bug."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryodeploy.backends.sources import load_source
from cryodeploy.errors import ModelError
from cryodeploy.models import ModelSpec
from cryodeploy.models.checkpoint import load_checkpoint
from cryodeploy.models.rawweights import axis_sums, export_raw, load_raw


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_roundtrip_is_bit_exact_and_weights_are_not_symmetric(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    model, spec = load_checkpoint(cnn3_checkpoint)
    w2 = model.conv2.weight.detach()
    # the weights must be non-symmetric, or a transposed layout would go unnoticed by this test
    assert not torch.equal(w2, w2.permute(1, 0, 2, 3)) and not torch.equal(w2, w2.transpose(2, 3))
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["layers.json"] + [f"conv{i}_{k}.bin" for i in (1, 2, 3) for k in ("weight", "bias")]
    )
    raw = (out / "conv2_weight.bin").read_bytes()
    assert len(raw) == 16 * 16 * 3 * 3 * 4
    # the file is exactly the (out, in, kH, kW) C-order little-endian bytes
    assert raw == w2.numpy().astype("<f4").tobytes(order="C")
    meta = json.loads((out / "layers.json").read_text())
    assert meta["layers"][1]["weight"]["shape"] == [16, 16, 3, 3]
    assert meta["layers"][1]["weight"]["layout"] == "(out,in,kH,kW)"
    loaded, loaded_spec = load_raw(out)
    assert loaded_spec == spec
    assert _state_equal(loaded, model)


def test_unet_exports_every_conv_in_order(unet_checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(unet_checkpoint)
    out = export_raw(unet_checkpoint, tmp_path / "raw")
    meta = json.loads((out / "layers.json").read_text())
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(meta["layers"]) == n_convs == 11
    assert meta["layers"][0]["module"] == "enc.0.0" and meta["layers"][-1]["module"] == "out"
    loaded, _ = load_raw(out)
    assert _state_equal(loaded, model)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model(x))


def test_transposed_file_is_rejected_by_hash(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    """Replacing a file by the (kH, kW, in, out) bytes of the same weights: same size, refused."""
    model, _ = load_checkpoint(cnn3_checkpoint)
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    wrong = model.conv2.weight.detach().permute(2, 3, 1, 0).contiguous().numpy().astype("<f4").tobytes()
    assert len(wrong) == (out / "conv2_weight.bin").stat().st_size
    (out / "conv2_weight.bin").write_bytes(wrong)
    with pytest.raises(ModelError, match=r"conv2_weight\.bin: sha256 differs"):
        load_raw(out)


def _foreign_writer(model: torch.nn.Module, spec: ModelSpec, folder: Path, transpose: bool) -> None:
    """Another program following layers.json's shapes: fingerprints from its in-memory array by
    named axes, hashes of the bytes it wrote, and (the seeds' bug) optionally the bytes in (kH,kW,in,out)."""
    folder.mkdir()
    layers = []
    for i, name in enumerate(("conv1", "conv2", "conv3"), start=1):
        conv = getattr(model, name)
        w = conv.weight.detach().numpy().astype("<f4")
        data = (w.transpose(2, 3, 1, 0) if transpose else w).tobytes(order="C")
        bias = conv.bias.detach().numpy().astype("<f4").tobytes()
        (folder / f"conv{i}_weight.bin").write_bytes(data)
        (folder / f"conv{i}_bias.bin").write_bytes(bias)
        common = {"dtype": "float32", "byte_order": "little"}
        layers.append({
            "name": f"conv{i}", "module": name,
            "weight": {"file": f"conv{i}_weight.bin", "shape": list(w.shape), "layout": "(out,in,kH,kW)",
                       "sha256": hashlib.sha256(data).hexdigest(), "axis_sums": axis_sums(w), **common},
            "bias": {"file": f"conv{i}_bias.bin", "shape": [w.shape[0]], "layout": "(out,)",
                     "sha256": hashlib.sha256(bias).hexdigest(), **common},
        })
    doc = {"format": "cryodeploy-raw/1", "model": spec.to_dict(), "layers": layers}
    (folder / "layers.json").write_text(json.dumps(doc))


def test_foreign_writer_with_seeds_bug_is_detected_by_layout_fingerprint(cnn3_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    model, spec = load_checkpoint(cnn3_checkpoint)
    _foreign_writer(model, spec, tmp_path / "good", transpose=False)
    loaded, _ = load_raw(tmp_path / "good")
    assert _state_equal(loaded, model)
    # sizes and hashes all agree; only the axis marginals reveal the wrong order
    _foreign_writer(model, spec, tmp_path / "bad", transpose=True)
    with pytest.raises(ModelError, match=r"conv1_weight\.bin: weights read as \(out,in,kH,kW\) do not match"):
        load_raw(tmp_path / "bad")


def test_folder_without_fingerprint_is_refused(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    meta = json.loads((out / "layers.json").read_text())
    del meta["layers"][0]["weight"]["axis_sums"]
    (out / "layers.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="no 'axis_sums' for conv1; refusing"):
        load_raw(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.joinpath("conv3_bias.bin").write_bytes(b"\0" * 8),
         r"conv3_bias\.bin: found 8 bytes, expected 4"),
        (lambda d: d.joinpath("conv2_weight.bin").unlink(), r"conv2_weight\.bin: cannot read"),
    ],
)
def test_size_and_missing_file_mismatches_are_refused(cnn3_checkpoint: Path, tmp_path: Path, edit,
                                                      message: str) -> None:
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    edit(out)
    with pytest.raises(ModelError, match=message):
        load_raw(out)


def test_shape_mismatch_with_architecture_is_refused(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    meta = json.loads((out / "layers.json").read_text())
    meta["model"]["params"]["channels"] = 8
    (out / "layers.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"shape \(16, 1, 3, 3\), expected \(8, 1, 3, 3\)"):
        load_raw(out)


def test_model_with_non_conv_parameters_is_refused(tmp_path: Path) -> None:
    from cryodeploy.models.rawweights import raw_layers

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ModelError, match=r"also has parameters \['1.bias', '1.weight'\]"):
        raw_layers(model)


def test_raw_folder_loads_as_model_source(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    model, spec = load_checkpoint(cnn3_checkpoint)
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    source = load_source(out)
    assert source.kind == "raw" and source.spec == spec and len(source.sha256) == 64
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 24, 24), dtype=np.float32))
    assert torch.equal(source.torch_module()(x), model(x))

