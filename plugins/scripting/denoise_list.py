#!/usr/bin/env python3
"""Denoise a list of micrographs (or, with a volume model, tomograms) with the cryodeploy Python API.

Usage::

    python denoise_list.py --model runs/cnn3/best.safetensors --out denoised/ mic_001.mrc mic_002.mrc

The same in a few lines of your own code::

    from cryodeploy import Denoiser

    denoiser = Denoiser.load("runs/cnn3/best.safetensors", device="cuda")   # or "default", an .onnx file...
    summary = denoiser.denoise_files(["mic_001.mrc", "mic_002.mrc"], "denoised/", skip_existing=True)
    clean = denoiser(image)            # or one 2-D numpy array in memory, same shape back

Outputs are named like the inputs, written atomically, and a rerun skips finished files.
The exit status is 1 if any micrograph failed (the reason is printed for each).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Denoise the micrographs named on the command line; return the exit status."""
    from cryodeploy import Denoiser

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("micrographs", nargs="+", help="MRC files to denoise")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="default", help="checkpoint, ONNX file or 'default'")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    denoiser = Denoiser.load(args.model, device=args.device)
    summary = denoiser.denoise_files(args.micrographs, args.out, skip_existing=True, quiet=True)
    for item in summary.files:  # status: done, skipped (output exists) or failed
        print(f"{item.status:8s} {item.input} -> {item.output}" + (f"  ({item.error})" if item.error else ""))
    return 1 if any(item.status == "failed" for item in summary.files) else 0


if __name__ == "__main__":
    sys.exit(main())
