"""Volume models deployed: ONNX export with dynamic depth/height/width, ONNX Runtime vs torch on
tomograms (directly and through the runner's parity check), and the fp16 gate's PSNR on volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from cryodeploy import Denoiser
from cryodeploy.backends import BackendOptions, create_backend
from cryodeploy.backends.gate import denoising_psnr, fp16_gate, synthetic_calibration
from cryodeploy.backends.sources import load_source
from cryodeploy.export.onnx import (
    check_against_torch,
    export_onnx,
    onnx_metadata,
    read_onnx_spec,
    verify_shape,
)
from cryodeploy.imaging.simulate.tomogram import simulate_tomogram
from cryodeploy.imaging.simulate.tomoscene import TomoConfig
from cryodeploy.io.volumes import write_volume
from cryodeploy.models.checkpoint import load_checkpoint
from cryodeploy.verify.parity import REFERENCE, ParityConfig, run_parity


@pytest.fixture(scope="module")
def unet3d_onnx(unet3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(load_source(unet3d_checkpoint), tmp_path_factory.mktemp("onnx3d") / "unet3d.onnx")


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_has_dynamic_depth_height_width_and_equals_torch(unet3d_onnx, unet3d_checkpoint, rng) -> None:
    model = onnx.load(str(unet3d_onnx))
    onnx.checker.check_model(model, full_check=True)
    for value in (model.graph.input[0], model.graph.output[0]):
        assert _dims(value) == ["batch", 1, "depth", "height", "width"]
    module, spec = load_checkpoint(unet3d_checkpoint)
    meta = onnx_metadata(unet3d_onnx)
    assert meta["layout"].startswith("NCDHW float32 [batch,1,depth,height,width]")
    assert meta["verified"].endswith("on random input 2x1x24x40x32")
    assert read_onnx_spec(unet3d_onnx) == spec and spec.ndim == 3
    assert verify_shape(spec) == (2, 1, 24, 40, 32)
    for shape in ((2, 1, 24, 40, 32), (3, 1, 16, 28, 44)):  # not the traced 32x48x32, batch 1
        assert check_against_torch(unet3d_onnx, module, shape, rng) <= 1e-5


def test_ort_and_torch_denoise_a_volume_alike(unet3d_onnx, unet3d_checkpoint, rng) -> None:
    volume = (rng.standard_normal((37, 50, 61)) * 4 + 10).astype(np.float32)
    with Denoiser.load(unet3d_checkpoint, device="cpu", backend="torch") as t, \
            Denoiser.load(unet3d_onnx, device="cpu", backend="ort", threads=1) as o:
        want, got = t(volume, tile=56, batch=2), o(volume, tile=56, batch=2)
        assert o.spec.ndim == 3 and o.backend.name == "ort"
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_parity_torch_vs_ort_on_tomograms(unet3d_checkpoint, tmp_path) -> None:
    source = load_source(unet3d_checkpoint)
    (tmp_path / "tomo").mkdir()
    (tmp_path / "clean").mkdir()
    inputs, targets = [], {}
    for i in range(2):
        tomogram = simulate_tomogram(TomoConfig(shape=(24, 40, 44), seed=1), i)
        noisy = write_volume(tmp_path / "tomo" / f"t{i}.mrc", tomogram.even.numpy())
        targets[noisy] = write_volume(tmp_path / "clean" / noisy.name, tomogram.clean.numpy())
        inputs.append(noisy)
    config = ParityConfig(backends=("torch", "ort"), threads=1, tile=56, batch=2, quiet=True)
    report = run_parity(source, inputs, tmp_path / "work", config, targets)
    assert report.ok, report.failures
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert pairs[("ort/cpu/fp32", "torch/cpu/fp32")].rel <= 1e-5
    for label in ("torch/cpu/fp32", "ort/cpu/fp32"):
        assert 0 < pairs[(label, REFERENCE)].rel <= 1e-5  # tiled fp32 vs the whole-volume float64 forward
    psnrs = [v.denoising_psnr for v in report.variants]
    assert psnrs[0] is not None and psnrs[0] == pytest.approx(psnrs[1], abs=1e-4)


def test_bench_refuses_a_volume_model(unet3d_checkpoint) -> None:
    from cryodeploy.errors import ConfigError
    from cryodeploy.verify.bench import BenchConfig, run_bench

    with pytest.raises(ConfigError, match="bench times images, but unet3d is a volume model"):
        run_bench(load_source(unet3d_checkpoint), BenchConfig(size=64))


def test_fp16_gate_measures_volumes(unet3d_checkpoint) -> None:
    source = load_source(unet3d_checkpoint)
    pairs = synthetic_calibration(source.spec, (16, 24, 20), count=2, seed=3)
    assert [(n.shape, c.shape) for n, c in pairs] == [((16, 24, 20), (16, 24, 20))] * 2
    clean = simulate_tomogram(TomoConfig(shape=(16, 24, 20), seed=3), 1).clean.numpy()
    np.testing.assert_array_equal(pairs[1][1], clean)  # the exact clean tomogram, the even half as input
    fp32 = create_backend("torch", source, BackendOptions())
    bf16 = create_backend("torch", source, BackendOptions(precision="bf16"))
    with fp32, bf16:
        p32, p16 = denoising_psnr(fp32, source.spec, pairs), denoising_psnr(bf16, source.spec, pairs)
    gate = fp16_gate(p32, p16, samples=2)
    print(f"fp16 gate on volumes: fp32 {p32:.6f} dB, bf16 {p16:.6f} dB, drop {gate.drop_db:.2e} dB")
    assert p32 == pytest.approx(19.291, abs=1e-3)  # an untrained, nearly identity residual net
    assert gate.passed and 0 < abs(gate.drop_db) < 1e-3  # bf16 arithmetic really ran, and changed little
