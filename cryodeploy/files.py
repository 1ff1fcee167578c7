"""The ground floor of file handling: atomic writes, temporary names, content hashes, the cache folder."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from cryodeploy.errors import CryoDeployError, OutputError, one_line

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["CACHE_ENV", "NAME_KEY_MAX", "TEMP_PREFIX", "StagedWrite", "atomic_write", "cache_root",
           "file_sha256", "name_key", "new_folders_removed_if_empty", "open_regular", "read_document",
           "read_json", "seal", "seal_problem", "staged_writes", "validated"]

#: Temporary files of atomic writes start with this, so a crashed run's leftovers are recognisable.
TEMP_PREFIX = ".cryodeploy-tmp-"
#: environment variable overriding the cache folder
CACHE_ENV = "CRYODEPLOY_CACHE"


#: longest file name (bytes) kept as is inside temporary and claim names; longer ones are hashed
NAME_KEY_MAX = 200
#: a JSON file larger than this is refused before it is read (configs, sidecars, layers.json)
JSON_MAX_BYTES = 16 << 20
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def name_key(name: str) -> str:
    """``name`` itself, or ``#`` + its sha256 if it is too long (NAME_KEY_MAX bytes) to carry a prefix
    and suffix within the 255-byte limit of a file name (temporary and claim names use it)."""
    raw = os.fsencode(name)
    return name if len(raw) <= NAME_KEY_MAX else "#" + hashlib.sha256(raw).hexdigest()[:40]


def _temp_path(target: Path) -> Path:
    """Create a new empty file beside ``target`` with the usual permissions (0666 less the umask)."""
    for _ in range(100):
        tmp = target.parent / f"{TEMP_PREFIX}{name_key(target.name)}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


@dataclass(frozen=True)
class StagedWrite:
    """A finished, closed temporary file that becomes ``target`` on :meth:`commit`."""

    tmp: Path
    target: Path

    def commit(self, fsync: bool = True) -> None:
        """fsync the temporary file (unless not ``fsync``) and rename it onto the target; on failure it
        is removed (:class:`OutputError` for an OS error) and the target is untouched. Without the
        fsync the target is still complete for every reader and after a crash of the process, but a
        power loss or kernel crash may leave it empty or short."""
        try:
            if fsync:
                with open(self.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(self.tmp, self.target)
        except OSError as err:
            self.discard()
            raise OutputError(f"{self.target}: cannot write ({err.strerror or err})") from err
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary file; the target is untouched."""
        self.tmp.unlink(missing_ok=True)


def commit_all(staged: list[StagedWrite], fsync: bool = True) -> None:
    """:meth:`~StagedWrite.commit` each of ``staged`` in order; if one fails, the rest are discarded
    and its error is raised."""
    for k, write in enumerate(staged):
        try:
            write.commit(fsync)
        except BaseException:
            for rest in staged[k + 1:]:
                rest.discard()
            raise


_staging = threading.local()


@contextlib.contextmanager
def staged_writes() -> Iterator[list[StagedWrite]]:
    """Within this block, each :func:`atomic_write` of this thread leaves its finished temporary file
    staged instead of committing it: the yielded list gets one :class:`StagedWrite` per write, in
    order, for the caller to :meth:`~StagedWrite.commit` (e.g. on another thread, so the fsync waits
    there). An exception in the block discards every staged file."""
    outer = getattr(_staging, "writes", None)
    staged: list[StagedWrite] = []
    _staging.writes = staged
    try:
        yield staged
    except BaseException:
        for write in staged:
            write.discard()
        raise
    finally:
        _staging.writes = outer


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str], protect: tuple[str | os.PathLike[str], ...] = ()
) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it is fsynced and renamed onto ``target``
    (inside :func:`staged_writes`: staged for the caller to commit).

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
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{t}: cannot write ({err.strerror or err})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write = StagedWrite(tmp, t)
    staged = getattr(_staging, "writes", None)
    if staged is None:
        write.commit()
    else:
        staged.append(write)


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


