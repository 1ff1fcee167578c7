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
from cryodeploy.io.writers import FORMATS


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
@click.option("--model", "models", multiple=True, default=("default",), show_default=True,
              help="default, a checkpoint (.safetensors or run folder), raw weights, .onnx or an engine; "
                   "repeat it (--model A --model B) to average the outputs of an ensemble.")
@click.option("--backend", default="auto", show_default=True, help=backend_help())
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True, help="auto: on CUDA the fastest variant passing parity and the fp16 gate "
              "(measured once, cached); fp32 on the CPU.")
@click.option("--threads", type=int, default=0, help="CPU threads for the backend (0: library default).")
@click.option("--tile", default="auto", show_default=True, help="Tile side (px) or auto.")
@click.option("--batch", default="auto", show_default=True, help="Tiles per batch, or auto.")
@click.option("--output-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="MRC or TIFF data type (float16 halves the files).")
@click.option("--format", "output_format", type=click.Choice(sorted(FORMATS)), default="mrc",
              show_default=True,
              help="Output format: " + "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
              + ". The output's extension follows the format.")
@click.option("--suffix", default="", help="Added to each output's file stem, e.g. _denoised.")
@click.option("--skip-existing", is_flag=True, help="Keep existing outputs (finish an interrupted run).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("--shard", default=None, metavar="I/N",
              help="Process shard I of N (default: from torchrun, Open MPI, PMI, srun or SLURM array "
                   "variables, else all).")
@click.option("--pull", is_flag=True,
              help="Share the list with any number of other runs started at any time on this output "
                   "folder (a shared file system): each takes the next unclaimed file "
                   "(implies --skip-existing).")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON summary here.")
@click.option("--preview", is_flag=True, help="Write a downsampled input|denoised PNG beside each output.")
@click.option("--bin", "bin_factor", type=click.IntRange(min=1), default=1, show_default=True,
              help="Bin by N (Fourier cropping) before the network; the output's pixel size grows by N.")
@click.option("--lowpass", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Low-pass filter to this resolution: in Å when the header has a pixel size, else pixels.")
@click.option("--gaussian", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Gaussian filter of this sigma in pixels (of the binned image).")
@click.option("--filter-at", type=click.Choice(["before", "after"]), default="before", show_default=True,
              help="Apply --lowpass/--gaussian before the network (as Topaz) or to its output.")
@click.option("--movies", is_flag=True,
              help="INPUTS are movies (MRC/MRCS/TIFF frame stacks): each is summed, then denoised "
                   "into <name>.mrc.")
@click.option("--gain", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --movies: gain reference (MRC or TIFF) multiplied into every frame.")
@click.option("--keep-normalized", is_flag=True, help="Write normalized intensities, not the input's scale.")
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path),
              help="RELION project folder for relative STAR paths (default: found from the STAR file).")
@click.option("--cuda-graphs", is_flag=True,
              help="torch backend on CUDA: replay a captured CUDA graph per tile shape (no launch overhead).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch backend: run the model through torch.compile (faster forward, ~10 s more start-up "
                   "per process; kernels cached across processes). Worth it for long runs that are not "
                   "bound by the disk.")
@click.option("--io-threads", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Reader and writer threads (each); fsyncs run on up to twice as many (1-16).")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="fsync each output before renaming it into place. --no-fsync: still atomic (complete or "
                   "absent after a crash of the process), not durable after a power loss; faster where the "
                   "disk's write-back is the limit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def denoise(
    inputs: tuple[str, ...], outdir: Path, models: tuple[str, ...], backend: str, device: str, precision: str,
    threads: int, tile: str, batch: str, output_dtype: str, output_format: str, suffix: str,
    skip_existing: bool, overwrite: bool, shard: str | None, pull: bool, summary: Path | None,
    preview: bool, bin_factor: int, lowpass: float | None, gaussian: float | None, filter_at: str,
    movies: bool, gain: Path | None, keep_normalized: bool, project_dir: Path | None,
    cuda_graphs: bool, compile_: bool, io_threads: int, fsync: bool, quiet: bool,
) -> None:
    """Denoise micrographs INPUTS (.mrc/.mrcs files, quoted globs, folders, RELION STAR files) into OUTDIR;
    with a volume model (unet3d), tomograms (.mrc/.rec)."""
    from cryodeploy.imaging.filters import FrameFilters
    from cryodeploy.imaging.movies import MOVIE_SUFFIXES, MovieConfig
    from cryodeploy.inference.denoiser import Denoiser
    from cryodeploy.inference.runner import RunConfig
    from cryodeploy.io.inputs import MICROGRAPH_SUFFIXES, expand_inputs
    from cryodeploy.io.volumes import VOLUME_SUFFIXES

    config = RunConfig(
        tile=size_or_auto(tile, "--tile"), batch=size_or_auto(batch, "--batch"), output_dtype=output_dtype,  # type: ignore[arg-type]
        output_format=output_format, suffix=suffix, skip_existing=skip_existing, overwrite=overwrite,
        shard=shard, pull=pull, summary=summary,
        quiet=quiet, preview=preview, keep_normalized=keep_normalized,
        filters=FrameFilters(bin_factor, lowpass, gaussian, filter_at),  # type: ignore[arg-type]
        movies=MovieConfig(gain) if movies else None, io_threads=io_threads, fsync=fsync,
    )
    if gain is not None and not movies:
        raise click.UsageError("--gain needs --movies")
    extra = {**({"cuda_graphs": True} if cuda_graphs else {}), **({"compile": True} if compile_ else {})}
    with _sigterm_interrupts(), Denoiser.load(list(models), device=device, backend=backend,
                                              precision=precision, threads=threads, **extra) as d:
        suffixes = VOLUME_SUFFIXES if d.spec.ndim == 3 else MOVIE_SUFFIXES if movies else MICROGRAPH_SUFFIXES
        paths = expand_inputs(list(inputs), project_dir, suffixes)
        result = d.denoise_files(paths, outdir, config)
        label = d.backend.label
    for f in result.files:
        if f.status == "failed":
            click.echo(f"failed: {one_line(f.error or '')}", err=True)
    click.echo(f"{result.line()} with {label}")
    if not result.ok:
        raise SystemExit(1)
