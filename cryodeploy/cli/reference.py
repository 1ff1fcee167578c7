"""``cryodeploy reference make|check``: write a reference bundle, or recompute one and compare."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def reference() -> None:
    """Reference bundles: weights, a fixed batch, output, loss and gradients to validate ports against."""


@reference.command("make")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1),
              help="Images in the fixed batch.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=8),
              help="Image side in pixels (a multiple of the model stride).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the fixed batch.")
def make(checkpoint: Path, outdir: Path, batch: int, size: int, seed: int) -> None:
    """Write the reference bundle of CHECKPOINT (file or run folder) into OUTDIR."""
    from cryodeploy.verify.reference import make_reference

    out = make_reference(checkpoint, outdir, batch=batch, size=size, seed=seed)
    click.echo(f"wrote reference bundle {out}")


@reference.command("check")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", default="torch", show_default=True,
              help="Backend to recompute with (non-torch backends check the forward pass only).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.pass_context
def check(ctx: click.Context, bundle: Path, backend: str, device: str) -> None:
    """Recompute BUNDLE and fail (exit 1) if any array differs by more than the tolerance."""
    from cryodeploy.verify.reference import check_reference

    report = check_reference(bundle, backend=backend, device=device)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        ctx.exit(1)
