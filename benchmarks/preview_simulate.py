"""Render a 3x3 preview of simulated micrographs: rows at dose 5, 20 and 80 e-/px; columns clean |
noisy (one shared grey scale per pair) | the noisy image's power spectrum (log, Thon rings).

    python benchmarks/preview_simulate.py OUT.png [--seed S] [--size N] [--map PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import gaussian_filter

from cryodeploy.imaging.simulate import SimConfig, simulate

DOSES = (5.0, 20.0, 80.0)


def shared_limits(clean: np.ndarray, noisy: np.ndarray) -> tuple[float, float]:
    """One grey scale for a pair: percentiles 1-99 of the noisy image smoothed by 1.5 px (shows the
    clean image's structure, and how far the noise goes beyond it)."""
    lo, hi = np.percentile(gaussian_filter(noisy, 1.5), [1, 99])
    lo, hi = min(lo, float(np.percentile(clean, 1))), max(hi, float(np.percentile(clean, 99)))
    return float(lo), float(hi)


def power_spectrum(img: np.ndarray) -> np.ndarray:
    """log10 of the centred power spectrum of the mean-subtracted image, lightly smoothed."""
    ps = np.abs(np.fft.fftshift(np.fft.fft2(img - img.mean()))) ** 2
    return np.log10(gaussian_filter(ps, 1.0) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--map", action="append", default=[], help="a 3-D map (MRC) for real-map particles")
    args = ap.parse_args()
    base = SimConfig(
        shape=(args.size, args.size),
        pixel_size_a=(1.0, 1.6),
        p_empty=0.0,
        p_contamination=0.0,
        p_interpolated=0.0,
        map_paths=tuple(args.map),
    )
    fig, axes = plt.subplots(3, 3, figsize=(12, 12.6))
    for row, dose in enumerate(DOSES):
        cfg = dataclasses.replace(base, dose_e_per_px=(dose, dose))
        batch = simulate(cfg, 3, args.seed)
        clean, noisy, m = batch.clean[row].numpy(), batch.noisy[row].numpy(), batch.meta[row]
        lo, hi = shared_limits(clean, noisy)
        axes[row, 0].imshow(clean, cmap="gray", vmin=lo, vmax=hi)
        axes[row, 1].imshow(noisy, cmap="gray", vmin=lo, vmax=hi)
        axes[row, 2].imshow(power_spectrum(noisy), cmap="gray")
        axes[row, 0].set_title(
            f"clean  {m['pixel_size_a']:.2f} A/px, df {m['defocus_um']:.2f} um, "
            f"{m['n_particles']} particles{', carbon' if m['has_carbon'] else ''}",
            fontsize=9,
        )
        axes[row, 1].set_title(f"noisy  dose {dose:g} e-/px, contrast {m['contrast']:.3f}", fontsize=9)
        axes[row, 2].set_title(
            f"power spectrum (noisy), {m['voltage_kv']:g} kV, B {m['bfactor_a2']:.0f}", fontsize=9
        )
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
