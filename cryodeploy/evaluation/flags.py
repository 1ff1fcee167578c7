"""Red flags: outputs that a denoiser must not produce, checked for every evaluated method."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CONSTANT_STD_RATIO", "FRC_LOSS_TOLERANCE", "NEAR_IDENTITY_FRACTION", "PATCHWORK_SPREAD",
           "halves_red_flags", "red_flags", "split_red_flags"]

#: An output whose std is below this fraction of the target's (or input's) std is flagged as constant.
CONSTANT_STD_RATIO = 0.01
#: A denoised-halves FRC 0.143 crossing coarser than this many times the raw one is flagged.
FRC_LOSS_TOLERANCE = 1.25
#: Residual spread (coefficient of variation of the local residual ratio over flat 64-px tiles)
#: above this is a patchwork. Measured on thinned synthetic counted 1024-px micrographs (doses 5-50,
#: contrast 5-30%): identity 0, Gaussian sigma 1-4 px 0.005-0.018, a sigma-2 blur on every other
#: 64-px or 128-px block (identity elsewhere, any offset) 0.16-0.17.
PATCHWORK_SPREAD = 0.05
#: A model whose change to the input, RMS(f(x) - x) / std(x), is below this fraction of the best
#: Gaussian's while that Gaussian gains > NEAR_IDENTITY_GAIN_DB left the noise in: a blend
#: (1 - a) x + a g(x) with a = 0.25 keeps (1 - a)^2 = 56% of the noise (at most 2.5 dB).
NEAR_IDENTITY_FRACTION = 0.25
NEAR_IDENTITY_GAIN_DB = 3.0
#: Methods that split flags do not judge: the baselines themselves.
SPLIT_BASELINES = ("identity", "constant", "gaussian")


def red_flags(methods: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, str]]:
    """Problems the seeds learned to look for, checked for every method but the baselines:
    negative correlation, PSNR below identity or the Gaussian baseline, mean shift > ``tolerance``
    (in units of the target's standard deviation), and a (nearly) constant output."""
    flags: list[dict[str, str]] = []

    def flag(name: str, check: str, text: str) -> None:
        flags.append({"method": name, "check": check, "message": f"{name}: {text}"})

    for name, m in methods.items():
        if name in ("identity", "gaussian"):
            continue
        items = m.get("per_item", [])
        negative = sum(1 for r in items if r.get("corr") is not None and r["corr"] < 0)
        if (m.get("corr") is not None and m["corr"] < 0) or negative:
            flag(name, "negative_correlation", f"negative correlation with the target (mean {m['corr']:.3f}; "
                 f"{negative} of {len(items)} items)")
        for base in ("identity", "gaussian"):
            if base in methods and m.get("psnr") is not None and m["psnr"] < methods[base]["psnr"]:
                flag(name, f"worse_than_{base}",
                     f"PSNR {m['psnr']:.2f} dB is below the {base} baseline ({methods[base]['psnr']:.2f} dB)")
        if m.get("std_ratio") is not None and m["std_ratio"] < CONSTANT_STD_RATIO:
            flag(name, "constant_output",
                 f"output is nearly constant (std {m['std_ratio']:.2g} x std(target))")
        shifts = [abs(r["mean_shift"]) for r in items if r.get("mean_shift") is not None]
        if shifts and float(np.mean(shifts)) > tolerance:
            flag(name, "mean_shift", f"mean |mean(pred) - mean(target)| is {np.mean(shifts):.3f} x "
                 f"std(target), above the tolerance {tolerance:g}")
    return flags


def halves_red_flags(methods: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, str]]:
    """Red flags without a target: negative correlation with the input, a (nearly) constant output,
    mean shift beyond ``tolerance`` x std(input), and denoised-halves FRC 0.143 much coarser than
    the raw halves'."""
    flags = []
    raw = methods["identity"].get("frc_0.143")
    for name, m in methods.items():
        if name == "identity":
            continue
        if m.get("corr_input") is not None and m["corr_input"] < 0:
            flags.append({"method": name, "check": "negative_correlation",
                          "message": f"{name}: negative correlation with the input ({m['corr_input']:.3f})"})
        if m.get("std_ratio") is not None and m["std_ratio"] < CONSTANT_STD_RATIO:
            flags.append({"method": name, "check": "constant_output",
                          "message": f"{name}: output is nearly constant "
                                     f"(std {m['std_ratio']:.2g} x std(input))"})
        if m.get("mean_shift") is not None and abs(m["mean_shift"]) > tolerance:
            flags.append({"method": name, "check": "mean_shift",
                          "message": f"{name}: mean shifted by {m['mean_shift']:+.3f} x std(input), "
                                     f"beyond the tolerance {tolerance:g}"})
        res = m.get("frc_0.143")
        if raw is not None and res is not None and res > FRC_LOSS_TOLERANCE * raw:
            flags.append({"method": name, "check": "frc_loss",
                          "message": f"{name}: denoised halves agree only to {res:.2f} at FRC 0.143, "
                                     f"raw halves to {raw:.2f} (more than {FRC_LOSS_TOLERANCE}x coarser)"})
    return flags


def split_red_flags(methods: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, str]]:
    """Red flags of a split evaluation, for every method but the baselines: split gain below
    identity (< 0 dB) or below the best Gaussian's, a patchwork (residual spread above
    :data:`PATCHWORK_SPREAD`), a near-identity output where a Gaussian finds noise to remove, plus
    the target-free checks of :func:`halves_red_flags` (correlation, constant output, mean shift)."""
    flags: list[dict[str, str]] = []

    def flag(name: str, check: str, text: str) -> None:
        flags.append({"method": name, "check": check, "message": f"{name}: {text}"})

    g = methods["gaussian"]
    for name, m in methods.items():
        if name in SPLIT_BASELINES:
            continue
        gain = m.get("split_gain_db")
        if gain is not None and gain < 0:
            flag(name, "below_identity", f"split gain {gain:.2f} dB is below identity (0 dB)")
        if gain is not None and g.get("split_gain_db") is not None and gain < g["split_gain_db"]:
            flag(name, "below_best_gaussian", f"split gain {gain:.2f} dB is below the best Gaussian's "
                 f"({g['split_gain_db']:.2f} dB, sigma {g.get('sigma', 0):g} px)")
        spread = m.get("residual_spread")
        if spread is not None and spread > PATCHWORK_SPREAD:
            flag(name, "patchwork", f"noise is removed unevenly (residual spread {spread:.3f} over flat "
                 f"64-px tiles, bound {PATCHWORK_SPREAD:g}): a patchwork of denoised and raw regions")
        change, g_change = m.get("change"), g.get("change")
        if (change is not None and g_change and (g.get("split_gain_db") or 0) > NEAR_IDENTITY_GAIN_DB
                and change < NEAR_IDENTITY_FRACTION * g_change):
            flag(name, "near_identity", f"output is nearly the input (RMS change {change:.3f} x std(input), "
                 f"below {NEAR_IDENTITY_FRACTION:g} x the best Gaussian's {g_change:.3f}) although a "
                 "Gaussian "
                 f"gains {g['split_gain_db']:.1f} dB: the noise was left in")
    flags += [f for f in halves_red_flags({k: {kk: v for kk, v in m.items() if kk != "frc_0.143"}
                                           for k, m in methods.items() if k not in SPLIT_BASELINES[1:]},
                                          tolerance)]
    return flags
