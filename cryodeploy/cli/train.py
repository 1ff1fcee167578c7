"""``cryodeploy train``: train a denoiser on a patch store or on simulation (also under ``torchrun``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from cryodeploy.training.config import OPTIMIZERS, PRECISIONS
from cryodeploy.training.objectives import METHODS


def _params(values: tuple[str, ...]) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. depth=2", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _sim_data(sim_config: Path | None, sim_size: int, crop: int, steps_per_epoch: int, redraws: int
              ) -> object:
    """The :class:`~cryodeploy.training.sources.SimulatedData` of ``--simulate`` (one-line errors)."""
    from cryodeploy.errors import ConfigError
    from cryodeploy.imaging.simulate import SimConfig
    from cryodeploy.training.sources import SimulatedData

    fields: dict[str, object] = {}
    if sim_config is not None:
        try:
            fields = json.loads(sim_config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{sim_config}: not a readable JSON simulation config ({err})") from err
        if not isinstance(fields, dict):
            raise ConfigError(f"{sim_config}: found {type(fields).__name__}, expected a JSON object")
    try:
        sim = SimConfig.from_dict({"shape": [sim_size, sim_size], **fields})
    except ConfigError as err:
        raise ConfigError(f"{sim_config or '--simulate'}: {err}") from err
    return SimulatedData(sim, crop=min(crop, *sim.shape), crops_per_image=1, steps_per_epoch=steps_per_epoch,
                         redraws=redraws)


@click.command()
@click.argument("store", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "rundir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: best/last checkpoints, state.pt, metrics.jsonl, loss.png.")
@click.option("--model", default=None,
              help="Architecture: cnn3 (default), unet, or unet3d for tomograms; with --init, its own.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Architecture parameter, e.g. --param base_channels=16 --param depth=2.")
@click.option("--method", default="supervised", show_default=True,
              type=click.Choice(METHODS),
              help="Store pairs (clean or independent noisy targets), or self-supervised Neighbor2Neighbor "
                   "(images, or single tomograms for unet3d).")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Passes over the training patches.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Global batch size (split over torchrun processes).")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Learning rate.")
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(OPTIMIZERS),
              help="adam, or plain sgd (no momentum).")
@click.option("--val-split", default=0.1, show_default=True, type=float,
              help="Fraction of training micrographs held out for validation.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="At most N batches per epoch.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="bf16/fp16: autocast + channels_last on CUDA; fp16 (with loss scaling) is the fastest "
                   "on an H100 (docs/benchmarks.md).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N (fp16 needs cuda; on cpu: fp32, e.g. --epochs 2 --max-batches 20).")
@click.option("--loader-threads", default=lambda: min(8, os.cpu_count() or 1), show_default="min(8, cores)",
              type=click.IntRange(min=1), help="Threads reading each batch from the store.")
@click.option("--buffers", default=3, show_default=True, type=click.IntRange(min=1),
              help="Batches the loader holds in (pinned) memory: its memory is buffers x batch bytes.")
@click.option("--simulate", is_flag=True,
              help="Train on micrographs simulated on the fly (exact clean targets; no STORE).")
@click.option("--sim-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON of simulation settings (SimConfig fields; unknown fields refused).")
@click.option("--sim-size", default=512, show_default=True, type=click.IntRange(min=32),
              help="Simulated micrograph side (px), unless the --sim-config sets shape.")
@click.option("--crop", default=256, show_default=True, type=click.IntRange(min=8),
              help="Training crop side (px) cut from each simulated micrograph.")
@click.option("--steps-per-epoch", default=200, show_default=True, type=click.IntRange(min=1),
              help="Batches per epoch with --simulate.")
@click.option("--redraws", default=0, show_default=True, type=click.IntRange(0, 64),
              help="With --simulate: steps each simulation serves again, the same scenes at fresh doses "
                   "with fresh counts (exact; 1 / (N + 1) of the simulating).")
@click.option("--init", default=None, metavar="CKPT|default",
              help="Fine-tune this checkpoint (or the shipped default); the architecture is taken from it.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the weights, the validation split and the patch order (same seed, same run).")
@click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1),
              help="Log loss, RMSE and samples/s every N batches.")
@click.option("--resume", is_flag=True, help="Continue the run in RUNDIR exactly where it stopped.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(store: Path | None, rundir: Path, model: str | None, params: tuple[str, ...], method: str,
          epochs: int, batch: int, lr: float, optimizer: str, val_split: float, max_batches: int | None,
          precision: str, device: str, loader_threads: int, buffers: int, simulate: bool,
          sim_config: Path | None, sim_size: int, crop: int, steps_per_epoch: int, redraws: int,
          init: str | None, seed: int, log_every: int, resume: bool, quiet: bool) -> None:
    """Train a denoiser on the patch store STORE (or, with --simulate, on simulation) into RUNDIR (-o)."""
    from cryodeploy.errors import ConfigError
    from cryodeploy.training.config import TrainConfig
    from cryodeploy.training.train import train as run_training

    if (store is None) == (not simulate):
        raise ConfigError("give a patch STORE or --simulate, not both" if simulate else
                          "missing STORE: give a patch store folder, or --simulate")
    model_params = _params(params)
    if init is not None:
        from cryodeploy.training.finetune import init_spec

        spec = init_spec(init)
        differs = any(spec.params.get(k) != v for k, v in model_params.items())
        if model not in (None, spec.architecture) or differs:
            raise ConfigError(f"--init {init}: the checkpoint is {spec.architecture} {spec.params}, found "
                              f"--model {model or spec.architecture} {model_params}; leave them out")
        model, model_params = spec.architecture, dict(spec.params)
    config = TrainConfig(model=model or "cnn3", model_params=model_params, epochs=epochs, batch=batch,
                         lr=lr, optimizer=optimizer, val_split=val_split, max_batches=max_batches,
                         precision=precision, device=device, seed=seed, method=method, log_every=log_every,
                         resume=resume, loader_threads=loader_threads, buffers=buffers, init=init)
    data = _sim_data(sim_config, sim_size, crop, steps_per_epoch, redraws) if simulate else store
    assert data is not None
    result = run_training(data, rundir, config, quiet=quiet)  # type: ignore[arg-type]
    if os.environ.get("RANK", "0") != "0":
        return
    best = "none"
    if result.best_val_loss is not None:
        best = f"{result.best_val_loss:.6g} (epoch {result.best_epoch})"
    click.echo(f"trained {result.epochs_completed} epoch(s), {result.steps} steps; "
               f"best validation loss {best}")
    click.echo(f"checkpoints: {result.best or '-'} (best), {result.last or '-'} (last)")
