"""The patch store: a directory of raw float32 patch files described by ``manifest.json``.

Layout (see docs/design.md, "Patch store")::

    STORE/manifest.json        {"format": "cryodeploy-patches/1", "patch": [H, W], "dtype": "float32",
                                "byte_order": "little", "splits": {"train": {"input": ..., "target": ...,
                                "count": N}, "test": {...}}, "normalization", "noise", "sources", ...}
    STORE/train_input.bin      N patches, float32 little-endian, sample-major, C order
    STORE/train_target.bin     (absent or null in the manifest for a split without targets)
    STORE/test_input.bin ...

A store of volumes has format ``cryodeploy-patches/2``, ``"ndim": 3``, ``"patch": [D, H, W]``.
This is the seeds' layout, so their raw files become a store by writing a manifest
(:mod:`cryodeploy.training.adopt`). Reading never loads a whole file: :meth:`PatchStore.read` uses
``os.preadv`` straight into the caller's buffer. A store without ``manifest.json`` is
incomplete; :class:`StoreWriter` writes the manifest last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import OutputError, StoreError
from cryodeploy.files import atomic_write
from cryodeploy.training.manifest import FORMAT, SPLITS, StoreManifest, format_for

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SPLITS",
    "WRITING",
    "PatchStore",
    "StoreWriter",
    "data_file_name",
    "held_out_mask",
]

log = logging.getLogger(__name__)

#: Name of the manifest file inside a store.
MANIFEST = "manifest.json"
#: Present while a :class:`StoreWriter` writes: its data files are not adoptable raw files.
WRITING = ".cryodeploy-writing"
_WHICH = ("input", "target")
_DTYPE = np.dtype("<f4")


def held_out_mask(k: int, fraction: float, seed: int, stream: int) -> np.ndarray:
    """Which of ``k`` units (micrographs) are held out: about ``k * fraction``, at least one and never
    all when ``fraction`` > 0 and ``k`` >= 2; deterministic in (k, fraction, seed, stream)."""
    n = 0 if fraction <= 0 or k < 2 else min(k - 1, max(1, round(k * fraction)))
    mask = np.zeros(k, dtype=bool)
    mask[np.random.default_rng([seed, stream]).permutation(k)[:n]] = True
    return mask


def data_file_name(split: str, which: str) -> str:
    """The seeds' data file name, e.g. ``train_input.bin``."""
    return f"{split}_{which}.bin"


def _data_files() -> list[str]:
    return [data_file_name(s, w) for s in SPLITS for w in _WHICH]


def _patch_shape(patch: int | Sequence[int]) -> tuple[int, ...]:
    shape = (int(patch), int(patch)) if isinstance(patch, int | np.integer) else tuple(int(p) for p in patch)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise StoreError(f"patch size {patch!r} invalid, expected a positive int, (H, W) or (D, H, W)")
    return shape


def _count_patches(f: Path, patch: tuple[int, ...], hint: str = "") -> int:
    """Whole patches in data file ``f``; refuses a size that is not a multiple of the patch bytes."""
    patch_bytes, size = math.prod(patch) * _DTYPE.itemsize, f.stat().st_size
    if size % patch_bytes:
        raise StoreError(
            f"{f}: size {size} bytes is not a multiple of the patch size "
            f"({patch_bytes} bytes = {'x'.join(map(str, patch))} float32){hint}"
        )
    return size // patch_bytes


