"""Shared fixtures: small real MRC files and a seeded CNN3 checkpoint written by the tests themselves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smooth_image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random float32 image with blob-like structure (fast, no synth dependency)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros(shape, np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(3, max(4.0, min(h, w) / 6))
        img += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return img + 0.05 * rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def cnn3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised CNN3 saved as a checkpoint (``.safetensors`` + ``.json``)."""
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("cnn3")
    model = build_model(spec)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "cnn3.safetensors", model, spec)


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised small U-Net (base 8, depth 2) checkpoint."""
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("unet", params={"base_channels": 8, "depth": 2})
    model = build_model(spec)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.safetensors", model, spec)


@pytest.fixture(scope="session")
def unet3d_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised small 3-D U-Net (base 4, depth 2: radius 24, stride 4) checkpoint."""
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 2})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet3d.safetensors", build_model(spec), spec)


@pytest.fixture
def shared_data() -> Path:
    """The real micrographs in ../shared/data (tests using it skip if the folder is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cnn3_onnx(cnn3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cnn3_checkpoint`` exported to ONNX (read-only for the tests that share it)."""
    from cryodeploy.backends.sources import load_source
    from cryodeploy.export.onnx import export_onnx

    return export_onnx(load_source(cnn3_checkpoint), tmp_path_factory.mktemp("onnx") / "cnn3.onnx")


@pytest.fixture(scope="session")
def unet_onnx(unet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``unet_checkpoint`` exported to ONNX."""
    from cryodeploy.backends.sources import load_source
    from cryodeploy.export.onnx import export_onnx

    return export_onnx(load_source(unet_checkpoint), tmp_path_factory.mktemp("onnx") / "unet.onnx")


def load_plugin(path: Path, name: str) -> ModuleType:
    """Import a plugin or other script (not a package module) from its file, as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micrograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small 64x64 micrograph (seed 0) for the bad- and hostile-model tests."""
    from mrc_cases import pixels, write_mrc

    return write_mrc(tmp_path_factory.mktemp("mic") / "m.mrc", pixels(np.random.default_rng(0), 2, (64, 64)))


@pytest.fixture(scope="module")
def raw_folder(cnn3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cnn3_checkpoint`` exported as raw per-layer weights."""
    from cryodeploy.models.rawweights import export_raw

    return export_raw(cnn3_checkpoint, tmp_path_factory.mktemp("raw") / "raw")
