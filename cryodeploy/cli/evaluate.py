"""``cryodeploy evaluate``: score a model against baselines and write an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from cryodeploy.evaluation.data import EvalData, VolumeSplitData


def _compare(ctx: click.Context, param: click.Parameter,
             values: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    out = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"found {v!r}, expected NAME=DIR", ctx=ctx, param=param)
        out.append((name, Path(folder)))
    return tuple(out)


@click.command()
@click.option("--model", "-m", required=True,
              help="Model: checkpoint, run folder, raw weights, .onnx or engine.")
@click.option("--pairs", nargs=2, type=click.Path(file_okay=False, path_type=Path),
              metavar="NOISY_DIR CLEAN_DIR", help="Noisy and clean micrographs matched by file name.")
@click.option("--store", type=click.Path(path_type=Path),
              help="A patch store (normalized patches with targets).")
@click.option("--store-split", default="test", show_default=True, help="Patch store split to evaluate.")
@click.option("--halves", is_flag=True,
              help="No clean target: FRC of diagonal halves of the INPUTS micrographs.")
@click.option("--half-pairs", nargs=2, type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR_A DIR_B",
              help="Independent halves (e.g. even/odd frame sums) matched by file name (with --halves; "
                   "with --volumes: even and odd half tomograms).")
@click.option("--volumes", is_flag=True,
              help="Tomograms (MRC volumes: INPUTS files, folders, RELION 5 tomograms STAR files, and/or "
                   "--half-pairs EVEN_DIR ODD_DIR), scored by split gain and FSC on their even/odd halves, "
                   "or on thinned halves of integer counts (--split auto or thin).")
@click.option("--even-odd", is_flag=True,
              help="With --volumes: pair INPUTS by name (NAME_even/NAME_odd, NAME_EVN/NAME_ODD).")
@click.option("--clean", type=click.Path(file_okay=False, path_type=Path),
              help="With --volumes: exact clean volumes named as the even halves (e.g. synth --volume's "
                   "clean/): PSNR and MSE against them.")
@click.option("--split", type=click.Choice(["auto", "thin", "diagonal"]),
              help="No clean target: split gain on two independent halves of the INPUTS micrographs "
                   "(thin = binomial thinning of counts, diagonal = 2x2 diagonals, auto = thin for integer "
                   "data, else diagonal).")
@click.option("--write-halves", type=click.Path(file_okay=False, path_type=Path),
              help="With --split: write the halves (NAME_A.mrc, NAME_B.mrc, NAME_full.mrc) here, for other "
                   "tools to denoise and --compare.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the thinning and the plots' pixel sample.")
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (metrics.json, index.html, PNGs).")
@click.option("--model-b", help="A second model to compare (A/B).")
@click.option("--compare", multiple=True, callback=_compare, metavar="NAME=DIR",
              help="A folder of another tool's denoised files, matched by file name (repeatable).")
@click.option("--train-log", type=click.Path(dir_okay=False, path_type=Path),
              help="RUNDIR/metrics.jsonl of a training run, to plot its loss curve.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N items.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--backend", default="auto", show_default=True, help="Backend name, or auto.")
@click.option("--strict", is_flag=True, help="Exit with status 3 if there is any red flag.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(model: str, pairs: tuple[Path, Path] | None, store: Path | None, store_split: str, halves: bool,
             half_pairs: tuple[Path, Path] | None, volumes: bool, even_odd: bool, clean: Path | None,
             split: str | None, write_halves: Path | None, seed: int,
             inputs: tuple[str, ...], output: Path, model_b: str | None,
             compare: tuple[tuple[str, Path], ...],
             train_log: Path | None, limit: int | None, device: str, backend: str, strict: bool,
             quiet: bool) -> None:
    """Score a model against the noisy input, the best Gaussian blur and optional other models/tools.

    Give exactly one of --pairs NOISY_DIR CLEAN_DIR, --store STORE, --halves [INPUTS...]
    [--half-pairs DIR_A DIR_B] or --split auto|thin|diagonal INPUTS... (the last two: micrographs
    without a clean target), or for tomograms --volumes [INPUTS...] [--half-pairs EVEN_DIR ODD_DIR]
    [--even-odd] [--split auto|thin] [--clean DIR].
    """
    from cryodeploy.evaluation.evaluate import EvalConfig, HalvesData, PairsData, SplitData, StoreData
    from cryodeploy.evaluation.evaluate import evaluate as run_evaluate

    data: EvalData
    if volumes:
        data = _volume_data(pairs, store, halves, split, inputs, even_odd, half_pairs, clean, write_halves)
    else:
        if even_odd or clean:
            raise click.UsageError("--even-odd and --clean go with --volumes")
        modes = [m for m, on in (("--pairs", pairs), ("--store", store), ("--halves", halves),
                                 ("--split", split)) if on]
        if len(modes) != 1:
            found = ", ".join(modes) or "none"
            raise click.UsageError(f"give exactly one of --pairs, --store, --halves, --split, --volumes "
                                   f"(found {found})")
        if inputs and not (halves or split):
            raise click.UsageError("INPUTS go with --halves, --split or --volumes")
        if half_pairs and not halves:
            raise click.UsageError("--half-pairs goes with --halves or --volumes")
        if write_halves and not split:
            raise click.UsageError("--write-halves goes with --split or --volumes")
        if halves and not inputs and not half_pairs:
            raise click.UsageError("--halves needs micrographs (INPUTS) or --half-pairs DIR_A DIR_B")
        if split and not inputs:
            raise click.UsageError("--split needs micrographs (INPUTS)")
        data = (PairsData(*pairs) if pairs else StoreData(store, store_split) if store
                else SplitData(tuple(inputs), split, write_halves) if split
                else HalvesData(tuple(inputs), half_pairs))
    config = EvalConfig(model_b=model_b, compare=compare, train_log=train_log, device=device, backend=backend,
                        limit=limit, seed=seed, quiet=quiet)
    result = run_evaluate(model, data, output, config)
    if not quiet:
        for name, m in result["methods"].items():
            parts = [f"{k}={m[k]:.4g}" for k in ("psnr", "ssim", "corr", "split_gain_db", "change",
                                                 "residual_spread", "frc_0.143", "fsc_0.143", "fsc_half_bit",
                                                 "flat_noise_ratio")
                     if m.get(k) is not None]
            click.echo(f"{name:12s} " + " ".join(parts))
        click.echo(f"report: {output / 'index.html'}")
    for flag in result["red_flags"]:
        click.echo(f"red flag: {flag['message']}", err=True)
    if strict and result["red_flags"]:
        raise click.exceptions.Exit(3)


def _volume_data(pairs: tuple[Path, Path] | None, store: Path | None, halves: bool, split: str | None,
                 inputs: tuple[str, ...], even_odd: bool, half_pairs: tuple[Path, Path] | None,
                 clean: Path | None, write_halves: Path | None) -> VolumeSplitData:
    from cryodeploy.evaluation.evaluate import VolumeSplitData

    others = [m for m, on in (("--pairs", pairs), ("--store", store), ("--halves", halves)) if on]
    if others:
        raise click.UsageError(f"--volumes takes no {', '.join(others)}")
    if split == "diagonal":
        raise click.UsageError("--split diagonal is for micrographs; tomograms split auto (even/odd halves, "
                               "else thinning) or thin")
    if not inputs and not half_pairs:
        raise click.UsageError("--volumes needs tomograms (INPUTS) or --half-pairs EVEN_DIR ODD_DIR")
    if even_odd and not inputs:
        raise click.UsageError("--even-odd pairs INPUTS by name, but no INPUTS are given")
    return VolumeSplitData(tuple(inputs), even_odd, half_pairs, split or "auto", clean, write_halves)
