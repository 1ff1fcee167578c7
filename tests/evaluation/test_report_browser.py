"""Open an evaluation report in a real headless Chromium: every image loads, the metrics table shows."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cryodeploy.evaluation.evaluate import EvalConfig, PairsData, evaluate

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package 'chromium')")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, cnn3_checkpoint: Path) -> Path:
    """A pairs report of a (random-weight) CNN3 on 3 synthetic micrographs of 128 px."""
    from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

    tmp = tmp_path_factory.mktemp("browser")
    synth_micrographs(tmp / "data", SynthConfig(count=3, size=(128, 128), seed=5))
    out = tmp / "report"
    evaluate(cnn3_checkpoint, PairsData(tmp / "data" / "noisy", tmp / "data" / "clean"), out,
             EvalConfig(backend="torch", quiet=True))
    return out


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_report_loads_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    page = (report / "index.html").resolve().as_uri()
    res = _chromium(tmp_path, "--dump-dom", page)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert loaded and total, f"the page's load check did not run: {body.group(0)}"
    n_png = len(list(report.glob("*.png")))
    assert int(total.group(1)) == n_png >= 9  # 4 crops + histograms, hexbin, per-item, FRC, sigma
    assert loaded.group(1) == total.group(1)
    table = re.search(r'<table id="metrics-table">(.*?)</table>', dom, re.S)
    assert table, "metrics table missing"
    for name in ("identity", "gaussian", "model"):
        assert f"<td>{name}</td>" in table.group(1)
    assert "PSNR (dB)" in table.group(1) and 'id="red-flags"' in dom


def test_report_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    page = (report / "index.html").as_uri()
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", page)
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 3000)
