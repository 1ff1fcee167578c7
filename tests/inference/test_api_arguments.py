"""Every bad argument of the Python API raises a project error (issue 22, items 2 and 8): wrong types,
absurd sizes and thread counts, ``batch=-1`` (which once looped forever), complex and masked arrays
(once silently reduced to their real part / data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy import Denoiser
from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, CryoDeployError, InputError
from cryodeploy.inference.runner import RunConfig


@pytest.fixture(scope="module")
def denoiser(cnn3_checkpoint: Path) -> Denoiser:
    return Denoiser.load(cnn3_checkpoint, device="cpu", backend="torch")


IMAGE = np.random.default_rng(0).standard_normal((40, 48)).astype(np.float32)

ARRAYS: dict[str, tuple[Any, str]] = {
    "object": (np.array([[object()] * 40] * 40), "array: found dtype object, expected real numbers"),
    "strings": (np.full((40, 40), "x"), "array: found dtype <U1, expected real numbers"),
    "complex": (IMAGE + 1j * IMAGE, "array: found dtype complex64, expected real numbers"),
    "masked": (np.ma.masked_less(IMAGE, 0), "array: found a masked array; fill the masked pixels first"),
    "ragged": ([[1.0, 2.0], [3.0]], "array: cannot be read as a numpy array"),
    "1-D": (IMAGE.ravel(), "array: found shape (1920,), expected a 2-D image or a 3-D stack"),
}


@pytest.mark.parametrize("case", sorted(ARRAYS))
def test_bad_arrays_raise_input_errors(denoiser: Denoiser, case: str) -> None:
    array, message = ARRAYS[case]
    with pytest.raises(InputError) as info:
        denoiser(array)
    assert str(info.value).startswith(message)


SIZES: dict[str, tuple[dict[str, Any], str]] = {
    "tile-text": ({"tile": "big"}, "tile 'big': expected 'auto' or a positive integer"),
    "batch-minus-1": ({"batch": -1}, "batch -1: expected 'auto' or a positive integer"),
    "batch-float": ({"batch": 2.0}, "batch 2.0: expected 'auto' or a positive integer"),
    "tile-huge": ({"tile": 100_000}, "tile 100000: expected at most 32768"),
    "batch-huge": ({"batch": 100_000}, "batch 100000: expected at most 1024"),
    "both-large": (
        {"tile": 8192, "batch": 1024},
        "batch 1024 x tile 8192x8192 is 68719476736 pixels per batch, expected at most 1073741824",
    ),
}


@pytest.mark.parametrize("case", sorted(SIZES))
def test_bad_sizes_are_refused_before_any_work(denoiser: Denoiser, case: str) -> None:
    args, message = SIZES[case]
    with pytest.raises(ConfigError) as info:
        denoiser(IMAGE, **args)
    assert str(info.value).startswith(message)
    with pytest.raises(ConfigError) as info:
        RunConfig(**args)
    assert str(info.value).startswith(message)


LOADS: dict[str, tuple[dict[str, Any], str]] = {
    "model-none": ({"model": None}, "model None: expected 'default' or a path"),
    "model-int": ({"model": 123}, "model 123: expected 'default' or a path"),
    "threads-text": ({"threads": "x"}, "threads 'x': expected an integer"),
    "threads-huge": ({"threads": 10**6}, "threads 1000000: expected at most 1024"),
    "threads-negative": ({"threads": -1}, "threads must be >= 0"),
    "device-int": ({"device": 0}, "device 0: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "precision-none": ({"precision": None}, "precision None: expected a string"),
    "backend-list": ({"backend": ["torch"]}, "backend ['torch']: expected 'auto' or a backend name"),
}


@pytest.mark.parametrize("case", sorted(LOADS))
def test_bad_load_arguments_raise_config_errors(cnn3_checkpoint: Path, case: str) -> None:
    args, message = LOADS[case]
    with pytest.raises(CryoDeployError) as info:
        Denoiser.load(**{"model": cnn3_checkpoint, "device": "cpu", **args})
    assert str(info.value).startswith(message)


def test_absurd_cli_sizes_are_one_line(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    """The runaway of issue 22 (``--tile 100000 --batch 100000`` on one 96x96 image: OOM-killed at 23 GB,
    a claim file left) and ``--threads 1000000`` are refused before any output folder exists."""
    from mrc_cases import pixels, write_mrc

    mic = write_mrc(tmp_path / "m.mrc", pixels(np.random.default_rng(0), 2, (96, 96)))
    base = ["denoise", str(mic), "-o", str(tmp_path / "out"), "--model", str(cnn3_checkpoint),
            "--backend", "torch", "--device", "cpu", "-q"]
    for extra, line in (
        (["--tile", "100000", "--batch", "100000"], "error: tile 100000: expected at most 32768"),
        (["--threads", "1000000"], "error: threads 1000000: expected at most 1024 (0: the library default)"),
    ):
        result = CliRunner().invoke(cli, [*base, *extra])
        assert (result.exit_code, result.stderr.splitlines()) == (2, [line])
        assert not (tmp_path / "out").exists()
