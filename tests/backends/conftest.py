"""Fixtures of the bad- and hostile-model tests: one small micrograph and a raw-weights folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mrc_cases import pixels, write_mrc


@pytest.fixture(scope="module")
def micrograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mrc(tmp_path_factory.mktemp("mic") / "m.mrc", pixels(np.random.default_rng(0), 2, (64, 64)))


@pytest.fixture(scope="module")
def raw_folder(cnn3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cryodeploy.models.rawweights import export_raw

    return export_raw(cnn3_checkpoint, tmp_path_factory.mktemp("raw") / "raw")
