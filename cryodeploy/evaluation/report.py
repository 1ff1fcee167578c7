"""Plots and the HTML page of an evaluation (``index.html`` + PNGs beside ``metrics.json``).

The page records, in ``<body data-images-loaded data-images-total>``, how many of its images
loaded, so a headless browser can check that the report is whole.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Figures", "pick_crop", "write_report"]

#: (metrics.json key, column title, format) of the metrics table; columns absent in the data are left out.
COLUMNS = (
    ("split_gain_db", "split gain (dB)", "{:.2f}"), ("split_gain_sd_db", "split gain sd (dB)", "{:.2f}"),
    ("split_error", "split error E", "{:.4f}"),
    ("change", "change RMS(f(x)-x)/std(x)", "{:.3f}"), ("residual_spread", "residual spread", "{:.3f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("mse", "MSE", "{:.4g}"),
    ("rmse", "RMSE", "{:.4g}"), ("corr", "corr", "{:.4f}"), ("corr_input", "corr with input", "{:.4f}"),
    ("mean_shift", "mean shift (std)", "{:+.3f}"), ("std_ratio", "std ratio", "{:.3f}"),
    ("flat_noise", "flat-region noise", "{:.4g}"),
    ("flat_noise_ratio", "flat noise / input", "{:.3f}"), ("frc_0.5", "resolution at FRC 0.5", "{:.2f}"),
    ("frc_0.143", "resolution at FRC 0.143", "{:.2f}"), ("fsc_0.143", "resolution at FSC 0.143", "{:.2f}"),
    ("fsc_half_bit", "resolution at FSC half-bit", "{:.2f}"), ("seconds", "seconds", "{:.2f}"),
)
_CAPTIONS = {"identity": "identity (the noisy input)", "clean": "clean (target)"}
_LOAD_CHECK = """<script>
/* self-check: record how many images loaded, for headless-browser tests */
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesLoaded = String(imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length);
});
</script>"""
_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.flags{background:#fdd;border:2px solid #c00;padding:.5em 1em}
.ok{background:#dfd;border:1px solid #0a0;padding:.5em 1em}
.warn{background:#ffd;border:1px solid #a80;padding:.5em 1em;margin-top:.5em}
.crops{display:flex;flex-wrap:wrap;gap:8px}
.crops figure{margin:0}.crops img{image-rendering:pixelated}figcaption{font-size:90%;text-align:center}
img.plot{max-width:100%}"""


@dataclass
class Figures:
    """Arrays behind the plots: same-place ``crops`` per label (shown left to right), a pixel
    subsample per label (same pixels for every label), and which label is the target."""

    crops: dict[str, np.ndarray]
    crop_text: str
    samples: dict[str, np.ndarray]
    target: str | None


