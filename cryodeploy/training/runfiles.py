"""The files of a training run folder besides its checkpoints: resume state, metrics log, loss curve.

- ``state.pt``: everything a resumed run needs to continue exactly (weights, optimizer and
  grad-scaler state, epoch and batch position, RNG states, best validation so far, the
  config as JSON). Written with ``torch.save`` of plain tensors, numbers, strings and dicts
  and read back with ``weights_only=True``, so loading never unpickles arbitrary objects.
- ``metrics.jsonl``: one JSON object per line; ``{"kind": "train", ...}`` every log interval,
  ``{"kind": "val", ...}`` after each epoch.
- ``loss.png``: training and validation loss against the step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cryodeploy.errors import ConfigError, first_line
from cryodeploy.files import TEMP_PREFIX, atomic_write

__all__ = ["METRICS", "PLOT", "STATE", "STATE_FORMAT", "append_metrics", "check_resumable", "load_state",
           "plot_losses", "read_metrics", "refuse_existing_run", "remove_temps", "save_state",
           "truncate_metrics"]

STATE = "state.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
STATE_FORMAT = "cryodeploy-train-state/1"

log = logging.getLogger(__name__)


def save_state(rundir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plain tensors/numbers/strings/containers) to ``rundir/state.pt``."""
    import torch

    target = rundir / STATE
    with atomic_write(target) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)
    return target


def load_state(rundir: Path) -> dict[str, Any]:
    """Read ``rundir/state.pt`` with ``weights_only=True``; refuses other formats."""
    import pickle

    import torch

    path = rundir / STATE
    if not path.is_file():
        raise ConfigError(f"{path}: no resume state (expected a run folder written by cryodeploy train)")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = first_line(err, type(err).__name__)
        if "Weights only load failed" in reason:  # torch's advice (weights_only=False) is unsafe here
            reason = "it holds objects other than tensors, numbers and strings; refusing to unpickle them"
        raise ConfigError(f"{path}: not a readable resume state ({reason})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: found state format {found!r}, expected {STATE_FORMAT!r}")
    return state


def append_metrics(rundir: Path, row: dict[str, Any]) -> None:
    """Append one row to ``rundir/metrics.jsonl`` (flushed, so a crash loses at most this row)."""
    with open(rundir / METRICS, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def read_metrics(rundir: Path) -> list[dict[str, Any]]:
    """All rows of ``rundir/metrics.jsonl`` (none if absent; a torn last line is dropped)."""
    path = rundir / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_metrics(rundir: Path, step: int) -> None:
    """Keep only the rows up to ``step`` (a resumed run rewrites what came after its state)."""
    rows = [r for r in read_metrics(rundir) if r.get("step", 0) <= step]
    with atomic_write(rundir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_losses(rundir: Path, rows: list[dict[str, Any]]) -> Path:
    """Draw training and validation loss against the step into ``rundir/loss.png`` (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for kind, key, style in (("train", "loss", "-"), ("val", "val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and r.get(key) is not None]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, style, label=f"{kind} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    if any(r.get("kind") in ("train", "val") for r in rows):
        ax.set_yscale("log")
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.96)  # tight_layout costs ~0.2 s
    target = rundir / PLOT
    with atomic_write(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


#: files of a run that a new run in the same folder writes afresh
RUN_FILES = (METRICS, PLOT, "best.safetensors", "best.json", "last.safetensors", "last.json")


def refuse_existing_run(rundir: Path, clean: bool = True) -> None:
    """Refuse to start a new run in a folder that holds one (it would be overwritten).

    A run exists once its first ``state.pt`` is written (the commit point of every save). Files of a
    run killed before that (checkpoints, metrics) are removed if ``clean`` (rank 0), so the new run
    starts clean.
    """
    if (rundir / STATE).exists():
        raise ConfigError(f"{rundir}: already holds a training run ({STATE}); "
                          "use --resume to continue it or choose another folder")
    left = [rundir / name for name in RUN_FILES if (rundir / name).exists()]
    if left and clean:
        log.warning("%s: removing %s of a run stopped before it saved a resumable state",
                    rundir, ", ".join(p.name for p in left))
        for path in left:
            path.unlink()


def remove_temps(rundir: Path) -> list[Path]:
    """Remove the temporary files of interrupted saves (one writer per run folder: all are stale)."""
    found = sorted(rundir.glob(TEMP_PREFIX + "*")) if rundir.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def check_resumable(rundir: Path, state: dict[str, Any], config: dict[str, Any], may_change: frozenset[str],
                    store_key: list[Any]) -> None:
    """Refuse to resume with a different config (except ``may_change`` fields) or store."""
    saved = json.loads(state["config"])
    for key in sorted(set(config) - may_change):
        if saved.get(key) != config[key]:
            raise ConfigError(f"{rundir / STATE}: the run was started with {key}={saved.get(key)!r}, "
                              f"found {config[key]!r}")
    if list(state["store"]) != store_key:
        raise ConfigError(f"{rundir / STATE}: the run's store had (patch H, W, train, val[, sampler]) "
                          f"{list(state['store'])}, found {store_key}")
