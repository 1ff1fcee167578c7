"""benchmarks/bench_quality3d.py --quick on the CPU: held-out synthetic tomograms, PSNR against the
exact clean volumes and split gains for identity, the best 3-D Gaussian, a volume model and (where
the Topaz environment exists) Topaz-Denoise's pretrained 3-D U-Nets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.imaging.metrics import psnr
from cryodeploy.io.volumes import read_volume

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_quality3d.py"


def _topaz_python() -> str | None:
    """The Topaz environment's python: $TOPAZ_PYTHON, else /work/topaz-venv, if it imports topaz."""
    cmd = os.environ.get("TOPAZ_PYTHON") or "/work/topaz-venv/bin/python"
    if not shutil.which(cmd.split()[0]):
        return None
    done = subprocess.run([*cmd.split(), "-c", "import topaz, mrcfile"], capture_output=True)
    return cmd if done.returncode == 0 else None


def _bench(tmp: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--out",
            str(tmp / "out"),
            "--workdir",
            str(tmp / "work"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| method | PSNR vs clean (dB) | split gain (dB) |" in (tmp / "out" / "quality3d.md").read_text()
    return json.loads((tmp / "out" / "quality3d.json").read_text())


def test_quick_mode_scores_the_baselines_and_a_volume_model(tmp_path: Path, unet3d_checkpoint: Path) -> None:
    r = _bench(tmp_path, "--model", f"u3={unet3d_checkpoint}")
    assert r["config"]["shape"] == [32, 64, 64] and r["config"]["seed"] == 20261201
    (ds,) = r["datasets"]
    assert (ds["voxel_size"], ds["dose"], ds["names"]) == (10.0, 40.0, ["tomo_0000"])
    rows = {row["method"]: row for row in ds["rows"]}
    assert list(rows) == [
        "identity",
        "constant (the half's mean)",
        "gaussian (sigma by split gain)",
        "gaussian (oracle sigma by PSNR)",
        "u3 (unet3d, ort/cpu/fp32)",
    ]
    folder = tmp_path / "work" / ds["key"]
    even, clean = (read_volume(folder / sub / "tomo_0000.mrc").data for sub in ("even", "clean"))
    ident = rows["identity"]
    assert ident["split_gain_db"] == 0.0 and ident["psnr_db"] == pytest.approx(psnr(even, clean), abs=1e-12)
    # measured: identity 13.44 dB, the Gaussian (sigma 1.5 voxels, the same by split gain and by PSNR)
    # 27.54 dB PSNR and 15.27 dB split gain; the random-weight model stays at the input
    for label in ("gaussian (sigma by split gain)", "gaussian (oracle sigma by PSNR)"):
        g = rows[label]
        assert (
            g["sigma"] == 1.5 and g["psnr_db"] > ident["psnr_db"] + 12.0 and 14.5 < g["split_gain_db"] < 16.0
        )
    assert abs(rows["u3 (unet3d, ort/cpu/fp32)"]["split_gain_db"]) < 0.1
    # the constant (each half's mean) scores 26.16 dB PSNR and 13.44 dB split gain here: at low contrast a
    # method that removes the signal with the noise comes close to the Gaussian (27.54 / 15.27)
    const = rows["constant (the half's mean)"]
    assert rows["gaussian (sigma by split gain)"]["psnr_db"] > const["psnr_db"] + 1.0
    assert const["psnr_db"] == pytest.approx(psnr(np.full_like(even, np.mean(even, dtype=np.float64)), clean),
                                             abs=1e-9)
    assert r["topaz"] == {}


def test_quick_mode_ranks_topaz_3d_unets(tmp_path: Path) -> None:
    python = _topaz_python()
    if python is None:
        pytest.skip("no Topaz environment (set TOPAZ_PYTHON to a python that imports topaz and mrcfile)")
    r = _bench(tmp_path, "--topaz-python", python)
    rows = {row["method"]: row for row in r["datasets"][0]["rows"]}
    ident = rows["identity"]
    # measured (topaz-em 0.3.20 on the whole 32x64x64 volume): unet-3d-10a 27.49 dB PSNR / 15.16 dB split
    # gain, unet-3d-20a 26.04 / 13.26, against identity's 13.44 dB and the Gaussian's 27.54 / 15.27
    for model in ("unet-3d-10a", "unet-3d-20a"):
        t = rows[f"topaz {model} (whole volume)"]
        assert t["topaz_version"] == "0.3.20" and t["psnr_db"] > ident["psnr_db"] + 10.0
        assert t["split_gain_db"] > 10.0 and t["seconds"] > 0
