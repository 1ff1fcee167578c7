"""Volumes read raw into one float32 array and written slab by slab: the same voxels and header bytes
as read_volume / write_volume."""

from __future__ import annotations

import struct
import warnings

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import OutputError
from cryodeploy.io.rawvolume import read_volume_data, write_raw_volume
from cryodeploy.io.volumes import VolumeHeader, read_volume, read_volume_header, write_volume

HEADER = VolumeHeader((40, 50, 61), 2, (4.0, 4.0, 5.0), (10.0, 20.0, 30.0), (1, 2, 3), 1, "volume", b"FEI1",
                      bytes(range(96)), ("a label", "another"))


@pytest.fixture
def volume(rng) -> np.ndarray:
    return (rng.standard_normal(HEADER.shape) * 20 + 300).astype(np.float32)


def _stats(path) -> tuple[float, float, float, float]:
    with mrcfile.open(path, header_only=True) as mrc:
        h = mrc.header
        return float(h.dmin), float(h.dmax), float(h.dmean), float(h.rms)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_raw_volume_bytes_equal_write_volumes(tmp_path, volume, dtype) -> None:
    """With write_volume's statistics given, the file is byte for byte the same; accumulated over slabs
    (float64) they differ from mrcfile's float32 ones by at most 2 float32 ulps."""
    want = write_volume(tmp_path / "want.mrc", volume, HEADER, dtype, label="cryodeploy test")
    padded = np.pad(volume, ((0, 3), (0, 2), (0, 1)))  # a non-contiguous crop, as the runner writes
    given = write_raw_volume(tmp_path / "given.mrc", padded[:40, :50, :61], HEADER, dtype,
                             label="cryodeploy test", stats=_stats(want) if dtype == "float32" else None)
    a, b = want.read_bytes(), given.read_bytes()
    if dtype == "float32":
        assert a == b
    assert len(a) == len(b)
    assert {i // 4 * 4 for i in range(len(a)) if a[i] != b[i]} <= {84, 216}  # dmean, rms
    for at in (84, 216):
        x, y = struct.unpack_from("<f", a, at)[0], struct.unpack_from("<f", b, at)[0]
        assert abs(x - y) <= 2 * np.spacing(np.float32(x))
    assert read_volume_header(given) == read_volume_header(want)


def test_overflowing_float16_is_refused_like_write_volume_and_nothing_is_left(tmp_path, volume) -> None:
    volume[3, 4, 5] = 1e6
    with pytest.raises(OutputError) as old:
        write_volume(tmp_path / "a.mrc", volume, dtype="float16")
    with pytest.raises(OutputError) as new:
        write_raw_volume(tmp_path / "a.mrc", volume, dtype="float16")
    assert str(new.value) == str(old.value) == (
        f"{tmp_path / 'a.mrc'}: found 1 NaN/Inf values in the float16 output (values beyond the float16 "
        "range of +-65504; write float32 instead), expected finite pixels")
    assert list(tmp_path.iterdir()) == []
    src = write_volume(tmp_path / "in.mrc", volume)
    with pytest.raises(OutputError, match="refusing to overwrite an input file"):
        write_raw_volume(src, volume, protect=(src,))


@pytest.mark.parametrize(("dtype", "byteorder"), [
    (np.float32, "<"), (np.float32, ">"), (np.int16, "<"), (np.uint16, "<"), (np.int8, "<"),
    (np.float16, "<")])
def test_raw_read_equals_read_volume_for_every_mode(tmp_path, rng, dtype, byteorder) -> None:
    data = (rng.standard_normal((16, 32, 33)) * 30 + 60).astype(np.dtype(dtype).newbyteorder(byteorder))
    path = tmp_path / "v.rec"
    with warnings.catch_warnings(), mrcfile.new(path) as mrc:
        warnings.simplefilter("ignore")
        mrc.set_data(data)
    got = read_volume_data(path, read_volume_header(path))
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, read_volume(path).data)
