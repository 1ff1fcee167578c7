#!/usr/bin/env bash
# The PREVIOUS default model (the seeds' recipe; shipped until the default made by models/reproduce.sh
# replaces it): data, four candidates (CNN3 / U-Net x supervised seeds' recipe / self-supervised
# Neighbor2Neighbor), held-out evaluation, choice, ONNX export.
# Usage: bash models/reproduce_seeds.sh SHARED_DATA OUTDIR [cuda|cpu] [--quick]
set -euo pipefail
data=$1; out=$2; dev=${3:-cuda}; quick=${4:-}
q=(); [ -n "$quick" ] && q=(--quick)
epochs=100; patch=256; stride=128; synth_n=12; synth_size=1024
if [ -n "$quick" ]; then epochs=2; patch=64; stride=64; synth_n=4; synth_size=256; fi
mkdir -p "$out"
python3 -m cryodeploy synth "$out/data/synth_train" --count $synth_n --size $synth_size $synth_size --seed 1 -q
python3 -m cryodeploy synth "$out/data/synth_test" --count 4 --size $synth_size $synth_size --seed 99 -q
python3 models/prepare_data.py "$data" "$out/data" --synth-clean "$out/data/synth_test/clean" "${q[@]}"
# seeds' recipe: Poisson over a dose range (the model must not need the exact dose) + Gaussian sigma 0.05
python3 -m cryodeploy preprocess "$out/data/real_train" "$out/data/synth_train/clean" -o "$out/store_sup" \
  --patch $patch --stride $stride --test-fraction 0.1 --seed 0 --sigma 0.05 --dose-range 5 50 --overwrite -q
# self-supervised: the real micrographs as they are (no clean target needed)
python3 -m cryodeploy preprocess -o "$out/store_n2n" --pairs "$out/data/real_train" "$out/data/real_train" \
  --patch $patch --stride $stride --test-fraction 0.1 --seed 0 --overwrite -q
prec=fp32; [ "$dev" = cuda ] && prec=bf16
train() {  # name store method lr model [params...]
  local name=$1 store=$2 method=$3 lr=$4 model=$5; shift 5
  python3 -m cryodeploy train "$out/$store" -o "$out/runs/$name" --model "$model" "$@" --method "$method" \
    --epochs $epochs --batch 16 --lr "$lr" --precision $prec --device "$dev" --seed 0 -q
}
ev() {  # name kind noisy_dir clean_dir
  python3 -m cryodeploy evaluate -m "$out/runs/$1" --pairs "$3" "$4" -o "$out/eval/$1/$2" --device "$dev" -q \
    --train-log "$out/runs/$1/metrics.jsonl"
}
train cnn3_sup store_sup supervised 1e-3 cnn3
train unet_sup store_sup supervised 3e-4 unet --param base_channels=16 --param depth=3
train cnn3_n2n store_n2n neighbor2neighbor 1e-3 cnn3
train unet_n2n store_n2n neighbor2neighbor 3e-4 unet --param base_channels=16 --param depth=3
for name in cnn3_sup unet_sup cnn3_n2n unet_n2n; do
  ev $name real_dose20 "$out/data/eval_real_dose20/noisy" "$out/data/eval_real_dose20/clean"
  ev $name synth_dose20 "$out/data/eval_synth_dose20/noisy" "$out/data/eval_synth_dose20/clean"
done
best=$(python3 models/choose.py "$out")
for d in 10 40; do ev "$best" real_dose$d "$out/data/eval_real_dose$d/noisy" "$out/data/eval_real_dose$d/clean"; done
python3 -m cryodeploy evaluate -m "$out/runs/$best" --halves "$out/data/real_heldout" -o "$out/eval/$best/halves" --device "$dev" -q
