"""Fuzzing ``cryodeploy denoise`` end to end: every input ends in a correct output (it reads back
with the input's shape and equals the in-memory result) or in exactly one stderr line naming the
file; never a traceback, a temporary or partial output, an output for a failed input, or a hang.

In-process runs use click's CliRunner (fast, many cases); a few real ``python -m cryodeploy``
subprocesses prove what a user's terminal shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrc_cases import (
    FIELDS,
    MODEL_ARGS,
    MODES,
    PNG_SIGNATURE,
    SHARD_VARS,
    denoise_process,
    edit_bytes,
    pixels,
    regions,
    set_field,
    truncate,
    without_root_override,
    write_mrc,
)

from cryodeploy.cli import cli
from cryodeploy.errors import InputError
from cryodeploy.inference.denoiser import Denoiser
from cryodeploy.io.mrc import read_micrograph

#: examples of the end-to-end property; CRYODEPLOY_FUZZ_EXAMPLES=500 fuzzes deeper
EXAMPLES = int(os.environ.get("CRYODEPLOY_FUZZ_EXAMPLES", "100"))
# a hang fails the test; deeper runs get longer
pytestmark = pytest.mark.timeout(180 * max(1, EXAMPLES // 100))

NAMES = ("m.mrc", "with space.mrc", "mïcrö ü.mrc", "日本語 δ.mrcs", "a'b\"c.mrc")
KINDS = ("good", "header-bytes", "header-field", "truncated", "nan", "constant", "small", "foreign")


@pytest.fixture(autouse=True)
def _no_shard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in SHARD_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def oracle(cnn3_checkpoint: Path) -> Iterator[Denoiser]:
    """The same model in memory: what a correct output must contain."""
    with Denoiser.load(cnn3_checkpoint, device="cpu", backend="torch") as d:
        yield d


def _run(inputs: list[Path], outdir: Path, model: Path, *extra: str) -> Result:
    args = ["denoise", *map(str, inputs), "-o", str(outdir), "--model", str(model), *MODEL_ARGS, *extra]
    return CliRunner().invoke(cli, args)


def _make(folder: Path, name: str, kind: str, draw: Callable[..., Any]) -> Path:
    """Write one input of ``kind`` (parameters drawn by hypothesis) as ``folder/name``."""
    path = folder / name
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(sorted(MODES)))
    nz = draw(st.sampled_from([1, 1, 2]))
    side = draw(
        st.sampled_from([1, 7, 31, 32, 33, 47, 64, 65, 100]) if kind == "small" else st.integers(32, 80)
    )
    shape = (side, draw(st.integers(32, 80)))
    if kind == "small":
        shape = draw(st.sampled_from([shape, shape[::-1], (side, side)]))
    data = pixels(rng, mode, (nz, *shape) if nz > 1 else shape)
    if kind == "nan" and mode in (2, 12):
        data.flat[draw(st.integers(0, data.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "constant":
        data[...] = 3
    if kind == "foreign":
        content = draw(
            st.one_of(
                st.binary(max_size=2000),
                st.text(max_size=300).map(str.encode),
                st.binary(max_size=100).map(PNG_SIGNATURE.__add__),
            )
        )
        path.write_bytes(content)
        return path
    write_mrc(path, data, ext=draw(st.sampled_from([b"", bytes(range(64))])), stack=nz > 1)
    if kind == "header-bytes":
        edit_bytes(
            path, draw(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=4))
        )
    if kind == "header-field":
        value = draw(
            st.one_of(
                st.sampled_from([0, -1, 1, 3, 4, 101, 2**30, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1)
            )
        )
        set_field(path, draw(st.sampled_from(sorted(FIELDS))), value)
    if kind == "truncated":
        start, end = regions(path)[draw(st.sampled_from(["header", "extended header", "data"]))]
        truncate(path, start + draw(st.integers(0, max(0, end - start - 1))))
    return path


def _expected(path: Path, min_size: int) -> np.ndarray | InputError:
    """What the library's reader says about ``path``: its pixels, or the error the run must report."""
    try:
        return read_micrograph(path, min_size).data
    except InputError as err:
        return err


