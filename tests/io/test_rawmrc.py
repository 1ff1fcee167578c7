"""Raw MRC data blocks: read into a caller's buffer, written with precomputed header statistics."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import InputError, OutputError
from cryodeploy.io.mrc import MicrographHeader, read_header, read_micrograph, write_micrograph
from cryodeploy.io.rawmrc import read_data_into, write_raw_micrograph
from tests.mrc_cases import MODES, pixels, write_mrc


def _stats(data: np.ndarray) -> tuple[float, float, float, float]:
    return (float(data.min()), float(data.max()), float(data.mean(dtype=np.float32)),
            float(data.std(dtype=np.float32)))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("stack", [False, True])
def test_read_into_a_buffer_equals_mrcfile(
    tmp_path: Path, rng: np.random.Generator, mode: int, stack: bool
) -> None:
    data = pixels(rng, mode, (3, 40, 48) if stack else (40, 48))
    path = write_mrc(tmp_path / "in.mrc", data, ext=b"x" * 100, stack=stack)
    buf = np.zeros(data.nbytes + 17, np.uint8)
    got = read_data_into(path, read_header(path), buf)
    assert got.dtype == data.dtype.newbyteorder("=") and np.array_equal(got, data)
    assert np.shares_memory(got, buf)


def test_read_into_a_big_endian_file(tmp_path: Path, rng: np.random.Generator) -> None:
    data = pixels(rng, 2, (40, 40)).astype(">f4")
    path = write_mrc(tmp_path / "be.mrc", data)
    got = read_data_into(path, read_header(path), np.empty(data.nbytes, np.uint8))
    assert got.dtype.isnative and np.array_equal(got, data)


def test_read_into_a_file_cut_after_the_header_check(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_mrc(tmp_path / "in.mrc", pixels(rng, 2, (40, 40)))
    header = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(1024 + 100)
    with pytest.raises(InputError, match=r"in.mrc: truncated file, found 1124 bytes, expected 7424"):
        read_data_into(path, header, np.empty(6400, np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("stack", [False, True])
def test_raw_write_is_byte_identical_to_write_micrograph(
    tmp_path: Path, rng: np.random.Generator, dtype: type, stack: bool
) -> None:
    src = write_mrc(tmp_path / "in.mrc", pixels(rng, 2, (2, 40, 48) if stack else (40, 48)),
                    ext=b"FEI" * 50, exttyp=b"FEI2", stack=stack)
    mic = read_micrograph(src)
    header = MicrographHeader(**{**vars(mic.header), "voxel_size": (1.5, 1.5, 2.0), "origin": (1.0, 2.0, 3.0),
                                 "nstart": (4, 5, 6), "labels": ("a label",)})
    data = (mic.data * 0.5).astype(dtype)
    ref = write_micrograph(tmp_path / "ref.mrc", data, header, np.dtype(dtype).name, label="cryodeploy x")
    raw = write_raw_micrograph(tmp_path / "raw.mrc", data, _stats(data), header, label="cryodeploy x")
    assert raw.read_bytes() == ref.read_bytes()
    with mrcfile.open(raw, permissive=False) as mrc:
        assert np.array_equal(mrc.data, data)
    back = read_micrograph(raw)
    assert back.header == read_micrograph(ref).header


def test_raw_write_refuses_wrong_input_and_protects_inputs(tmp_path: Path) -> None:
    data = np.ones((40, 40), np.float32)
    with pytest.raises(OutputError, match="C-contiguous float32 or float16"):
        write_raw_micrograph(tmp_path / "o.mrc", data.astype(np.float64), _stats(data))
    with pytest.raises(OutputError, match="C-contiguous"):
        write_raw_micrograph(tmp_path / "o.mrc", np.ones((40, 80), np.float32)[:, ::2], _stats(data))
    src = write_mrc(tmp_path / "in.mrc", data)
    with pytest.raises(OutputError, match="refusing to overwrite an input"):
        write_raw_micrograph(src, data, _stats(data), protect=(src,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]
