"""``cryodeploy synth``: write synthetic micrographs (clean + two independent noisy draws), or with
``--volume`` synthetic tomograms (clean + even/odd halves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--count", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="Number of micrographs."
)
@click.option(
    "--size",
    nargs=2,
    type=click.IntRange(min=32),
    default=None,
    metavar="H W",
    help="Height and width in pixels [default: 1024 1024; with --volume 256 256].",
)
@click.option("--volume", is_flag=True, help="Write tomograms (3-D volumes) to OUTDIR/clean, even and odd.")
@click.option("--depth", type=click.IntRange(min=16), default=None,
              help="With --volume: sections (nz) [default: 64].")
@click.option("--tilt-range", type=click.FloatRange(0, 90, min_open=True), default=None,
              help="With --volume: tilt range +-DEG about Y; the missing wedge lies beyond [default: 60].")
@click.option("--device", default="cpu", show_default=True, help="With --volume: torch device (cpu, cuda).")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random seed (same seed, same files).",
)
@click.option(
    "--dose",
    type=click.FloatRange(min=0),
    default=None,
    help="Poisson dose: expected counts per pixel at intensity 1 (0: no Poisson noise) [default: 20]; "
    "with --volume counts per voxel of ice in each half [default: 40].",
)
@click.option(
    "--sigma",
    type=click.FloatRange(min=0),
    default=None,
    help="Gaussian noise standard deviation on the [0, 1] scale [default: 0.05].",
)
@click.option(
    "--voxel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pixel size in Angstrom (sets the particle size in pixels) [default: 1; with --volume 10].",
)
@click.option("--no-carbon", is_flag=True, help="No carbon film edge.")
@click.option("--no-ctf", is_flag=True, help="No CTF modulation (an amplitude-contrast image).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUTDIR.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def synth(
    outdir: Path,
    count: int,
    size: tuple[int, int] | None,
    volume: bool,
    depth: int | None,
    tilt_range: float | None,
    device: str,
    seed: int,
    dose: float | None,
    sigma: float | None,
    voxel_size: float | None,
    no_carbon: bool,
    no_ctf: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Write COUNT synthetic micrographs to OUTDIR/clean, OUTDIR/noisy and OUTDIR/noisy2, or with
    --volume COUNT tomograms to OUTDIR/clean, OUTDIR/even and OUTDIR/odd (and OUTDIR/tomograms.star)."""
    if volume:
        if sigma is not None or no_carbon:
            raise click.UsageError(
                "--volume takes no --sigma or --no-carbon (tomograms have Poisson noise only)"
            )
        _synth_volumes(outdir, count, size or (256, 256), depth or 64, seed, dose, voxel_size, tilt_range,
                       not no_ctf, device, overwrite, quiet)
        return
    if depth is not None or tilt_range is not None or device != "cpu":
        raise click.UsageError("--depth, --tilt-range and --device need --volume")
    from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

    size = size or (1024, 1024)
    config = SynthConfig(
        count=count,
        size=(size[0], size[1]),
        seed=seed,
        dose=20.0 if dose is None else dose,
        sigma=0.05 if sigma is None else sigma,
        voxel_size=1.0 if voxel_size is None else voxel_size,
        carbon=not no_carbon,
        ctf=not no_ctf,
    )
    paths = synth_micrographs(outdir, config, quiet=quiet, overwrite=overwrite)
    if not quiet:
        click.echo(
            f"wrote {len(paths)} micrographs of {size[0]}x{size[1]} pixels to {outdir}/clean, noisy, noisy2"
        )


def _synth_volumes(outdir: Path, count: int, size: tuple[int, int], depth: int, seed: int,
                   dose: float | None, voxel_size: float | None, tilt_range: float | None, ctf: bool,
                   device: str, overwrite: bool, quiet: bool) -> None:
    from cryodeploy.imaging.simulate.tomoscene import TomoConfig
    from cryodeploy.imaging.tomosynth import synth_tomograms

    options = (("dose", dose), ("voxel_size", voxel_size), ("tilt_range_deg", tilt_range))
    given: dict[str, Any] = {k: v for k, v in options if v is not None}
    config = TomoConfig(shape=(depth, size[0], size[1]), seed=seed, ctf=ctf, **given)
    paths = synth_tomograms(outdir, config, count, device=device, quiet=quiet, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {len(paths)} tomograms of {size[1]}x{size[0]}x{depth} voxels to "
                   f"{outdir}/clean, even, odd and {outdir}/tomograms.star")
