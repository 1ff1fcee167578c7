#!/usr/bin/env bash
# Reproduce the default model on one GPU in six runs of models/train_default.py (6-8 minutes each):
# (1) U-Net candidates base 16 and base 20, depth 4, from scratch on micrographs simulated on the fly
#     (64 crops per step, 8 from each simulation, each simulation redrawn at 3 more doses);
# (2) the winner fine-tuned alone at lr 3e-4; (3) that fine-tuned again at lr 2e-4 twice side by side,
# with plain MSE and with the PSNR-weighted MSE; (4) the winner of (3) alone at lr 1.5e-4; (5) that on
# whole 512^2 micrographs instead of 256^2 crops (16 a step, each redrawn at 7 more doses), weights
# averaged (--ema 0.999); (6) that deepened by one level (depth 5, channels capped at 256: it starts
# as exactly run 5's model) and fine-tuned the same way. Each run evaluates on held-out simulation
# (doses 5/20/50) and by split gain on real images beside the shipped default; the best lands in
# OUTDIR/6/default/.
# Usage: bash models/reproduce.sh REAL_STACK.mrc OUTDIR [MINUTES]   (TOPAZ=1 also ranks Topaz-Denoise)
# CPU smoke run: python3 models/train_default.py --out /tmp/td --quick
set -euo pipefail
real=$1; out=$2; minutes=${3:-7}
common=(--real "$real" --device cuda --batch 64 --crops-per-image 8 --redraws 3 --compare default)
python3 models/train_default.py --out "$out/1" --minutes "$minutes" --candidates unet_b16d4,unet_b20d4 "${common[@]}"
best=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['choice']['chosen'])" "$out/1/quality.json")
python3 models/train_default.py --out "$out/2" --minutes "$minutes" --candidates "$best" --lr 3e-4 \
  --init "$best=$out/1/candidates/$best/best.safetensors" "${common[@]}"
m2=$out/2/candidates/$best/best.safetensors
python3 models/train_default.py --out "$out/3" --minutes "$minutes" --candidates "$best,${best}_psnr" --lr 2e-4 \
  --init "$best=$m2,${best}_psnr=$m2" "${common[@]}"
best3=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['choice']['chosen'])" "$out/3/quality.json")
python3 models/train_default.py --out "$out/4" --minutes "$minutes" --candidates "$best3" --lr 1.5e-4 \
  --init "$best3=$out/3/candidates/$best3/best.safetensors" "${common[@]}"
m4=$out/4/candidates/$best3/best.safetensors
python3 models/train_default.py --out "$out/5" --minutes "$minutes" --candidates "$best3" --lr 1.5e-4 \
  --init "$best3=$m4" "${common[@]}" --crop 512 --sim-size 512 --crops-per-image 1 --batch 16 --redraws 7 \
  --ema 0.999
python3 models/train_default.py --out "$out/6" --minutes "$minutes" --candidates unet_b16d5c256_psnr \
  --lr 1.5e-4 --init "unet_b16d5c256_psnr=$out/5/default/best.safetensors" "${common[@]}" --crop 512 \
  --sim-size 512 --crops-per-image 1 --batch 16 --redraws 7 --ema 0.999
