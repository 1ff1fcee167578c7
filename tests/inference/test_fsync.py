"""``RunConfig.fsync`` / ``denoise --no-fsync``: the same bytes with or without the fsync before each
output's rename; without it no output is fsynced, with it every one (micrographs and tomograms)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.cli import main
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.io.mrc import write_micrograph
from cryodeploy.io.volumes import write_volume
from cryodeploy.models.checkpoint import load_checkpoint


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """Paths of the files os.fsync is called on (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["micrographs", "tomograms"])
def test_no_fsync_writes_the_same_bytes_and_fsyncs_no_output(tmp_path, rng, fsynced, kind, cnn3_checkpoint,
                                                             unet3d_checkpoint) -> None:
    src = tmp_path / "in"
    src.mkdir()
    if kind == "micrographs":
        model, spec = load_checkpoint(cnn3_checkpoint)
        paths = [write_micrograph(src / f"m{i}.mrc", rng.normal(100, 5, (96, 80)).astype(np.float32))
                 for i in range(3)]
    else:
        model, spec = load_checkpoint(unet3d_checkpoint)
        paths = [src / f"t{i}.mrc" for i in range(2)]
        for p in paths:
            write_volume(p, rng.normal(100, 5, (16, 48, 40)).astype(np.float32))
    with TorchBackend(model, BackendOptions()) as backend:
        for fsync in (True, False):
            fsynced.clear()
            out = tmp_path / f"out_{fsync}"
            assert denoise_files(paths, out, backend, spec, RunConfig(quiet=True, fsync=fsync)).ok
            outputs = [s for s in fsynced if Path(s).parent == out]
            assert len(outputs) == (len(paths) if fsync else 0), fsynced
    assert _outputs(tmp_path / "out_True") == _outputs(tmp_path / "out_False")
    assert len(_outputs(tmp_path / "out_False")) == len(paths)  # no temporary or claim file left


def test_cli_no_fsync(tmp_path, rng, fsynced, cnn3_checkpoint, capsys) -> None:
    src = write_micrograph(tmp_path / "m.mrc", rng.normal(100, 5, (64, 64)).astype(np.float32))
    for flag, name in (("--no-fsync", "a"), ("--fsync", "b")):
        fsynced.clear()
        with pytest.raises(SystemExit) as done:
            main(["denoise", str(src), "--model", str(cnn3_checkpoint), "--backend", "torch",
                  "--device", "cpu", "-o", str(tmp_path / name), "-q", flag])
        assert done.value.code == 0
        synced = [s for s in fsynced if Path(s).parent == tmp_path / name]  # the temporary file
        assert len(synced) == (0 if flag == "--no-fsync" else 1)
        assert all(".cryodeploy-tmp-m.mrc." in s for s in synced)
    assert (tmp_path / "a" / "m.mrc").read_bytes() == (tmp_path / "b" / "m.mrc").read_bytes()
