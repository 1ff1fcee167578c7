"""The scripting example runs as a script, and ``python -m cryodeploy`` is the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import InputError
from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

EXAMPLE = Path(__file__).resolve().parents[2] / "plugins" / "scripting" / "denoise_list.py"


def test_denoise_list_example_runs_as_a_script(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    from cryodeploy import Denoiser

    noisy = synth_micrographs(
        tmp_path / "in", SynthConfig(count=2, size=(40, 56), seed=7, carbon=False, ctf=False)
    )
    bad = tmp_path / "in" / "broken.mrc"
    bad.write_bytes(b"\0" * 64)
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "--model",
        str(cnn3_checkpoint),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        *map(str, noisy),
        str(bad),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # one input is broken
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("done") for line in lines) == 2
    assert any(line.startswith("failed") and "broken.mrc" in line for line in lines)

    denoiser = Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch")
    for src in noisy:
        with mrcfile.open(src) as a, mrcfile.open(tmp_path / "out" / src.name) as b:
            raw, den = np.asarray(a.data, np.float32), np.asarray(b.data, np.float32)
        assert den.shape == raw.shape and np.abs(den - raw).max() > 1e-3
        np.testing.assert_allclose(den, denoiser(raw), atol=1e-5)

    again = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)  # rerun, good files only
    assert again.returncode == 0 and again.stdout.count("skipped") == 2, again.stdout + again.stderr


def test_python_dash_m_cryodeploy_is_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cryodeploy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "info" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cryodeploy", "no-such-command"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "no-such-command" in bad.stderr


def _volume_model(path: Path) -> Path:
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 1})
    return save_checkpoint(path, build_model(spec), spec)


def test_readme_volume_example_runs_and_denoise_list_takes_tomograms(tmp_path: Path, monkeypatch) -> None:
    """The README's ``Denoiser(volume)`` block, run as written (model path and device swapped), on
    ``synth --volume`` tomograms; then ``denoise_list.py`` with the same volume model."""
    import shutil

    from click.testing import CliRunner

    from cryodeploy import Denoiser
    from cryodeploy.cli import cli
    from cryodeploy.io.volumes import read_volume

    args = ["--count", "2", "--size", "32", "40", "--depth", "20", "--voxel-size", "7.5", "-q"]
    made = CliRunner().invoke(cli, ["synth", "--volume", str(tmp_path / "syn"), *args])
    assert made.exit_code == 0, made.output
    ckpt = _volume_model(tmp_path / "u3.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    for src, dst in (("even/tomo_0000", "TS_01_even.mrc"), ("odd/tomo_0000", "TS_01_odd.mrc"),
                     ("even/tomo_0000", "TS_01.rec"), ("even/tomo_0001", "TS_02.rec")):
        shutil.copy(tmp_path / "syn" / f"{src}.mrc", work / dst)
    readme = (EXAMPLE.parent / "README.md").read_text()
    block = readme.split("## Tomograms")[1].split("```python\n")[1].split("```")[0]
    code = block.replace("runs/unet3d/best.safetensors", str(ckpt)).replace('device="cuda"', 'device="cpu"')
    monkeypatch.chdir(work)
    exec(compile(code, "README.md", "exec"), {})

    d = Denoiser.load(str(ckpt), device="cpu")
    even, odd = read_volume(work / "TS_01_even.mrc"), read_volume(work / "TS_01_odd.mrc")
    out = read_volume(work / "TS_01_denoised.mrc")
    np.testing.assert_allclose(out.data, (d(even.data) + d(odd.data)) / 2, rtol=0, atol=1e-5)
    assert out.header.voxel_size == pytest.approx((7.5,) * 3)
    for name in ("TS_01.rec", "TS_02.rec"):
        den = read_volume(work / "denoised" / name)
        np.testing.assert_allclose(den.data, d(read_volume(work / name).data), rtol=0, atol=1e-5)

    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(ckpt), "--device", "cpu", "--out",
                           str(tmp_path / "list"), str(work / "TS_01.rec"), str(work / "TS_01_even.mrc")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("done") == 2, proc.stdout + proc.stderr
    np.testing.assert_allclose(read_volume(tmp_path / "list" / "TS_01_even.mrc").data, d(even.data),
                               rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="found 2-D data, but unet3d is a volume model"):
        d(even.data[0])