def pick_crop(image: np.ndarray, size: int) -> tuple[int, int, int]:
    """(row, column, side) of the ``size`` px square with the most structure (variance of a
    lightly low-passed ``image``), searched on a half-overlapping grid."""
    from cryodeploy.imaging.metrics import gaussian_filter

    h, w = image.shape
    c = min(size, h, w)
    lp = gaussian_filter(image, 2.0)
    best, where = -1.0, (0, 0)
    for y in range(0, h - c + 1, max(1, c // 2)):
        for x in range(0, w - c + 1, max(1, c // 2)):
            v = float(lp[y:y + c, x:x + c].var())
            if v > best:
                best, where = v, (y, x)
    return where[0], where[1], c


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig: Figure, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _write_crops(out: Path, fig: Figures) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    ref = fig.crops.get("clean", fig.crops.get("identity"))
    if ref is None:
        return []
    vmin, vmax = np.nanpercentile(ref, [0.5, 99.5])  # NaN: the gaps between orthogonal views
    files = []
    for label, crop in fig.crops.items():
        name = f"crop_{_slug(label)}.png"
        plt.imsave(out / name, crop, cmap="gray", vmin=vmin, vmax=vmax)
        files.append((label, name))
    return files


def _plot_histograms(out: Path, fig: Figures) -> str | None:
    import matplotlib.pyplot as plt

    if not fig.samples:
        return None
    ref = np.concatenate([fig.samples[k] for k in ("clean", "identity") if k in fig.samples])
    lo, hi = np.percentile(ref, [0.1, 99.9])
    bins = np.linspace(lo, hi, 120).tolist()
    f, ax = plt.subplots(figsize=(8, 4.5))
    for label, vals in fig.samples.items():
        ax.hist(vals, bins=bins, density=True, histtype="step", label=label,
                linewidth=2.2 if label == fig.target else 1.2, color="k" if label == fig.target else None)
    ax.set_xlabel("intensity")
    ax.set_ylabel("density")
    ax.set_title("intensity histograms (same pixels for every image)")
    ax.legend(fontsize=8)
    return _save(f, out / "histograms.png")


def _plot_hexbin(out: Path, fig: Figures) -> str | None:
    import matplotlib.pyplot as plt

    if fig.target is None:
        return None
    t = fig.samples[fig.target]
    preds = [k for k in fig.samples if k != fig.target]
    lo, hi = np.percentile(t, [0.1, 99.9])
    pad = 0.15 * (hi - lo)
    lim = (lo - pad, hi + pad)
    ncol = min(3, len(preds))
    nrow = -(-len(preds) // ncol)
    f, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.0 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, preds, strict=False):
        p = fig.samples[k]
        ax.hexbin(t, p, gridsize=60, bins="log", mincnt=1, extent=(*lim, *lim), cmap="viridis")
        ax.plot(lim, lim, "r--", linewidth=1, label="y = x")
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{fig.target} (target) intensity")
        ax.set_ylabel(f"{k} prediction")
        ax.set_title(f"{k}: r = {np.corrcoef(t, p)[0, 1]:.3f} (pooled pixels)", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(preds):]:
        ax.axis("off")
    f.suptitle("prediction vs target (log counts per hexagon)")
    f.tight_layout()
    return _save(f, out / "hexbin.png")


def _plot_per_item(out: Path, result: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    methods = result["methods"]
    if result["n_items"] < 2:
        return None
    keys = [k for k in ("split_gain_db", "psnr", "ssim", "flat_noise_ratio", "frc_0.143")
            if any(r.get(k) is not None for m in methods.values() for r in m["per_item"])][:2]
    if not keys:
        return None
    f, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=True):
        names = [n for n, m in methods.items() if any(r.get(k) is not None for r in m["per_item"])]
        data = [[r[k] for r in methods[n]["per_item"] if r.get(k) is not None] for n in names]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        for j, vals in enumerate(data, start=1):
            jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [0.0]
            ax.plot(j + np.asarray(jitter), vals, ".", alpha=0.5, markersize=4)
        label = _label(k, result)
        ax.set_ylabel(label)
        ax.set_title(f"per-item {label} ({len(data[0])} items)")
    return _save(f, out / "per_item.png")


def _frc_axes(ax: Any, frc: dict[str, Any], title: str, labels: dict[str, str]) -> None:
    from cryodeploy.imaging.metrics import frc_crossing

    freq = np.asarray(frc["freq"])
    for name, curve in frc["curves"].items():
        c = np.asarray(curve)
        (line,) = ax.plot(freq, c, label=labels.get(name, name))
        for t in (0.5, 0.143):
            r = frc_crossing(freq, c, t)
            if r is not None:
                ax.plot([1.0 / r], [t], "o", color=line.get_color(), markersize=5)
    for t in (0.5, 0.143):
        ax.axhline(t, color="gray", linestyle="--", linewidth=0.8)
        ax.text(freq[-1], t + 0.015, f"{t}", ha="right", fontsize=8, color="gray")
    ax.set_xlabel(f"spatial frequency ({frc['unit']})")
    ax.set_ylabel("Fourier ring correlation")
    ax.set_ylim(-0.2, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _plot_frc(out: Path, result: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    panels = [(result["frc"], result["frc"].get("title", "FRC against the clean target"))]
    if result.get("half_pairs"):
        panels.append((result["half_pairs"]["frc"], "FRC between the given half pairs (e.g. even/odd)"))
    labels = {"identity": "raw halves"} if result["mode"] in ("halves", "split", "volume-split") else {}
    f, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (frc, title) in zip(axes.flat, panels, strict=True):
        _frc_axes(ax, frc, title, labels)
        if "half_bit" in frc:
            ax.plot(frc["freq"], frc["half_bit"], ":", color="gray", linewidth=1, label="half-bit threshold")
            ax.set_ylabel(frc["ylabel"])
            ax.legend(fontsize=8)
    return _save(f, out / "frc.png")


def _plot_sigma(out: Path, result: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    g = result["methods"].get("gaussian")
    if not g or "sigma_scores" not in g:
        return None
    s = [float(k) for k in g["sigma_scores"]]
    v = [np.nan if x is None else x for x in g["sigma_scores"].values()]
    f, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(s, v, "o-")
    ax.axvline(g["sigma"], color="r", linestyle="--", label=f"chosen sigma = {g['sigma']:g} px")
    ax.set_xlabel("Gaussian sigma (px)")
    split = result["mode"] in ("split", "volume-split")
    ax.set_ylabel("mean split gain (dB)" if split else "mean PSNR on validation items (dB)")
    ax.set_title(f"Gaussian baseline: {g['sigma_chosen_on']}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(f, out / "gaussian_sigma.png")


def _plot_loss(out: Path, log_path: Path) -> str | None:
    import matplotlib.pyplot as plt

    rows = []
    for n, line in enumerate(log_path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{log_path}:{n}: not a JSON line, expected one JSON object per line"
                                 ) from err
    keys = sorted({k for r in rows for k, v in r.items()
                   if "loss" in k and isinstance(v, int | float) and not isinstance(v, bool)})
    if not keys:
        return None
    xkey = next((k for k in ("step", "epoch") if all(k in r for r in rows)), None)
    f, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r.get(xkey, i) if xkey else i, r[k]) for i, r in enumerate(rows)
               if isinstance(r.get(k), int | float)]
        ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None,
                label="train loss" if k == "loss" else k)
    ax.set_xlabel(xkey or "log line")
    ax.set_ylabel("loss")
    if all(r[k] > 0 for r in rows for k in keys if isinstance(r.get(k), int | float)):
        ax.set_yscale("log")
    ax.set_title(f"training log {log_path.name}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(f, out / "loss.png")


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _label(key: str, result: dict[str, Any]) -> str:
    """Column title of ``key``; resolutions carry the unit of the FRC frequencies (px or A)."""
    title = next(c[1] for c in COLUMNS if c[0] == key)
    if key.startswith(("frc_", "fsc_")):
        title += " (A)" if result.get("frc", {}).get("unit") == "1/A" else " (px)"
    return title


def _metrics_table(result: dict[str, Any]) -> str:
    methods = result["methods"]
    cols = [c for c in COLUMNS if any(m.get(c[0]) is not None for m in methods.values())]
    head = "".join(f"<th>{html.escape(_label(k, result))}</th>" for k, _, _ in cols)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{_fmt(m.get(k), f)}</td>" for k, _, f in cols)
        + "</tr>"
        for n, m in methods.items())
    return f'<table id="metrics-table"><tr><th>method</th>{head}</tr>{rows}</table>'


def _summary_table(result: dict[str, Any]) -> str:
    methods = result["methods"]
    keys = [c for c in COLUMNS if c[0] in ("split_gain_db", "psnr", "ssim", "flat_noise_ratio", "frc_0.143")
            and any(c[0] in m["summary"] for m in methods.values())]
    head = "".join(f"<th>{html.escape(_label(k, result))} min / median / max</th>" for k, _, _ in keys)
    body = ""
    for n, m in methods.items():
        cells = "".join("<td>" + (" / ".join(_fmt(m["summary"][k][s], f) for s in ("min", "median", "max"))
                                  if k in m["summary"] else "n/a") + "</td>" for k, _, f in keys)
        body += f"<tr><td>{html.escape(n)}</td>{cells}</tr>"
    return f'<table id="summary-table"><tr><th>method</th>{head}</tr>{body}</table>'


def _half_pairs_table(result: dict[str, Any]) -> str:
    hp = result.get("half_pairs")
    if not hp:
        return ""
    unit = "A" if hp["frc"]["unit"] == "1/A" else "px"
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{_fmt(c['frc_0.5'], '{:.2f}')}</td>"
                   f"<td>{_fmt(c['frc_0.143'], '{:.2f}')}</td></tr>" for n, c in hp["crossings"].items())
    return (f"<h2>Given half pairs</h2><p>{html.escape(' vs '.join(hp['folders']))}, {hp['n_items']} pairs "
            "(identity = the raw halves).</p><table id=\"half-pairs-table\"><tr><th>method</th>"
            f"<th>resolution at FRC 0.5 ({unit})</th><th>resolution at FRC 0.143 ({unit})</th></tr>"
            f"{rows}</table>")


def _notes(result: dict[str, Any]) -> str:
    lines = [f"Data: {html.escape(json.dumps(result['data']))}; {result['n_items']} items."]
    for key, title in (("data_range", "Data range"), ("means", "Means"), ("mean_shift", "Mean shift"),
                       ("flat_noise", "Flat-region noise"), ("frc_note", "FRC")):
        if result.get(key):
            lines.append(f"{title}: {html.escape(str(result[key]))}.")
    g = result["methods"].get("gaussian")
    if g and "sigma" in g:
        lines.append(f"Gaussian baseline: sigma {g['sigma']:g} px, chosen on the "
                     f"{html.escape(g['sigma_chosen_on'])}; all methods are scored on all items.")
    if result.get("flat_noise_clean") is not None:
        lines.append("Flat-region residual of the clean images themselves: "
                     f"{result['flat_noise_clean']:.4g}.")
    lines.append("Mean-shift tolerance: |mean(pred) - mean(target)| &le; "
                 f"{result['tolerances']['mean_shift']:g} &times; std(target).")
    for name, m in result["models"].items():
        lines.append(f"{html.escape(name)}: {html.escape(m['path'])} ({html.escape(m['architecture'])}, "
                     f"sha256 {m['sha256'][:12]}&hellip;), run by {html.escape(m.get('runner', '?'))}.")
    return "<ul>" + "".join(f"<li>{t}</li>" for t in lines) + "</ul>"


def write_report(out: Path, result: dict[str, Any], fig: Figures, train_log: Path | None = None) -> Path:
    """Write the PNGs and ``index.html`` for ``result`` (the metrics dict) into ``out``; return the page."""
    import matplotlib

    matplotlib.use("Agg")
    flags = result["red_flags"]
    if flags:
        flag_html = ('<section id="red-flags" class="flags"><h2>Red flags</h2><ul>'
                     + "".join(f"<li>{html.escape(f['message'])}</li>" for f in flags) + "</ul></section>")
    else:
        flag_html = '<section id="red-flags" class="ok">No red flags.</section>'
    if result.get("warnings"):
        flag_html += ('<section id="warnings" class="warn"><h2>Data warnings</h2><ul>'
                      + "".join(f"<li>{html.escape(w)}</li>" for w in result["warnings"]) + "</ul></section>")
    crop_files = _write_crops(out, fig)
    side = max((c.shape[1] for c in fig.crops.values()), default=1)
    zoom = max(1, min(3, 1300 // (side * max(1, len(crop_files)))))  # all crops side by side in one row
    crops = "".join(
        f'<figure><img src="{f}" alt="{html.escape(lab)}" width="{zoom * fig.crops[lab].shape[1]}">'
        f"<figcaption>{html.escape(_CAPTIONS.get(lab, lab))}</figcaption></figure>" for lab, f in crop_files)
    plots = [("Intensity histograms", _plot_histograms(out, fig)),
             ("Prediction vs target", _plot_hexbin(out, fig)),
             ("Per-item metrics", _plot_per_item(out, result)),
             (result["frc"].get("ylabel", "Fourier ring correlation"), _plot_frc(out, result)),
             ("Gaussian baseline", _plot_sigma(out, result)),
             ("Training loss", _plot_loss(out, train_log) if train_log else None)]
    plot_html = "".join(f'<h2>{t}</h2><img class="plot" src="{p}" alt="{t}">' for t, p in plots if p)
    if result["mode"] == "split":
        from cryodeploy.evaluation.splitreport import split_section

        plot_html = split_section(out, result) + plot_html
    elif result["mode"] == "volume-split":
        from cryodeploy.evaluation.volreport import volume_section

        plot_html = volume_section(out, result) + plot_html
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cryodeploy evaluation</title>'
            f"<style>{_CSS}</style></head><body>"
            f"<h1>cryodeploy evaluation ({html.escape(result['mode'])})</h1>"
            f"{flag_html}<h2>Metrics (means over items)</h2>{_metrics_table(result)}"
            f"<h2>Per-item spread</h2>{_summary_table(result)}{_half_pairs_table(result)}{_notes(result)}"
            f"<h2>{'Central sections' if result['mode'] == 'volume-split' else 'Crops at full resolution'}"
            f"</h2><p>{html.escape(fig.crop_text)}; the same place for every "
            "image, one intensity scale (0.5-99.5th percentile of the "
            f"{'clean' if 'clean' in fig.crops else 'noisy'} crop); each pixel drawn as "
            f"{zoom}&times;{zoom} screen pixels.</p>"
            f'<div class="crops">{crops}</div>{plot_html}{_LOAD_CHECK}</body></html>\n')
    path = out / "index.html"
    path.write_text(page)
    return path
