#!/usr/bin/env bash
# The device frame path on the GPU machine, side by side in one run (issue 20), about 5-8 minutes:
# 20 (and, time allowing, 200) 4096^2 float32 MRC files on local disk, warm page cache; raw floor and
# MRC floor; `cryodeploy denoise` (default model) fp32, fp16 and fp16 + CUDA graphs, start-up
# measured separately; per-stage times per file; the in-memory API vs device forward + one H2D +
# one D2H; outputs vs the CPU fp32 reference; Topaz-Denoise on the same files when $TOPAZ_PY is set
# (the Python of an environment with topaz-em, e.g. TOPAZ_PY=python3 with /tmp/topazsite).
# Every step reports its own failure and the rest go on. Results: $OUT/frame_suite.md (rows in the
# docs/benchmarks.md format), one JSON per step, and $OUT/gpu_frame_suite.log.
# Usage (repo root): OUT=/tmp/out bash benchmarks/gpu_frame_suite.sh
# ONLY="inputs20 floors20 ..." runs just the named steps (the table is made from what ran); T200 / TTOPAZ200
# (seconds into the suite, default 330 / 420) limit when the 200-file block and its Topaz run still start;
# REPEAT20=N runs the 20-file default and fp16 runs N times (denoise20_default_rK, denoise20_fp16_rK).
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-/tmp/out}; mkdir -p "$out"
exec > >(tee -a "$out/gpu_frame_suite.log") 2>&1
work=${WORK:-/tmp/frame_suite}
model=${MODEL:-default}
start=$(date +%s)
fs() { local cmd=$1; shift; python3 benchmarks/frame_suite.py "$cmd" --out "$out" --work "$work/w" --model "$model" "$@"; }
elapsed() { echo $(( $(date +%s) - start )); }
step() {  # step NAME TIMEOUT CMD...: run (shell functions too), report failure, never stop the suite
  local name=$1 limit=$2; shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then echo "=== $name: not in ONLY, skipped"; return 0; fi
  echo "=== $name ($(elapsed) s into the suite)"
  timeout "$limit" bash -c "$(declare -f fs denoise topaz ov); $(declare -p out work model); \"\$@\"" step "$@"
  local rc=$?
  [[ $rc -eq 0 ]] || echo "!!! step $name failed (exit $rc)"
  return 0
}

