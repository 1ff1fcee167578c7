"""The fused CNN3 Triton backend: clean unavailability on CPU, exactness where it can run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.backends import BackendOptions, availability


def _size1_arrays_convert() -> bool:
    try:
        float(np.ones(1))  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


HAS_CUDA = importlib.util.find_spec("triton") is not None and __import__("torch").cuda.is_available()


def test_unavailable_reasons_name_what_is_missing() -> None:
    assert availability("fused", BackendOptions(device="cpu", precision="fp16")) == (
        False,
        "fused: CUDA only (Triton kernel)",
    )
    ok, reason = availability("fused", BackendOptions(device="cuda", precision="fp32"))
    assert not ok and reason == "fused: fp16/bf16 only, not fp32"


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode runs on CPU)"
)
@pytest.mark.skipif(
    not _size1_arrays_convert(),
    reason=f"Triton's interpreter calls float() on 1-element arrays, an error in numpy {np.__version__}",
)
def test_kernel_matches_cnn3_in_triton_interpreter(cnn3_checkpoint: Path) -> None:
    """TRITON_INTERPRET=1 runs the kernel's exact program logic on the CPU (fp16 intermediates)."""
    code = f"""
import torch
from cryodeploy.backends.fused.kernel import fused_cnn3_forward, pack_weights
from cryodeploy.models.checkpoint import load_checkpoint
model, _ = load_checkpoint({str(cnn3_checkpoint)!r})
x = torch.randn(2, 1, 37, 70, generator=torch.Generator().manual_seed(0))
y = fused_cnn3_forward(x, pack_weights(model, torch.float16, torch.device("cpu")), rows=12, programs=3)
with torch.no_grad():
    ref = model(x)
print(float((y - ref).abs().max() / ref.abs().max()))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 2e-3  # fp16 intermediates; measured 7e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and triton")
def test_fused_backend_matches_torch_on_gpu(cnn3_checkpoint: Path) -> None:
    from cryodeploy.backends import create_backend
    from cryodeploy.backends.sources import load_source

    source = load_source(cnn3_checkpoint)
    x = np.random.default_rng(0).standard_normal((2, 1, 300, 517)).astype(np.float32)
    with create_backend("torch", source, BackendOptions(device="cuda")) as ref_backend:
        ref = ref_backend.run(x)
    for precision, tol in (("fp16", 2e-3), ("bf16", 1.5e-2)):
        with create_backend("fused", source, BackendOptions(device="cuda", precision=precision)) as fused:
            out = fused.run(x)
        assert np.abs(out - ref).max() / np.abs(ref).max() < tol
