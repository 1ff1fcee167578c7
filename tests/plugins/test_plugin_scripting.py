"""The scripting example runs as a script, and ``python -m cryodeploy`` is the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np

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
