"""``cryodeploy synth``: write synthetic micrographs (clean + two independent noisy draws)."""

from __future__ import annotations

from pathlib import Path

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
    default=(1024, 1024),
    show_default=True,
    metavar="H W",
    help="Height and width in pixels.",
)
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
    default=20.0,
    show_default=True,
    help="Poisson dose: expected counts per pixel at intensity 1 (0: no Poisson noise).",
)
@click.option(
    "--sigma",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Gaussian noise standard deviation on the [0, 1] scale.",
)
@click.option(
    "--voxel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Pixel size in Angstrom (sets the particle size in pixels).",
)
@click.option("--no-carbon", is_flag=True, help="No carbon film edge.")
@click.option("--no-ctf", is_flag=True, help="No CTF modulation (an amplitude-contrast image).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUTDIR.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def synth(
    outdir: Path,
    count: int,
    size: tuple[int, int],
    seed: int,
    dose: float,
    sigma: float,
    voxel_size: float,
    no_carbon: bool,
    no_ctf: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Write COUNT synthetic micrographs to OUTDIR/clean, OUTDIR/noisy and OUTDIR/noisy2."""
    from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

    config = SynthConfig(
        count=count,
        size=(size[0], size[1]),
        seed=seed,
        dose=dose,
        sigma=sigma,
        voxel_size=voxel_size,
        carbon=not no_carbon,
        ctf=not no_ctf,
    )
    paths = synth_micrographs(outdir, config, quiet=quiet, overwrite=overwrite)
    if not quiet:
        click.echo(
            f"wrote {len(paths)} micrographs of {size[0]}x{size[1]} pixels to {outdir}/clean, noisy, noisy2"
        )
