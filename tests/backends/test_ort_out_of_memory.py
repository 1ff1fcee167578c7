"""ONNX Runtime running out of memory, for real: ``cryodeploy denoise --backend ort`` in a subprocess whose
address space is capped (RLIMIT_AS) a little above what it has mapped once everything is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cryodeploy.io.mrc import write_micrograph

ROOT = Path(__file__).resolve().parents[2]
#: imports everything (and probes CUDA) first, caps the address space at what is mapped + argv[1] MiB,
#: then runs the CLI
CAPPED = """
import resource, sys
import numpy, onnxruntime, torch
import cryodeploy.backends.ort, cryodeploy.cli, cryodeploy.inference.runner
torch.cuda.is_available()  # CUDA (hidden) probed before the cap: under it, torch warns at the probe
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = vm + (int(sys.argv[1]) << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cryodeploy.cli.main(sys.argv[2:])
"""
ORT_LOG = ("onnxruntime:", "EP Error", "****", "Falling back", "Traceback", "internal error")


def test_out_of_memory_ends_in_one_line_per_file(cnn3_onnx, tmp_path) -> None:
    """At +100 MiB ONNX Runtime fails to allocate a 1024^2 tile (the run backs off to tile 512) and the
    file then fails on a later allocation: exit 1, one ``failed:`` line for the file, nothing printed
    by ONNX Runtime, no traceback, no claim or temp file."""
    src = write_micrograph(tmp_path / "m.mrc", np.random.default_rng(0).standard_normal((1024, 1024)))
    out = tmp_path / "out"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # the ONNX Runtime CPU path under a memory cap; no CUDA (torch's CUDA init warns under the cap)
    env = {**os.environ, "PYTHONPATH": path, "MALLOC_ARENA_MAX": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["denoise", str(src), "--model", str(cnn3_onnx), "--backend", "ort", "--device", "cpu",
            "--threads", "1", "--tile", "1024", "--batch", "1", "-o", str(out), "-q"]
    res = subprocess.run([sys.executable, "-c", CAPPED, "100", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    lines = (res.stdout + res.stderr).splitlines()
    assert not [line for line in lines if any(m in line for m in ORT_LOG)], lines
    assert res.returncode == 1, lines
    failed = [line for line in res.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(failed) == 1 and failed[0].startswith("failed: ") and "m.mrc: " in failed[0], lines
    warnings = [line for line in res.stderr.splitlines() if line.startswith("WARNING ")]
    assert warnings and all("ort/cpu/fp32: out of memory; tile reduced to " in w for w in warnings), lines
    assert res.stdout.startswith("denoised 0, skipped 0, failed 1 in ")
    assert not out.exists() or os.listdir(out) == []
