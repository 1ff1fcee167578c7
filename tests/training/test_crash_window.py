"""The training crash window (issue 22, item 6): a ``kill -9`` at any rename of a run's saves leaves a
folder that ``--resume`` continues (or, before the first ``state.pt``, a fresh run accepts) to exactly the
uninterrupted result, with no temporary file left; a killed preprocess store is not adoptable.

Each kill is real: a child process (forked from one helper process that imported torch once, so the
12 kills cost one interpreter start) replaces ``os.replace`` by "SIGKILL myself before rename k".
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mrc_cases import unsharded_env
from test_train import _write_store

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, StoreError
from cryodeploy.files import TEMP_PREFIX
from cryodeploy.training.adopt import adopt_raw_store
from cryodeploy.training.config import TrainConfig
from cryodeploy.training.store import WRITING
from cryodeploy.training.train import train

pytestmark = pytest.mark.timeout(240)

CONFIG = {"epochs": 2, "batch": 4, "lr": 3e-3, "log_every": 1, "max_batches": 1, "loader_threads": 1}
#: renames of a 2-epoch run: per epoch best.json, best.safetensors, last.json, last.safetensors, state.pt,
#: loss.png (best is rewritten in epoch 2 only if validation improves; these seeds make it improve)
RENAMES = 12

KILLER = r"""
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from cryodeploy.training.config import TrainConfig
from cryodeploy.training.train import train
store, base, config = sys.argv[1], Path(sys.argv[2]), TrainConfig(**json.loads(sys.argv[3]))
train(store, base / "warm", config, quiet=True)  # first-call costs (imports, fonts: ~1 s) paid once
for k in range(1, int(sys.argv[4]) + 1):
    pid = os.fork()
    if pid == 0:
        real, calls = os.replace, [0]
        def replace(src, dst, *a, **kw):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **kw)
        os.replace = replace
        try:
            train(store, base / f"kill{k}", config, quiet=True)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    print(k, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status), flush=True)
"""


def _files(run: Path) -> dict[str, object]:
    """Checkpoint bytes, and configs bar the ``resume`` flag they record."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    for p in run.glob("*.json"):
        config = json.loads(p.read_text())
        config["training"].pop("resume")
        files[p.name] = config
    return files


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]


def test_kill_at_every_rename_then_resume_or_restart_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    store = _write_store(tmp_path / "store", n=12, size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(store, tmp_path / "ref", TrainConfig(**CONFIG), quiet=True)
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(store), str(tmp_path), json.dumps(CONFIG), str(RENAMES + 1)],
            capture_output=True, text=True, timeout=200, env=unsharded_env(),
        )
        assert proc.returncode == 0, proc.stderr
        # every child up to the last rename was killed there; the one after it ran to the end
        assert proc.stdout.split() == [str(x) for k in range(1, RENAMES + 1) for x in (k, 9)] + [
            str(RENAMES + 1), "-3"
        ], proc.stdout
        reference = _files(tmp_path / "ref")
        assert sorted(reference) == ["best.json", "best.safetensors", "last.json", "last.safetensors"]
        resumed = []
        for k in range(1, RENAMES + 1):
            run = tmp_path / f"kill{k}"
            assert list(run.glob(TEMP_PREFIX + "*")), k  # the kill left the save's temporary file
            if (run / "state.pt").exists():
                with pytest.raises(ConfigError, match="already holds a training run"):
                    train(store, run, TrainConfig(**CONFIG), quiet=True)
                train(store, run, TrainConfig(**CONFIG, resume=True), quiet=True)
                resumed.append(k)
            else:
                train(store, run, TrainConfig(**CONFIG), quiet=True)
            assert list(run.glob(TEMP_PREFIX + "*")) == [], k
            assert _files(run) == reference, k  # byte-identical checkpoints and configs
            assert _losses(run) == _losses(tmp_path / "ref"), k
    finally:
        torch.set_num_threads(threads)
    assert resumed == list(range(6, RENAMES + 1))  # state.pt is the 5th rename: before it, a fresh run


STORE_KILLER = r"""
import os, signal, sys
import numpy as np
from cryodeploy.training.store import StoreWriter
writer = StoreWriter(sys.argv[1], 8)
for i in range(6):
    writer.append("train", np.full((4, 8, 8), i, np.float32), np.full((4, 8, 8), -i, np.float32))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_preprocess_store_is_not_adoptable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", STORE_KILLER, str(store)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (store / "train_input.bin").stat().st_size == 24 * 8 * 8 * 4 and (store / WRITING).exists()
    with pytest.raises(StoreError, match=f"did not finish \\({WRITING} is present\\)"):
        adopt_raw_store(store, 8)
    result = CliRunner().invoke(cli, ["preprocess", "--adopt", str(store), "--patch", "8", "--overwrite"])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: {store}: holds the files of a 'cryodeploy preprocess' that did not finish "
        f"({WRITING} is present); rerun preprocess with --overwrite instead of adopting them"
    ]
    assert not (store / "manifest.json").exists()
