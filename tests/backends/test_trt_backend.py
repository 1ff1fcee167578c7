"""The TensorRT backend and ``cryodeploy export --trt``.

Without TensorRT (the usual case in CI: only its type stubs are installed) the tests check the
honest failure paths: availability reasons, the install message, clean one-line CLI errors.
The ``trt`` tests build and run real engines and skip, saying why, unless TensorRT's runtime
(``tensorrt.Builder``) and a CUDA GPU are present.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.backends import BACKENDS, BackendOptions, availability, create_backend
from cryodeploy.backends.sources import load_source
from cryodeploy.backends.trt.cache import (
    BuildConfig,
    EngineRecord,
    EngineSidecar,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from cryodeploy.backends.trt.probe import tensorrt_runtime
from cryodeploy.backends.trt.profile import ProfileShapes
from cryodeploy.cli import cli
from cryodeploy.errors import ModelError
from cryodeploy.models import ModelSpec


def _trt_missing() -> str | None:
    found, reason = tensorrt_runtime()
    if found is None:
        return reason
    import torch

    return None if torch.cuda.is_available() else "no CUDA device visible"


_MISSING = _trt_missing()
needs_trt = pytest.mark.skipif(_MISSING is not None, reason=f"needs TensorRT's runtime and a GPU: {_MISSING}")
without_trt = pytest.mark.skipif(_MISSING is None, reason="TensorRT and a GPU are present here")
PROFILE = ProfileShapes((1, 32, 32), (2, 64, 64), (4, 128, 128))


# --- without TensorRT ----------------------------------------------------------------------------

def test_trt_is_registered_and_imports_no_tensorrt() -> None:
    assert BACKENDS["trt"].module == "cryodeploy.backends.trt"
    code = ("import sys, cryodeploy.backends.trt, cryodeploy.backends.trt.cache, "
            "cryodeploy.backends.trt.profile, cryodeploy.backends.gate; "
            "print(sorted(m for m in ('tensorrt', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@without_trt
def test_availability_gives_the_reason() -> None:
    found, runtime_reason = tensorrt_runtime()
    ok, reason = availability("trt", BackendOptions(device="cuda"))
    assert not ok
    assert reason == (runtime_reason if found is None else "trt: no CUDA device visible")
    ok, cpu_reason = availability("trt", BackendOptions(device="cpu"))
    assert not ok
    assert cpu_reason == (runtime_reason if found is None else "trt: needs a CUDA device, found device 'cpu'")


def test_availability_with_only_the_type_stubs() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None or tensorrt_runtime()[0] is not None:
        pytest.skip("needs the tensorrt type stubs installed without TensorRT's runtime")
    ok, reason = availability("trt", BackendOptions(device="cuda"))
    assert not ok
    assert reason.startswith("tensorrt: only type stubs are installed, no TensorRT runtime")


def test_availability_when_tensorrt_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    ok, reason = availability("trt", BackendOptions(device="cuda"))
    assert not ok
    assert reason.startswith("tensorrt: not installed")


@without_trt
def test_export_trt_fails_with_the_install_message(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["export", str(cnn3_checkpoint), "-o", str(out), "--trt", "--precision", "fp16"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT engines cannot be built or run here: ")
    assert "pip install tensorrt" in lines[0] and "cryodeploy[gpu]" in lines[0]
    assert not out.exists()  # checked before anything was written


def test_export_trt_options_need_trt(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    args = ["export", str(cnn3_checkpoint), "-o", str(tmp_path / "o"), "--precision", "fp16"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    assert "need --trt" in res.output
    assert not (tmp_path / "o").exists()


def test_export_help_lists_the_trt_options() -> None:
    res = CliRunner().invoke(cli, ["export", "--help"])
    assert res.exit_code == 0
    for opt in ("--trt", "--precision", "--shapes", "--workspace", "--allow-accuracy-loss"):
        assert opt in res.output


@without_trt
def test_info_reports_tensorrt_unavailable_with_the_reason() -> None:
    res = CliRunner().invoke(cli, ["info", "--json"])
    assert res.exit_code == 0, res.output
    trt = json.loads(res.output)["backends"]["trt"]
    assert trt["available"] is False
    assert trt["reason"] == availability("trt", BackendOptions(device="cpu"))[1]
    text = CliRunner().invoke(cli, ["info"]).output
    assert f"trt              unavailable: {trt['reason']}" in text


@without_trt
def test_denoise_backend_trt_is_a_clean_one_line_error(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    import mrcfile
    from conftest import smooth_image

    mrc = tmp_path / "a.mrc"
    with mrcfile.new(mrc) as m:
        m.set_data(smooth_image(np.random.default_rng(0), (64, 64)))
    args = ["denoise", str(mrc), "-o", str(tmp_path / "dn"), "--model", str(cnn3_checkpoint),
            "--backend", "trt", "--device", "cuda", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tensorrt" in lines[0].lower()
    assert "Traceback" not in res.output


def test_load_source_reads_the_engine_sidecar(tmp_path: Path) -> None:
    from cryodeploy.backends.trt.cache import EngineKey, Platform
    from cryodeploy.files import file_sha256

    spec = ModelSpec("unet", params={"base_channels": 8, "depth": 2})
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"placeholder bytes: load_source reads only the sidecar and hashes the file")
    key = EngineKey("0" * 64, Platform("GPU", "9.0", "10.13.0.35"), "fp32", PROFILE)
    side = EngineSidecar(key, spec.to_dict(), file_sha256(engine), 1.0, "t", 1 << 20, "m.onnx")
    write_sidecar(engine, side)
    src = load_source(engine)
    assert (src.kind, src.path, src.spec, src.sha256) == ("engine", engine, spec, file_sha256(engine))
    with pytest.raises(ModelError, match="cannot be run by PyTorch"):
        src.torch_module()
    sidecar_path(engine).unlink()
    with pytest.raises(ModelError, match=r"m.engine: sidecar m.json missing"):
        load_source(engine)


# --- with TensorRT (real engines) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def built(cnn3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[EngineRecord]:
    if _MISSING is not None:
        pytest.skip(f"needs TensorRT's runtime and a CUDA GPU: {_MISSING}")
    from cryodeploy.backends.trt.build import build_engines
    from cryodeploy.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("trt")
    onnx = export_onnx(load_source(cnn3_checkpoint), folder / "model.onnx")
    cfg = BuildConfig(precisions=("fp32", "fp16"), shapes=PROFILE, workspace_bytes=256 << 20)
    return build_engines(onnx, folder / "engines", cfg)


def _torch(ckpt: Path, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.asarray(load_source(ckpt).torch_module()(torch.from_numpy(batch)).numpy())


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_engines_are_built_cached_and_gated(built: list[EngineRecord]) -> None:
    fp32, fp16 = built
    assert (fp32.key.precision, fp16.key.precision) == ("fp32", "fp16")
    assert fp32.path.is_file() and read_sidecar(fp32.path) == fp32.sidecar
    gate = fp16.sidecar.gate
    assert gate is not None and gate.samples == 4 and gate.passed, gate
    assert np.isfinite(gate.psnr_fp32) and np.isfinite(gate.psnr_fp16)
    assert any(p.name.startswith("timing-") for p in fp32.path.parent.iterdir())
    from cryodeploy.backends.trt.build import build_engines

    again = build_engines(fp32.sidecar.onnx_path, fp32.path.parent,
                          BuildConfig(precisions=("fp32", "fp16"), shapes=PROFILE, workspace_bytes=256 << 20))
    assert [r.reused for r in again] == [True, True]
    assert [r.path for r in again] == [fp32.path, fp16.path]


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_engines_match_torch(built: list[EngineRecord], cnn3_checkpoint: Path) -> None:
    import torch
    from conftest import smooth_image

    from cryodeploy.backends.trt.runner import TrtBackend

    rng = np.random.default_rng(0)
    # 6 tiles: more than the profile's max batch of 4, so the backend splits the batch
    batch = np.stack([smooth_image(rng, (96, 80))[None] for _ in range(6)]).astype(np.float32)
    ref = _torch(cnn3_checkpoint, batch)
    scale = float(np.abs(ref).max())
    for record, tol in zip(built, (1e-5, 1e-2), strict=True):
        with create_backend("trt", load_source(record.path), BackendOptions(device="cuda")) as backend:
            assert isinstance(backend, TrtBackend) and backend.precision == record.key.precision
            assert backend.fit_geometry(4096, 16) == (128, 4)  # clamped into the profile
            out = backend.run(batch)
            on_gpu = backend.run_device(torch.from_numpy(batch[:4]).cuda()).cpu().numpy()
        assert float(np.abs(out - ref).max()) / scale < tol, record.key.precision
        np.testing.assert_allclose(on_gpu, out[:4], rtol=0, atol=1e-6 * scale)


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_shape_outside_the_profile_is_a_clear_error(built: list[EngineRecord]) -> None:
    expected = r"found batch 1 of 256x256 tiles, expected batch 1..4 and tiles 32x32..128x128"
    with (create_backend("trt", load_source(built[0].path), BackendOptions(device="cuda")) as backend,
          pytest.raises(ModelError, match=expected)):
        backend.run(np.zeros((1, 1, 256, 256), np.float32))


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize(("field", "value"), [("gpu_name", "NVIDIA A100-SXM4-80GB"),
                                              ("tensorrt_version", "9.9.9")])
def test_mismatched_engine_is_rejected(
    built: list[EngineRecord], tmp_path: Path, field: str, value: str
) -> None:
    engine = tmp_path / "copy.engine"
    shutil.copy(built[0].path, engine)
    data = json.loads(sidecar_path(built[0].path).read_text())
    data["key"][field] = value
    sidecar_path(engine).write_text(json.dumps(data))
    with pytest.raises(ModelError, match=rf"copy.engine: engine built for .*{value}.*, this is "):
        create_backend("trt", load_source(engine), BackendOptions(device="cuda"))


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_denoise_backend_trt_builds_from_a_checkpoint(
    cnn3_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import smooth_image

    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache-root"))  # the exported ONNX goes here

    extra = (("engine_cache", str(tmp_path / "cache")), ("shapes", PROFILE))
    opts = BackendOptions(device="cuda", extra=extra)
    x = smooth_image(np.random.default_rng(1), (64, 64))[None, None]
    with create_backend("trt", load_source(cnn3_checkpoint), opts) as backend:
        out = backend.run(x)
    assert float(np.abs(out - _torch(cnn3_checkpoint, x)).max()) < 1e-4
    assert len(list((tmp_path / "cache").glob("fp32-*.engine"))) == 1
