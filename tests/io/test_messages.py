"""Messages that once misled (issue 22, item 9): compressed MRC files, symlink loops, missing relative
STAR entries, a duplicated rlnMicrographName column, a state.pt holding arbitrary objects."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mrc_cases import MODEL_ARGS, pixels, write_mrc
from test_inputs import _write_star

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError, InputError
from cryodeploy.io.inputs import expand_inputs
from cryodeploy.io.mrc import read_micrograph


@pytest.mark.parametrize(
    ("suffix", "compress", "kind", "tool"),
    [(".gz", gzip.compress, "gzip", "gunzip"), (".bz2", bz2.compress, "bzip2", "bunzip2"),
     (".xz", lzma.compress, "xz", "unxz")],
)
def test_compressed_mrc_says_decompress_first(
    tmp_path: Path, suffix: str, compress, kind: str, tool: str
) -> None:
    plain = write_mrc(tmp_path / "m.mrc", pixels(np.random.default_rng(0), 2, (64, 64)))
    packed = tmp_path / f"m.mrc{suffix}"
    packed.write_bytes(compress(plain.read_bytes()))
    with pytest.raises(InputError) as info:
        read_micrograph(packed)
    assert str(info.value) == f"{packed}: compressed MRC ({kind}): decompress first (e.g. {tool})"


def test_symlink_loop_in_a_run_says_so(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    loop = tmp_path / "loop.mrc"
    loop.symlink_to(loop)
    result = CliRunner().invoke(
        cli, ["denoise", str(loop), "-o", str(tmp_path / "out"), "--model", str(cnn3_checkpoint), *MODEL_ARGS]
    )
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"failed: {loop}: symbolic link loop"]


def test_missing_relative_star_entry_is_named_under_the_relion_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "proj"
    entry = "MotionCorr/job002/gone.mrc"
    star = _write_star(project / "CtfFind" / "job003" / "micrographs_ctf.star", [entry])
    monkeypatch.chdir(tmp_path)  # RELION runs in the project folder; this shell is elsewhere
    assert expand_inputs([str(star)]) == [project.resolve() / "MotionCorr/job002/gone.mrc"]
    with pytest.raises(InputError, match=f"^{project.resolve()}/MotionCorr/job002/gone.mrc: no such file$"):
        read_micrograph(expand_inputs([str(star)])[0])
    assert expand_inputs([str(star)], project_dir=tmp_path) == [tmp_path / "MotionCorr/job002/gone.mrc"]


def test_duplicate_micrograph_name_column(tmp_path: Path) -> None:
    star = tmp_path / "dup.star"
    star.write_text("data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnCtfMaxResolution #2\n"
                    "_rlnMicrographName #3\na.mrc 3.0 b.mrc\n")
    with pytest.raises(InputError) as info:
        expand_inputs([str(star)])
    assert str(info.value) == f"{star}: duplicate rlnMicrographName column, expected one"


class Payload:
    """Any class: torch's weights-only unpickler refuses it."""


def test_malicious_state_pt_gives_one_line(tmp_path: Path) -> None:
    import torch

    from cryodeploy.training.runfiles import STATE, load_state

    torch.save({"format": "cryodeploy-train-state/1", "x": Payload()}, tmp_path / STATE)
    with pytest.raises(ConfigError) as info:
        load_state(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / STATE}: not a readable resume state (it holds objects other than tensors, numbers "
        "and strings; refusing to unpickle them)"
    )