@contextlib.contextmanager
def open_regular(
    path: str | os.PathLike[str], error: type[CryoDeployError]
) -> Iterator[tuple[IO[bytes], int]]:
    """Open a regular file for reading and yield it with its size; ``error`` for anything else.

    The file is opened without blocking, so a named pipe or device is refused, not waited on.
    A missing file raises :class:`FileNotFoundError` (callers word that case themselves).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(f"{p}: symbolic link loop") from err
        raise error(f"{p}: cannot read ({err.strerror or err})") from err
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        for test, kind in _KINDS:
            if test(mode):
                raise error(f"{p}: not a regular file (found {kind})")
        os.set_blocking(fd, True)
        yield fh, os.fstat(fd).st_size


def read_json(path: str | os.PathLike[str], error: type[CryoDeployError], max_bytes: int = JSON_MAX_BYTES
              ) -> Any:
    """Parse a JSON file; ``error`` (one line naming the file) for a special file, a file over
    ``max_bytes``, bytes that are not UTF-8 JSON, or nesting too deep to parse."""
    with open_regular(path, error) as (fh, size):
        if size > max_bytes:
            raise error(f"{path}: found {size} bytes, expected a JSON file of at most {max_bytes}")
        raw = fh.read(max_bytes + 1)
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise error(f"{path}: not valid JSON (nested too deeply)") from err


_Schema = TypeVar("_Schema", bound="BaseModel")
#: longest repr of a wrong value quoted in a validation error
_FOUND_MAX = 80


def validated(data: Any, schema: type[_Schema], where: str | os.PathLike[str],
              error: type[CryoDeployError]) -> _Schema:
    """``data`` (a parsed JSON document) checked against the pydantic model ``schema``; its first
    problem is one ``error`` naming ``where`` and the field: "<where>: found <field> X, expected Y"."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise error(f"{where}: {one_line(_problem(err.errors(include_url=False)[0]))}") from None


def read_document(path: Path, schema: type[_Schema], error: type[CryoDeployError], missing: str) -> _Schema:
    """The JSON object in ``path`` (:func:`read_json`) checked against ``schema`` (:func:`validated`);
    ``error`` naming ``path`` when it is missing (``missing`` says what needs it), not an object,
    or invalid."""
    try:
        data = read_json(path, error)
    except FileNotFoundError as err:
        raise error(f"{path}: missing ({missing})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: found {type(data).__name__}, expected a JSON object")
    return validated(data, schema, path, error)


def _problem(detail: Any) -> str:
    """One pydantic error detail as "found <field> X, expected Y" (a validator's own sentence as is)."""
    field = ".".join(str(p) for p in detail["loc"]) or "document"
    kind, ctx = detail["type"], detail.get("ctx") or {}
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "missing":
        return f"found no {field!r}, expected one"
    if kind == "extra_forbidden":
        return f"found unknown field {field!r}"
    found = repr(detail["input"])
    found = found if len(found) <= _FOUND_MAX else found[:_FOUND_MAX] + "..."
    if kind in ("too_short", "too_long"):
        bound = ctx["min_length"] if kind == "too_short" else ctx["max_length"]
        expected = f"{'at least' if kind == 'too_short' else 'at most'} {bound} item{'s' * (bound != 1)}"
    else:
        msg = detail["msg"].removeprefix("Input should be ")
        expected = ctx["expected"] if kind == "literal_error" else msg[:1].lower() + msg[1:]
    return f"found {field} {found}, expected {expected}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _seal_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".sha256")


def seal(entry: str | os.PathLike[str]) -> Path:
    """Record the sha256 of a finished cache file beside it (``<name>.sha256``), for :func:`seal_problem`."""
    p = Path(entry)
    with atomic_write(_seal_path(p)) as tmp:
        tmp.write_text(file_sha256(p) + "\n")
    return p


def seal_problem(entry: str | os.PathLike[str]) -> str | None:
    """Why a cache file must not be served (no seal, unreadable, content changed), or None if it is intact."""
    p = Path(entry)
    try:
        want = _seal_path(p).read_text().strip()
        found = file_sha256(p)
    except FileNotFoundError as err:
        return f"{err.filename} missing"
    except OSError as err:
        return f"cannot read it ({err.strerror or err})"
    return None if found == want else f"its sha256 {found[:12]}... differs from the recorded {want[:12]}..."


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
