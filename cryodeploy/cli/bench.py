"""``cryodeploy bench``: every backend and precision side by side on this device."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cryodeploy.cli._params import split_csv

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource
    from cryodeploy.verify.bench import BenchConfig


@click.command()
@click.option(
    "--model",
    "model",
    default="default",
    show_default=True,
    help="Model to time (checkpoint, run folder, ...).",
)
@click.option("--size", type=click.IntRange(min=32), default=None,
              help="Micrograph side in pixels [default: 4096 on cuda, 1024 on cpu].")
@click.option("--backends", default=None, help="Comma-separated backends to include (default: all).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=None,
    help="Timed runs per variant, median reported [default: 20 on cuda, 3 on cpu (minutes, not hours)].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the report as JSON.",
)
@click.option(
    "--e2e",
    "e2e",
    multiple=True,
    help="Also time whole runs over these micrographs (files, globs, folders) next to the raw/MRC floors.",
)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where --e2e writes outputs (created if missing; its temporary folder is removed).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the table.")
def bench(
    model: str,
    size: int | None,
    backends: str | None,
    device: str | None,
    repeats: int | None,
    json_path: str | None,
    e2e: tuple[str, ...],
    workdir: str | None,
    quiet: bool,
) -> None:
    """Time one micrograph's forward pass for every backend and precision, with the ratio to eager fp32."""
    from cryodeploy.backends.sources import load_source
    from cryodeploy.verify.bench import BenchConfig, run_bench

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    size = size or (1024 if cpu else 4096)
    cfg = BenchConfig(
        size=size,
        device=device,
        repeats=repeats or (3 if cpu else 20),
        warmup=1 if cpu else 3,
        backends=split_csv(backends),
    )
    source = load_source(model)
    report = run_bench(source, cfg, None if quiet else lambda s: click.echo(s, err=True))
    today = datetime.date.today().isoformat()
    click.echo("| date | device | what | config | value | unit | baseline (same run) | ratio |")
    click.echo("|---|---|---|---|---|---|---|---|")
    base = next((r for r in report.rows if r.ratio_vs_eager_fp32 == 1.0), None)
    what = f"{source.spec.architecture} forward {size}x{size}"
    for r in report.rows:
        if r.ms is None:
            click.echo(f"| {today} | {report.device} | {what} | {r.label} | n/a | ms | | {r.note} |")
            continue
        err = f", rel err {r.max_rel_err_vs_fp32:.1e}" if r.max_rel_err_vs_fp32 is not None else ""
        baseline = f"eager fp32 {base.ms:.2f} ms" if base and base.ms else ""
        ratio = f"{r.ratio_vs_eager_fp32:.2f}x" if r.ratio_vs_eager_fp32 else ""
        click.echo(
            f"| {today} | {report.device} | {what} | {r.label} ({r.timed}{err}) | {r.ms:.3f} | ms "
            f"| {baseline} | {ratio} |"
        )
    if report.copy_bandwidth_gbs:
        click.echo(f"\nmeasured device copy bandwidth: {report.copy_bandwidth_gbs:.0f} GB/s")
        for name, ms in report.floors_ms.items():
            click.echo(f"memory-traffic floor, {name}: {ms:.3f} ms")
    data = report.to_dict()
    if e2e:
        data["e2e"] = _end_to_end(source, cfg, e2e, workdir, today, report.device)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(data, fh, indent=2)


def _end_to_end(
    source: ModelSource,
    cfg: BenchConfig,
    inputs: tuple[str, ...],
    workdir: str | None,
    today: str,
    device: str,
) -> dict[str, Any]:
    """Whole runs over ``inputs`` per variant next to the floors; prints the rows, returns them."""
    import dataclasses
    import tempfile

    from cryodeploy.errors import OutputError
    from cryodeploy.io.inputs import expand_inputs
    from cryodeploy.verify.bench import run_e2e

    paths = expand_inputs(list(inputs))
    if workdir is not None:
        try:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = err.strerror or err
            raise OutputError(f"--workdir {workdir}: cannot create the folder ({reason})") from err
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        rep = run_e2e(source, paths, Path(tmp), cfg, startup=True)
    what = f"denoise {len(paths)} files end-to-end"
    raw = f"raw floor {rep.raw_floor_s:.2f} s"

    def row(config: str, value: float, baseline: str = "", ratio: str = "") -> None:
        click.echo(f"| {today} | {device} | {what} | {config} | {value:.3f} | s | {baseline} | {ratio} |")

    click.echo("")
    row("raw floor (read the bytes, write as many bytes; no parsing, no model)", rep.raw_floor_s)
    row("MRC floor (mrcfile read + mrcfile write)", rep.mrc_floor_s, baseline=raw,
        ratio=f"{rep.mrc_floor_s / rep.raw_floor_s:.2f}x")
    row("runner overhead (runner with an identity backend, not a floor)", rep.runner_overhead_s, baseline=raw,
        ratio=f"{rep.runner_overhead_s / rep.raw_floor_s:.2f}x")
    if rep.startup_s is not None:
        click.echo(f"| {today} | {device} | cryodeploy denoise start-up | process start to first output "
                   f"written (1 file) | {rep.startup_s:.3f} | s | | |")
    for r in rep.rows:
        if r.seconds is None:
            click.echo(f"| {today} | {device} | {what} | {r.label} | n/a | s | | {r.note} |")
        else:
            row(r.label, r.seconds, baseline=raw, ratio=f"{r.ratio_vs_raw_floor:.2f}x")
    return dataclasses.asdict(rep)