denoise() {  # denoise N LABEL ARGS...: one `cryodeploy denoise` process over N files, timed
  local n=$1 label=$2; shift 2
  local dir=$work/out$n/$label t0 t1
  rm -rf "$dir"
  t0=$(date +%s%N)
  python3 -m cryodeploy denoise "$work"/in$n/*.mrc -o "$dir" --model "$model" --device cuda -q \
    --summary "$work/summary${n}_$label.json" "$@" || return
  t1=$(date +%s%N)
  python3 - "$work/summary${n}_$label.json" "$out/denoise${n}_$label.json" "$label" "$(( (t1 - t0) / 1000 ))" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = {"label": sys.argv[3], "wall_s": int(sys.argv[4]) / 1e6, "run_s": s["seconds"],
     "files": len(s["files"]), "done": sum(f["status"] == "done" for f in s["files"]),
     "backend": s.get("backend"), "tile": s.get("tile"), "batch": s.get("batch")}
json.dump(r, open(sys.argv[2], "w"), indent=2); print(r)
PY
  [[ $n -lt 100 ]] || rm -rf "$dir"  # 200 outputs: 13 GB of disk
}

# ov ARGS: the runner's stages overlapped? one file per run vs all files, busy time per stage, raw floor + fsync
ov() { env "OUT=$out" python3 benchmarks/bench_overlap.py --inputs "$work/in20" --backend torch --device cuda \
  --model "$model" --frame-path device --work "$work/overlap" "$@"; }

topaz() {  # topaz N
  local n=$1
  [[ -n "${TOPAZ_PY:-}" && -f benchmarks/topaz_denoise.py ]] || { echo "TOPAZ_PY unset or no topaz_denoise.py: skipped"; return 0; }
  PYTHONPATH=/tmp/topazsite "$TOPAZ_PY" benchmarks/topaz_denoise.py "$work"/in$n/*.mrc -o "$work/topaz$n" \
    --model unet --json "$out/topaz$n.json"
  local rc=$?
  [[ $n -lt 100 ]] || rm -rf "$work/topaz$n"
  return $rc
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" || true
step inputs20 120 fs inputs "$work/in20" --count 20 --size 4096
# the default variant (--precision auto): measured once here (compile time included), cached for the runs
step choose_variant 240 python3 - "$model" "$out/variant_choice.json" <<'PY'
import json, sys, time
from cryodeploy.backends.sources import load_source
from cryodeploy.inference.variants import cache_path, default_variant
t0 = time.perf_counter()
source = load_source(sys.argv[1])
chosen = default_variant(source, "cuda")
record = json.loads(cache_path(source, "cuda").read_text())
r = {"chosen": chosen.label, "precision": chosen.precision, "extra": chosen.extra,
     "seconds": time.perf_counter() - t0, "trials": record["trials"]}
json.dump(r, open(sys.argv[2], "w"), indent=2, default=str); print(r)
PY
step floors20 90 fs floors "$work/in20"
first=$(ls "$work"/in20/*.mrc | head -1)
step startup_fp32 90 fs startup "$first" --label fp32 --precision fp32 --work "$work/startup_fp32"
step denoise20_fp32 120 denoise 20 fp32 --precision fp32
step denoise20_fp16 120 denoise 20 fp16 --precision fp16
step startup_fp16 90 fs startup "$first" --label fp16 --precision fp16 --work "$work/startup_fp16"
step denoise20_fp16_graphs 120 denoise 20 fp16_graphs --precision fp16 --cuda-graphs
# first default-variant process: its start-up includes compiling for 4096^2 (torch.compile, if chosen)
step startup_default_first 240 fs startup "$first" --label default_first --precision auto --work "$work/startup_df"
step denoise20_default 150 denoise 20 default
for r in $(seq 2 "${REPEAT20:-1}"); do  # the same run again: its spread beside the one figure
  step "denoise20_default_r$r" 150 denoise 20 "default_r$r"
  step "denoise20_fp16_r$r" 120 denoise 20 "fp16_r$r" --precision fp16
done
step startup_default 90 fs startup "$first" --label default --precision auto --work "$work/startup_default"
step denoise20_default_io4 150 denoise 20 default_io4 --io-threads 4
step denoise20_nofsync_io4 150 denoise 20 nofsync_io4 --io-threads 4 --no-fsync
step stages_fp32 120 fs stages "$work/in20" --precision fp32 --label fp32 --work "$work/stages"
step stages_fp16 120 fs stages "$work/in20" --precision fp16 --label fp16 --work "$work/stages"
step overlap_fp16 150 ov --precision fp16 --label overlap_fp16
step overlap_compile_fp16 240 ov --precision fp16 --compile --label overlap_compile_fp16
step api_fp32 90 fs api "$first" --precision fp32 --label fp32
step api_fp16 90 fs api "$first" --precision fp16 --label fp16
step cpuref 180 fs cpuref "$first" --out-dir "$work/cpuref"
step parity 60 fs parity "$work/cpuref" "$work/out20/fp32" "$work/out20/fp16" "$work/out20/fp16_graphs" "$work/out20/default" \
  --file "$(basename "$first")"
step topaz20 150 topaz 20
if (( $(elapsed) < ${T200:-330} )) && [[ -z "${ONLY:-}" || " $ONLY " == *" denoise200_default "* ]]; then  # 200 files: ~13 GB
  mkdir -p "$work/in200"
  for i in $(seq 0 199); do
    src=$(printf "%s/in20/mic_%04d.mrc" "$work" $((i % 20)))
    [[ -f "$work/in200/mic_$(printf %04d "$i").mrc" ]] || cp "$src" "$work/in200/mic_$(printf %04d "$i").mrc"
  done
  step floors200 120 fs floors "$work/in200"
  step denoise200_default 150 denoise 200 default
  step denoise200_default_io4 150 denoise 200 default_io4 --io-threads 4
  step denoise200_nofsync_io4 150 denoise 200 nofsync_io4 --io-threads 4 --no-fsync
  (( $(elapsed) < ${TTOPAZ200:-420} )) && step topaz200 240 topaz 200
  rm -rf "$work/in200" "$work/out200" "$work/w/raw" "$work/w/mrc"
else
  echo "200-file runs skipped: $(elapsed) s used"
fi
step table 60 fs table "$out"
echo "suite done in $(elapsed) s"
