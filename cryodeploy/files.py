"""The ground floor of file handling: atomic writes, temporary names, content hashes, the cache folder."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from cryodeploy.errors import OutputError

__all__ = [
    "CACHE_ENV", "TEMP_PREFIX", "atomic_write", "cache_root", "file_sha256", "new_folders_removed_if_empty",
]

#: Temporary files of atomic writes start with this, so a crashed run's leftovers are recognisable.
TEMP_PREFIX = ".cryodeploy-tmp-"
#: environment variable overriding the cache folder
CACHE_ENV = "CRYODEPLOY_CACHE"


def _temp_path(target: Path) -> Path:
    """Create a new empty file beside ``target`` with the usual permissions (0666 less the umask)."""
    for _ in range(100):
        tmp = target.parent / f"{TEMP_PREFIX}{target.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str], protect: tuple[str | os.PathLike[str], ...] = ()
) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it is fsynced and renamed onto ``target``.

    On any exception the temp file is removed and ``target`` is untouched. ``protect`` lists
    files (the inputs) that must never be replaced.
    """
    t = Path(target)
    for src in map(Path, protect):
        same = t.exists() and src.exists() and os.path.samefile(t, src)
        if same or t.resolve() == src.resolve():
            raise OutputError(f"{t}: refusing to overwrite an input file")
    try:
        tmp = _temp_path(t)
    except OSError as err:
        raise OutputError(f"{t}: cannot write ({err.strerror or err})") from err
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, t)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{t}: cannot write ({err.strerror or err})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def new_folders_removed_if_empty(*folders: str | os.PathLike[str]) -> Iterator[None]:
    """On leaving, remove those of ``folders`` that did not exist on entry and are empty (deepest
    first), so a run that wrote nothing (all inputs failed, or an error) leaves no empty folder."""
    created: list[Path] = []
    for folder in map(Path, folders):
        p = folder.absolute()
        while not p.exists() and p != p.parent:
            created.append(p)
            p = p.parent
    try:
        yield
    finally:
        for p in sorted(set(created), key=lambda q: len(q.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                p.rmdir()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root(kind: str) -> Path:
    """The cache folder for ``kind`` (e.g. ``"onnx"``), created if missing.

    ``$CRYODEPLOY_CACHE/<kind>`` if that variable is set, else ``~/.cache/cryodeploy/<kind>``.
    """
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "cryodeploy"
    folder = root / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or err
        raise OutputError(f"{folder}: cannot create the cache folder ({reason}); set {CACHE_ENV}") from err
    return folder
