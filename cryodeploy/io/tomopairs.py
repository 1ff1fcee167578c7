"""Find even/odd tomogram pairs (the usual Noise2Noise input of cryo-ET) and single tomograms.

Three ways to name pairs:

- file names: ``NAME_even.mrc`` / ``NAME_odd.mrc``, ``NAME_EVN.mrc`` / ``NAME_ODD.mrc`` (AreTomo3),
  ``NAME.even.mrc`` / ``NAME.odd.mrc`` (any case, any volume ending) — :func:`pair_by_name`;
- two folders holding the same file names (cryoCARE, Warp's ``even``/``odd``) — :func:`pair_folders`;
- a RELION 5 tomograms STAR file: ``rlnTomoReconstructedTomogramHalf1`` / ``Half2`` per
  tomogram (or only ``rlnTomoReconstructedTomogram``: single tomograms) — :func:`read_star_tomograms`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryodeploy.errors import InputError
from cryodeploy.io.inputs import _resolve_star_path, expand_inputs
from cryodeploy.io.volumes import VOLUME_SUFFIXES

__all__ = [
    "HALF_COLUMNS",
    "TOMOGRAM_COLUMN",
    "TomoPair",
    "expand_tomograms",
    "pair_by_name",
    "pair_folders",
    "read_star_tomograms",
]

#: RELION 5 columns of the even and odd half tomograms (tomograms.star, ``global`` table).
HALF_COLUMNS = ("rlnTomoReconstructedTomogramHalf1", "rlnTomoReconstructedTomogramHalf2")
#: RELION 5 column of the full tomogram.
TOMOGRAM_COLUMN = "rlnTomoReconstructedTomogram"
_HALF = re.compile(r"^(?P<stem>.+?)[._-](?P<half>even|odd|evn)$", re.IGNORECASE)


@dataclass(frozen=True)
class TomoPair:
    """One tomogram: ``even`` (or the only one) and ``odd`` (None for a single tomogram)."""

    name: str
    even: Path
    odd: Path | None = None


def _split_name(p: Path) -> tuple[str, str] | None:
    """(stem, 'even' | 'odd') of a half's file name, or None."""
    m = _HALF.match(p.name[: -len(p.suffix)] if p.suffix else p.name)
    if m is None:
        return None
    half = m["half"].lower()
    return m["stem"], "even" if half in ("even", "evn") else "odd"


def pair_by_name(paths: Sequence[str | os.PathLike[str]]) -> list[TomoPair]:
    """Pair halves named ``NAME_even`` / ``NAME_odd`` (see the module); every path must be a half
    and every half needs its partner, in the same folder. Pairs keep the order of the even halves."""
    found: dict[tuple[Path, str], dict[str, Path]] = {}
    for p in map(Path, paths):
        parts = _split_name(p)
        if parts is None:
            raise InputError(
                f"{p}: found no even/odd half in the name, expected NAME_even{p.suffix} / NAME_odd{p.suffix} "
                "(or _EVN/_ODD)"
            )
        halves = found.setdefault((p.parent, parts[0]), {})
        if parts[1] in halves:
            raise InputError(f"{p}: a second {parts[1]} half of {parts[0]!r} (first: {halves[parts[1]]})")
        halves[parts[1]] = p
    pairs = []
    for (_, stem), halves in found.items():
        for have, need in (("even", "odd"), ("odd", "even")):
            if need not in halves:
                raise InputError(f"{halves[have]}: found no {need} half beside it, expected a pair")
        pairs.append(TomoPair(stem, halves["even"], halves["odd"]))
    return pairs


