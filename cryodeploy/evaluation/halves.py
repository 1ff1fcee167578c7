"""Evaluation without a clean target: Fourier ring correlation of independent halves.

A micrograph is split into the two diagonals of each 2x2 block
(:func:`~cryodeploy.imaging.metrics.split_diagonals`); their noise is independent when the
detector's pixel noise is. FRC between the raw halves and between the separately denoised halves
is reported with its 0.5 and 0.143 crossings, plus, on the whole micrograph, the noise left in
flat (empty-ice) regions. Given half pairs (even/odd frame sums, two noise draws) are compared
the same way at full resolution.

Caveats (also in the report): the halves have twice the pixel size, so the model sees them off
its training scale; and a high FRC of denoised halves shows agreement, not truth (a model that
paints the same pattern on both halves scores high).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import InputError
from cryodeploy.evaluation.data import (
    EvalConfig,
    HalvesData,
    Item,
    Method,
    check_outputs,
    matched_files,
    micrograph_items,
    read_frame,
    voxel_size,
)
from cryodeploy.evaluation.flags import halves_red_flags
from cryodeploy.imaging import metrics as M

if TYPE_CHECKING:
    from cryodeploy.evaluation.report import Figures

__all__ = ["evaluate_halves"]

FRC_NOTE = ("halves are the two diagonals of each 2x2 block (twice the pixel size), denoised separately; "
            "FRC shows agreement between halves, not truth")
#: Metrics reported per micrograph and averaged at the top of each method.
HALVES_METRICS = ("corr_input", "mean_shift", "std_ratio", "flat_noise", "flat_noise_ratio",
                  "frc_0.5", "frc_0.143")
#: Raw halves whose FRC averages above this over the top 10% of rings have correlated pixel noise.
CORRELATED_NOISE_FRC = 0.143


def _micrographs(data: HalvesData) -> list[tuple[Path, int]]:
    """Each input micrograph with its number of frames."""
    from cryodeploy.io.inputs import expand_inputs
    from cryodeploy.io.mrc import read_header

    return [(p, read_header(p).n_frames) for p in expand_inputs(list(data.inputs))]


def _items(files: list[tuple[Path, int]], count: int) -> Iterator[Item]:
    """The first ``count`` frames of ``files``, read one file at a time."""
    return (item for item, _ in micrograph_items([p for p, _ in files], count))


Curves = dict[str, list[tuple[np.ndarray, np.ndarray]]]


def _mean_curves(curves: Curves) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    first = next(iter(curves.values()))[0][0]
    out = {k: np.mean([np.interp(first, f, c) for f, c in v], axis=0) for k, v in curves.items()}
    return first, out


def _crossings(freq: np.ndarray, curve: np.ndarray) -> dict[str, float | None]:
    return {"frc_0.5": M.frc_crossing(freq, curve, 0.5), "frc_0.143": M.frc_crossing(freq, curve, 0.143)}


def _half_pairs(data: HalvesData, models: list[Method], limit: int | None) -> dict[str, Any] | None:
    if data.half_pairs is None:
        return None
    pairs = matched_files(*data.half_pairs)[:limit]
    curves: Curves = {"identity": [], **{m.name: [] for m in models}}
    per_item = []
    for pa, pb in pairs:
        a, b = read_frame(pa, None), read_frame(pb, None)
        if a.shape != b.shape:
            raise InputError(f"{pb}: found shape {b.shape}, expected {a.shape} as {pa}")
        vs = voxel_size(pa)
        rec: dict[str, Any] = {"name": pa.name}
        for m in [None, *models]:
            name = "identity" if m is None else m.name
            fa, fb = (a, b) if m is None or m.run is None else (m.run(a), m.run(b))
            freq, curve = M.frc(fa, fb, vs)
            curves[name].append((freq, curve))
            rec[name] = _crossings(freq, curve)
        per_item.append(rec)
    freq, mean = _mean_curves(curves)
    unit = "1/A" if voxel_size(pairs[0][0]) else "1/px"
    return {"folders": [str(p) for p in data.half_pairs], "n_items": len(pairs), "per_item": per_item,
            "crossings": {k: _crossings(freq, c) for k, c in mean.items()},
            "frc": {"unit": unit, "freq": freq.tolist(), "curves": {k: v.tolist() for k, v in mean.items()}}}


def _score(item: Item, methods: list[Method], curves: Curves) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-method records of one micrograph (FRC of its denoised halves for methods in ``curves``)
    and the methods' whole denoised images."""
    x = item.noisy
    a, b = M.split_diagonals(x)
    mask = M.flat_mask(x) if min(x.shape) > 64 else None
    base = M.flat_noise(x, mask) if mask is not None else None
    sd, mu = float(np.std(x)), float(np.mean(x, dtype=np.float64))
    records, outputs = {}, {}
    for m in methods:
        full = outputs[m.name] = m.apply(item)
        rec: dict[str, Any] = {"name": item.name, "corr_input": M.pearson(full, x),
                               "mean_shift": float((full.mean(dtype=np.float64) - mu) / sd),
                               "std_ratio": float(full.std(dtype=np.float64)) / sd}
        if mask is not None and base:
            rec["flat_noise"] = M.flat_noise(full, mask)
            rec["flat_noise_ratio"] = rec["flat_noise"] / base
        if m.name in curves and m.run is not None:
            freq, curve = M.frc(m.run(a), m.run(b), 2.0 * (item.voxel_size or 1.0))
            curves[m.name].append((freq, curve))
            rec.update(_crossings(freq, curve))
        records[m.name] = rec
    return records, outputs


