"""Outputs that cannot be written: a full disk, a file size limit, a read-only file system or folder,
an output path through a regular file. Each gives one clear line, a non-zero exit, and no partial
or temporary file; an output that existed before a failed rewrite stays intact.

The failures are real, produced by the kernel: a size-limited tmpfs and read-only remounts inside a
private mount namespace (``unshare --mount``, needs root; the mounts vanish with the process),
``RLIMIT_FSIZE`` (no root needed), and permission bits enforced on root by dropping its capabilities
in a new user namespace (``unshare --user``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mrc_cases import MODEL_ARGS, denoise_process, pixels, unsharded_env, without_root_override, write_mrc

from cryodeploy.cli import cli
from cryodeploy.errors import OutputError
from cryodeploy.files import TEMP_PREFIX
from cryodeploy.io.mrc import read_micrograph, write_micrograph

pytestmark = pytest.mark.timeout(180)

BIG, SMALL = (256, 256), (64, 64)  # float32 outputs of 257 KiB and 17 KiB


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A 256x256 and a 64x64 micrograph."""
    rng = np.random.default_rng(5)
    (tmp_path / "in").mkdir()
    return (
        write_mrc(tmp_path / "in" / "big.mrc", pixels(rng, 2, BIG)),
        write_mrc(tmp_path / "in" / "small.mrc", pixels(rng, 2, SMALL)),
    )


@pytest.fixture(scope="session")
def private_mounts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command prefix that runs a shell script in a private mount namespace, or skip saying why."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip(
            "util-linux 'unshare' not installed: cannot mount a size-limited or read-only file system"
        )
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-ec"]
    probe = tmp_path_factory.mktemp("probe")
    proc = subprocess.run(
        [*prefix, f"mount -t tmpfs -o size=64k tmpfs '{probe}'"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    return prefix


def _denoise_cmd(ins: tuple[Path, ...], outdir: Path, model: Path, record: Path) -> str:
    """A shell line running ``cryodeploy denoise``; stdout, stderr and a non-zero exit code go to
    ``record``.stdout / .stderr / .rc. One writer thread: the files are written in order, so which one
    a small disk has room for does not depend on two writers racing for it."""
    args = [sys.executable, "-m", "cryodeploy", "denoise", *map(str, ins), "-o", str(outdir),
            "--io-threads", "1"]
    line = " ".join(f"'{a}'" for a in [*args, "--model", str(model), *MODEL_ARGS])
    return f"{line} > '{record}.stdout' 2> '{record}.stderr' || echo $? > '{record}.rc'"


def _listing(text: str) -> list[str]:
    return sorted(text.split())


def test_disk_full_on_a_real_small_filesystem(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path, private_mounts: list[str]
) -> None:
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    kept.mkdir()
    script = f"""
        mount -t tmpfs -o size=128k tmpfs '{mnt}'
        {_denoise_cmd(inputs, mnt / "out", cnn3_checkpoint, tmp_path / "run")}
        ls -A '{mnt}/out' > '{tmp_path}/listing'
        cp '{mnt}/out/small.mrc' '{kept}/'
    """
    subprocess.run([*private_mounts, textwrap.dedent(script)], check=True, timeout=120, env=unsharded_env())

    assert (tmp_path / "run.rc").read_text().strip() == "1"
    assert (tmp_path / "run.stderr").read_text().splitlines() == [
        f"failed: {mnt}/out/big.mrc: cannot write (No space left on device)"
    ]
    assert (tmp_path / "run.stdout").read_text().startswith("denoised 1, skipped 0, failed 1 in ")
    assert _listing((tmp_path / "listing").read_text()) == ["small.mrc"]  # no partial big.mrc, no temp file
    assert read_micrograph(kept / "small.mrc").data.shape == SMALL


def test_completely_full_disk(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path, private_mounts: list[str]
) -> None:
    """Not one byte left: even the claim file cannot be written."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
        mount -t tmpfs -o size=64k tmpfs '{mnt}'
        mkdir '{mnt}/out'
        dd if=/dev/zero of='{mnt}/filler' bs=4k count=64 2> /dev/null || true
        {_denoise_cmd(inputs[1:], mnt / "out", cnn3_checkpoint, tmp_path / "run")}
        ls -A '{mnt}/out' > '{tmp_path}/listing'
    """
    subprocess.run([*private_mounts, textwrap.dedent(script)], check=True, timeout=120, env=unsharded_env())

    assert (tmp_path / "run.rc").read_text().strip() == "1"
    assert (tmp_path / "run.stderr").read_text().splitlines() == [
        f"error: {mnt}/out/small.mrc: cannot create claim file (No space left on device)"
    ]
    assert _listing((tmp_path / "listing").read_text()) == []


def test_disk_full_rewrite_keeps_the_previous_output(tmp_path: Path, private_mounts: list[str]) -> None:
    """write_micrograph onto an existing output when the new copy does not fit: OutputError, and the
    old output is still there, complete."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = f"""
import json, os, numpy as np
from cryodeploy.errors import OutputError
from cryodeploy.io.mrc import read_micrograph, write_micrograph
first = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
write_micrograph("{mnt}/a.mrc", first)
try:
    write_micrograph("{mnt}/a.mrc", first + 1)
    error = None
except OutputError as err:
    error = str(err)
same = bool((read_micrograph("{mnt}/a.mrc").data == first).all())
print(json.dumps({{"error": error, "same": same, "files": sorted(os.listdir("{mnt}"))}}))
"""
    script = f"mount -t tmpfs -o size=400k tmpfs '{mnt}'\n'{sys.executable}' -c '{code}'"
    proc = subprocess.run(
        [*private_mounts, script], capture_output=True, text=True, timeout=60, env=unsharded_env()
    )

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "error": f"{mnt}/a.mrc: cannot write (No space left on device)",
        "same": True,
        "files": ["a.mrc"],
    }


def test_file_size_limit_fails_the_file_cleanly(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path
) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past 100 kB (EFBIG; SIGXFSZ ignored as a shell's
    ``ulimit -f`` leaves it): works without root."""
    outdir = tmp_path / "out"
    args = ["denoise", *map(str, inputs), "-o", str(outdir), "--model", str(cnn3_checkpoint), *MODEL_ARGS]
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "from cryodeploy.cli import main\n"
        f"main({args!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=unsharded_env()
    )

    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"failed: {outdir}/big.mrc: cannot write (File too large)"]
    assert sorted(p.name for p in outdir.iterdir()) == ["small.mrc"]
    assert read_micrograph(outdir / "small.mrc").data.shape == SMALL


