"""``cryodeploy denoise``: denoise micrographs (files, globs, folders, RELION STAR files) into OUTDIR."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from cryodeploy.backends import backend_help
from cryodeploy.cli._params import size_or_auto
from cryodeploy.errors import one_line


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a batch system's cancel) stops the run like Ctrl-C: claims released, temporaries removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; outputs keep their input's file name.")
@click.option("--model", default="default", show_default=True,
              help="default, a checkpoint (.safetensors or run folder), raw weights, .onnx or an engine.")
@click.option("--backend", default="auto", show_default=True, help=backend_help())
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True, help="auto: on CUDA the fastest variant passing parity and the fp16 gate "
              "(measured once, cached); fp32 on the CPU.")
@click.option("--threads", type=int, default=0, help="CPU threads for the backend (0: library default).")
@click.option("--tile", default="auto", show_default=True, help="Tile side (px) or auto.")
@click.option("--batch", default="auto", show_default=True, help="Tiles per batch, or auto.")
@click.option("--output-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--suffix", default="", help="Added to each output's file stem, e.g. _denoised.")
@click.option("--skip-existing", is_flag=True, help="Keep existing outputs (finish an interrupted run).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("--shard", default=None, metavar="I/N",
              help="Process shard I of N (default: RANK/WORLD_SIZE or SLURM array variables, else all).")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON summary here.")
@click.option("--preview", is_flag=True, help="Write a downsampled input|denoised PNG beside each output.")
@click.option("--keep-normalized", is_flag=True, help="Write normalized intensities, not the input's scale.")
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path),
              help="RELION project folder for relative STAR paths (default: found from the STAR file).")
@click.option("--cuda-graphs", is_flag=True,
              help="torch backend on CUDA: replay a captured CUDA graph per tile shape (no launch overhead).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def denoise(
    inputs: tuple[str, ...], outdir: Path, model: str, backend: str, device: str, precision: str,
    threads: int, tile: str, batch: str, output_dtype: str, suffix: str, skip_existing: bool, overwrite: bool,
    shard: str | None, summary: Path | None, preview: bool, keep_normalized: bool, project_dir: Path | None,
    cuda_graphs: bool, quiet: bool,
) -> None:
    """Denoise micrographs INPUTS (.mrc/.mrcs files, quoted globs, folders, RELION STAR files) into OUTDIR."""
    from cryodeploy.inference.denoiser import Denoiser
    from cryodeploy.inference.runner import RunConfig
    from cryodeploy.io.inputs import expand_inputs

    config = RunConfig(
        tile=size_or_auto(tile, "--tile"), batch=size_or_auto(batch, "--batch"), output_dtype=output_dtype,  # type: ignore[arg-type]
        suffix=suffix, skip_existing=skip_existing, overwrite=overwrite, shard=shard, summary=summary,
        quiet=quiet, preview=preview, keep_normalized=keep_normalized,
    )
    paths = expand_inputs(list(inputs), project_dir)
    extra = {"cuda_graphs": True} if cuda_graphs else {}
    with _sigterm_interrupts(), Denoiser.load(model, device=device, backend=backend, precision=precision,
                                              threads=threads, **extra) as d:
        result = d.denoise_files(paths, outdir, config)
        label = d.backend.label
    for f in result.files:
        if f.status == "failed":
            click.echo(f"failed: {one_line(f.error or '')}", err=True)
    click.echo(f"{result.line()} with {label}")
    if not result.ok:
        raise SystemExit(1)
