"""``cryodeploy preprocess``: cut micrographs (or, with ``--volumes``, tomograms) into a patch store, or
adopt a raw seeds-style store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click


def _default_workers() -> int:
    return min(16, os.cpu_count() or 1)


def _sampler(device: str, draws_noise: bool) -> tuple[str, str]:
    """(sampler, device) of the config for ``--device``: torch on a GPU, numpy on the cpu."""
    if device == "auto":
        if not draws_noise:
            return "numpy", "cpu"
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "numpy", "cpu"
    if not draws_noise:
        raise click.UsageError(f"--device {device}: only noise and --noise2noise targets are drawn on a GPU; "
                               "--thin, --pairs and --movies run on the cpu")
    return "torch", device


@click.command()
@click.argument("inputs", nargs=-1)
@click.option(
    "-o", "--output", "store", type=click.Path(path_type=Path),
    help="The patch store folder to write (required, except with --adopt).",
)
@click.option(
    "--patch", type=click.IntRange(min=8), default=None,
    help="Patch side in pixels [default: 1024; with --volumes 64, i.e. 64^3 voxels].",
)
@click.option(
    "--stride", type=click.IntRange(min=1), help="Pixels between patches [default: the patch size]."
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Fraction of the micrographs put in the test split.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the split and noise."
)
@click.option(
    "--noise",
    "noise_kind",
    type=click.Choice(["poisson-gaussian"]),
    default=None,
    help="Synthetic noise model [default: poisson-gaussian].",
)
@click.option(
    "--sigma", type=click.FloatRange(min=0), help="Gaussian noise sigma on the [0,1] scale [default: 0.05]."
)
@click.option(
    "--dose", type=click.FloatRange(min=0), help="Poisson dose (counts at intensity 1) [default: 20]."
)
@click.option(
    "--dose-range", nargs=2, type=click.FloatRange(min=0), help="Draw the dose per micrograph in LO HI."
)
@click.option("--noise2noise", is_flag=True, help="Target = a second independent noisy draw (Noise2Noise).")
@click.option(
    "--thin",
    is_flag=True,
    help="Noise2Noise from counted micrographs: input and target are binomially thinned halves of the "
    "counts (integer data, or a gain estimated from variance/mean; other data refused).",
)
@click.option(
    "--pairs",
    nargs=2,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Inputs in DIR_A, targets the same file names in DIR_B (e.g. even/odd sums).",
)
@click.option(
    "--adopt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Write a manifest for raw train_input.bin ... files in this folder.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=_default_workers,
    show_default="min(16, cores)",
    help="Threads drawing noise, normalizing and writing (each adds only small temporaries; 0 = none).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the synthetic noise is drawn: cpu (numpy's sampler, as before), cuda or cuda:N (torch's on "
    "the GPU: a different, equally distributed draw; the manifest's 'sampler' says which), auto = cuda "
    "when torch sees a GPU. --thin, --pairs, --movies and --volumes run on the cpu.",
)
@click.option("--movies", is_flag=True,
              help="INPUTS are movies (MRC/MRCS/TIFF frame stacks): even/odd frame sums become input/target "
                   "pairs (Noise2Noise); the sums stay in STORE/sums.")
@click.option("--gain", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --movies: gain reference (MRC or TIFF) multiplied into every frame.")
@click.option("--bin", "bin_factor", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --movies: bin the sums by N (Fourier cropping).")
@click.option("--volumes", is_flag=True,
              help="INPUTS are tomograms (MRC volumes: files, folders of .mrc/.rec/.map, RELION 5 tomograms "
                   "STAR files, whose half tomograms become input/target pairs); patches are cubes.")
@click.option("--even-odd", is_flag=True,
              help="With --volumes: pair INPUTS by name (NAME_even/NAME_odd, NAME_EVN/NAME_ODD): "
                   "Noise2Noise.")
@click.option("--self-supervised", is_flag=True,
              help="With --volumes: store the inputs only (no targets), for self-supervised training.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def preprocess(
    inputs: tuple[str, ...],
    store: Path | None,
    patch: int | None,
    stride: int | None,
    test_fraction: float,
    seed: int,
    noise_kind: str | None,
    sigma: float | None,
    dose: float | None,
    dose_range: tuple[float, float] | None,
    noise2noise: bool,
    thin: bool,
    pairs: tuple[Path, Path] | None,
    adopt: Path | None,
    workers: int,
    device: str,
    movies: bool,
    gain: Path | None,
    bin_factor: int,
    volumes: bool,
    even_odd: bool,
    self_supervised: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Cut micrographs (files, globs, folders, RELION STAR files) into a patch store for training.

    Targets: synthetic Poisson+Gaussian noise on the micrographs (default), two independent
    noisy draws (--noise2noise), binomially thinned halves of counted micrographs (--thin), or
    your own pairs (--pairs DIR_A DIR_B).
    """
    noise_given = [
        n
        for n, v in (
            ("--noise", noise_kind),
            ("--sigma", sigma),
            ("--dose", dose),
            ("--dose-range", dose_range),
        )
        if v is not None
    ]
    if (even_odd or self_supervised) and not volumes:
        raise click.UsageError("--even-odd and --self-supervised need --volumes")
    if volumes:
        if movies or adopt is not None or gain is not None or bin_factor != 1:
            raise click.UsageError("--volumes takes no --movies, --adopt, --gain or --bin")
        if device not in ("auto", "cpu"):
            raise click.UsageError(f"--device {device}: --volumes draws its noise on the cpu")
        if store is None:
            raise click.UsageError("missing -o/--output STORE")
        _volumes(store, patch or 64)
        return
    patch = patch or 1024
    if adopt is not None:
        if inputs or store or pairs or noise2noise or thin or noise_given:
            raise click.UsageError("--adopt DIR takes only --patch and --overwrite")
        from cryodeploy.training.adopt import adopt_raw_store

        adopted = adopt_raw_store(adopt, patch, overwrite=overwrite)
        click.echo(f"adopted {adopted}")
        return
    if store is None:
        raise click.UsageError("missing -o/--output STORE")
    if pairs is not None and (inputs or noise2noise or noise_given):
        raise click.UsageError(
            f"--pairs takes no INPUTS, --noise2noise or noise options (got {noise_given or 'some'})"
        )
    if thin and (pairs or noise2noise or noise_given):
        raise click.UsageError(f"--thin takes no --pairs, --noise2noise or noise options "
                               f"(got {noise_given or 'some'})")
    if pairs is None and not inputs:
        raise click.UsageError("give INPUTS (micrographs) or --pairs DIR_A DIR_B")
    if dose is not None and dose_range is not None:
        raise click.UsageError("give --dose or --dose-range, not both")
    if movies and (pairs or noise2noise or noise_given):
        raise click.UsageError(
            "--movies makes its own pairs: it takes no --pairs, --noise2noise or noise options"
        )
    if not movies and (gain is not None or bin_factor != 1):
        raise click.UsageError("--gain and --bin need --movies")

    from cryodeploy.imaging.movies import MOVIE_SUFFIXES
    from cryodeploy.imaging.noise import NoiseSpec
    from cryodeploy.io.inputs import MICROGRAPH_SUFFIXES, expand_inputs
    from cryodeploy.training.preprocess import PreprocessConfig
    from cryodeploy.training.preprocess import preprocess as run

    targets = "pairs" if pairs else "noise2noise" if noise2noise else "thin" if thin else "noise"
    sampler, device = _sampler(device, targets in ("noise", "noise2noise") and not movies)
    given: dict[str, Any] = {
        k: v for k, v in (("kind", noise_kind), ("dose", dose), ("sigma", sigma)) if v is not None
    }
    noise = NoiseSpec(**given, dose_range=dose_range)  # NoiseSpec's defaults for the rest
    config = PreprocessConfig(
        patch=patch,
        stride=stride,
        test_fraction=test_fraction,
        seed=seed,
        targets=targets,
        noise=noise,
        target_dir=pairs[1] if pairs else None,
        workers=workers,
        overwrite=overwrite,
        sampler=sampler,
        device=device,
    )
    paths = expand_inputs([str(pairs[0])] if pairs else list(inputs),
                          suffixes=MOVIE_SUFFIXES if movies else MICROGRAPH_SUFFIXES)
    if movies:
        from cryodeploy.imaging.movies import MovieConfig
        from cryodeploy.training.movies import preprocess_movies

        result = preprocess_movies(paths, store, config, MovieConfig(gain, bin_factor), quiet=quiet)
    else:
        result = run(paths, store, config, quiet=quiet)
    counts = ", ".join(f"{s} {result.count(s)}" for s in result.splits)
    gib = sum(result.count(s) for s in result.splits) * result.patch_bytes * 2 / 2**30
    click.echo(
        f"wrote {store}: {counts} patches of {patch}x{patch} from {len(paths)} micrographs ({gib:.2f} GiB)"
    )


