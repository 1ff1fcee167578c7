"""The tomograms STAR side of the RELION 5 tomogram job (``cryodeploy_relion_tomo.py``): read a
tomograms STAR file verbatim, list its tomograms, write STAR and ``RELION_OUTPUT_NODES.star`` files.
Imported by that script (which puts this folder on ``sys.path``)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryodeploy_relion import NODES_FILE  # the micrograph job, in this folder

from cryodeploy.errors import InputError
from cryodeploy.files import atomic_write
from cryodeploy.io.tomopairs import HALF_COLUMNS, TOMOGRAM_COLUMN

__all__ = ["DEFAULT_STAR_VERSION", "DENOISED_COLUMN", "NODE_LABEL_TOMOGRAMS", "SOURCES", "TOMO_DIR",
           "Tomogram", "TomogramStar", "plan_tomograms", "read_tomogram_star", "write_output_nodes",
           "write_star"]

#: where the denoised tomograms go in the job folder, as ``rec_<rlnTomoName>.mrc`` (RELION 5's Denoise job)
TOMO_DIR = "tomograms"
#: the column RELION 5's Denoise job adds and its tomogram picker displays
DENOISED_COLUMN = "rlnTomoReconstructedTomogramDenoised"
#: RELION 5 node type label of a tomograms STAR file (LABEL_TOMOGRAMS_CPIPE)
NODE_LABEL_TOMOGRAMS = "TomogramGroupMetadata.star.relion"
#: the ``# version`` line RELION 5 writes (kept from the input when it has one)
DEFAULT_STAR_VERSION = 50001
SOURCES = ("auto", "halves", "tomogram")
_VERSION_RE = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)


@dataclass
class TomogramStar:
    """A tomograms STAR file: its tables in file order, every value kept as the text it was."""

    path: Path
    blocks: dict[str, Any]  # block name -> pandas.DataFrame
    table: str  # the block holding rlnTomoName ("global" in RELION 5)
    version: int | None


@dataclass(frozen=True)
class Tomogram:
    """One row: its name, the volumes to denoise (two halves, or the tomogram), the output, and the
    voxel size the STAR file gives (rlnTomoTiltSeriesPixelSize x rlnTomoTomogramBinning), if any."""

    name: str
    inputs: tuple[Path, ...]
    output: Path
    voxel_size: float | None = None


def read_tomogram_star(path: str | os.PathLike[str]) -> TomogramStar:
    """Read a RELION 5 tomograms STAR file (the ``global`` table with ``rlnTomoName``)."""
    import pandas as pd
    import starfile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file, expected a RELION 5 tomograms STAR file")
    try:
        first = starfile.read(p, always_dict=True)
        columns = sorted({c for b in first.values() if isinstance(b, pd.DataFrame) for c in b.columns})
        blocks = starfile.read(p, always_dict=True, parse_as_string=columns)  # values back verbatim
    except Exception as err:  # starfile raises many types on malformed input
        raise InputError(f"{p}: not a readable STAR file ({type(err).__name__}: {err})") from err
    tables = {n: b for n, b in blocks.items() if isinstance(b, pd.DataFrame)}
    for name, block in tables.items():
        if "rlnTomoName" in block.columns:
            version = _VERSION_RE.search(p.read_text(errors="replace"))
            return TomogramStar(p, dict(blocks), name, int(version.group(1)) if version else None)
    if any("rlnMicrographName" in b.columns for b in tables.values()):
        raise InputError(f"{p}: found a micrographs STAR file (rlnMicrographName), expected a RELION 5 "
                         "tomograms STAR file with rlnTomoName (micrographs: use cryodeploy_relion.py)")
    raise InputError(f"{p}: found no table with rlnTomoName, expected a RELION 5 tomograms STAR file")


def _number(value: str, column: str, star: Path, row: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{star}: {column} of {row} is {value!r}, expected a number") from None


def plan_tomograms(star: TomogramStar, source: str, project_dir: Path, outdir: Path) -> list[Tomogram]:
    """The tomograms to denoise, with absolute input and output paths (inputs relative to the
    project directory, as RELION resolves them); bad tables are an :class:`InputError`."""
    table = star.blocks[star.table]
    cols, p = set(table.columns), star.path
    halves = [c for c in HALF_COLUMNS if c in cols]
    if len(halves) == 1:
        missing = set(HALF_COLUMNS).difference(halves).pop()
        raise InputError(f"{p}: found {halves[0]} without {missing}, expected both half tomogram columns")
    if source == "auto":
        source = "halves" if halves else "tomogram"
    columns = list(HALF_COLUMNS) if source == "halves" else [TOMOGRAM_COLUMN]
    for c in columns:
        if c not in cols:
            raise InputError(f"{p}: found no {c} column, expected it with --source {source}")
    if table.empty:
        raise InputError(f"{p}: table {star.table or '(unnamed)'} lists no tomograms")
    tomos: list[Tomogram] = []
    seen: set[str] = set()
    for _, row in table.iterrows():
        name = str(row["rlnTomoName"])
        if not name or "/" in name or name in (".", "..") or name in seen:
            why = "appears twice" if name in seen else "is not a file name"
            raise InputError(f"{p}: rlnTomoName {name!r} {why}, expected unique names such as TS_01")
        seen.add(name)
        size = None
        if "rlnTomoTiltSeriesPixelSize" in cols:
            size = _number(row["rlnTomoTiltSeriesPixelSize"], "rlnTomoTiltSeriesPixelSize", p, name)
            if "rlnTomoTomogramBinning" in cols:
                size *= _number(row["rlnTomoTomogramBinning"], "rlnTomoTomogramBinning", p, name)
        inputs = tuple(Path(os.path.normpath(project_dir / str(row[c]))) for c in columns)
        tomos.append(Tomogram(name, inputs, outdir / TOMO_DIR / f"rec_{name}.mrc", size))
    return tomos


def write_star(blocks: dict[str, Any], version: int, target: Path, protect: Sequence[Path]) -> None:
    """Write ``blocks`` atomically, each table after RELION's ``# version`` line."""
    import starfile

    with atomic_write(target, protect=tuple(protect)) as tmp:
        chunks = []
        for name, block in blocks.items():
            starfile.write({name: block}, tmp, overwrite=True)
            text = tmp.read_text()
            chunks.append(f"# version {version}\n\n" + text[text.index("data_"):])  # no "# Created by"
        tmp.write_text("\n".join(chunks))


def write_output_nodes(outdir: Path, nodes: Sequence[tuple[str, str]], version: int) -> Path:
    """``outdir/RELION_OUTPUT_NODES.star`` declaring each (name, RELION 5 type label)."""
    import pandas as pd

    table = pd.DataFrame({"rlnPipeLineNodeName": [n for n, _ in nodes],
                          "rlnPipeLineNodeTypeLabel": [t for _, t in nodes]})
    target = outdir / NODES_FILE
    write_star({"output_nodes": table}, version, target, ())
    return target