def pair_folders(even_dir: str | os.PathLike[str], odd_dir: str | os.PathLike[str]) -> list[TomoPair]:
    """Pair the volumes of ``even_dir`` with the files of the same name in ``odd_dir`` (sorted by name)."""
    e, o = Path(even_dir), Path(odd_dir)
    for d in (e, o):
        if not d.is_dir():
            raise InputError(f"{d}: no such directory, expected a folder of half tomograms")
    evens = sorted(q for q in e.iterdir() if q.suffix.lower() in VOLUME_SUFFIXES and q.is_file())
    if not evens:
        raise InputError(f"{e}: directory holds no {', '.join(VOLUME_SUFFIXES)} files")
    pairs = []
    for q in evens:
        partner = o / q.name
        if not partner.is_file():
            raise InputError(
                f"{partner}: no such file, expected the odd half of {q} (pairs match by file name)"
            )
        pairs.append(TomoPair(q.name[: -len(q.suffix)], q, partner))
    extra = sorted(
        {q.name for q in o.iterdir() if q.suffix.lower() in VOLUME_SUFFIXES} - {q.name for q in evens}
    )
    if extra:
        raise InputError(f"{o / extra[0]}: found no even half in {e}, expected pairs of the same names")
    return pairs


def read_star_tomograms(star: str | os.PathLike[str], project_dir: Path | None = None) -> list[TomoPair]:
    """The tomograms of a RELION 5 tomograms STAR file: even/odd pairs from the half columns when
    both are present, else the single tomograms of ``rlnTomoReconstructedTomogram``."""
    import starfile

    s = Path(star)
    try:
        blocks = starfile.read(s, always_dict=True)
    except Exception as err:  # starfile raises many types on malformed input
        raise InputError(f"{s}: not a readable STAR file ({type(err).__name__}: {err})") from err
    for block in blocks.values():
        cols = list(getattr(block, "columns", []))
        names = [str(n) for n in block["rlnTomoName"]] if "rlnTomoName" in cols else None
        if all(c in cols for c in HALF_COLUMNS):
            evens, odds = (block[c] for c in HALF_COLUMNS)
            return [
                TomoPair(
                    names[i] if names else Path(str(a)).stem,
                    _resolve_star_path(str(a), s, project_dir),
                    _resolve_star_path(str(b), s, project_dir),
                )
                for i, (a, b) in enumerate(zip(evens, odds, strict=True))
            ]
        one = [c for c in HALF_COLUMNS if c in cols]
        if one:
            raise InputError(
                f"{s}: found {one[0]} without {set(HALF_COLUMNS).difference(one).pop()}, "
                "expected both half tomogram columns"
            )
        if TOMOGRAM_COLUMN in cols:
            return [
                TomoPair(names[i] if names else Path(str(a)).stem, _resolve_star_path(str(a), s, project_dir))
                for i, a in enumerate(block[TOMOGRAM_COLUMN])
            ]
    raise InputError(
        f"{s}: no table with {TOMOGRAM_COLUMN} or {HALF_COLUMNS[0]}/{HALF_COLUMNS[1]}, "
        "expected a RELION 5 tomograms STAR file"
    )


def expand_tomograms(
    items: Sequence[str], even_odd: bool = False, project_dir: Path | None = None
) -> list[TomoPair]:
    """Tomograms named by files, globs, folders (their .mrc/.rec/.map files) and RELION 5 tomograms
    STAR files (pairs when they name both halves); with ``even_odd`` the files are paired by
    name (:func:`pair_by_name`). Mixing pairs and single tomograms is refused."""
    pairs: list[TomoPair] = []
    files: list[Path] = []
    for item in items:
        if Path(item).suffix.lower() == ".star" and Path(item).is_file():
            pairs += read_star_tomograms(item, project_dir)
        else:
            files += expand_inputs([item], project_dir, suffixes=VOLUME_SUFFIXES)
    pairs += (
        pair_by_name(files) if even_odd else [TomoPair(p.name[: -len(p.suffix)] or p.name, p) for p in files]
    )
    if not pairs:
        raise InputError("no input tomograms given")
    halves = {p.odd is not None for p in pairs}
    if len(halves) > 1:
        single = next(p for p in pairs if p.odd is None)
        raise InputError(f"{single.even}: a single tomogram among even/odd pairs, expected all pairs or none")
    return pairs
