#!/usr/bin/env bash
# Set up Topaz-Denoise (topaz-em 0.3.20, GPLv3) on the GPU machine, for measurement only:
# Topaz is never a dependency of cryodeploy, and nothing of it is committed (.whl/ is ignored).
#
#   benchmarks/topaz_gpu_setup.sh prepare   # here (network): fill .whl/ with the wheels below
#   TOPAZ_2D=1 benchmarks/topaz_gpu_setup.sh prepare   # the same less the 3-D denoisers (21 MB):
#                                              # leaves room in a call for a larger model
#   benchmarks/topaz_gpu_setup.sh           # on the GPU machine, from the repo root, .whl/ carried
#
# Wheel set (all installed with --no-deps; the GPU machine has python 3.12, torch, numpy, pandas,
# pillow (through matplotlib / scikit-image) and typing_extensions (through torch)):
#   topaz_em-0.3.20-0denoise-py3-none-any.whl  topaz-em 0.3.20 less its particle-picking models
#                                              (topaz/pretrained/detector/*, 14 MB); all denoisers kept
#   h5py-*-cp312-*.whl                         imported by topaz.denoising.datasets (installed only
#                                              if the machine lacks h5py)
#   mrcfile-*.whl, starfile-*.whl              MRC / STAR I/O (starfile needs pandas, typing_extensions)
#   pydantic, pydantic_core, annotated_types,  cryodeploy's model configs (installed only if the
#   typing_inspection, typing_extensions       machine lacks pydantic)
# Not needed by the denoise path, so not carried: torchvision, tqdm, scikit-learn, scipy, psutil,
# future (topaz only uses `from __future__`), pyarrow (starfile never imports it). On python < 3.12
# Topaz loads its models through pkg_resources (setuptools < 81); 3.12's importlib.resources suffices.
set -euo pipefail

WHL=${WHL:-.whl}
SITE=${TOPAZSITE:-/tmp/topazsite}
PY=${PYTHON:-python3}

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p "$WHL"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$WHL" \
        mrcfile starfile topaz-em==0.3.20 h5py
    # cryodeploy's model configs need pydantic, which the GPU machine lacks (checked 2026-12-02)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHL" \
        pydantic pydantic-core annotated-types typing-inspection typing-extensions
    "$PY" - "$WHL" "${TOPAZ_2D:-0}" <<'EOF'
import sys, zipfile
from pathlib import Path

whl = Path(sys.argv[1])
src = whl / "topaz_em-0.3.20-py3-none-any.whl"
dst = whl / "topaz_em-0.3.20-0denoise-py3-none-any.whl"
drop = ("topaz/pretrained/detector/",) + (("topaz/pretrained/denoise/unet-3d",) if sys.argv[2] == "1" else ())
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = [ln for ln in data.decode().splitlines() if not ln.startswith(drop)]
            data = ("\n".join(lines) + "\n").encode()
        elif info.filename.endswith(".dist-info/WHEEL"):
            data = data.decode().rstrip("\n").encode() + b"\nBuild: 0denoise\n"
        zout.writestr(info, data)
src.unlink()
print(f"# {dst.name}: {dst.stat().st_size / 2**20:.1f} MiB")
EOF
    ls -l "$WHL"
    du -ch "$WHL"/*.whl | tail -1
    exit 0
fi

# ---- on the GPU machine ---------------------------------------------------------------------
shopt -s nullglob
topaz=("$WHL"/topaz_em-0.3.20-*.whl)
io=("$WHL"/mrcfile-*.whl "$WHL"/starfile-*.whl)
h5=("$WHL"/h5py-*.whl)
[[ ${#topaz[@]} -eq 1 && ${#io[@]} -eq 2 ]] || { echo "error: run from the repo root with $WHL/ carried" >&2; exit 1; }
"$PY" -c "import numpy, torch, PIL, pandas, typing_extensions" \
    || { echo "error: $PY lacks one of numpy, torch, pillow, pandas, typing_extensions" >&2; exit 1; }
files=("${topaz[@]}" "${io[@]}")
"$PY" -c "import h5py" 2>/dev/null || files+=("${h5[@]}")
"$PY" -c "import pydantic" 2>/dev/null || files+=("$WHL"/pydantic*.whl "$WHL"/annotated_types-*.whl \
    "$WHL"/typing_inspection-*.whl "$WHL"/typing_extensions-*.whl)
if ! "$PY" -c "import sys; sys.exit(sys.version_info < (3, 12))"; then
    # python < 3.12: Topaz's loader falls back to pkg_resources
    "$PY" -c "import pkg_resources" 2>/dev/null || files+=("$WHL"/setuptools-*.whl)
fi
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}"
PYTHONPATH="$SITE" "$PY" -W ignore -c "
import mrcfile, starfile, torch, topaz, topaz.denoise
from topaz.denoising.models import load_model
load_model('unet')
print('# topaz', topaz.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())
"
cat <<EOF
# installed into $SITE: ${files[*]##*/}
# run (2-D micrographs or stacks; --volume for topaz denoise3d with unet-3d-10a/-20a):
#   PYTHONPATH=$SITE $PY benchmarks/topaz_denoise.py MICS/ -o \$OUT/topaz --model unet \\
#       --device cuda --in-memory-repeats 10 --json \$OUT/topaz_unet.json
EOF
