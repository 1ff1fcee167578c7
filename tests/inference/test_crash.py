"""Crash safety and concurrency of ``cryodeploy denoise``, in real subprocesses: ``kill -9`` mid-run
leaves no truncated output and a ``--skip-existing`` rerun completes byte for byte; two runs on one
output folder write every output exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.files import TEMP_PREFIX
from cryodeploy.inference.claims import CLAIM_PREFIX
from cryodeploy.inference.jobs import LAUNCHERS
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.models.checkpoint import load_checkpoint

N_FILES = 24
GEOMETRY = ("--tile", "32", "--batch", "2")  # many small batches: slow enough to be killed mid-run
SHARD_VARS = ("LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
              *(v for pair in LAUNCHERS for v in pair))


@pytest.fixture(autouse=True)
def _no_shard_env(monkeypatch):
    for var in SHARD_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cnn3_checkpoint):
    """24 input micrographs and the uninterrupted run's output bytes."""
    root = tmp_path_factory.mktemp("crash")
    (root / "in").mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_FILES):
        write_micrograph(root / "in" / f"mic_{i:03d}.mrc", (rng.standard_normal((64, 64)) * 20 + 300))
    model, spec = load_checkpoint(cnn3_checkpoint)
    with TorchBackend(model, BackendOptions()) as backend:
        config = RunConfig(tile=int(GEOMETRY[1]), batch=int(GEOMETRY[3]), quiet=True)
        assert denoise_files(sorted((root / "in").iterdir()), root / "reference", backend, spec, config).ok
    reference = {p.name: _sha(p) for p in (root / "reference").iterdir()}
    assert len(reference) == N_FILES
    return root, reference


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _denoise(root: Path, outdir: Path, checkpoint: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in SHARD_VARS}
    cmd = [sys.executable, "-m", "cryodeploy", "denoise", str(root / "in"), "-o", str(outdir),
           "--model", str(checkpoint), "--backend", "torch", "--device", "cpu", *GEOMETRY, "-q", *extra]
    # SIGINT at its default in the child: a shell's background job inherits it ignored, and Python
    # then installs no KeyboardInterrupt handler (as for any `cmd &`, which Ctrl-C must not reach)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _outputs(outdir: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in outdir.iterdir() if not p.name.startswith(".")}


def test_kill_9_then_skip_existing_equals_uninterrupted_run(dataset, cnn3_checkpoint, tmp_path) -> None:
    root, reference = dataset
    out = tmp_path / "out"
    proc = _denoise(root, out, cnn3_checkpoint)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.name.startswith("mic_") for p in out.iterdir())):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = _outputs(out)
    assert 0 < len(survivors) < N_FILES, f"{len(survivors)} outputs: the run was not killed mid-way"
    for name, digest in survivors.items():  # every output that exists is complete and correct
        assert digest == reference[name], name
        assert read_micrograph(out / name).data.shape == (64, 64)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(n.startswith((TEMP_PREFIX, CLAIM_PREFIX)) for n in leftovers)

    rerun = _denoise(root, out, cnn3_checkpoint, "--skip-existing", "--summary", str(tmp_path / "s.json"))
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr.decode()
    assert f"denoised {N_FILES - len(survivors)}, skipped {len(survivors)}, failed 0" in stdout.decode()
    assert _outputs(out) == reference
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # temps and claims cleaned up


def test_two_concurrent_runs_write_each_output_once(dataset, cnn3_checkpoint, tmp_path) -> None:
    root, reference = dataset
    out = tmp_path / "out"
    runs = [_denoise(root, out, cnn3_checkpoint, "--skip-existing", "--summary", str(tmp_path / f"s{i}.json"))
            for i in range(2)]
    for proc in runs:
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr.decode()
    assert _outputs(out) == reference
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text())["files"] for i in range(2)]
    done = [sorted(Path(f["input"]).name for f in s if f["status"] == "done") for s in summaries]
    assert sorted(done[0] + done[1]) == sorted(reference)  # every file written, none twice
    reasons = {f["error"].split(" (")[0] for s in summaries for f in s if f["status"] == "skipped"}
    assert reasons <= {"being written by another process", "written by another process during this run",
                       "output exists"}
    print(f"run 1 wrote {len(done[0])}, run 2 wrote {len(done[1])}; skip reasons: {sorted(reasons)}")


