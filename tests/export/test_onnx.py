"""ONNX export: opset, dynamic axes, checker, metadata round trip, equality with PyTorch, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cryodeploy import __version__
from cryodeploy.backends.sources import load_source
from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, ModelError
from cryodeploy.export.onnx import (
    SPEC_KEY,
    cached_onnx,
    check_against_torch,
    convert_fp16,
    export_onnx,
    onnx_metadata,
    read_onnx_spec,
    verify_shape,
)
from cryodeploy.files import file_sha256
from cryodeploy.models.checkpoint import load_checkpoint


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_graph_contract(cnn3_onnx: Path, cnn3_checkpoint: Path) -> None:
    model = onnx.load(str(cnn3_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in model.graph.input] == ["input"]
    assert _dims(model.graph.input[0]) == ["batch", 1, "height", "width"]
    assert _dims(model.graph.output[0]) == ["batch", 1, "height", "width"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = onnx_metadata(cnn3_onnx)
    _, spec = load_checkpoint(cnn3_checkpoint)
    assert meta["architecture"] == "cnn3"
    assert json.loads(meta["params"]) == {"channels": 16}
    assert (meta["receptive_radius"], meta["stride"]) == ("3", "1")
    assert json.loads(meta["normalization"]) == spec.normalization.to_dict()
    assert meta["source_sha256"] == file_sha256(cnn3_checkpoint)
    assert meta["cryodeploy_version"] == __version__
    assert meta["verified"].startswith("onnxruntime ")
    assert list(meta)[-1] == SPEC_KEY  # written last: a file cut short loses it
    assert read_onnx_spec(cnn3_onnx) == spec


@pytest.mark.parametrize("which", ["cnn3", "unet"])
def test_export_equals_torch(which: str, request: pytest.FixtureRequest, rng: np.random.Generator) -> None:
    path = request.getfixturevalue(f"{which}_onnx")
    module, spec = load_checkpoint(request.getfixturevalue(f"{which}_checkpoint"))
    s = spec.stride
    # non-square, odd where the stride allows, and a batch size other than the traced one
    for shape in (verify_shape(spec), (3, 1, -(-91 // s) * s, -(-57 // s) * s)):
        assert shape[2] != shape[3]
        err = check_against_torch(path, module, shape, rng)
        assert err <= 1e-5, f"{which} {shape}: relative error {err:.3g}"
    if which == "cnn3":
        assert verify_shape(spec)[2] % 2 == 1 and verify_shape(spec)[3] % 2 == 1


def test_simplify_keeps_contract(
    unet_checkpoint: Path, unet_onnx: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    slim = export_onnx(load_source(unet_checkpoint), tmp_path / "slim.onnx", simplify=True)
    model = onnx.load(str(slim))
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.node) <= len(onnx.load(str(unet_onnx)).graph.node)
    assert _dims(model.graph.input[0]) == ["batch", 1, "height", "width"]
    module, spec = load_checkpoint(unet_checkpoint)
    assert check_against_torch(slim, module, (2, 1, 44, 28), rng) <= 1e-5
    assert read_onnx_spec(slim) == spec


def test_opset_range(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opset 16 unsupported"):
        export_onnx(load_source(cnn3_checkpoint), tmp_path / "m.onnx", opset=16)
    assert not (tmp_path / "m.onnx").exists()
    out = export_onnx(load_source(cnn3_checkpoint), tmp_path / "m18.onnx", opset=18)
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [18]


def _copy_checkpoint(src: Path, dst: Path, config: dict | None = None, weights: bytes | None = None) -> Path:
    dst.with_suffix(".safetensors").write_bytes(src.read_bytes() if weights is None else weights)
    cfg = json.loads(src.with_suffix(".json").read_text())
    dst.with_suffix(".json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst.with_suffix(".safetensors")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown-architecture", "unknown architecture 'resnet'"),
        ("wrong-shapes", "weights do not match architecture cnn3"),
        ("truncated-weights", "not a readable safetensors file"),
        ("missing", "no such model file"),
    ],
)
def test_unexportable_checkpoint(case: str, message: str, cnn3_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    if case == "unknown-architecture":
        _copy_checkpoint(cnn3_checkpoint, bad, {"architecture": "resnet", "params": {}})
    elif case == "wrong-shapes":
        _copy_checkpoint(cnn3_checkpoint, bad, {"params": {"channels": 8}})
    elif case == "truncated-weights":
        _copy_checkpoint(cnn3_checkpoint, bad, weights=cnn3_checkpoint.read_bytes()[:200])
    out = tmp_path / "out.onnx"
    with pytest.raises(ModelError, match=message) as info:
        export_onnx(load_source(bad), out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cryodeploy-tmp")]


def test_onnx_source_is_not_exported_again(cnn3_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="found an onnx model, expected a checkpoint"):
        export_onnx(load_source(cnn3_onnx), tmp_path / "again.onnx")


def test_load_source_onnx(cnn3_onnx: Path, cnn3_checkpoint: Path) -> None:
    src = load_source(cnn3_onnx)
    assert src.kind == "onnx"
    assert src.path == cnn3_onnx
    assert src.sha256 == file_sha256(cnn3_onnx)
    assert src.spec == load_checkpoint(cnn3_checkpoint)[1]
    assert (src.spec.receptive_radius, src.spec.stride) == (3, 1)
    with pytest.raises(ModelError, match="cannot be run by PyTorch"):
        src.torch_module()


@pytest.mark.parametrize("keep", [0, 16, 1000, 0.5, -7])
def test_truncated_onnx_is_model_error(keep: float, unet_onnx: Path, tmp_path: Path) -> None:
    data = unet_onnx.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[:n])
    with pytest.raises(ModelError, match=r"cut\.onnx") as info:
        load_source(cut)
    assert "\n" not in str(info.value)


def test_foreign_onnx_without_metadata(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Identity", ["input"], ["output"])
    io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", 1, "h", "w"])
          for n in ("input", "output")]
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", io[:1], io[1:]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="found no 'model_spec' metadata, expected an ONNX file written by"):
        load_source(path)


def test_cached_onnx_reuses_and_repairs(
    cnn3_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache"))
    src = load_source(cnn3_checkpoint)
    first = cached_onnx(src)
    assert first.parent == tmp_path / "cache" / "onnx"
    assert first.name.startswith(src.sha256)
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(src) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not exported again
    first.write_bytes(first.read_bytes()[:100])  # a damaged cache entry is replaced
    assert cached_onnx(src) == first
    assert read_onnx_spec(first) == src.spec
    onnx_src = load_source(first)
    assert cached_onnx(onnx_src) == first


def test_convert_fp16(
    unet_onnx: Path, unet_checkpoint: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    half = convert_fp16(unet_onnx, tmp_path / "half.onnx")
    model = onnx.load(str(half))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in model.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    meta = onnx_metadata(half)
    assert meta["precision"] == "fp16"
    assert list(meta)[-1] == SPEC_KEY
    module, spec = load_checkpoint(unet_checkpoint)
    assert read_onnx_spec(half) == spec
    err = check_against_torch(half, module, (1, 1, 64, 48), rng)
    assert 0 < err < 1e-2  # rounded weights: close to, but not equal to, fp32


def test_export_cli(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(cnn3_checkpoint), "-o", str(tmp_path / "out"),
                                 "--raw", str(tmp_path / "raw")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert "verified: onnxruntime" in result.output and "relative error" in result.output
    raw = load_source(tmp_path / "raw")
    assert raw.kind == "raw"
    # the raw folder is itself exportable, to the same function
    module, _ = load_checkpoint(cnn3_checkpoint)
    from_raw = export_onnx(raw, tmp_path / "from_raw.onnx")
    assert check_against_torch(from_raw, module, (1, 1, 33, 21), np.random.default_rng(0)) <= 1e-5
    assert onnx_metadata(from_raw)["source_kind"] == "raw"

    bad = runner.invoke(cli, ["export", str(tmp_path / "out" / "model.onnx"), "-o", str(tmp_path / "again")])
    assert bad.exit_code == 1
    assert bad.output.count("\n") == 1 and bad.output.startswith("error: ")
    assert runner.invoke(cli, ["export", "--help"]).exit_code == 0
