"""The tomogram part of the HTML report: how each tomogram was split (and against which clean
volume), signal error and power ratio per frequency band (tables and plots)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from cryodeploy.evaluation.splitreport import _band_table, _plot_bands

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
    notes = "".join(f"<li>{html.escape(k.replace('_', ' '))}: {html.escape(v)}.</li>"
                    for k, v in result["notes"].items())
    return (f"<h2>Tomograms</h2>{_tomograms_table(result)}"
            f"<h2>Signal error per frequency band (relative to identity)</h2>"
            f"{_band_table(result, 'band_error', result['bands']['names'], 'band-error-table')}"
            f"<h2>Power of f(x) relative to x per band</h2>"
            f"{_band_table(result, 'power_ratio', result['bands']['power_names'], 'power-ratio-table')}"
            f'<img class="plot" src="{_plot_bands(out, result)}" alt="per-band plots">'
            f"<ul>{notes}</ul>")
