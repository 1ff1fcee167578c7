"""`cryodeploy bench`: every variant gets a row, measured or with the reason it cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner, Result

from cryodeploy.backends.sources import load_source
from cryodeploy.cli import cli
from cryodeploy.verify.bench import VARIANTS, BenchConfig, mrc_floor, raw_floor, run_bench


def test_bench_rows_on_cpu(cnn3_checkpoint: Path) -> None:
    report = run_bench(load_source(cnn3_checkpoint), BenchConfig(size=64, device="cpu", repeats=2, warmup=1))
    assert [r.label for r in report.rows] == [v.label for v in VARIANTS]
    by_label = {r.label: r for r in report.rows}
    eager = by_label["eager fp32"]
    assert eager.ms is not None and eager.ratio_vs_eager_fp32 == 1.0 and eager.max_rel_err_vs_fp32 == 0.0
    ort = by_label["ONNX Runtime fp32"]
    assert ort.ms is not None and ort.max_rel_err_vs_fp32 is not None and ort.max_rel_err_vs_fp32 < 1e-5
    fused = by_label["fused Triton fp16"]
    assert fused.ms is None and fused.note == "fused: CUDA only (Triton kernel)"
    for r in report.rows:
        assert (r.ms is None) == bool(r.note), r


def _bench_cli(checkpoint: Path, out: Path, *args: str) -> Result:
    """``cryodeploy bench`` on a 64-px image on the CPU, JSON to ``out``."""
    common = ["--size", "64", "--device", "cpu", "--repeats", "2", "--json", str(out), "-q"]
    return CliRunner().invoke(cli, ["bench", "--model", str(checkpoint), *common, *args])


def test_bench_cli_table_and_json(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _bench_cli(cnn3_checkpoint, out, "--backends", "torch,fused")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| date | device | what |")
    assert any("eager fp32" in ln and "1.00x" in ln for ln in lines)
    assert any("fused Triton fp16" in ln and "CUDA only" in ln for ln in lines)
    data = json.loads(out.read_text())
    assert data["size"] == 64 and {r["backend"] for r in data["rows"]} == {"torch", "fused"}


@pytest.mark.parametrize("workdir_exists", [True, False])
def test_bench_e2e_floors_overhead_and_startup(
    cnn3_checkpoint: Path, tmp_path: Path, workdir_exists: bool
) -> None:
    folder = tmp_path / "mics"
    folder.mkdir()
    for name in ("epu_crop_a.mrc", "epu_crop_b.mrc"):
        shutil.copy(Path(__file__).resolve().parents[2] / "examples" / name, folder / name)
    work = tmp_path / "work" / "deeper"
    if workdir_exists:
        work.mkdir(parents=True)
    out = tmp_path / "bench.json"
    result = _bench_cli(
        cnn3_checkpoint, out, "--backends", "torch", "--e2e", str(folder), "--workdir", str(work)
    )
    assert result.exit_code == 0, result.output
    e2e = json.loads(out.read_text())["e2e"]
    assert e2e["files"] == 2
    for key in ("raw_floor_s", "mrc_floor_s", "runner_overhead_s", "startup_s"):
        assert e2e[key] > 0, key
    rows = {r["label"]: r for r in e2e["rows"]}
    eager = rows["eager fp32"]
    assert eager["seconds"] > 0
    assert abs(eager["ratio_vs_raw_floor"] - eager["seconds"] / e2e["raw_floor_s"]) < 1e-9
    assert rows["CUDA graphs fp16"]["seconds"] is None
    assert rows["CUDA graphs fp16"]["note"] == "torch: CUDA graphs need a CUDA device"
    lines = result.output.splitlines()
    labels = [ln.split(" | ")[3] for ln in lines if ln.startswith("| ") and "end-to-end" in ln]
    assert labels[:3] == [
        "raw floor (read the bytes, write as many bytes; no parsing, no model)",
        "MRC floor (mrcfile read + mrcfile write)",
        "runner overhead (runner with an identity backend, not a floor)",
    ]
    assert not any("floor" in label for label in labels[3:]) and "I/O floor" not in result.output
    assert sum("start-up | process start to first output written" in ln for ln in lines) == 1
    assert list(work.iterdir()) == []  # the run's outputs are removed, the folder is kept


def test_raw_and_mrc_floors_write_what_they_read(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "examples"
    paths = sorted(src.glob("epu_crop_*.mrc"))
    assert raw_floor(paths, tmp_path / "raw") > 0 and mrc_floor(paths, tmp_path / "mrc") > 0
    assert raw_floor(paths, tmp_path / "raw_fsync", fsync=True) > 0
    assert raw_floor(paths, tmp_path / "raw_threads", fsync=True, threads=3) > 0
    for i, p in enumerate(paths):
        for folder in ("raw", "raw_fsync", "raw_threads"):
            assert (tmp_path / folder / f"{i:06d}.raw").read_bytes() == p.read_bytes()
        assert np.array_equal(mrcfile.read(tmp_path / "mrc" / f"{i:06d}.mrc"), mrcfile.read(p))


def test_bench_workdir_that_cannot_be_created(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    examples = Path(__file__).resolve().parents[2] / "examples"
    result = _bench_cli(cnn3_checkpoint, tmp_path / "b.json", "--backends", "torch", "--e2e", str(examples),
                        "--workdir", str(blocker / "sub"))
    assert result.exit_code != 0 and result.exit_code != 70
    assert f"--workdir {blocker / 'sub'}: cannot create the folder" in result.output
