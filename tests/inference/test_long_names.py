"""File names at the 255-byte limit (issue 22, item 1): inputs named 227-255 bytes are denoised (their
temporary and claim names are hashed, never longer than the limit); a name plus ``--suffix`` past the
limit fails that file alone; a newline in a file name does not split its one-line message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from mrc_cases import MODEL_ARGS, denoise_process, pixels, truncate, write_mrc

from cryodeploy.cli import cli
from cryodeploy.files import TEMP_PREFIX, name_key
from cryodeploy.inference.claims import CLAIM_PREFIX, clean_leftovers, try_claim
from cryodeploy.io.mrc import read_micrograph


def _name(nbytes: int, ext: str = ".mrc", char: str = "a") -> str:
    """A file name of exactly ``nbytes`` bytes in UTF-8 (``char`` may take several bytes)."""
    body = nbytes - len(ext)
    width = len(char.encode())
    return char * (body // width) + "b" * (body % width) + ext


def test_names_up_to_255_bytes_are_denoised_and_a_newline_stays_on_one_line(
    tmp_path: Path, cnn3_checkpoint: Path
) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    names = [_name(227), _name(237), _name(254, ".mrcs"), _name(255), _name(255, char="é"), "short.mrc"]
    assert [len(n.encode()) for n in names] == [227, 237, 254, 255, 255, 9]
    good = [write_mrc(tmp_path / "in" / n, pixels(rng, 2, (40, 48))) for n in names]
    bad = write_mrc(tmp_path / "in" / "two\nlines.mrc", pixels(rng, 2, (40, 48)))
    truncate(bad, 2000)
    outdir = tmp_path / "out"

    proc = denoise_process([*good, bad], outdir, cnn3_checkpoint)

    assert proc.returncode == 1 and proc.stdout.startswith("denoised 6, skipped 0, failed 1 in "), proc.stderr
    assert proc.stderr.splitlines() == [
        f"failed: {tmp_path}/in/two\\nlines.mrc: truncated file, found 2000 bytes, expected 8704 "
        "(a 48x40x1 mode 2 data block after the headers)"
    ]
    assert sorted(p.name for p in outdir.iterdir()) == sorted(names)  # no temporary or claim file left
    for src in good:
        assert read_micrograph(outdir / src.name).data.shape == (40, 48)


def test_name_plus_suffix_past_the_limit_fails_that_file_alone(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    rng = np.random.default_rng(4)
    long = write_mrc(tmp_path / _name(252), pixels(rng, 2, (40, 48)))
    short = write_mrc(tmp_path / "short.mrc", pixels(rng, 2, (40, 48)))
    outdir = tmp_path / "out"
    args = ["denoise", str(long), str(short), "-o", str(outdir), "--model", str(cnn3_checkpoint), *MODEL_ARGS]

    result = CliRunner().invoke(cli, [*args, "--suffix", "_den"])

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.stderr
    out = outdir / (long.stem + "_den.mrc")
    assert result.stderr.splitlines() == [
        f"failed: {out}: output name is 256 bytes, longer than the 255-byte limit of a file name; "
        "shorten the input name or the suffix"
    ]
    assert result.stdout.startswith("denoised 1, skipped 0, failed 1 in ")
    assert sorted(p.name for p in outdir.iterdir()) == ["short_den.mrc"]


def test_hashed_temporaries_are_cleaned_only_when_their_owner_is_gone(tmp_path: Path) -> None:
    """A killed run's temporary of a long output (and of its preview) is removed; while a live claim
    covers it, it stays. The owner of a hashed preview is found from the name its claim file records."""
    out = tmp_path / _name(240)
    preview = out.with_suffix(".png")
    temps = [tmp_path / f"{TEMP_PREFIX}{name_key(p.name)}.0123456789ab" for p in (out, preview)]
    assert all(len(t.name.encode()) <= 255 and name_key(p.name).startswith("#")
               for t, p in zip(temps, (out, preview), strict=True))
    for t in temps:
        t.write_bytes(b"partial")
    claim = try_claim(out)
    assert claim is not None and len(claim.path.name.encode()) <= 255
    assert claim.path.read_bytes().split(b"\n")[1] == out.name.encode()
    assert clean_leftovers(tmp_path) == []  # the live claim covers the output and its preview
    assert all(t.exists() for t in temps)
    claim.release()
    assert sorted(clean_leftovers(tmp_path)) == sorted(temps)
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(CLAIM_PREFIX) for p in tmp_path.iterdir())