def _volumes(store: Path, patch: int) -> None:
    """``preprocess --volumes``: tomograms (or even/odd pairs) into a store of patch^3 patches; the
    other options are the command's own (its click context)."""
    from cryodeploy.imaging.noise import NoiseSpec
    from cryodeploy.io.tomopairs import expand_tomograms, pair_folders
    from cryodeploy.training.preprocess import PreprocessConfig
    from cryodeploy.training.volumes import preprocess_volumes

    p = click.get_current_context().params
    inputs, pairs = p["inputs"], p["pairs"]
    if pairs is not None and (inputs or p["even_odd"]):
        raise click.UsageError("--pairs EVEN_DIR ODD_DIR takes no INPUTS or --even-odd")
    if pairs is None and not inputs:
        raise click.UsageError("give INPUTS (tomograms) or --pairs EVEN_DIR ODD_DIR")
    tomos = pair_folders(*pairs) if pairs is not None else expand_tomograms(list(inputs), p["even_odd"])
    noise_given = [f"--{k.replace('_', '-')}" for k in ("noise_kind", "sigma", "dose", "dose_range")
                   if p[k] is not None]
    noise_given = ["--noise" if n == "--noise-kind" else n for n in noise_given]
    kinds = [f"--{k.replace('_', '-')}" for k in ("noise2noise", "thin", "self_supervised") if p[k]]
    paired = tomos[0].odd is not None
    if paired and (kinds or noise_given):
        extra = ", ".join(kinds + noise_given)
        raise click.UsageError(f"even/odd pairs are their own targets: they take no {extra}")
    if len(kinds) > 1:
        raise click.UsageError(f"choose one kind of targets, found {' and '.join(kinds)}")
    if (p["thin"] or p["self_supervised"]) and noise_given:
        raise click.UsageError(f"{kinds[0]} takes no noise options (got {', '.join(noise_given)})")
    if p["dose"] is not None and p["dose_range"] is not None:
        raise click.UsageError("give --dose or --dose-range, not both")
    targets = ("pairs" if paired else "noise2noise" if p["noise2noise"] else "thin" if p["thin"]
               else "none" if p["self_supervised"] else "noise")
    fields = (("kind", "noise_kind"), ("dose", "dose"), ("sigma", "sigma"))
    given: dict[str, Any] = {k: p[f] for k, f in fields if p[f] is not None}
    config = PreprocessConfig(
        patch=patch, stride=p["stride"], test_fraction=p["test_fraction"], seed=p["seed"], targets=targets,
        noise=NoiseSpec(**given, dose_range=p["dose_range"]), workers=p["workers"], overwrite=p["overwrite"],
        ndim=3,
    )
    result = preprocess_volumes(tomos, store, config, quiet=p["quiet"])
    counts = ", ".join(f"{s} {result.count(s)}" for s in result.splits)
    n = sum(result.count(s) for s in result.splits)
    gib = n * result.patch_bytes * (1 if targets == "none" else 2) / 2**30
    click.echo(f"wrote {store}: {counts} patches of {patch}^3 ({targets}) from {len(tomos)} tomograms "
               f"({gib:.2f} GiB)")