def _load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise StoreError(f"{path}: no such patch store (expected a directory with {MANIFEST})")
    if not mpath.is_file():
        raw = [n for n in _data_files() if (path / n).exists()]
        hint = (
            f"; to use raw seeds-style files run `cryodeploy preprocess --adopt {path} --patch N`"
            if raw
            else ""
        )
        raise StoreError(f"{path}: no {MANIFEST} (an incomplete or raw patch store){hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{mpath}: not readable JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise StoreError(f"{mpath}: found a JSON {type(manifest).__name__}, expected an object")
    return manifest


class PatchStore:
    """A validated, read-only patch store.

    Opening checks the manifest (format, patch shape, dtype, byte order) and that every data
    file exists with exactly ``count`` patches; any problem is a one-line :class:`StoreError`.
    Reads are thread-safe (``pread`` on file descriptors opened once).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._manifest = _load_manifest(self.path)
        self._patch = self._validate()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _validate(self) -> tuple[int, ...]:
        from cryodeploy.files import validated

        where = self.path / MANIFEST
        manifest = validated(self._manifest, StoreManifest, where, StoreError)
        for entry in manifest.splits.values():
            for name in (entry.input, entry.target):
                if name is not None:
                    self._check_file(name, entry.count, manifest.patch, where)
        return manifest.patch

    def _check_file(self, name: str, count: int, patch: tuple[int, ...], where: Path) -> None:
        f = self.path / name
        if not f.is_file():
            raise StoreError(f"{f}: missing data file named in {MANIFEST}")
        found = _count_patches(f, patch)
        if found != count:
            raise StoreError(f"{f}: found {found} patches, expected {count} (the manifest's count)")

    @property
    def patch(self) -> tuple[int, ...]:
        """(H, W) of one patch, or (D, H, W) in a store of volumes."""
        return self._patch

    @property
    def ndim(self) -> int:
        """2 (images) or 3 (volumes)."""
        return len(self._patch)

    @property
    def patch_bytes(self) -> int:
        """Bytes of one patch in a data file."""
        return math.prod(self._patch) * _DTYPE.itemsize

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the parsed manifest."""
        return json.loads(json.dumps(self._manifest))

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits present, e.g. ("train", "test")."""
        return tuple(s for s in SPLITS if s in self._manifest["splits"])

    def _entry(self, split: str) -> dict[str, Any]:
        entry = self._manifest["splits"].get(split)
        if entry is None:
            raise StoreError(f"{self.path}: no split {split!r}, found {', '.join(self.splits)}")
        return entry  # type: ignore[no-any-return]

    def count(self, split: str) -> int:
        """Number of patches in ``split``."""
        return int(self._entry(split)["count"])

    def has_target(self, split: str) -> bool:
        """Whether ``split`` has a target file."""
        return self._entry(split).get("target") is not None

    def groups(self, split: str) -> list[tuple[int, int]] | None:
        """(first index, count) of each source image's patches in ``split``, or None if unknown."""
        sources = self._manifest.get("sources")
        if not sources or not all(isinstance(s, dict) and "start" in s for s in sources):
            return None
        return [(int(s["start"]), int(s["count"])) for s in sources if s.get("split") == split and s["count"]]

    def _fd(self, split: str, which: str) -> int:
        if which not in _WHICH:
            raise ValueError(f"which must be 'input' or 'target', got {which!r}")
        name = self._entry(split).get(which)
        if name is None:
            raise StoreError(f"{self.path}: split {split!r} has no {which} file")
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY)
            return fd

    def read(
        self,
        split: str,
        indices: Sequence[int] | np.ndarray,
        which: str = "input",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Patches ``indices`` (in that order) of ``split`` as float32 [n, H, W] ([n, D, H, W] for volumes).

        Consecutive indices are read with one call. ``out`` (C-contiguous float32 [n, *patch])
        is filled in place and returned, so a caller can read into a reused (pinned) buffer.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_split = self.count(split)
        if idx.size and (idx.min() < 0 or idx.max() >= n_split):
            raise IndexError(f"patch index out of range 0..{n_split - 1} of split {split!r}")
        shape = (idx.size, *self._patch)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
        fd, pb = self._fd(split, which), self.patch_bytes
        buf = out.reshape(-1).view(np.uint8).data
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(np.arange(idx.size), breaks):
            if run.size:
                self._pread(fd, buf[run[0] * pb : (run[-1] + 1) * pb], int(idx[run[0]]) * pb, split, which)
        return out

    def _pread(self, fd: int, view: memoryview, offset: int, split: str, which: str) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                name = self._entry(split)[which]
                raise StoreError(f"{self.path / name}: file shorter than its manifest says (truncated?)")
            done += n

    def close(self) -> None:
        """Close the data files (reads reopen them)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __reduce__(self) -> tuple[type[PatchStore], tuple[Path]]:
        return (PatchStore, (self.path,))

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        return f"PatchStore({str(self.path)!r}, patch={'x'.join(map(str, self._patch))}, {counts})"


def _write_manifest(store: Path, manifest: dict[str, Any]) -> None:
    with atomic_write(store / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def _base_manifest(patch: tuple[int, ...]) -> dict[str, Any]:
    return {
        "format": format_for(len(patch)),
        **({"ndim": len(patch)} if len(patch) != 2 else {}),
        "patch": list(patch),
        "dtype": "float32",
        "byte_order": "little",
        "splits": {},
        "created_by": f"cryodeploy {__version__}",
    }


class StoreWriter:
    """Builds a store by appending patches; :meth:`finish` writes the manifest last.

    Writes are positional: :meth:`reserve` claims the next slots of a split (one thread, in
    order) and :meth:`write_at` fills them from any thread, so patches can be written in parallel.

    Refuses a directory that already holds a store (complete or not) unless ``overwrite``,
    in which case the old manifest is removed first. On :meth:`abort` (or an exception inside
    a ``with`` block) the data files it created are removed. With ``targets=False`` the store holds
    inputs only (self-supervised training): targets are passed as None and no target file is written.
    """

    def __init__(
        self, path: str | os.PathLike[str], patch: int | Sequence[int], overwrite: bool = False,
        targets: bool = True,
    ) -> None:
        self.path = Path(path)
        self.patch = _patch_shape(patch)
        self.targets = targets
        names = _data_files()
        if (self.path / MANIFEST).exists() and not overwrite:
            raise OutputError(
                f"{self.path}: a patch store already exists here; use --overwrite to replace it"
            )
        if any((self.path / n).exists() for n in [*names, WRITING]) and not overwrite:
            raise OutputError(
                f"{self.path}: holds an incomplete patch store (no {MANIFEST}); use --overwrite to replace it"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / WRITING).write_text(f"{os.getpid()}\n")  # removed once the manifest is written
            (self.path / MANIFEST).unlink(missing_ok=True)
            for n in names:  # a stale file of the other kind (with or without targets) must not stay
                (self.path / n).unlink(missing_ok=True)
            kept = [data_file_name(s, w) for s in SPLITS for w in _WHICH if targets or w == "input"]
            self._files = {n: open(self.path / n, "wb", buffering=0) for n in kept}  # noqa: SIM115
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write the patch store ({err.strerror or err})") from err
        self.counts = dict.fromkeys(SPLITS, 0)

    def append(self, split: str, inputs: np.ndarray, targets: np.ndarray | None) -> None:
        """Append patches ``inputs``/``targets`` (each [n, *patch]) to ``split``."""
        self._check(inputs, targets)
        self.write_at(split, self.reserve(split, len(inputs)), inputs, targets)

    def reserve(self, split: str, n: int) -> int:
        """Claim the next ``n`` patch slots of ``split``; returns the first (see :meth:`write_at`)."""
        start = self.counts[split]
        self.counts[split] += n
        return start

    def write_at(self, split: str, start: int, inputs: np.ndarray, targets: np.ndarray | None) -> None:
        """Write patches ``inputs``/``targets`` (each [n, *patch]) to reserved slots ``start``... of
        ``split``; safe to call from several threads at once."""
        self._check(inputs, targets)
        if not 0 <= start <= start + inputs.shape[0] <= self.counts[split]:
            raise ValueError(f"slots {start}..{start + inputs.shape[0] - 1} of {split!r} were not reserved")
        offset = start * math.prod(self.patch) * _DTYPE.itemsize
        try:
            for which, arr in (("input", inputs), ("target", targets)):
                if arr is None:
                    continue
                data = np.ascontiguousarray(arr, dtype=_DTYPE).reshape(-1).view(np.uint8).data
                fd, done = self._files[data_file_name(split, which)].fileno(), 0
                while done < len(data):
                    written = os.pwrite(fd, data[done:], offset + done)
                    if written == 0:
                        raise OSError(errno.EIO, "the file accepted no bytes")
                    done += written
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write patches ({err.strerror or err})") from err

    def write_behind(self, split: str, start: int, n: int) -> None:
        """Hand slots ``start``... (``n``) of ``split``, written and not to be written again, to the
        disk now (the kernel's write-back of those bytes starts; what is on disk already leaves the
        page cache), so :meth:`finish`'s sync does not start all the writing at the end. Advisory:
        a no-op without ``posix_fadvise``, and on its errors."""
        if n <= 0 or not hasattr(os, "posix_fadvise"):
            return
        pb = math.prod(self.patch) * _DTYPE.itemsize
        for which in _WHICH:
            fh = self._files.get(data_file_name(split, which))
            if fh is None or fh.closed:
                continue
            with contextlib.suppress(OSError, ValueError):
                os.posix_fadvise(fh.fileno(), start * pb, n * pb, os.POSIX_FADV_DONTNEED)

    def _check(self, inputs: np.ndarray, targets: np.ndarray | None) -> None:
        if (targets is None) == self.targets:
            raise ValueError(f"targets {'missing' if self.targets else 'given'} for a store "
                             f"{'with' if self.targets else 'without'} targets")
        paired = inputs.shape if targets is None else targets.shape
        if inputs.shape != paired or inputs.shape[1:] != self.patch:
            raise ValueError(
                f"expected inputs and targets [n, {', '.join(map(str, self.patch))}], "
                f"got {inputs.shape} and {None if targets is None else targets.shape}"
            )

    def finish(self, **fields: Any) -> PatchStore:
        """Flush and sync the data, write the manifest (with ``fields`` added), return the store."""
        try:
            for fh in self._files.values():
                os.fsync(fh.fileno())
                fh.close()
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write patches ({err.strerror or err})") from err
        manifest = _base_manifest(self.patch)
        manifest["splits"] = {
            s: {
                "input": data_file_name(s, "input"),
                "target": data_file_name(s, "target") if self.targets else None,
                "count": self.counts[s],
            }
            for s in SPLITS
        }
        manifest.update(fields)
        _write_manifest(self.path, manifest)
        (self.path / WRITING).unlink(missing_ok=True)
        return PatchStore(self.path)

    def abort(self) -> None:
        """Close and delete the data files written so far (no manifest is written)."""
        for name, fh in self._files.items():
            fh.close()
            (self.path / name).unlink(missing_ok=True)
        (self.path / WRITING).unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