def _wait_for_outputs(out: Path, n: int, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 120
    while not (out.is_dir() and sum(p.name.startswith("mic_") for p in out.iterdir()) >= n):
        for proc in procs:
            assert proc.poll() is None or proc.returncode == 0, proc.communicate()[1].decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory, cnn3_checkpoint):
    """40 larger inputs (about half a second each here): long enough for late workers to join in."""
    root = tmp_path_factory.mktemp("pull")
    (root / "in").mkdir()
    rng = np.random.default_rng(8)
    for i in range(40):
        write_micrograph(root / "in" / f"mic_{i:03d}.mrc", (rng.standard_normal((192, 192)) * 20 + 300))
    model, spec = load_checkpoint(cnn3_checkpoint)
    with TorchBackend(model, BackendOptions()) as backend:
        config = RunConfig(tile=int(GEOMETRY[1]), batch=int(GEOMETRY[3]), quiet=True)
        assert denoise_files(sorted((root / "in").iterdir()), root / "reference", backend, spec, config).ok
    return root, {p.name: _sha(p) for p in (root / "reference").iterdir()}


def test_pull_workers_started_at_staggered_times_write_each_file_once(
    big_dataset, cnn3_checkpoint, tmp_path
) -> None:
    root, reference = big_dataset
    out = tmp_path / "out"
    runs: list[subprocess.Popen[bytes]] = []
    for i in range(3):  # worker i starts once the others have written i outputs
        if i:
            _wait_for_outputs(out, i, runs)
        runs.append(_denoise(root, out, cnn3_checkpoint, "--pull", "--summary", str(tmp_path / f"s{i}.json")))
    for proc in runs:
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr.decode()
    assert _outputs(out) == reference
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(3)]
    assert all(s["shard"] == [0, 1] and len(s["files"]) == len(reference) for s in summaries)  # whole list
    done = [Path(f["input"]).name for s in summaries for f in s["files"] if f["status"] == "done"]
    assert sorted(done) == sorted(reference)  # every file exactly once over the three workers
    print("files per worker:", [sum(f["status"] == "done" for f in s["files"]) for s in summaries])


def test_pull_worker_takes_over_the_file_of_a_killed_worker(dataset, cnn3_checkpoint, tmp_path) -> None:
    root, reference = dataset
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # a "worker" that claims the first file, then dies without writing it
        [sys.executable, "-c", "import sys, time; from cryodeploy.inference.claims import try_claim; "
         "c = try_claim(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out / "mic_000.mrc")],
        stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    worker = _denoise(root, out, cnn3_checkpoint, "--pull", "--summary", str(tmp_path / "s.json"))
    _wait_for_outputs(out, 1, [worker])  # the worker has gone past mic_000 (claimed: skipped)
    assert not (out / "mic_000.mrc").exists()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    _, stderr = worker.communicate(timeout=180)
    assert worker.returncode == 0, stderr.decode()
    assert _outputs(out) == reference
    files = json.loads((tmp_path / "s.json").read_text())["files"]
    assert [f["status"] for f in files] == ["done"] * N_FILES  # mic_000 too, in the takeover pass
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_sigint_and_sigterm_stop_a_run_cleanly(dataset, cnn3_checkpoint, tmp_path) -> None:
    """Ctrl-C and a batch system's SIGTERM stop the run mid-way: one line, exit 130, every output that
    exists complete and correct, no claim or temporary file left (issue 22, item 4)."""
    root, reference = dataset
    runs = {sig: (tmp_path / sig.name, _denoise(root, tmp_path / sig.name, cnn3_checkpoint))
            for sig in (signal.SIGINT, signal.SIGTERM)}
    waiting, deadline = dict(runs), time.monotonic() + 120
    while waiting:  # both polled together: each is stopped as soon as its first output appears
        for sig, (out, proc) in list(waiting.items()):
            if out.is_dir() and any(p.name.startswith("mic_") for p in out.iterdir()):
                os.kill(proc.pid, sig)
                del waiting[sig]
            else:
                assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    for sig, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        outcome = (proc.returncode, stderr.decode().splitlines(), stdout)
        assert outcome == (130, ["error: interrupted"], b""), sig
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], sig
        survivors = _outputs(out)
        assert 0 < len(survivors) < N_FILES, (sig, len(survivors))
        assert all(reference[name] == digest for name, digest in survivors.items())