def test_read_only_filesystem(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path, private_mounts: list[str]
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
        mount -t tmpfs -o size=1m tmpfs '{mnt}'
        mkdir '{mnt}/out'
        mount -o remount,ro '{mnt}'
        {_denoise_cmd(inputs, mnt / "out", cnn3_checkpoint, tmp_path / "run1")}
        {_denoise_cmd(inputs, mnt / "new", cnn3_checkpoint, tmp_path / "run2")}
        ls -A '{mnt}' '{mnt}/out' > '{tmp_path}/listing'
    """
    subprocess.run([*private_mounts, textwrap.dedent(script)], check=True, timeout=120, env=unsharded_env())

    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert (read("run1.rc").strip(), read("run1.stdout")) == ("1", "")
    assert read("run1.stderr").splitlines() == [
        f"error: {mnt}/out/big.mrc: cannot create claim file (Read-only file system)"
    ]
    assert (read("run2.rc").strip(), read("run2.stdout")) == ("1", "")
    assert read("run2.stderr").splitlines() == [
        f"error: {mnt}/new: cannot create the output folder (Read-only file system)"
    ]
    assert _listing(read("listing")) == [f"{mnt}/out:", f"{mnt}:", "out"]


def test_output_folder_without_write_permission(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path
) -> None:
    """chmod 555 stops everyone but root; as root the run goes into a new user namespace, where it keeps
    uid 0 but loses the capability to bypass permissions."""
    outdir = tmp_path / "locked"
    outdir.mkdir()
    outdir.chmod(0o555)
    proc = denoise_process(list(inputs), outdir, cnn3_checkpoint, without_root_override("chmod 555"))

    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == [
        f"error: {outdir}/big.mrc: cannot create claim file (Permission denied)"
    ]
    assert list(outdir.iterdir()) == []


def test_output_folder_is_or_is_under_a_regular_file(
    tmp_path: Path, inputs: tuple[Path, Path], cnn3_checkpoint: Path
) -> None:
    (tmp_path / "file.txt").write_text("keep me\n")
    run = lambda outdir: CliRunner().invoke(  # noqa: E731
        cli, ["denoise", str(inputs[1]), "-o", str(outdir), "--model", str(cnn3_checkpoint), *MODEL_ARGS]
    )

    under = run(tmp_path / "file.txt" / "sub")  # ENOTDIR from the kernel when the folder is created
    assert (under.exit_code, under.stdout) == (1, "")
    assert under.stderr.splitlines() == [
        f"error: {tmp_path}/file.txt/sub: cannot create the output folder (Not a directory)"
    ]
    is_file = run(tmp_path / "file.txt")  # refused by click's option check: a usage error (exit 2)
    assert is_file.exit_code == 2 and "Traceback" not in is_file.stderr
    assert (
        is_file.stderr.splitlines()[-1]
        == f"Error: Invalid value for '-o' / '--output': Directory '{tmp_path}/file.txt' is a file."
    )
    assert (tmp_path / "file.txt").read_text() == "keep me\n"


def test_write_micrograph_through_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError) as info:
        write_micrograph(tmp_path / "file.txt" / "a.mrc", np.ones((40, 40), np.float32))
    assert str(info.value) == f"{tmp_path}/file.txt/a.mrc: cannot write (Not a directory)"


def test_values_beyond_float16_are_refused_not_written_as_inf(tmp_path: Path) -> None:
    data = np.ones((40, 40), np.float32)
    data[3, 4] = 1e6
    with pytest.raises(OutputError) as info:
        write_micrograph(tmp_path / "a.mrc", data, dtype="float16")
    assert str(info.value) == (
        f"{tmp_path}/a.mrc: found 1 NaN/Inf values in the float16 output (values beyond the float16 range "
        "of +-65504; write float32 instead), expected finite pixels"
    )
    data[3, 4] = np.nan
    with pytest.raises(OutputError, match="found 1 NaN/Inf values in the float32 output, expected finite"):
        write_micrograph(tmp_path / "a.mrc", data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX) or p.name == "a.mrc"]
