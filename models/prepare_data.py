"""Make the default model's training and held-out data from real micrographs plus synthetic ones.

Real micrographs (the EPU 2.9 sum and the UCSF dose-weighted micrograph) are cut into a
training region and a held-out region that training never sees. The held-out region gets
the seeds' noise (Poisson at several doses + Gaussian sigma 0.05 on the [0, 1] scale) as
evaluation pairs. Usage: ``python models/prepare_data.py SHARED_DATA OUTDIR [--quick]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.imaging.noise import NoiseSpec, add_noise, to_unit_range


def _write(path: Path, data: np.ndarray, label: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_micrograph(path, data, label=label)

#: doses (counts at intensity 1) of the held-out evaluation sets; 20 is the moderate one
EVAL_DOSES = (10.0, 20.0, 40.0)


def split_regions(image: np.ndarray, quick: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training crops (left 3/4 of the columns) and held-out crops (right 1/4), as square-ish tiles."""
    h, w = image.shape
    cut = (w * 3) // 4
    side = 256 if quick else 1024
    train = [image[r : r + side * 2, :cut] for r in range(0, h - side * 2 + 1, side * 2)][: (1 if quick else 8)]
    held = [image[r : r + side, c : c + side] for r in range(0, h - side + 1, side)
            for c in range(cut, w - side + 1, side)][: (2 if quick else 8)]
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny crops, for a dry run on a CPU")
    ap.add_argument("--synth-clean", type=Path, help="clean synthetic micrographs to turn into test pairs")
    args = ap.parse_args()
    out = args.outdir
    rng = np.random.default_rng(2026)
    sources = {
        "epu": args.shared_data / "epu2.9_example.mrc",
        "ucsf": args.shared_data / "ucsf" / "Ucsf_stack_1142_DW.mrc",
    }
    for name, path in sources.items():
        mic = read_micrograph(path)
        img = mic.data
        if name == "ucsf":  # smaller image: top 2/3 train, bottom 1/3 held out
            cut = (img.shape[0] * 2) // 3
            train, held = [img[:cut]], [img[cut:]]
        else:
            train, held = split_regions(img, args.quick)
        for i, t in enumerate(train):
            _write(out / "real_train" / f"{name}_{i:02d}.mrc", t, label="cryodeploy default-model data")
        for i, t in enumerate(held):
            _write(out / "real_heldout" / f"{name}_{i:02d}.mrc", t, label="cryodeploy held-out")
            clean = to_unit_range(t)
            for dose in EVAL_DOSES:
                d = out / f"eval_real_dose{int(dose)}"
                _write(d / "clean" / f"{name}_{i:02d}.mrc", clean)
                noisy = add_noise(clean, NoiseSpec(dose=dose, sigma=0.05), rng)
                _write(d / "noisy" / f"{name}_{i:02d}.mrc", noisy)
    if args.synth_clean:  # synthetic test pairs made exactly like the real ones
        for path in sorted(args.synth_clean.glob("*.mrc")):
            clean = to_unit_range(read_micrograph(path).data)
            _write(out / "eval_synth_dose20" / "clean" / path.name, clean)
            noisy = add_noise(clean, NoiseSpec(dose=20.0, sigma=0.05), rng)
            _write(out / "eval_synth_dose20" / "noisy" / path.name, noisy)
    print(f"wrote training and held-out data under {out}")


if __name__ == "__main__":
    main()
