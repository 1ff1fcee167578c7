"""Fuzzing the MRC reader: every damaged, odd or foreign file is read correctly or rejected with
one :class:`InputError` line naming it; never another exception, never a long stall.

Hypothesis runs derandomized (the same examples every run) with small budgets to stay fast.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrc_cases import (
    FIELDS,
    LAYOUT_BYTES,
    MODES,
    PNG_SIGNATURE,
    edit_bytes,
    pixels,
    regions,
    set_field,
    truncate,
    write_mrc,
)

from cryodeploy.errors import InputError
from cryodeploy.io.mrc import MIN_SIZE, Micrograph, read_micrograph, write_micrograph

#: examples per property; CRYODEPLOY_FUZZ_EXAMPLES=2000 fuzzes deeper (same derandomized start, more cases)
EXAMPLES = int(os.environ.get("CRYODEPLOY_FUZZ_EXAMPLES", "100"))
# a hang fails the test; deeper runs get longer
pytestmark = pytest.mark.timeout(120 * max(1, EXAMPLES // 100))
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
#: 4-byte values that break readers: zero, signs, int32 limits, just below the minimum size, huge
NASTY_INTS = [0, 1, -1, 2, 3, 4, 12, 31, 32, 101, 2**16, 2**30, 2**31 - 1, -(2**31)]


def _read(path: Path) -> Micrograph | InputError:
    """read_micrograph's result or its InputError; any other exception fails the test. Also bounds time."""
    start = time.perf_counter()
    try:
        result: Micrograph | InputError = read_micrograph(path)
    except InputError as err:
        msg = str(err)
        assert "\n" not in msg and msg.startswith(f"{path}: "), msg
        result = err
    assert time.perf_counter() - start < 10.0, "reader stalled"
    return result


def _check_good(mic: Micrograph) -> None:
    """What a successful read promises: float32 pixels of the header's shape, finite, not constant."""
    assert mic.data.dtype == np.float32 and mic.data.shape == mic.header.shape
    assert min(mic.data.shape[-2:]) >= MIN_SIZE
    assert np.isfinite(mic.data).all()
    for frame in mic.frames():
        assert frame.min() < frame.max()


