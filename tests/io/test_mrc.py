"""MRC reading, validation and atomic writing, on real files written with mrcfile."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import InputError, OutputError
from cryodeploy.files import TEMP_PREFIX, staged_writes
from cryodeploy.io.mrc import (
    MicrographHeader,
    atomic_write,
    read_header,
    read_micrograph,
    write_micrograph,
)

MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}


def _values(rng: np.random.Generator, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """Random values spanning the dtype's range (integers) or a wide range (floats)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * 300).astype(dtype)


def _write_mrc(
    path: Path,
    data: np.ndarray,
    voxel_size: tuple[float, float, float] = (1.25, 1.5, 2.0),
    origin: tuple[float, float, float] = (10.5, -3.0, 7.25),
    nstart: tuple[int, int, int] = (4, 5, 0),
    stack: bool = False,
) -> Path:
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN/Inf that bad-input tests write
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_size
        mrc.header.origin = origin
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = nstart
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("stack", [False, True], ids=["2d", "stack"])
def test_read_every_mode_exact_with_header(
    tmp_path: Path, rng: np.random.Generator, mode: int, stack: bool
) -> None:
    shape = (3, 40, 56) if stack else (40, 56)
    data = _values(rng, MODES[mode], shape)
    path = _write_mrc(tmp_path / f"m{mode}.mrc", data, stack=stack)
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.mode) == mode  # mrcfile really wrote this mode

    mic = read_micrograph(path)

    assert mic.data.dtype == np.float32 and mic.data.shape == shape
    np.testing.assert_array_equal(mic.data, data.astype(np.float32))
    h = mic.header
    assert h.mode == mode and h.shape == shape and h.is_stack == stack
    assert h.frame_shape == (40, 56) and h.n_frames == (3 if stack else 1)
    assert h.voxel_size[:2] == pytest.approx((1.25, 1.5), abs=1e-6)
    assert h.origin == (10.5, -3.0, 7.25)
    assert h.nstart == (4, 5, 0)
    assert read_header(path) == h
    assert len(list(mic.frames())) == h.n_frames


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_round_trip_keeps_values_and_header(
    tmp_path: Path, rng: np.random.Generator, dtype: str
) -> None:
    data = (rng.standard_normal((48, 64)) * 10 + 100).astype(np.float32)
    src = _write_mrc(tmp_path / "in.mrc", data.astype(np.uint16), voxel_size=(0.83, 0.83, 0.83))
    with mrcfile.open(src, mode="r+") as mrc:
        mrc.add_label("acquired by a test")
    mic = read_micrograph(src)
    src_sha = _sha(src)

    out = write_micrograph(
        tmp_path / "out.mrc", data, mic.header, dtype=dtype, protect=(src,), label="denoised"
    )

    back = read_micrograph(out)
    np.testing.assert_array_equal(back.data, data.astype(dtype).astype(np.float32))
    assert back.header.mode == (2 if dtype == "float32" else 12)
    assert back.header.voxel_size == pytest.approx(mic.header.voxel_size, abs=1e-6)
    assert back.header.origin == mic.header.origin == (10.5, -3.0, 7.25)
    assert back.header.nstart == (4, 5, 0)
    assert back.header.labels == (*mic.header.labels, "denoised")
    assert mic.header.labels[-1] == "acquired by a test"
    assert _sha(src) == src_sha  # the input is never modified
    assert _leftovers(tmp_path) == ["in.mrc", "out.mrc"]


def test_write_stack_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((4, 33, 35)).astype(np.float32)
    src = _write_mrc(tmp_path / "in.mrcs", data, voxel_size=(1.1, 1.1, 1.1), stack=True)
    mic = read_micrograph(src)
    out = write_micrograph(tmp_path / "out.mrcs", mic.data * 2, mic.header)
    back = read_micrograph(out)
    np.testing.assert_array_equal(back.data, data * 2)
    assert back.header.shape == (4, 33, 35) and back.header.is_stack and back.header.ispg == 0
    assert back.header.voxel_size == pytest.approx((1.1, 1.1, 1.1), abs=1e-6)
    # Without a header a 3-D array is still written as an image stack, not a volume.
    assert read_micrograph(write_micrograph(tmp_path / "bare.mrcs", data)).header.is_stack


