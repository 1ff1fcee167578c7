"""The Python API: Denoiser.load / __call__ / denoise_files / close, backend and device selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy import Denoiser
from cryodeploy.backends import BACKEND_PREFERENCE, BACKENDS, availability
from cryodeploy.backends.base import BackendOptions
from cryodeploy.backends.sources import default_model_path
from cryodeploy.errors import BackendUnavailable, ConfigError, InputError
from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize
from cryodeploy.inference.denoiser import resolve_device
from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.models.checkpoint import load_checkpoint


def _expected(checkpoint, image: np.ndarray) -> np.ndarray:
    model, spec = load_checkpoint(checkpoint)
    stats = norm_stats(image, spec.normalization)
    with torch.no_grad():
        y = model(torch.from_numpy(normalize(image, stats))[None, None])[0, 0].numpy()
    return denormalize(y, stats)


def test_call_on_image_and_stack(cnn3_checkpoint, rng) -> None:
    image = (rng.standard_normal((150, 170)) * 25 + 400).astype(np.float32)
    with Denoiser.load(cnn3_checkpoint, device="cpu", backend="torch") as d:
        assert d.backend.label == "torch/cpu/fp32" and d.spec.architecture == "cnn3"
        assert "cnn3" in repr(d)
        out = d(image)
        tiled = d(image.astype(np.float64), tile=40, batch=3)
        stack = d(np.stack([image, image[::-1].copy()]))
    expected = _expected(cnn3_checkpoint, image)
    assert out.shape == image.shape and out.dtype == np.float32
    tol = 1e-6 * float(np.abs(expected).max()) * 10
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(tiled, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(stack[0], expected, rtol=0, atol=tol)
    np.testing.assert_allclose(stack[1], _expected(cnn3_checkpoint, image[::-1].copy()), rtol=0, atol=tol)


def test_call_rejects_bad_arrays(cnn3_checkpoint) -> None:
    with Denoiser.load(cnn3_checkpoint, device="cpu", backend="torch") as d:
        with pytest.raises(InputError, match="constant"):
            d(np.ones((64, 64)))
        with pytest.raises(InputError, match="expected at least 32x32"):
            d(np.random.default_rng(0).standard_normal((16, 64)))
        with pytest.raises(InputError, match="found shape"):
            d(np.zeros((2, 2, 40, 40)))


def test_denoise_files_with_options_or_config(cnn3_checkpoint, rng, tmp_path) -> None:
    from cryodeploy.inference.runner import RunConfig

    image = (rng.standard_normal((80, 90)) * 5 + 50).astype(np.float32)
    src = write_micrograph(tmp_path / "a.mrc", image)
    with Denoiser.load(cnn3_checkpoint, device="cpu", backend="torch") as d:
        summary = d.denoise_files([src], tmp_path / "out", suffix="_dn", quiet=True, shard=(0, 1))
        assert summary.ok and summary.files[0].output == str(tmp_path / "out" / "a_dn.mrc")
        assert d.denoise_files([src], tmp_path / "out2", RunConfig(quiet=True)).ok
        with pytest.raises(ConfigError, match="unknown run options"):
            d.denoise_files([src], tmp_path / "out3", skipexisting=True)
        with pytest.raises(ConfigError, match="not both"):
            d.denoise_files([src], tmp_path / "out3", RunConfig(), quiet=True)
    got = read_micrograph(tmp_path / "out" / "a_dn.mrc").data
    np.testing.assert_allclose(got, _expected(cnn3_checkpoint, image), rtol=0, atol=1e-4)


def test_auto_backend_follows_the_preference_list(cnn3_checkpoint, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache"))
    usable = [n for n in BACKEND_PREFERENCE["cpu"] if n in BACKENDS and availability(n, BackendOptions())[0]]
    with Denoiser.load(cnn3_checkpoint, device="cpu") as d:
        assert d.backend.name == usable[0]
        image = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
        np.testing.assert_allclose(d(image), _expected(cnn3_checkpoint, image), rtol=0, atol=1e-4)


def test_explicit_backend_errors(cnn3_checkpoint) -> None:
    with pytest.raises(ConfigError, match="backend 'nope' unknown"):
        Denoiser.load(cnn3_checkpoint, device="cpu", backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch: no CUDA device"):
            Denoiser.load(cnn3_checkpoint, device="cuda", backend="torch")


def test_default_model_is_shipped_and_denoises() -> None:
    """The shipped default (models/README.md) loads by name and changes a noisy image toward its mean."""
    path = default_model_path()
    assert path.name == "best.safetensors" and path.with_suffix(".json").is_file()
    rng = np.random.default_rng(5)
    clean = np.kron(rng.uniform(0.2, 0.8, (8, 8)), np.ones((16, 16))).astype(np.float32)
    noisy = (rng.poisson(clean * 20) / 20 + rng.normal(0, 0.05, clean.shape)).astype(np.float32)
    with Denoiser.load("default", device="cpu", backend="torch") as d:
        assert d.spec.architecture == "unet"
        out = d(noisy)
    assert out.shape == noisy.shape
    # no ONNX copy is shipped: ONNX Runtime (the CPU default) runs the cached export of the checkpoint
    with Denoiser.load("default", device="cpu", backend="ort") as d:
        assert np.abs(d(noisy) - out).max() <= 1e-4 * float(np.abs(out).max())
    err_noisy = float(np.mean((noisy - clean) ** 2))
    err_out = float(np.mean((out - clean) ** 2))
    assert err_out < 0.5 * err_noisy  # measured: 0.17x on this blocky test image


def test_devices() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert resolve_device("cuda:1", {"LOCAL_RANK": "3"}) == "cuda:1"
