"""The tomogram part of the HTML report: how each tomogram was split (and against which clean
volume), signal error and power ratio per frequency band (tables and plots)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from cryodeploy.evaluation.splitreport import bands_section

__all__ = ["volume_section"]


def _tomograms_table(result: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "<td>n/a</td>" if v is None else f"<td>{html.escape(str(v))}</td>"

    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td>{cell(s['split'])}{cell(' x '.join(map(str, s['shape'])))}"
        f"{cell(s['voxel_size'])}{cell(s['even'])}{cell(s['odd'])}{cell(s['clean'])}</tr>"
        for s in result["splits"])
    return ('<table id="tomograms-table"><tr><th>tomogram</th><th>halves</th><th>shape (z x y x x)</th>'
            "<th>voxel size (A)</th><th>even (or only) file</th><th>odd file</th><th>clean volume</th></tr>"
            f"{rows}</table>")


def volume_section(out: Path, result: dict[str, Any]) -> str:
    """HTML of the tomogram tables and the per-band plot (written into ``out``)."""
    return f"<h2>Tomograms</h2>{_tomograms_table(result)}{bands_section(out, result)}"
