"""``cryodeploy parity``: backends x precisions on the same micrographs, compared; exit 1 on mismatch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from cryodeploy.cli._params import size_or_auto, split_csv


@click.command()
@click.argument("model")
@click.argument("inputs", nargs=-1)
@click.option("--synth", "synth_count", type=click.IntRange(min=1), default=None,
              help="Instead of INPUTS, generate N synthetic micrographs with clean targets.")
@click.option("--size", type=(int, int), default=(512, 512), show_default=True, help="Synthetic image H W.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic micrographs.")
@click.option("--targets", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of clean images named like INPUTS (enables the fp16/bf16 PSNR check).")
@click.option("--backends", default=None, help="Comma-separated, e.g. torch,ort,trt (default: all).")
@click.option("--precisions", default="fp32", show_default=True, help="Comma-separated, e.g. fp32,fp16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=0, help="CPU threads per backend (0: library default).")
@click.option("--tile", default="auto", show_default=True, help="Runner tile side, or auto.")
@click.option("--batch", default="auto", show_default=True, help="Runner tiles per batch, or auto.")
@click.option("--rtol", type=float, default=1e-5, show_default=True,
              help="fp32 tolerance: max|a-b| / max|reference|.")
@click.option("--max-psnr-loss", type=float, default=0.1, show_default=True,
              help="fp16/bf16 tolerance: dB of denoising PSNR below fp32.")
@click.option("--tf32", is_flag=True, help="Allow TF32 on GPUs (strict fp32 parity needs it off).")
@click.option("--no-reference", is_flag=True, help="Skip the float64 PyTorch reference.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the denoised outputs here (default: a temporary folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def parity(
    ctx: click.Context, model: str, inputs: tuple[str, ...], synth_count: int | None,
    size: tuple[int, int], seed: int, targets: Path | None, backends: str | None, precisions: str,
    device: str, threads: int, tile: str, batch: str, rtol: float, max_psnr_loss: float, tf32: bool,
    no_reference: bool, json_path: Path | None, workdir: Path | None, quiet: bool,
) -> None:
    """Denoise the same micrographs (or, with a volume model, tomograms) with every backend/precision
    through the runner and compare the outputs.

    Exits 1 when an fp32 result differs from another or from the float64 reference by more than
    --rtol, or an fp16/bf16 result loses more than --max-psnr-loss dB (needs clean targets).
    """
    from rich.console import Console

    from cryodeploy.backends.sources import load_source
    from cryodeploy.inference.denoiser import resolve_device
    from cryodeploy.io.inputs import expand_inputs
    from cryodeploy.verify.parity import ParityConfig, render, run_parity

    if bool(inputs) == bool(synth_count):
        raise click.UsageError("give either INPUTS or --synth N")
    config = ParityConfig(
        backends=split_csv(backends), precisions=split_csv(precisions) or (), device=resolve_device(device),
        cpu_fallback=device == "auto",
        threads=threads, tf32=tf32, tile=size_or_auto(tile, "--tile"), batch=size_or_auto(batch, "--batch"),  # type: ignore[arg-type]
        rtol=rtol, max_psnr_loss_db=max_psnr_loss, reference=not no_reference, quiet=quiet,
    )
    source = load_source(model)
    volumes = source.spec.ndim == 3
    if synth_count and volumes:
        raise click.UsageError("--synth draws micrographs; for a volume model write tomograms with "
                               "`cryodeploy synth --volume` and give their even halves (--targets: clean)")
    with tempfile.TemporaryDirectory(prefix="cryodeploy-parity-") as tmp:
        work = workdir or Path(tmp)
        clean: dict[Path, Path] | None
        if synth_count:
            from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

            paths = synth_micrographs(work / "synth", SynthConfig(synth_count, size=size, seed=seed))
            clean = {p: p.parent.parent / "clean" / p.name for p in paths}
        else:
            from cryodeploy.io.inputs import MICROGRAPH_SUFFIXES
            from cryodeploy.io.volumes import VOLUME_SUFFIXES

            paths = expand_inputs(list(inputs), suffixes=VOLUME_SUFFIXES if volumes else MICROGRAPH_SUFFIXES)
            clean = {p: targets / p.name for p in paths} if targets else None
        report = run_parity(source, paths, work, config, clean)
    console = Console(width=max(Console().width, 140))
    for item in render(report):
        console.print(item)
    if json_path is not None:
        click.echo(f"wrote {report.write_json(json_path)}")
    if not report.ok:
        ctx.exit(1)
