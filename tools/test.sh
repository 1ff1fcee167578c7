#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# Used verbatim by CI (.ci/run) and by the README. Fails when a test fails or when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

# CPU PyTorch first (a plain 'torch' requirement could pull a multi-GB CUDA build), then the package.
"$py" -m pip install -q --disable-pip-version-check torch==2.13.0
"$py" -m pip install -q --disable-pip-version-check -e ".[dev]"

# TensorRT 10 type stubs, so mypy can check the TensorRT code (TensorRT itself is not installable here).
stubs=../shared/tools/install-trt-stubs.sh
[ -f "$stubs" ] || stubs=tools/install-trt-stubs.sh
bash "$stubs" "$py" >/dev/null

# Real clients used by tests: RELION 3.1 (relion_pipeliner) and Chromium (report rendering).
need_apt=()
command -v relion_pipeliner >/dev/null || need_apt+=(relion)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  elif [ "${CI:-}" = true ]; then
    echo "CI needs root to apt-get install ${need_apt[*]}" >&2; exit 1
  else
    echo "note: not root, not installing ${need_apt[*]}; the tests that need them will be skipped" >&2
  fi
fi

"$py" -m ruff check cryodeploy plugins tests benchmarks
"$py" -m mypy cryodeploy

set +e
"$py" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
