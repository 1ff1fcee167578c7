"""`cryodeploy bench`: every variant gets a row, measured or with the reason it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from cryodeploy.backends.sources import load_source
from cryodeploy.cli import cli
from cryodeploy.verify.bench import VARIANTS, BenchConfig, run_bench


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


def test_bench_e2e_rows_against_the_io_floor(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "mics"
    folder.mkdir()
    for name in ("epu_crop_a.mrc", "epu_crop_b.mrc"):
        shutil.copy(Path(__file__).resolve().parents[2] / "examples" / name, folder / name)
    out = tmp_path / "bench.json"
    result = _bench_cli(
        cnn3_checkpoint, out, "--backends", "torch", "--e2e", str(folder), "--workdir", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    e2e = json.loads(out.read_text())["e2e"]
    assert e2e["files"] == 2 and e2e["floor_s"] > 0
    rows = {r["label"]: r for r in e2e["rows"]}
    eager = rows["eager fp32"]
    assert eager["seconds"] > 0 and abs(eager["ratio_vs_floor"] - eager["seconds"] / e2e["floor_s"]) < 1e-9
    assert rows["CUDA graphs fp16"]["seconds"] is None
    assert rows["CUDA graphs fp16"]["note"] == "torch: CUDA graphs need a CUDA device"
    assert "I/O floor (identity backend)" in result.output
    assert list(tmp_path.glob("tmp*")) == []  # the run's outputs are removed