def _check_outcome(result: Result, path: Path, outdir: Path, oracle: Denoiser) -> None:
    expected = _expected(path, min_size=32)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    left = sorted(p.name for p in outdir.iterdir()) if outdir.exists() else []
    if isinstance(expected, InputError):
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [f"failed: {expected}"]
        assert str(expected).startswith(f"{path}: ")
        assert left == []  # no output, no temporary file, no claim file for a failed input
        return
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert left == [path.name]
    out = read_micrograph(outdir / path.name, min_size=1).data
    assert out.shape == expected.shape
    want = oracle(expected, tile=64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@settings(
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_denoise_fuzzed_input_gives_output_or_one_line(
    tmp_path: Path, cnn3_checkpoint: Path, oracle: Denoiser, data: st.DataObject
) -> None:
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    path = _make(case, data.draw(st.sampled_from(NAMES), label="name"), kind, data.draw)

    result = _run([path], case / "out", cnn3_checkpoint)

    _check_outcome(result, path, case / "out", oracle)


def test_denoise_symlinks_and_special_files(tmp_path: Path, cnn3_checkpoint: Path, oracle: Denoiser) -> None:
    rng = np.random.default_rng(3)
    good = write_mrc(tmp_path / "good.mrc", pixels(rng, 6, (48, 40)))
    (tmp_path / "link é.mrc").symlink_to(good)
    (tmp_path / "dangling.mrc").symlink_to(tmp_path / "gone.mrc")
    os.mkfifo(tmp_path / "pipe.mrc")
    for name in ("link é.mrc", "dangling.mrc", "pipe.mrc"):
        outdir = tmp_path / f"out-{name}"
        _check_outcome(_run([tmp_path / name], outdir, cnn3_checkpoint), tmp_path / name, outdir, oracle)
    assert (tmp_path / "out-link é.mrc" / "link é.mrc").is_file()  # the output is named after the link


def _bad_inputs(folder: Path, rng: np.random.Generator) -> list[Path]:
    """One of each kind of bad input, named with spaces and non-ASCII characters."""
    folder.mkdir()
    made = {}
    for name, shape in {
        "tiny 1x1.mrc": (1, 1),
        "row 1xN.mrc": (1, 64),
        "col Nx1.mrc": (64, 1),
        "odd 31x31.mrc": (31, 31),
    }.items():
        made[name] = write_mrc(folder / name, pixels(rng, 2, shape))
    fields: dict[str, tuple[str, int | bytes]] = {
        "huge ñ.mrc": ("nx", 2**30),
        "negative.mrc": ("ny", -5),
        "mode 4.mrc": ("mode", 4),
        "mode 101.mrc": ("mode", 101),
        "bad map.mrc": ("map", b"JUNK"),
        "bad machst.mrc": ("machst", b"\x00\x00\x00\x00"),
        "ext huge.mrc": ("nsymbt", 2**31 - 1),
    }
    for name, (field, value) in fields.items():
        made[name] = write_mrc(folder / name, pixels(rng, 2, (40, 40)))
        set_field(made[name], field, value)
    made["cut data.mrc"] = write_mrc(folder / "cut data.mrc", pixels(rng, 1, (40, 40)))
    truncate(made["cut data.mrc"], 2000)
    nan = pixels(rng, 2, (2, 40, 40))
    nan[1, 3, 3] = np.nan
    made["nan frame.mrcs"] = write_mrc(folder / "nan frame.mrcs", nan, stack=True)
    made["flat.mrc"] = write_mrc(folder / "flat.mrc", np.full((40, 40), 9, np.uint16))
    for name, content in {
        "notes.mrc": b"not a micrograph\n" * 90,
        "image.mrc": PNG_SIGNATURE + bytes(3000),
        "empty.mrc": b"",
        "noise.mrc": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    }.items():
        made[name] = folder / name
        made[name].write_bytes(content)
    made["dangling.mrc"] = folder / "dangling.mrc"
    made["dangling.mrc"].symlink_to(folder / "nowhere.mrc")
    made["pipe.mrc"] = folder / "pipe.mrc"
    os.mkfifo(made["pipe.mrc"])
    return sorted(made.values())


def test_real_process_reports_each_bad_input_on_one_line(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    rng = np.random.default_rng(11)
    bad = _bad_inputs(tmp_path / "bad", rng)
    (tmp_path / "good ü").mkdir()
    good = [
        write_mrc(tmp_path / "good ü" / "stack δ.mrcs", pixels(rng, 12, (2, 50, 41)), stack=True),
        write_mrc(tmp_path / "good ü" / "plain.mrc", pixels(rng, 0, (33, 64))),
    ]
    outdir = tmp_path / "out"

    proc = denoise_process([*bad, *good], outdir, cnn3_checkpoint)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(bad), proc.stderr
    for path, line in zip(bad, sorted(lines, key=lambda s: s.split(": ")[1]), strict=True):
        assert line.startswith(f"failed: {path}: "), line
    assert proc.stdout.strip().startswith(f"denoised 2, skipped 0, failed {len(bad)} in ")
    assert sorted(p.name for p in outdir.iterdir()) == ["plain.mrc", "stack δ.mrcs"]
    for src in good:
        assert read_micrograph(outdir / src.name).data.shape == read_micrograph(src).data.shape


def test_real_process_single_bad_input_prints_one_line(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    path = write_mrc(tmp_path / "cut.mrc", pixels(np.random.default_rng(0), 2, (64, 64)))
    truncate(path, 3000)

    proc = denoise_process([path], tmp_path / "out", cnn3_checkpoint)

    assert proc.returncode == 1 and proc.stdout.startswith("denoised 0, skipped 0, failed 1 in ")
    assert proc.stderr.splitlines() == [
        f"failed: {path}: truncated file, found 3000 bytes, expected 17408 "
        "(a 64x64x1 mode 2 data block after the headers)"
    ]
    assert not (tmp_path / "out").exists()  # every input failed: no empty output folder left


def test_real_process_unreadable_input(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    """chmod 000 stops everyone but root; as root the run goes into a new user namespace, where it
    keeps uid 0 but loses the capability to bypass file permissions (a real EACCES from the kernel)."""
    path = write_mrc(tmp_path / "locked.mrc", pixels(np.random.default_rng(0), 2, (40, 40)))
    path.chmod(0)
    prefix = without_root_override("chmod 000")

    proc = denoise_process([path], tmp_path / "out", cnn3_checkpoint, prefix)

    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"failed: {path}: not readable (permission denied)"]
    assert not (tmp_path / "out").exists()  # every input failed: no empty output folder left


def _extreme(tmp_path: Path) -> tuple[Path, Result]:
    data = np.random.default_rng(2).standard_normal((48, 48)).astype(np.float32) * np.float32(2e38)
    path = write_mrc(tmp_path / "extreme.mrc", np.clip(data, -3.4e38, 3.4e38))
    return path, CliRunner().invoke(
        cli,
        [
            "denoise",
            str(path),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(tmp_path / "model.safetensors"),
            *MODEL_ARGS,
        ],
    )


def _model_copy(checkpoint: Path, folder: Path) -> None:
    shutil.copy(checkpoint, folder / "model.safetensors")
    shutil.copy(checkpoint.with_suffix(".json"), folder / "model.json")


def test_values_near_the_float32_limit_are_denoised(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    """Pixels of +-3e38 are valid float32: normalization works in float64, so they denoise cleanly."""
    _model_copy(cnn3_checkpoint, tmp_path)
    path, result = _extreme(tmp_path)
    assert (result.exit_code, result.stderr) == (0, "")
    assert np.isfinite(read_micrograph(tmp_path / "out" / path.name).data).all()
