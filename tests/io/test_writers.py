"""The output-format registry: one entry per format, unknown names refused with the known ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryodeploy.errors import ConfigError
from cryodeploy.inference.jobs import RunConfig
from cryodeploy.io.mrc import read_micrograph
from cryodeploy.io.writers import FORMATS, output_format


def test_mrc_writer_round_trips(tmp_path: Path) -> None:
    fmt = output_format("mrc")
    data = np.random.default_rng(0).normal(size=(40, 48)).astype(np.float32)
    path = fmt.write(tmp_path / "a.mrc", data, None, "float32", (), "test")
    assert path.suffix == fmt.suffix
    np.testing.assert_array_equal(read_micrograph(path).data, data)


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="output format 'gif' unknown, expected one of mrc"):
        output_format("gif")
    with pytest.raises(ConfigError, match="output format"):
        RunConfig(output_format="gif")
    assert set(FORMATS) >= {"mrc"} and RunConfig().output_format == "mrc"
