"""The ONNX Runtime backend behind the one Backend interface: real sessions, real numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryodeploy.backends import BACKENDS, BackendOptions, availability, create_backend
from cryodeploy.backends.ort.loader import providers, session_options
from cryodeploy.backends.sources import load_source
from cryodeploy.errors import ConfigError, ModelError
from cryodeploy.export.onnx import export_onnx


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path_factory.getbasetemp() / "ort-cache"))


def _torch_forward(source_path: Path, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return load_source(source_path).torch_module()(torch.from_numpy(batch)).numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def test_registered_and_reasons() -> None:
    assert BACKENDS["ort"].module == "cryodeploy.backends.ort"
    assert availability("ort", BackendOptions()) == (True, "available")
    ok, reason = availability("ort", BackendOptions(precision="fp16"))
    assert not ok and "fp16 is offered on CUDA only" in reason
    ok, reason = availability("ort", BackendOptions(precision="bf16"))
    assert not ok and "bf16 is not offered" in reason


def test_cuda_reason_without_gpu_build() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu installed here")
    ok, reason = availability("ort", BackendOptions(device="cuda"))
    assert (ok, reason) == (False, "ort: CUDAExecutionProvider not available (install onnxruntime-gpu)")


@pytest.mark.parametrize(("which", "shape"), [("cnn3", (3, 1, 45, 67)), ("unet", (2, 1, 44, 68))])
def test_checkpoint_source_equals_torch(which: str, shape: tuple[int, ...], request: pytest.FixtureRequest,
                                        rng: np.random.Generator) -> None:
    ckpt = request.getfixturevalue(f"{which}_checkpoint")
    batch = rng.standard_normal(shape).astype(np.float32)
    with create_backend("ort", load_source(ckpt), BackendOptions(threads=1)) as backend:
        assert backend.label == "ort/cpu/fp32"
        assert backend.model_file.parent.name == "onnx"  # exported into the cache
        out = backend.run(batch)
    assert out.dtype == np.float32 and out.shape == shape
    err = _rel(out, _torch_forward(ckpt, batch))
    assert err <= 1e-5, f"{which}: relative error {err:.3g}"


def test_onnx_source_and_options(unet_checkpoint: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    path = export_onnx(load_source(unet_checkpoint), tmp_path / "unet.onnx")
    batch = rng.standard_normal((1, 1, 36, 52)).astype(np.float32)
    ref = _torch_forward(unet_checkpoint, batch)
    for level in ("disable", "basic", "extended", "all"):
        opts = BackendOptions(threads=1, extra=(("graph_optimization", level),))
        with create_backend("ort", load_source(path), opts) as backend:
            assert backend.model_file == path  # an ONNX source is used as it is
            assert backend.session.get_session_options().intra_op_num_threads == 1
            assert _rel(backend.run(batch), ref) <= 1e-5, level
    with pytest.raises(ConfigError, match="graph_optimization 'fast' unknown"):
        session_options(BackendOptions(extra=(("graph_optimization", "fast"),)))


def test_bad_batch_is_model_error(unet_checkpoint: Path) -> None:
    backend = create_backend("ort", load_source(unet_checkpoint), BackendOptions(threads=1))
    with pytest.raises(ModelError, match="ONNX Runtime failed on a batch") as info:
        backend.run(np.zeros((1, 1, 37, 53), np.float32))  # not a multiple of the U-Net stride 4
    assert "\n" not in str(info.value)
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(np.zeros((1, 1, 36, 52), np.float32))


def test_cuda_provider_options() -> None:
    """What the CUDA execution provider is given: TF32 off unless asked, search and layout as configured."""
    (name, cuda), (fallback, _) = providers(BackendOptions(device="cuda:1"))
    assert (name, fallback) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert cuda == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
    opts = BackendOptions(device="cuda", tf32=True, extra=(("cudnn_conv_algo_search", "heuristic"),
                                                            ("prefer_nhwc", "true"),
                                                            ("cudnn_conv_use_max_workspace", False)))
    assert providers(opts)[0][1] == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1",
                                     "prefer_nhwc": "1", "cudnn_conv_use_max_workspace": "0"}
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search 'FASTEST' unknown"):
        providers(BackendOptions(device="cuda", extra=(("cudnn_conv_algo_search", "fastest"),)))
    assert providers(BackendOptions()) == [("CPUExecutionProvider", {})]


def _cuda_ort() -> bool:
    return availability("ort", BackendOptions(device="cuda"))[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ort(), reason="needs onnxruntime-gpu and a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_iobinding(precision: str, cnn3_checkpoint: Path, rng: np.random.Generator) -> None:
    import torch

    batch = rng.standard_normal((2, 1, 129, 97)).astype(np.float32)
    ref = _torch_forward(cnn3_checkpoint, batch)
    with create_backend("ort", load_source(cnn3_checkpoint), BackendOptions("cuda", precision)) as backend:
        out = backend.run(batch)
        on_device = backend.run_device(torch.from_numpy(batch).cuda()).cpu().numpy()
    assert np.array_equal(out, on_device)
    assert _rel(out, ref) <= (1e-5 if precision == "fp32" else 1e-2)


def test_denoise_cli_with_onnx_model(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    """``cryodeploy denoise --model model.onnx``: geometry and normalization come from the ONNX metadata."""
    from click.testing import CliRunner

    from cryodeploy.cli import cli
    from cryodeploy.imaging.synth import SynthConfig, synth_micrographs
    from cryodeploy.io.mrc import read_micrograph

    noisy = synth_micrographs(tmp_path / "synth", SynthConfig(2, size=(120, 90), seed=5))
    model = export_onnx(load_source(cnn3_checkpoint), tmp_path / "model.onnx")
    runner = CliRunner()
    for backend in ("ort", "torch"):
        model_arg = model if backend == "ort" else cnn3_checkpoint
        res = runner.invoke(cli, [
            "denoise", str(tmp_path / "synth" / "noisy"), "-o", str(tmp_path / backend),
            "--model", str(model_arg), "--backend", backend, "--threads", "1", "--tile", "48", "-q",
            "--precision", "fp32",  # on a GPU machine auto would pick fp16 for torch: compare fp32 with fp32
        ])
        assert res.exit_code == 0, res.output
    for path in noisy:
        got = read_micrograph(tmp_path / "ort" / path.name)
        want = read_micrograph(tmp_path / "torch" / path.name)
        assert got.header.voxel_size == read_micrograph(path).header.voxel_size
        assert _rel(got.data, want.data.astype(np.float64)) <= 1e-5


def test_auto_device_falls_back_to_the_cpu_where_a_backend_has_no_cuda() -> None:
    """``device="auto"`` on a GPU machine whose ONNX Runtime lacks the CUDA provider runs ORT on the
    CPU (the error is kept for an explicit ``cuda``); a CUDA-only backend keeps CUDA and its reason."""
    from cryodeploy.backends import BackendOptions
    from cryodeploy.backends.registry import auto_device_options, availability

    cuda = BackendOptions(device="cuda", precision="fp16")
    ort_cuda = availability("ort", cuda)[0]
    got = auto_device_options("ort", cuda, precision_chosen=True)
    assert (got.device, got.precision) == (("cuda", "fp16") if ort_cuda else ("cpu", "fp32"))
    kept = auto_device_options("ort", BackendOptions(device="cuda", precision="fp16"))
    assert kept.device == "cuda"  # a chosen fp16 has no CPU ORT: it stays on CUDA and says why
    fused = auto_device_options("fused", BackendOptions(device="cuda", precision="fp32"))
    assert fused.device == "cuda"  # the fused kernel never runs on the CPU: its own reason stays
    cpu = BackendOptions(device="cpu")
    assert auto_device_options("ort", cpu) is cpu
