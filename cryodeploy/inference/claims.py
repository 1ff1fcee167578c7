"""Per-output claims, so concurrent runs on one output folder never write the same file.

A claim is an ``flock``-ed file ``.cryodeploy-claim-<output name>`` beside the output,
holding the owner's PID (for messages) and the output's name. A name too long to carry the
prefix within the 255-byte limit is replaced by ``#`` + its hash (:func:`cryodeploy.files.name_key`),
in claim and temporary names alike; the name inside the claim file lets the cleanup find the
owner of a hashed temporary file. The kernel drops the lock when its process dies
(``kill -9`` included), so a claim left behind by a dead run is simply taken over: there
are no stale claims to time out. A writer holds the output's claim from before it starts
writing a temporary file until after the rename, which makes the cleanup of a killed
run's ``.cryodeploy-tmp-*`` files safe: a temporary file is deleted only while its owner's
claim is held by the cleaner, i.e. while nobody can be writing it; a claim file is removed
by taking it over and releasing it.

Why ``flock`` here and not the ``filelock`` package: its Unix ``FileLock`` is this same
``fcntl.flock`` call (so the same NFS/Lustre behaviour, see ``docs/slurm.md``), its
``SoftFileLock`` is a bare file that a killed process leaves behind (the stale claims this
design avoids), and neither takes over a claim file unlinked between open and lock, nor
records the owner's PID, both of which the cleanup and the messages here need.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from cryodeploy.errors import OutputError
from cryodeploy.files import TEMP_PREFIX, name_key

__all__ = ["CLAIM_PREFIX", "Claim", "claim_owner", "clean_leftovers", "try_claim"]

log = logging.getLogger(__name__)

CLAIM_PREFIX = ".cryodeploy-claim-"
#: outputs whose previews (``<stem>.png``) are written under the output's claim
_PREVIEW_OWNERS = (".mrc", ".mrcs")


class Claim:
    """An exclusive, process-lifetime lock on one output path; :meth:`release` removes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the claim file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _claim_path(output: Path) -> Path:
    return output.parent / (CLAIM_PREFIX + name_key(output.name))


def _claim_lines(claim: Path) -> list[str]:
    """The lines of a claim file (PID, output name); empty if unreadable or not yet written."""
    try:
        return claim.read_bytes().decode("utf-8", "surrogateescape").split("\n")[:2]
    except OSError:
        return []


def claim_owner(output: Path) -> str:
    """The PID written in ``output``'s claim file, or '?' if unreadable."""
    return (_claim_lines(_claim_path(output)) or [""])[0].strip() or "?"


def try_claim(output: str | os.PathLike[str], blocking: bool = False) -> Claim | None:
    """Claim ``output`` for this process; None if a live process holds it (unless ``blocking``)."""
    path = _claim_path(Path(output))
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{output}: cannot create claim file ({err.strerror or err})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:  # e.g. ENOSYS on Lustre mounted without -o flock
            os.close(fd)
            raise OutputError(
                f"{output}: cannot lock the claim file ({err.strerror or err}); the output folder's file "
                "system needs flock support (Lustre: mount with -o flock)"
            ) from err
        # the previous holder may have unlinked the file between our open and lock: retry on a fresh one
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode() + os.fsencode(Path(output).name) + b"\n")
            except OSError as err:  # e.g. a full disk: give the claim up and leave no empty claim file
                path.unlink(missing_ok=True)
                os.close(fd)
                raise OutputError(f"{output}: cannot create claim file ({err.strerror or err})") from err
            return Claim(path, fd)
        os.close(fd)


def _hashed_owners(key: str, outdir: Path) -> list[Path] | None:
    """Outputs whose claim covers a temporary file of hashed target ``key``, from the names that
    claim files record; None if a claim file is not yet readable (its owner is then unknown)."""
    owners = [outdir / key]
    for claim in outdir.glob(CLAIM_PREFIX + "*"):
        lines = _claim_lines(claim)
        if len(lines) < 2 or not lines[1]:
            return None
        name = lines[1]
        if key in (name_key(name), name_key(Path(name).stem + ".png")):
            owners.append(outdir / name)
    return owners


def _owners(name: str, outdir: Path) -> list[Path] | None:
    """Outputs whose claim covers a temporary file of target ``name`` (itself, or the output of a preview)."""
    if name.startswith("#"):
        return _hashed_owners(name, outdir)
    owners = [outdir / name]
    if name.endswith(".png"):
        stem = name[: -len(".png")]
        owners += [outdir / (stem + suffix) for suffix in _PREVIEW_OWNERS]
        owners += [
            outdir / c.name[len(CLAIM_PREFIX):]
            for c in outdir.glob(CLAIM_PREFIX + stem + ".*")
            if Path(c.name[len(CLAIM_PREFIX):]).stem == stem
        ]
    return list(dict.fromkeys(owners))


def clean_leftovers(outdir: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary and claim files of killed runs in ``outdir``; those of live processes stay.

    Returns the removed paths.
    """
    d = Path(outdir)
    removed = []
    for path in sorted(d.glob(CLAIM_PREFIX + "*")):
        claim = try_claim(d / path.name[len(CLAIM_PREFIX):])
        if claim is not None:  # its owner is gone (or it finished meanwhile): releasing removes the file
            claim.release()
            removed.append(path)
    for tmp in sorted(d.glob(TEMP_PREFIX + "*")):
        target = tmp.name[len(TEMP_PREFIX):].rsplit(".", 1)[0]
        claims = []
        owners = _owners(target, d)
        if owners is None:
            continue
        try:
            for owner in owners:
                c = try_claim(owner)
                if c is None:
                    break
                claims.append(c)
            else:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
                log.info("removed %s left by an interrupted run", tmp)
        finally:
            for c in claims:
                c.release()
    return removed
