"""benchmarks/bench_quality.py: the paired gain over the best Gaussian and its standard error, and a
CPU run of the whole benchmark on small held-out micrographs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import load_plugin

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> Any:
    return load_plugin(ROOT / "benchmarks" / "bench_quality.py", "bench_quality")


def test_paired_gain() -> None:
    bq = _bench()
    gain, se = bq.paired_gain([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1
    assert gain == pytest.approx(2.0) and se == pytest.approx(1.0 / math.sqrt(3.0))
    gain, se = bq.paired_gain([2.0], [1.0])
    assert gain == 1.0 and math.isnan(se)


def test_topaz_timeout_grows_with_the_pixels() -> None:
    import numpy as np

    bq = _bench()
    assert bq.topaz_timeout({}) == 300.0
    stacks = {"dose5": np.zeros((128, 1024, 1024), np.float32), "real_A": np.zeros((7, 160, 160), np.float32)}
    assert bq.topaz_timeout(stacks) == pytest.approx(300.0 + 10.0 * (128 * 1024**2 + 7 * 160**2) / 1e6)


def test_benchmark_reports_every_image_and_the_paired_gain(tmp_path: Path) -> None:
    bq = _bench()
    bq.main(["--model", "default", "--size", "128", "--count", "3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quality.json").read_text())
    rows = result["methods"]
    for dose in ("dose5", "dose20", "dose50"):
        for name in ("identity", "gaussian", "default"):
            images = rows[name][f"image_psnrs_{dose}"]
            assert len(images) == 3 and rows[name][f"psnr_{dose}"] == pytest.approx(sum(images) / 3)
        assert rows["gaussian"]["sigmas"][dose] in bq.SIM_SIGMAS
        # the oracle Gaussian is never worse than identity (sigma 0.5 is nearly identity)
        assert rows["gaussian"][f"psnr_{dose}"] >= rows["identity"][f"psnr_{dose}"]
    gain, se = bq.paired_gain(rows["default"]["image_psnrs_dose20"], rows["gaussian"]["image_psnrs_dose20"])
    assert gain > 0.0 and se > 0.0
    d5, _ = bq.paired_gain(rows["default"]["image_psnrs_dose5"], rows["gaussian"]["image_psnrs_dose5"])
    assert f"| default | {d5:+.2f} ± " in (tmp_path / "quality.md").read_text()
