#!/usr/bin/env bash
# Reproduce the default model (one GPU, one call of about 7 minutes): three U-Net candidates trained
# at once on micrographs simulated on the fly, evaluated on held-out simulation (doses 5/20/50) and by
# split gain on real images, the best copied to OUTDIR/default/ (models/train_default.py).
# Usage: bash models/reproduce.sh REAL_STACK.mrc OUTDIR [MINUTES]   (TOPAZ=1 also ranks Topaz-Denoise)
# CPU smoke run: python3 models/train_default.py --out /tmp/td --quick
set -euo pipefail
real=$1; out=$2; minutes=${3:-5}
python3 models/train_default.py --out "$out" --minutes "$minutes" --real "$real" --device cuda
