"""Expand what the user names as inputs (files, quoted globs, directories, RELION micrograph STAR
files) into an ordered, de-duplicated list of micrograph paths."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from cryodeploy.errors import InputError

__all__ = ["MICROGRAPH_SUFFIXES", "expand_inputs", "read_star_micrographs"]

#: File name endings taken from a directory.
MICROGRAPH_SUFFIXES = (".mrc", ".mrcs")


def _relion_project(star: Path) -> Path | None:
    """The project folder of a STAR file inside a RELION job folder (``PROJECT/Type/jobNNN/x.star``)."""
    parents = star.resolve().parents
    return parents[2] if len(parents) > 2 and re.fullmatch(r"job\d+", parents[0].name) else None


def _resolve_star_path(name: str, star: Path, project_dir: Path | None) -> Path:
    """RELION paths are relative to the project directory; find it if not given.

    Tried in order: ``project_dir`` (or the working directory), then each parent of the STAR file.
    A file found nowhere is named as RELION would resolve it: under ``project_dir``, else the
    project of the job folder holding the STAR file, else the working directory.
    """
    p = Path(name)
    if p.is_absolute():
        return p
    bases = [project_dir or Path.cwd(), *star.resolve().parents]
    for base in bases:
        if (base / p).exists() or (base / p).is_symlink():
            return base / p
    return (project_dir or _relion_project(star) or Path.cwd()) / p


def read_star_micrographs(star: str | os.PathLike[str], project_dir: Path | None = None) -> list[Path]:
    """Micrograph paths (``rlnMicrographName``) of a RELION 3.0-5 micrographs STAR file."""
    import starfile

    s = Path(star)
    try:
        blocks = starfile.read(s, always_dict=True)
    except Exception as err:  # starfile raises many types on malformed input
        raise InputError(f"{s}: not a readable STAR file ({type(err).__name__}: {err})") from err
    for block in blocks.values():
        if hasattr(block, "columns") and list(block.columns).count("rlnMicrographName") > 1:
            raise InputError(f"{s}: duplicate rlnMicrographName column, expected one")
        if hasattr(block, "columns") and "rlnMicrographName" in block.columns:
            return [_resolve_star_path(str(n), s, project_dir) for n in block["rlnMicrographName"]]
    raise InputError(f"{s}: no table with rlnMicrographName, expected a RELION micrographs STAR file")


def expand_inputs(
    items: list[str] | tuple[str, ...], project_dir: Path | None = None,
    suffixes: tuple[str, ...] = MICROGRAPH_SUFFIXES,
) -> list[Path]:
    """Expand files, globs, directories (their files ending in one of ``suffixes``, by default
    ``.mrc``/``.mrcs``; movies add ``.tif``/``.tiff``) and ``.star`` files, keeping order.

    A name that matches nothing is an :class:`InputError`; duplicates are dropped.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.absolute()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.suffix.lower() == ".star" and p.is_file():
            for m in read_star_micrographs(p, project_dir):
                add(m)
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in suffixes and q.is_file())
            if not found:
                endings = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
                raise InputError(f"{p}: directory holds no {endings} files")
            for q in found:
                add(q)
        elif p.exists() or p.is_symlink():
            add(p)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"{item}: pattern matches no files")
            for match in matches:
                add(Path(match))
        else:
            raise InputError(f"{p}: no such file")
    return out
