"""The split-evaluation part of the HTML report: how each micrograph was split, signal error and
power ratio per frequency band (tables and plots)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bands_section", "split_section"]

#: Values below this (a band error can be slightly negative: it is an estimate) are drawn at it.
FLOOR = 1e-3


def _cell(v: float | None, fmt: str = "{:.3f}") -> str:
    return "<td>n/a</td>" if v is None else f"<td>{fmt.format(v)}</td>"


def _band_table(result: dict[str, Any], key: str, names: list[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(_cell(v) for v in r[key]) + "</tr>"
                   for m, r in result["methods"].items())
    return f'<table id="{table_id}"><tr><th>method</th>{head}</tr>{rows}</table>'


def _splits_table(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['split'])}</td>"
        f"{_cell(s['gain'], '{:.4g}')}{_cell(s['frc_mid'], '{:+.3f}')}{_cell(s['frc_outer'], '{:+.3f}')}"
        f"{_cell(s['independence_threshold'], '{:.3f}')}</tr>" for s in result["splits"])
    return ('<table id="splits-table"><tr><th>micrograph</th><th>split</th><th>gain</th>'
            "<th>raw-halves FRC, 1/4-3/8 cycles/px</th><th>raw-halves FRC, 3/8-1/2 cycles/px</th>"
            f"<th>independence bound |FRC|</th></tr>{rows}</table>")


def _plot_bands(out: Path, result: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    f, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    panels = ((axes[0], "band_error", result["bands"]["names"],
               f"signal error per band relative to identity (1 = input, lower is better; floor {FLOOR:g})"),
              (axes[1], "power_ratio", result["bands"]["power_names"],
               "power of f(x) / power of x per band (1 = unchanged)"))
    for ax, key, names, title in panels:
        x = np.arange(len(names))
        for i, (name, m) in enumerate(result["methods"].items()):
            if name == "constant" and key == "band_error":
                continue  # its low-band error (all the signal) would squash the others
            vals = [np.nan if v is None else max(v, FLOOR) for v in m[key]]
            ax.plot(x, vals, "o-", label=name, color=f"C{i % 10}", linewidth=2.2 if name == "model" else 1.2)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, names, rotation=15)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    f.savefig(out / "bands.png", dpi=100, bbox_inches="tight")
    plt.close(f)
    return "bands.png"


def split_section(out: Path, result: dict[str, Any]) -> str:
    """HTML of the split tables and the per-band plot (written into ``out``)."""
    return f"<h2>Splits</h2>{_splits_table(result)}{bands_section(out, result)}"


def bands_section(out: Path, result: dict[str, Any]) -> str:
    """HTML of the per-band tables, their plot (written into ``out``) and the notes of a split
    evaluation (micrographs or tomograms)."""
    notes = "".join(f"<li>{html.escape(k.replace('_', ' '))}: {html.escape(v)}.</li>"
                    for k, v in result["notes"].items())
    return (f"<h2>Signal error per frequency band (relative to identity)</h2>"
            f"{_band_table(result, 'band_error', result['bands']['names'], 'band-error-table')}"
            f"<h2>Power of f(x) relative to x per band</h2>"
            f"{_band_table(result, 'power_ratio', result['bands']['power_names'], 'power-ratio-table')}"
            f'<img class="plot" src="{_plot_bands(out, result)}" alt="per-band plots">'
            f"<ul>{notes}</ul>")
