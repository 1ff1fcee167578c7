"""The ONNX cache serves only the content it wrote (issue 22, item 5): an entry whose weights were
edited in place, keeping its metadata, or whose seal is missing, is rebuilt, and the run says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from mrc_cases import pixels, write_mrc
from onnx import numpy_helper

from cryodeploy.backends.sources import load_source
from cryodeploy.cli import cli
from cryodeploy.export.onnx import cached_onnx
from cryodeploy.files import file_sha256
from cryodeploy.io.mrc import read_micrograph

ORT = ("--backend", "ort", "--device", "cpu", "--tile", "64", "-q", "--overwrite")


def _tamper(entry: Path) -> None:
    """Scale every weight of a cached ONNX file by 3, keeping its metadata (what an attacker or a bad
    disk could do without the cache noticing from the metadata alone)."""
    model = onnx.load(str(entry))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
    onnx.save(model, str(entry))


def test_tampered_or_unsealed_cache_entries_are_rebuilt_with_a_warning(
    cnn3_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache"))
    mic = write_mrc(tmp_path / "m.mrc", pixels(np.random.default_rng(0), 2, (64, 64)))
    out = tmp_path / "out"

    def denoise(model: Path = cnn3_checkpoint) -> tuple[list[str], np.ndarray]:
        """Run the CLI; its warnings (pytest's log capture holds them in-process) and the output."""
        caplog.clear()
        args = ["denoise", str(mic), "-o", str(out), "--model", str(model), *ORT]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and result.stderr == "", result.stderr
        warnings = [f"WARNING {r.name}: {r.getMessage()}" for r in caplog.records if r.levelname == "WARNING"]
        return warnings, read_micrograph(out / "m.mrc").data

    stderr, reference = denoise()
    assert stderr == []
    entry = cached_onnx(load_source(cnn3_checkpoint))
    seal = entry.with_name(entry.name + ".sha256")
    assert seal.read_text() == file_sha256(entry) + "\n"
    clean = entry.read_bytes()

    _tamper(entry)
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(entry.read_bytes())
    assert np.abs(denoise(tampered)[1] - reference).max() > 0.5  # what serving it would have given
    stderr, again = denoise()
    assert len(stderr) == 1 and stderr[0].startswith(
        f"WARNING cryodeploy.export.onnx: rebuilding cached ONNX {entry}: "
        "it failed its content check (its sha256 ")
    np.testing.assert_array_equal(again, reference)
    assert entry.read_bytes() == clean and seal.read_text() == file_sha256(entry) + "\n"

    seal.unlink()
    stderr, again = denoise()
    assert stderr == [f"WARNING cryodeploy.export.onnx: rebuilding cached ONNX {entry}: "
                                   f"it failed its content check ({seal} missing)"]
    np.testing.assert_array_equal(again, reference)
    assert denoise()[0] == []  # sealed again: served without a warning