def _case_dir(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


@st.composite
def good_files(draw: st.DrawFn) -> tuple[np.ndarray, int, bytes, bool]:
    """(pixels, mode, extended header, stack) of a valid micrograph or stack."""
    mode = draw(st.sampled_from(sorted(MODES)))
    h, w = draw(st.integers(32, 45)), draw(st.integers(32, 45))
    nz = draw(st.sampled_from([1, 1, 2, 3]))
    shape = (nz, h, w) if nz > 1 else (h, w)
    ext = draw(st.sampled_from([b"", bytes(range(128)), b"\x00" * 96]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return pixels(rng, mode, shape), mode, ext, nz > 1


@FUZZ
@given(
    case=good_files(),
    edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_random_header_bytes_read_or_rejected(
    tmp_path: Path, case: tuple, edits: list[tuple[int, int]]
) -> None:
    data, _mode, ext, stack = case
    path = write_mrc(_case_dir(tmp_path) / "m.mrc", data, ext, stack=stack)
    edit_bytes(path, edits)

    result = _read(path)

    if isinstance(result, Micrograph):
        _check_good(result)
        if not LAYOUT_BYTES & {offset for offset, _ in edits}:  # pixels are where they were: same values
            np.testing.assert_array_equal(result.data, data.astype(np.float32))


@FUZZ
@given(
    case=good_files(),
    edits=st.lists(st.tuples(st.integers(16, 1023), st.integers(0, 255)), min_size=1, max_size=12),
    labels=st.lists(st.binary(min_size=1, max_size=80), max_size=10),
)
def test_any_readable_header_can_be_written_back(
    tmp_path: Path, case: tuple, edits: list[tuple[int, int]], labels: list[bytes]
) -> None:
    """What a denoised copy carries over (voxel size, origin, start, space group, extended header,
    labels), however damaged, never stops the copy from being written and read back."""
    data, _mode, ext, stack = case
    folder = _case_dir(tmp_path)
    path = write_mrc(folder / "m.mrc", data, ext, stack=stack)
    label_bytes = b"".join(lab.ljust(80, b" ") for lab in labels)
    edit_bytes(path, [(224 + i, b) for i, b in enumerate(label_bytes)] + [(220, len(labels))] + edits)

    result = _read(path)

    if isinstance(result, Micrograph):
        copy = write_micrograph(folder / "copy.mrc", result.data, result.header)
        again = read_micrograph(copy)
        np.testing.assert_array_equal(again.data, result.data)
        assert all(lab.isascii() and lab.isprintable() for lab in again.header.labels)


@FUZZ
@given(
    case=good_files(),
    field=st.sampled_from(sorted(FIELDS)),
    value=st.one_of(
        st.sampled_from(NASTY_INTS), st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=4)
    ),
)
def test_header_field_values_read_or_rejected(
    tmp_path: Path, case: tuple, field: str, value: int | bytes
) -> None:
    data, _mode, ext, stack = case
    path = write_mrc(_case_dir(tmp_path) / "m.mrc", data, ext, stack=stack)
    set_field(path, field, value)

    result = _read(path)

    if isinstance(result, Micrograph):
        _check_good(result)
        if field not in ("nx", "ny", "nz", "mode", "nsymbt", "map", "machst"):
            np.testing.assert_array_equal(result.data, data.astype(np.float32))


@FUZZ
@given(
    case=good_files(), region=st.sampled_from(["header", "extended header", "data"]), where=st.floats(0, 1)
)
def test_truncation_in_every_region_is_rejected(
    tmp_path: Path, case: tuple, region: str, where: float
) -> None:
    data, _mode, ext, stack = case
    path = write_mrc(_case_dir(tmp_path) / "m.mrc", data, ext, stack=stack)
    start, end = regions(path)[region]
    if end == start:  # no extended header in this file: cut right after the header instead
        start, end = 1024, 1025
    cut = min(end - 1, start + int(where * (end - start)))
    truncate(path, cut)

    result = _read(path)

    assert isinstance(result, InputError)
    expected = "empty file" if cut == 0 else "not a readable MRC file" if cut < 1024 else "truncated file"
    assert expected in str(result)


@settings(FUZZ, max_examples=max(25, EXAMPLES // 2))
@given(case=good_files())
def test_every_valid_mode_reads_exactly(tmp_path: Path, case: tuple) -> None:
    data, mode, ext, stack = case
    path = write_mrc(_case_dir(tmp_path) / "m.mrc", data, ext, stack=stack)

    mic = read_micrograph(path)

    assert mic.header.mode == mode and mic.header.extended_header == ext
    np.testing.assert_array_equal(mic.data, data.astype(np.float32))


@FUZZ
@given(
    case=good_files(),
    bad_mode=st.one_of(st.sampled_from([3, 4, 101, 5, 7, 13, -1]), st.integers(-(2**31), 2**31 - 1)),
)
def test_unsupported_modes_are_named(tmp_path: Path, case: tuple, bad_mode: int) -> None:
    data, _mode, ext, stack = case
    if bad_mode in MODES:
        return
    path = write_mrc(_case_dir(tmp_path) / "m.mrc", data, ext, stack=stack)
    set_field(path, "mode", bad_mode)

    result = _read(path)

    assert isinstance(result, InputError)
    assert f"unsupported MRC mode {bad_mode}, expected one of 0 (int8)" in str(result)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (31, 31), (31, 64), (64, 31)], ids=str)
def test_images_below_the_minimum_size_are_rejected(
    tmp_path: Path, rng: np.random.Generator, shape: tuple
) -> None:
    path = write_mrc(tmp_path / "small.mrc", pixels(rng, 2, shape))
    with pytest.raises(InputError, match=rf"image is {shape[1]}x{shape[0]} pixels, expected at least 32x32"):
        read_micrograph(path)
    assert read_micrograph(write_mrc(tmp_path / "ok.mrc", pixels(rng, 2, (32, 32)))).data.shape == (32, 32)


#: small files whose header declares sizes they cannot hold, and the error each must give
LIARS: dict[str, tuple[dict[str, int], str]] = {
    "nx=ny=2^30": (
        {"nx": 2**30, "ny": 2**30},
        "truncated file, found 5120 bytes, expected 4611686018427388928",
    ),
    "nz=2^30": ({"nz": 2**30}, "truncated file, found 5120 bytes, expected 4398046512128"),
    "all-int32-max": ({"nx": 2**31 - 1, "ny": 2**31 - 1, "nz": 2**31 - 1}, "truncated file"),
    "nsymbt=2^31-1": (
        {"nsymbt": 2**31 - 1},
        "expected at least 2147484671 (a 1024-byte header and a 2147483647-byte",
    ),
    "nsymbt<0": ({"nsymbt": -4}, "found extended header size -4, expected 0 or more bytes"),
    "negative-nx-ny": (
        {"nx": -32, "ny": -32},
        "found dimensions -32x-32x1, expected at least 1 pixel along each axis",
    ),
    "nz=0": ({"nz": 0}, "found dimensions 32x32x0"),
}


def _liar(folder: Path, rng: np.random.Generator, case: str) -> Path:
    path = write_mrc(folder / f"liar {case}.mrc", pixels(rng, 2, (32, 32)))
    for name, value in LIARS[case][0].items():
        set_field(path, name, value)
    return path


@pytest.mark.parametrize("case", sorted(LIARS))
def test_huge_or_negative_declared_sizes_are_named(
    tmp_path: Path, rng: np.random.Generator, case: str
) -> None:
    path = _liar(tmp_path, rng, case)
    with pytest.raises(InputError) as info:
        read_micrograph(path)
    assert str(info.value).startswith(f"{path}: ") and LIARS[case][1] in str(info.value)


def test_declared_sizes_allocate_nothing(tmp_path: Path, rng: np.random.Generator) -> None:
    """Under an address-space limit of 256 MiB more than the process holds, every liar still ends in
    InputError: no buffer of a declared size (up to 2 GiB for the extended header) is allocated."""
    paths = [_liar(tmp_path, rng, case) for case in sorted(LIARS)]
    code = f"""
import resource, sys
from cryodeploy.errors import InputError
from cryodeploy.io.mrc import read_micrograph
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
for p in {[str(p) for p in paths]!r}:
    try:
        read_micrograph(p)
    except InputError:
        print("InputError")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (0, ["InputError"] * len(paths), "")


@FUZZ
@given(
    mode=st.sampled_from([2, 12]),
    nz=st.sampled_from([1, 3]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    spots=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 39), st.integers(0, 39)),
        min_size=1,
        max_size=5,
        unique=True,
    ),
)
def test_nan_and_inf_are_counted_and_located(
    tmp_path: Path, mode: int, nz: int, bad: float, spots: list
) -> None:
    shape = (nz, 40, 40) if nz > 1 else (40, 40)
    data = pixels(np.random.default_rng(0), mode, shape).reshape(nz, 40, 40)
    spots = sorted({(z % nz, y, x) for z, y, x in spots})
    for z, y, x in spots:
        data[z, y, x] = bad
    path = write_mrc(_case_dir(tmp_path) / "bad.mrc", data.reshape(shape), stack=nz > 1)

    result = _read(path)

    assert isinstance(result, InputError)
    first = spots[0][0]
    n = sum(z == first for z, _, _ in spots)
    where = f" (frame {first})" if nz > 1 else ""
    assert f"found {n} NaN/Inf values{where}, expected finite pixels" in str(result)


@FUZZ
@given(mode=st.sampled_from(sorted(MODES)), value=st.integers(-100, 100), nz=st.sampled_from([1, 2]))
def test_constant_images_are_rejected(tmp_path: Path, mode: int, value: int, nz: int) -> None:
    dtype = MODES[mode]
    value = max(value, 0) if dtype == np.uint16 else value
    data: np.ndarray = np.full((nz, 33, 35) if nz > 1 else (33, 35), value, dtype)
    path = write_mrc(_case_dir(tmp_path) / "flat.mrc", data, stack=nz > 1)

    result = _read(path)

    assert isinstance(result, InputError)
    assert f"image is constant ({value:g})" in str(result)


def test_stack_keeps_frames_and_a_volume_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    data = pixels(rng, 6, (4, 40, 36))
    mic = read_micrograph(write_mrc(tmp_path / "s.mrcs", data, stack=True))
    assert mic.header.is_stack and mic.header.n_frames == 4 and len(list(mic.frames())) == 4
    np.testing.assert_array_equal(mic.data, data.astype(np.float32))

    volume = write_mrc(tmp_path / "v.mrc", data)
    set_field(volume, "ispg", 1)
    with pytest.raises(InputError, match=r"v.mrc: found a 3-D volume \(36x40x4, space group 1\)"):
        read_micrograph(volume)


@FUZZ
@given(
    content=st.one_of(
        st.binary(min_size=1, max_size=3000),
        st.text(min_size=1, max_size=500).map(str.encode),
        st.binary(max_size=200).map(lambda b: PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + b),
        st.binary(min_size=1020, max_size=1100).map(lambda b: b[:208] + b"MAP DD\x00\x00" + b[216:]),
    )
)
def test_foreign_bytes_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = _case_dir(tmp_path) / "foreign.mrc"
    path.write_bytes(content)

    result = _read(path)

    if isinstance(result, Micrograph):  # only if the bytes happen to form a valid MRC file
        _check_good(result)


def test_empty_text_png_and_directory_messages(tmp_path: Path) -> None:
    cases = {
        "empty.mrc": (b"", "empty file, expected an MRC file"),
        "notes.mrc": (b"this is a text file\n" * 80, "not a readable MRC file (Map ID string not found"),
        "image.mrc": (PNG_SIGNATURE + bytes(2000), "not a readable MRC file (Map ID string not found"),
        "tiny.mrc": (b"MRC", "not a readable MRC file (Couldn't read enough bytes for MRC header)"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=f"{name}: ") as info:
            read_micrograph(tmp_path / name)
        assert expected in str(info.value)
    (tmp_path / "folder.mrc").mkdir()
    with pytest.raises(InputError, match=r"folder.mrc: is a directory, expected an MRC file"):
        read_micrograph(tmp_path / "folder.mrc")


def test_symlinks_fifos_and_devices(tmp_path: Path, rng: np.random.Generator) -> None:
    data = pixels(rng, 2, (40, 40))
    good = write_mrc(tmp_path / "good.mrc", data)
    (tmp_path / "link.mrc").symlink_to(good)
    (tmp_path / "dangling.mrc").symlink_to(tmp_path / "gone.mrc")
    (tmp_path / "loop.mrc").symlink_to(tmp_path / "loop.mrc")
    os.mkfifo(tmp_path / "pipe.mrc")

    mic = read_micrograph(tmp_path / "link.mrc")
    assert mic.path == tmp_path / "link.mrc"
    np.testing.assert_array_equal(mic.data, data)
    with pytest.raises(InputError, match=r"dangling\.mrc: no such file"):
        read_micrograph(tmp_path / "dangling.mrc")
    with pytest.raises(InputError, match=r"loop\.mrc: symbolic link loop$"):
        read_micrograph(tmp_path / "loop.mrc")
    # a named pipe would block a reader forever: refused before it is opened
    with pytest.raises(InputError, match=r"pipe.mrc: not a regular file \(found a named pipe\)"):
        read_micrograph(tmp_path / "pipe.mrc")
    with pytest.raises(InputError, match=r"/dev/zero: not a regular file \(found a character device\)"):
        read_micrograph("/dev/zero")


@pytest.mark.parametrize(
    "name", ["with space.mrc", "mïcrögraph ü.mrc", "日本語 δ 1.mrcs", "-dash 'quote\".mrc"]
)
def test_unusual_path_names_read_and_are_named_in_errors(
    tmp_path: Path, rng: np.random.Generator, name: str
) -> None:
    folder = tmp_path / "dir with spaces é"
    folder.mkdir()
    data = pixels(rng, 1, (33, 47))
    np.testing.assert_array_equal(
        read_micrograph(write_mrc(folder / name, data)).data, data.astype(np.float32)
    )
    truncate(folder / name, 2000)
    with pytest.raises(InputError) as info:
        read_micrograph(folder / name)
    assert str(info.value).startswith(f"{folder / name}: truncated file")


def test_unreadable_file_is_rejected(tmp_path: Path, rng: np.random.Generator) -> None:
    """chmod 000 stops everyone but root. As root (as in CI containers) the read runs in a child
    process in a new user namespace, where it keeps uid 0 but loses the capability to bypass
    file permissions, so the kernel really refuses the open."""
    path = write_mrc(tmp_path / "locked.mrc", pixels(rng, 2, (40, 40)))
    path.chmod(0)
    code = f"from cryodeploy.io.mrc import read_micrograph; read_micrograph({str(path)!r})"
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if (
            unshare is None
            or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode != 0
        ):
            pytest.skip("running as root and user namespaces are unavailable: chmod 000 does not stop root")
        cmd = [unshare, "--user", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"InputError: {path}: not readable (permission denied)" in proc.stderr


def test_layout_checks_read_little_endian_fields(tmp_path: Path, rng: np.random.Generator) -> None:
    """The fuzz cases above rely on mrcfile writing little-endian files on this machine."""
    path = write_mrc(tmp_path / "m.mrc", pixels(rng, 2, (40, 36)))
    head = path.read_bytes()[:1024]
    assert struct.unpack_from("<3i", head, 0) == (36, 40, 1) and head[212:214] == b"\x44\x44"