def test_write_is_byte_identical_for_same_input(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((40, 40)).astype(np.float32)
    a = write_micrograph(tmp_path / "a.mrc", data, label="x")
    b = write_micrograph(tmp_path / "b.mrc", data, label="x")
    assert a.read_bytes() == b.read_bytes()  # no time stamp in the labels


def test_non_ascii_label_is_written(tmp_path: Path, rng: np.random.Generator) -> None:
    out = write_micrograph(tmp_path / "a.mrc", rng.standard_normal((40, 40)), label="Å 1.0 µm")
    assert read_header(out).labels == ("? 1.0 ?m",)


def test_real_epu_fei2_header_survives_float16_write(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "epu2.9_example.mrc"
    mic = read_micrograph(src)
    h = mic.header
    assert (h.shape, h.mode, h.exttyp) == ((4096, 4096), 6, b"FEI2")
    assert len(h.extended_header) == 909_312
    assert h.voxel_size[0] == pytest.approx(0.66655, abs=1e-5)
    assert 2790 <= mic.data.min() < mic.data.max() <= 9661

    out = write_micrograph(tmp_path / "epu_f16.mrc", mic.data, h, dtype="float16", protect=(src,))

    back = read_micrograph(out)
    assert back.header.mode == 12
    assert back.header.exttyp == b"FEI2"
    assert back.header.extended_header == h.extended_header
    assert back.header.voxel_size == h.voxel_size
    np.testing.assert_array_equal(back.data, mic.data.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------- bad inputs


def _good(path: Path, rng: np.random.Generator, shape: tuple[int, ...] = (64, 64)) -> Path:
    return _write_mrc(path, rng.standard_normal(shape).astype(np.float32))


def _bad_random_bytes(d: Path, rng: np.random.Generator) -> Path:
    p = d / "random.mrc"
    p.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _bad_text(d: Path, rng: np.random.Generator) -> Path:
    p = d / "notes.mrc"
    p.write_text("this is a text file, not a micrograph\n" * 50)
    return p


def _bad_short_text(d: Path, rng: np.random.Generator) -> Path:
    p = d / "short.mrc"
    p.write_text("hello\n")
    return p


def _bad_truncated(d: Path, rng: np.random.Generator) -> Path:
    p = _good(d / "cut.mrc", rng)
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size - 64 * 64 * 4 // 2)
    return p


def _bad_mode4(d: Path, rng: np.random.Generator) -> Path:
    data = (rng.standard_normal((64, 64)) + 1j * rng.standard_normal((64, 64))).astype(np.complex64)
    with mrcfile.new(d / "complex.mrc") as mrc:
        mrc.set_data(data)
    return d / "complex.mrc"


def _bad_nan(d: Path, rng: np.random.Generator) -> Path:
    data = rng.standard_normal((64, 64)).astype(np.float32)
    data[10, 20] = np.nan
    return _write_mrc(d / "nan.mrc", data)


def _bad_inf(d: Path, rng: np.random.Generator) -> Path:
    data = rng.standard_normal((64, 64)).astype(np.float32)
    data[0, 0] = -np.inf
    return _write_mrc(d / "inf.mrc", data)


def _bad_nan_frame(d: Path, rng: np.random.Generator) -> Path:
    data = rng.standard_normal((3, 64, 64)).astype(np.float32)
    data[1, 5, 5] = np.nan
    return _write_mrc(d / "nanframe.mrcs", data, stack=True)


def _bad_constant(d: Path, rng: np.random.Generator) -> Path:
    return _write_mrc(d / "flat.mrc", np.full((64, 64), 7, np.uint16))


def _bad_empty(d: Path, rng: np.random.Generator) -> Path:
    p = d / "empty.mrc"
    p.touch()
    return p


def _bad_small(d: Path, rng: np.random.Generator) -> Path:
    return _good(d / "small.mrc", rng, shape=(16, 40))


def _bad_missing(d: Path, rng: np.random.Generator) -> Path:
    return d / "does_not_exist.mrc"


def _bad_directory(d: Path, rng: np.random.Generator) -> Path:
    p = d / "folder.mrc"
    p.mkdir()
    return p


BAD_INPUTS = {
    "random-bytes": (_bad_random_bytes, "not a readable MRC file"),
    "text-file": (_bad_text, "not a readable MRC file"),
    "short-text-file": (_bad_short_text, "not a readable MRC file"),
    "truncated": (_bad_truncated, "truncated file, found 9216 bytes, expected 17408"),
    "mode-4-complex": (_bad_mode4, "unsupported MRC mode 4"),
    "nan": (_bad_nan, "found 1 NaN/Inf values"),
    "inf": (_bad_inf, "found 1 NaN/Inf values"),
    "nan-in-frame-1": (_bad_nan_frame, "(frame 1)"),
    "constant": (_bad_constant, "image is constant (7)"),
    "empty": (_bad_empty, "empty file"),
    "too-small": (_bad_small, "image is 40x16 pixels, expected at least 32x32"),
    "missing": (_bad_missing, "no such file"),
    "directory": (_bad_directory, "is a directory"),
}


def _copy(src: Path, outdir: Path) -> Path:
    """Read, validate and write a copy: the pipeline a denoiser runs around its model."""
    mic = read_micrograph(src)
    return write_micrograph(outdir / src.name, mic.data, mic.header, protect=(src,))


@pytest.mark.parametrize("case", [*sorted(BAD_INPUTS), "3d-volume"])
def test_bad_input_gives_one_line_error_and_no_output(
    tmp_path: Path, rng: np.random.Generator, request: pytest.FixtureRequest, case: str
) -> None:
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    if case == "3d-volume":  # a real EMDB map
        path = request.getfixturevalue("shared_data") / "EMD-3197.map"
        expected = "found a 3-D volume (20x20x20, space group 1)"
    else:
        make, expected = BAD_INPUTS[case]
        path = make(indir, rng)

    with pytest.raises(InputError) as info:
        _copy(path, outdir)

    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert expected in msg
    assert _leftovers(outdir) == []


def test_min_size_can_be_raised(tmp_path: Path, rng: np.random.Generator) -> None:
    path = _good(tmp_path / "a.mrc", rng, shape=(64, 80))
    assert read_micrograph(path, min_size=64).data.shape == (64, 80)
    with pytest.raises(InputError, match="image is 80x64 pixels, expected at least 100x100"):
        read_micrograph(path, min_size=100)


def test_read_header_rejects_non_mrc(tmp_path: Path, rng: np.random.Generator) -> None:
    path = _bad_random_bytes(tmp_path, rng)
    with pytest.raises(InputError, match="not a readable MRC file"):
        read_header(path)


# ---------------------------------------------------------------- atomic writes


def test_exception_inside_atomic_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.mrc"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX)
        tmp.write_bytes(b"half a micrograph")
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_interrupt_inside_atomic_write_keeps_old_target(tmp_path: Path) -> None:
    target = tmp_path / "out.mrc"
    target.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"previous result"
    assert _leftovers(tmp_path) == ["out.mrc"]


def test_atomic_write_success_has_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _leftovers(tmp_path) == ["out.bin"]


def test_staged_writes_wait_for_commit_and_are_discarded_on_error(tmp_path: Path) -> None:
    """Inside staged_writes a finished write is a closed temp file, the target untouched, until
    commit renames it into place (bytes equal); an exception in the block removes every staged temp."""
    target, preview = tmp_path / "out.mrc", tmp_path / "out.png"
    target.write_bytes(b"previous result")
    data = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    with staged_writes() as staged:
        write_micrograph(target, data)
        with atomic_write(preview) as tmp:
            tmp.write_bytes(b"png")
    assert [(w.target.name, w.tmp.name.startswith(TEMP_PREFIX)) for w in staged] == [
        ("out.mrc", True), ("out.png", True)]
    assert target.read_bytes() == b"previous result" and not preview.exists()
    assert len(_leftovers(tmp_path)) == 3  # the old target and two temps
    for w in staged:
        w.commit()
    assert _leftovers(tmp_path) == ["out.mrc", "out.png"]
    np.testing.assert_array_equal(read_micrograph(target).data, data)
    write_micrograph(tmp_path / "direct.mrc", data)  # outside the block: committed at once, same bytes
    assert (tmp_path / "direct.mrc").read_bytes() == target.read_bytes()

    with pytest.raises(RuntimeError, match="boom"), staged_writes() as staged:
        write_micrograph(tmp_path / "lost.mrc", data)
        raise RuntimeError("boom")
    assert len(staged) == 1 and not staged[0].tmp.exists()
    assert _leftovers(tmp_path) == ["direct.mrc", "out.mrc", "out.png"]


def test_failed_commit_removes_its_temp_and_names_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with staged_writes() as staged, atomic_write(target) as tmp:
        tmp.write_bytes(b"done")
    staged[0].tmp.unlink()  # e.g. removed by someone else before the fsync
    with pytest.raises(OutputError, match=r"out\.bin: cannot write"):
        staged[0].commit()
    assert _leftovers(tmp_path) == []


def test_failure_inside_mrcfile_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """A write that hits the file size limit mid-way (like a full disk) leaves the old target and no temp."""
    target = tmp_path / "out.mrc"
    target.write_bytes(b"previous result")
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from cryodeploy.errors import OutputError
        from cryodeploy.io.mrc import write_micrograph
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            write_micrograph({str(target)!r}, np.ones((256, 256), np.float32))
        except OutputError as err:
            print("OutputError:", err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"OutputError: {target}: cannot write (File too large)")
    assert target.read_bytes() == b"previous result"
    assert _leftovers(tmp_path) == ["out.mrc"]


def test_refuses_to_overwrite_an_input(tmp_path: Path, rng: np.random.Generator) -> None:
    src = _good(tmp_path / "in.mrc", rng)
    sha = _sha(src)
    link = tmp_path / "hardlink.mrc"
    os.link(src, link)
    mic = read_micrograph(src)
    for target in (src, tmp_path / "." / "in.mrc", link):
        with pytest.raises(OutputError, match="refusing to overwrite an input file"):
            write_micrograph(target, mic.data, mic.header, protect=(str(src),))
    assert _sha(src) == sha
    assert _leftovers(tmp_path) == ["hardlink.mrc", "in.mrc"]


def test_write_rejects_shape_mismatch_and_bad_dtype(tmp_path: Path) -> None:
    header = MicrographHeader(shape=(40, 40), mode=2, voxel_size=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    with pytest.raises(OutputError, match="differs from the header"):
        write_micrograph(tmp_path / "a.mrc", np.zeros((40, 41), np.float32), header)
    with pytest.raises(OutputError, match="expected float32 or float16"):
        write_micrograph(tmp_path / "a.mrc", np.zeros((40, 40), np.float32), dtype="int8")
    assert _leftovers(tmp_path) == []


def test_shipped_examples_are_real_mode6_crops() -> None:
    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.mrc"))
    assert len(examples) == 3
    assert sum(p.stat().st_size for p in examples) < 4_000_000
    for path in examples:
        mic = read_micrograph(path)
        assert mic.header.shape == (768, 768) and mic.header.mode == 6
        assert mic.header.voxel_size[0] == pytest.approx(0.66655, abs=1e-5)
        assert 2000 < mic.data.min() < mic.data.mean() < mic.data.max() < 10000
