"""The TensorRT engine cache without TensorRT: profiles, cache keys, sidecars, invalidation, the fp16 gate.

Files named ``*.engine`` here hold placeholder bytes (the cache logic hashes engine files and
never parses them); nothing in this module builds or runs a TensorRT engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryodeploy.backends.gate import GateResult, denoising_psnr, fp16_gate, synthetic_calibration
from cryodeploy.backends.trt.cache import (
    BuildConfig,
    EngineKey,
    EngineRecord,
    EngineSidecar,
    Platform,
    cache_lookup,
    check_gate,
    check_platform,
    key_differences,
    read_sidecar,
    sidecar_path,
    timing_cache_path,
    write_sidecar,
)
from cryodeploy.backends.trt.probe import INSTALL_HINT, require_tensorrt
from cryodeploy.backends.trt.profile import (
    DEFAULT_SHAPES,
    ProfileShapes,
    parse_shapes,
    plan_batches,
    select_shape,
)
from cryodeploy.errors import BackendUnavailable, ConfigError, ModelError
from cryodeploy.models import ModelSpec

H100 = Platform("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
PROFILE = ProfileShapes((1, 64, 64), (2, 128, 128), (4, 256, 256))
KEY = EngineKey("ab" * 32, H100, "fp16", PROFILE)


# --- profiles ------------------------------------------------------------------------------------

def test_parse_shapes_reads_min_opt_max_and_round_trips() -> None:
    p = parse_shapes("1x256x256,4x1024x1024,8x2048x2048")
    assert p == DEFAULT_SHAPES
    assert p.input_shapes() == [(1, 1, 256, 256), (4, 1, 1024, 1024), (8, 1, 2048, 2048)]
    assert parse_shapes(p.describe()) == p
    expected = ProfileShapes((1, 64, 64), (2, 96, 128), (4, 128, 256))
    assert parse_shapes("1x64, 2x96x128 ,4x128x256") == expected


@pytest.mark.parametrize(("text", "stride", "needle"), [
    ("1x256x256,4x1024x1024", 1, "found 2 shapes"),
    ("1x256x256,4x1024,8xAx2048", 1, "expected BATCHxHEIGHTxWIDTH"),
    ("1x256x256,4x128x128,8x2048x2048", 1, "height: found min 256, opt 128"),
    ("4x256x256,2x512x512,8x1024x1024", 1, "batch: found min 4, opt 2"),
    ("1x256x256,4x512x512,8x2048x384", 1, "width: found min 256, opt 512, max 384"),
    ("0x256x256,4x512x512,8x1024x1024", 1, "3 positive sizes"),
    ("1x260x256,4x512x512,8x1024x1024", 8, "min tile 260x256: not a multiple of the model stride 8"),
])
def test_parse_shapes_rejects(text: str, stride: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_shapes(text, stride)


def test_select_shape_clamps_and_aligns_to_the_profile() -> None:
    assert select_shape(PROFILE, 2, 128) == (2, (128, 128))
    assert select_shape(PROFILE, 16, 1024) == (4, (256, 256))       # above max: clamped down
    assert select_shape(PROFILE, 1, 32) == (1, (64, 64))            # below min: raised to min
    assert select_shape(PROFILE, 3, (100, 250), stride=16) == (3, (96, 240))
    assert select_shape(PROFILE, 3, (70, 70), stride=16) == (3, (64, 64))  # never below min
    with pytest.raises(ConfigError):
        select_shape(PROFILE, 0, 128)


def test_plan_batches_splits_above_max_and_pads_below_min() -> None:
    assert plan_batches(10, 1, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert plan_batches(3, 4, 8) == [(0, 3, 4)]
    assert plan_batches(9, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    with pytest.raises(ConfigError):
        plan_batches(3, 5, 4)


def test_profile_require_names_the_engine_and_the_ranges() -> None:
    PROFILE.require(4, (256, 64), "x.engine")
    with pytest.raises(ModelError, match=r"x.engine: found batch 1 of 512x512 tiles, expected batch 1..4 "
                                         r"and tiles 64x64..256x256"):
        PROFILE.require(1, (512, 512), "x.engine")
    with pytest.raises(ModelError, match="found batch 5"):
        PROFILE.require(5, (128, 128), "x.engine")


def test_profile_from_engine_input_shapes() -> None:
    assert ProfileShapes.from_input_shapes([[1, 1, 64, 64], [2, 1, 128, 128], [4, 1, 256, 256]]) == PROFILE
    with pytest.raises(ModelError):
        ProfileShapes.from_input_shapes([[1, 3, 64, 64], [2, 3, 128, 128], [4, 3, 256, 256]])


# --- keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32},
    {"platform": replace(H100, gpu_name="NVIDIA A100-SXM4-80GB")},
    {"platform": replace(H100, compute_capability="8.0")},
    {"platform": replace(H100, tensorrt_version="10.0.1.6")},
    {"precision": "fp32"},
    {"profile": replace(PROFILE, opt=(2, 128, 192))},
])
def test_engine_key_changes_with_each_field(change: dict[str, Any]) -> None:
    other = replace(KEY, **change)
    assert other.digest() != KEY.digest()
    assert other.engine_name() != KEY.engine_name()
    assert len(key_differences(KEY, other)) == 1


def test_engine_key_is_stable_and_validated() -> None:
    same = EngineKey("ab" * 32, Platform(*H100.__dict__.values()), "fp16", parse_shapes(PROFILE.describe()))
    assert same.digest() == KEY.digest() == EngineKey.from_fields(KEY.fields()).digest()
    assert KEY.engine_name() == f"fp16-{KEY.digest()[:24]}.engine"
    assert set(KEY.fields()) == {"onnx_sha256", "gpu_name", "compute_capability", "tensorrt_version",
                                 "precision", "profile"}
    with pytest.raises(ConfigError, match="'bf16'"):
        replace(KEY, precision="bf16")


# --- sidecars and the cache ----------------------------------------------------------------------

def _sidecar(engine: Path, key: EngineKey = KEY, gate: GateResult | None = None) -> EngineSidecar:
    from cryodeploy.files import file_sha256

    return EngineSidecar(key, ModelSpec("cnn3").to_dict(), file_sha256(engine), 12.5,
                         "2026-01-01T00:00:00+00:00", 1 << 30, "/x/model.onnx", gate)


def _cached(folder: Path, key: EngineKey = KEY, gate: GateResult | None = None) -> Path:
    engine = folder / key.engine_name()
    engine.write_bytes(b"placeholder bytes standing in for a serialized engine")
    write_sidecar(engine, _sidecar(engine, key, gate))
    return engine


def test_sidecar_round_trip_holds_key_build_time_and_gate(tmp_path: Path) -> None:
    gate = fp16_gate(31.25, 31.2, samples=4)
    engine = _cached(tmp_path, gate=gate)
    side = read_sidecar(engine)
    assert side == _sidecar(engine, gate=gate)
    raw = json.loads(sidecar_path(engine).read_text())
    assert raw["format"] == "cryodeploy-engine/1"
    assert raw["key"] == KEY.fields()
    assert raw["build_seconds"] == 12.5
    assert raw["fp16_gate"]["drop_db"] == pytest.approx(0.05)
    assert raw["fp16_gate"]["passed"] is True
    assert ModelSpec.from_dict(raw["model"]) == ModelSpec("cnn3")
    assert raw["loss_accepted"] is False
    write_sidecar(engine, replace(side, loss_accepted=True))
    assert read_sidecar(engine).loss_accepted is True


def test_read_sidecar_errors_name_the_file(tmp_path: Path) -> None:
    engine = tmp_path / "a.engine"
    with pytest.raises(ModelError, match=r"a.engine: sidecar a.json missing"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ModelError, match=r"a.json: unreadable engine sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ModelError, match=r"a.json: engine sidecar format 'other/1'"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "cryodeploy-engine/1", "key": KEY.fields()}))
    with pytest.raises(ModelError, match=r"a.json: engine sidecar is incomplete"):
        read_sidecar(engine)


SIDECAR_CASES = {
    "text-workspace": (lambda d: d.update(workspace_bytes="1073741824"),
                       "found workspace_bytes '1073741824', expected a valid integer"),
    "number-as-gpu": (lambda d: d["key"].update(gpu_name=100),
                      "found key.gpu_name 100, expected a valid string"),
    "no-precision": (lambda d: d["key"].pop("precision"), "found no 'key.precision', expected one"),
    "negative-build": (lambda d: d.update(build_seconds=-1.0),
                       "found build_seconds -1.0, expected greater than or equal to 0"),
    "text-loss-accepted": (lambda d: d.update(loss_accepted="yes"),
                           "found loss_accepted 'yes', expected a valid boolean"),
    "gate-samples": (lambda d: d["fp16_gate"].update(samples=2.5),
                     "found fp16_gate.samples 2.5, expected a valid integer"),
    "short-engine-hash": (lambda d: d.update(engine_sha256="00"),
                          "found engine_sha256 '00', expected string should match pattern '^[0-9a-f]{64}$'"),
    "unknown-field": (lambda d: d.update(int8=True), "found unknown field 'int8'"),
}


@pytest.mark.parametrize("case", sorted(SIDECAR_CASES))
def test_sidecar_field_errors_name_the_file_and_field(tmp_path: Path, case: str) -> None:
    engine = _cached(tmp_path, gate=fp16_gate(31.25, 31.2, samples=4))
    doc = json.loads(sidecar_path(engine).read_text())
    change, message = SIDECAR_CASES[case]
    change(doc)
    sidecar_path(engine).write_text(json.dumps(doc))
    with pytest.raises(ModelError) as err:
        read_sidecar(engine)
    assert str(err.value) == f"{sidecar_path(engine)}: engine sidecar is incomplete or invalid: {message}"


def test_cache_lookup_reuses_only_an_exact_match(tmp_path: Path) -> None:
    assert cache_lookup(tmp_path, KEY).action == "build"
    engine = _cached(tmp_path)
    decision = cache_lookup(tmp_path, KEY)
    assert (decision.action, decision.path) == ("reuse", engine)
    assert decision.sidecar == read_sidecar(engine)  # handed on, so build_engines need not re-read it
    # every other key names another file, so it is built, never served this engine
    newer = replace(H100, tensorrt_version="10.14")
    for other in (replace(KEY, precision="fp32"), replace(KEY, platform=newer)):
        d = cache_lookup(tmp_path, other)
        assert (d.action, d.path, d.reason) == ("build", tmp_path / other.engine_name(), "no cached engine")


@pytest.mark.parametrize("field", ["onnx_sha256", "gpu_name", "compute_capability", "tensorrt_version",
                                   "precision", "profile"])
def test_cache_lookup_rebuilds_when_a_sidecar_field_differs(tmp_path: Path, field: str) -> None:
    engine = _cached(tmp_path)
    data = json.loads(sidecar_path(engine).read_text())
    other = {"profile": "1x64x64,1x64x64,1x64x64", "precision": "fp32"}
    data["key"][field] = other.get(field, "X")
    sidecar_path(engine).write_text(json.dumps(data))
    decision = cache_lookup(tmp_path, KEY)
    assert decision.action == "build"
    assert f"{field}: cached" in decision.reason


def test_cache_lookup_rebuilds_a_changed_or_orphaned_engine(tmp_path: Path) -> None:
    engine = _cached(tmp_path)
    engine.write_bytes(b"other bytes")
    assert "sha256 differs" in cache_lookup(tmp_path, KEY).reason
    sidecar_path(engine).unlink()
    decision = cache_lookup(tmp_path, KEY)
    assert decision.action == "build" and "sidecar" in decision.reason


def test_check_platform_names_both_gpus_and_versions() -> None:
    check_platform(Path("e.engine"), H100, Platform("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35"))
    a100 = Platform("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35")
    expected = (r"e.engine: engine built for NVIDIA H100 80GB HBM3 \(sm 9.0\) / TensorRT 10.13.0.35, "
                r"this is NVIDIA A100-SXM4-80GB \(sm 8.0\) / TensorRT 10.13.0.35")
    with pytest.raises(ModelError, match=expected):
        check_platform(Path("e.engine"), H100, a100)
    with pytest.raises(ModelError, match=r"TensorRT 10.13.0.35, this is .* TensorRT 10.14.1"):
        check_platform(Path("e.engine"), H100, replace(H100, tensorrt_version="10.14.1"))


def test_check_gate_refuses_failed_or_ungated_fp16(tmp_path: Path) -> None:
    fp32 = _sidecar(_cached(tmp_path, replace(KEY, precision="fp32")), replace(KEY, precision="fp32"))
    check_gate(Path("a"), fp32)
    ungated = _sidecar(_cached(tmp_path))
    with pytest.raises(ModelError, match="no accuracy gate result"):
        check_gate(Path("a"), ungated)
    failed = replace(ungated, gate=fp16_gate(30.0, 29.7, samples=4))
    with pytest.raises(ModelError, match=r"fp16 denoising PSNR 29.700 dB vs fp32 30.000 dB on 4 calibration "
                                         r"micrographs: drop 0.300 dB exceeds the 0.1 dB allowed"):
        check_gate(Path("a"), failed)
    check_gate(Path("a"), failed, allow_accuracy_loss=True)
    check_gate(Path("a"), replace(failed, loss_accepted=True))  # kept on purpose when it was built
    check_gate(Path("a"), replace(ungated, gate=fp16_gate(30.0, 29.95)))


def test_engine_record_describe(tmp_path: Path) -> None:
    engine = _cached(tmp_path, gate=fp16_gate(30.0, 29.98, samples=4))
    built = EngineRecord(engine, read_sidecar(engine), reused=False).describe()
    assert built.startswith(f"fp16 engine {engine} (built in 12.5 s, profile 1x64x64,2x128x128,4x256x256)")
    assert "drop 0.020 dB within" in built
    assert "reused from the cache" in EngineRecord(engine, read_sidecar(engine), reused=True).describe()


def test_timing_cache_is_per_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    path = timing_cache_path(tmp_path, H100)
    assert path == tmp_path / "timing-nvidia-h100-80gb-hbm3-sm9.0-trt10.13.0.35.cache"
    assert timing_cache_path(tmp_path, replace(H100, tensorrt_version="10.14")) != path


def test_build_config_from_command_line_options() -> None:
    cfg = BuildConfig.from_options("both", "1x64x64,2x128x128,4x256x256", 512, False, stride=1)
    assert (cfg.precisions, cfg.shapes, cfg.workspace_bytes) == (("fp32", "fp16"), PROFILE, 512 << 20)
    assert BuildConfig.from_options("fp16", None, 64, True, stride=8).shapes == DEFAULT_SHAPES
    with pytest.raises(ConfigError, match="stride 16"):
        BuildConfig.from_options("fp32", "1x72x72,2x128x128,4x256x256", 64, False, stride=16)
    with pytest.raises(ConfigError, match="'int8'"):
        BuildConfig.from_options("int8", None, 64, False, stride=1)
    with pytest.raises(ConfigError):
        BuildConfig(precisions=())
    with pytest.raises(ConfigError, match="at least 1 MiB"):
        BuildConfig(workspace_bytes=1000)


def test_require_tensorrt_says_how_to_install() -> None:
    from cryodeploy.backends.trt.probe import tensorrt_runtime

    if tensorrt_runtime()[0] is not None:
        pytest.skip("TensorRT's runtime is installed here")
    with pytest.raises(BackendUnavailable) as err:
        require_tensorrt()
    assert INSTALL_HINT in str(err.value) and "pip install tensorrt" in str(err.value)


# --- the fp16 gate -------------------------------------------------------------------------------

def test_gate_boundary_is_inclusive_at_exactly_max_drop() -> None:
    assert 30.1 - 30.0 != 0.1                                                # floats: 0.10000000000000142
    assert fp16_gate(30.1, 30.0).drop_db == 0.1 and fp16_gate(30.1, 30.0).passed
    assert fp16_gate(40.0, 39.9).passed
    assert not fp16_gate(30.0, 29.8999999).passed                                 # 0.1000001 dB
    assert not fp16_gate(30.0, 29.89).passed
    assert fp16_gate(30.0, 30.4).passed and fp16_gate(30.0, 30.4).drop_db == pytest.approx(-0.4)
    assert fp16_gate(30.0, 29.5, max_drop_db=0.5).passed
    assert not fp16_gate(30.0, 29.5, max_drop_db=0.49).passed


def test_gate_non_finite_values() -> None:
    assert fp16_gate(math.inf, math.inf).passed                   # both identical to the target
    assert not fp16_gate(math.inf, 50.0).passed
    assert not fp16_gate(30.0, math.nan).passed
    assert fp16_gate(30.0, math.inf).passed
    with pytest.raises(ConfigError):
        fp16_gate(30.0, 30.0, max_drop_db=-0.1)
    with pytest.raises(ConfigError):
        fp16_gate(30.0, 30.0, max_drop_db=math.nan)


def test_gate_result_round_trip() -> None:
    g = fp16_gate(28.4, 28.35, 0.1, samples=4)
    assert GateResult.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_synthetic_calibration_is_seeded_and_noisy() -> None:
    noise = {"kind": "poisson-gaussian", "dose": 10.0, "sigma": 0.1, "dose_range": None}
    spec = ModelSpec("cnn3", noise=noise)
    a = synthetic_calibration(spec, (48, 64), count=2, seed=3)
    b = synthetic_calibration(spec, (48, 64), count=2, seed=3)
    assert len(a) == 2 and a[0][0].shape == (48, 64) and a[0][0].dtype == np.float32
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))
    noisy, clean = a[0]
    assert clean.min() >= 0.0 and clean.max() <= 1.0
    resid = float(np.std(noisy - clean))
    assert 0.1 < resid < 0.3, resid                                # Poisson at dose 10 + sigma 0.1
    assert not np.array_equal(a[0][1], synthetic_calibration(spec, (48, 64), count=1, seed=4)[0][1])


def test_denoising_psnr_matches_a_direct_computation(cnn3_checkpoint: Path) -> None:
    import torch

    from cryodeploy.backends import BackendOptions, create_backend
    from cryodeploy.backends.sources import load_source
    from cryodeploy.imaging.metrics import psnr
    from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize

    src = load_source(cnn3_checkpoint)
    pairs = synthetic_calibration(src.spec, (64, 64), count=2, seed=0)
    with create_backend("torch", src, BackendOptions()) as backend:
        measured = denoising_psnr(backend, src.spec, pairs)
        gate = fp16_gate(measured, denoising_psnr(backend, src.spec, pairs), samples=2)
    module = src.torch_module()
    direct = []
    for noisy, clean in pairs:
        st = norm_stats(noisy, src.spec.normalization)
        with torch.inference_mode():
            out = module(torch.from_numpy(normalize(noisy, st)[None, None].astype(np.float32)))[0, 0].numpy()
        direct.append(psnr(denormalize(out, st), clean, data_range=float(clean.max() - clean.min())))
    assert measured == pytest.approx(float(np.mean(direct)), abs=1e-6)
    assert math.isfinite(measured)
    assert gate.drop_db == 0.0 and gate.passed