def evaluate_halves(methods: list[Method], data: HalvesData,
                    config: EvalConfig) -> tuple[dict[str, Any], Figures]:
    """FRC of diagonal halves and flat-region noise for ``methods`` on ``data``; returns the
    metrics dict (``methods``, ``frc``, ``half_pairs``, ``red_flags``) and the report figures."""
    from cryodeploy.evaluation.report import Figures, pick_crop
    from cryodeploy.progress import progress

    if not data.inputs and data.half_pairs is None:
        raise InputError("found no micrographs for --halves and no --half-pairs, expected at least one")
    models = [m for m in methods if m.run is not None]
    all_methods = [Method("identity", lambda x: x), *methods]
    files = _micrographs(data) if data.inputs else []
    count = min(sum(n for _, n in files), config.limit or sys.maxsize)
    check_outputs(methods, [p.name for p, _ in files])
    records: dict[str, list[dict[str, Any]]] = {m.name: [] for m in all_methods}
    curves: Curves = {"identity": [], **{m.name: [] for m in models}}
    rng = np.random.default_rng(config.seed)
    samples: dict[str, list[np.ndarray]] = {m.name: [] for m in all_methods}
    crops: dict[str, np.ndarray] = {}
    crop_text = ""
    units = set()
    with progress(count, "evaluate halves", config.quiet) as task:
        for i, item in enumerate(_items(files, count)):
            units.add("1/A" if item.voxel_size else "1/px")
            recs, outputs = _score(item, all_methods, curves)
            idx = rng.choice(item.noisy.size, min(item.noisy.size, max(500, 100_000 // count)), replace=False)
            if i == 0:
                y0, x0, c = pick_crop(M.gaussian_filter(item.noisy, 2.0), config.crop)
                crop_text = f"{item.name}, rows {y0}-{y0 + c - 1}, columns {x0}-{x0 + c - 1}"
                crops = {k: v[y0:y0 + c, x0:x0 + c] for k, v in outputs.items()}
            for name, rec in recs.items():
                records[name].append(rec)
                samples[name].append(outputs[name].ravel()[idx])
            task.advance(1)
    if len(units) > 1:
        raise InputError("micrographs mix files with and without a voxel size; evaluate them separately")
    result_methods: dict[str, dict[str, Any]] = {}
    frc_block: dict[str, Any] = {}
    warnings = []
    if count:
        freq, mean = _mean_curves(curves)
        tail = float(mean["identity"][-max(3, freq.size // 10):].mean())
        if tail > CORRELATED_NOISE_FRC:
            warnings.append(f"raw diagonal halves still correlate ({tail:.2f}) near Nyquist: "
                            "neighbouring pixels' noise is likely correlated (interpolated or "
                            "motion-corrected sums), so the halves are not independent and FRC "
                            "overstates the resolution")
        for m in all_methods:
            res = M.summarize(records[m.name], HALVES_METRICS)
            if m.name in mean:
                res.update(_crossings(freq, mean[m.name]))
            result_methods[m.name] = res
        frc_block = {"against": "the other half", "unit": units.pop(), "freq": freq.tolist(),
                     "curves": {k: v.tolist() for k, v in mean.items()},
                     "title": "FRC between diagonal halves of each micrograph"}
    pairs = _half_pairs(data, models, config.limit)
    n_items = count
    if not count:
        assert pairs is not None
        n_items = pairs["n_items"]
        frc_block = {**pairs["frc"], "title": "FRC between the given half pairs"}
        result_methods = {k: {**v, "summary": {}, "per_item": []} for k, v in pairs["crossings"].items()}
        pairs = None
        crop_text = "no crops: only half pairs were given"
    result = {
        "mode": "halves",
        "data": {"kind": "halves", "inputs": list(data.inputs),
                 "half_pairs": [str(p) for p in data.half_pairs] if data.half_pairs else None},
        "n_items": n_items, "methods": result_methods, "frc": frc_block, "half_pairs": pairs,
        "frc_note": FRC_NOTE,
        "mean_shift": "(mean(denoised) - mean(input)) / std(input), per micrograph; "
                      "std ratio = std(denoised) / std(input)",
        "flat_noise": "std of (image - Gaussian low-pass, sigma 8 px) in the flattest 10% of the input "
                      "(local variance of its 8-px low-pass over 32 px); ratio = denoised / input",
        "red_flags": halves_red_flags(result_methods, config.mean_shift_tolerance),
        "warnings": warnings,
    }
    figures = Figures(crops=crops, crop_text=crop_text,
                      samples={k: np.concatenate(v) for k, v in samples.items() if v}, target=None)
    return result, figures
