"""The default variant on CUDA: the fastest one that is correct, measured once per model, device and
torch version and remembered (``<cache>/variants/*.json``).

Correct means: an fp32 variant matches eager fp32 to ``rtol`` (relative to the output's range); an
fp16 variant passes the fp16 accuracy gate (:func:`~cryodeploy.backends.gate.fp16_gate`: at most
0.1 dB PSNR lost against eager fp32 on the model's synthetic calibration micrographs) — and matches
eager fp32 to :data:`FP16_RTOL`. Eager fp32 is always correct, so it is the fallback. On the CPU the
default stays eager fp32 (ONNX Runtime by the backend preference).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import CryoDeployError
from cryodeploy.files import atomic_write, cache_root

if TYPE_CHECKING:
    from cryodeploy.models.source import ModelSource

__all__ = ["CANDIDATES", "FP16_RTOL", "Trial", "cache_path", "choose_variant", "default_variant",
           "measure_variants"]

log = logging.getLogger(__name__)

#: (label, backend, precision, backend options) tried on CUDA, the reference first
CANDIDATES: tuple[tuple[str, str, str, tuple[tuple[str, Any], ...]], ...] = (
    ("eager fp32", "torch", "fp32", ()),
    ("CUDA graphs fp32", "torch", "fp32", (("cuda_graphs", True),)),
    ("eager fp16", "torch", "fp16", ()),
    ("CUDA graphs fp16", "torch", "fp16", (("cuda_graphs", True),)),
    ("fused Triton fp16", "fused", "fp16", ()),
)
# torch.compile is not a candidate but opt-in (``compile=True``, ``denoise --compile``): its faster
# forward (the default U-Net at 2048^2 on an H200: 5.7 ms against 8.3 ms with CUDA graphs, 2026-12-02)
# saves nothing in a file run bound by the disk (20 x 4096^2: 0.79-0.96 s against eager fp16's
# 0.78-0.84 s), while each process pays its tracing and cache loading (start-up 14.8 s to the first
# output, 23.9 s the first time; process wall for 20 files 24-27 s against 12-14 s).
#: fp32 variants must match eager fp32 to this (relative to the output's largest magnitude)
FP32_RTOL = 1e-5
#: fp16 variants: a sanity bound on top of the PSNR gate (fp16 has ~1e-3 relative resolution)
FP16_RTOL = 2e-2
_CACHE_FORMAT = 2  # 2: timed device-resident at 2048^2 (1: with host copies at 1024^2)


@dataclass(frozen=True)
class Trial:
    """One candidate's measurement: median ``ms`` per forward (None: could not run, ``note`` says
    why), relative error vs eager fp32, the fp16 gate's PSNR drop (fp16 only) and verdict."""

    label: str
    backend: str
    precision: str
    extra: tuple[tuple[str, Any], ...]
    ms: float | None
    rel_err: float | None = None
    drop_db: float | None = None
    gate_passed: bool | None = None
    note: str = ""

    @property
    def correct(self) -> bool:
        """Matches eager fp32 (fp32) or passes the fp16 gate and the fp16 bound (fp16/bf16)."""
        if self.ms is None or self.rel_err is None:
            return False
        if self.precision == "fp32":
            return self.rel_err <= FP32_RTOL
        return bool(self.gate_passed) and self.rel_err <= FP16_RTOL


def choose_variant(trials: list[Trial]) -> Trial:
    """The fastest correct trial; the first (eager fp32, the reference) when none is."""
    ok = [t for t in trials if t.correct]
    return min(ok, key=lambda t: t.ms or float("inf")) if ok else trials[0]


Candidate = tuple[str, str, str, tuple[tuple[str, Any], ...]]


def measure_variants(
    source: ModelSource, device: str, size: int = 2048, repeats: int = 5, calibration: int = 2,
    candidates: tuple[Candidate, ...] = CANDIDATES,
) -> list[Trial]:
    """Time every available candidate on a ``size``^2 batch (volume models: ``(size/16)``^3) and check it
    against eager fp32
    (outputs on that batch; denoising PSNR on ``calibration`` synthetic micrographs for fp16).

    A backend with a device-resident forward is timed on that (a batch already on the device, as the
    runner's device frame path calls it: the host copies are the same for every variant and would
    only hide the differences); others on :meth:`~cryodeploy.backends.base.Backend.run` with its copies.
    """
    from cryodeploy.backends import BackendOptions, availability, create_backend
    from cryodeploy.backends.gate import denoising_psnr, fp16_gate, synthetic_calibration

    cuda = device.startswith("cuda")
    side = (size,) * 2 if source.spec.ndim == 2 else (size // 16,) * 3  # volume models: 128^3 for 2048
    x = np.random.default_rng(0).standard_normal((1, 1, *side), dtype=np.float32)
    pairs = synthetic_calibration(source.spec, tuple(n // 2 for n in side), calibration)
    ref_out: np.ndarray | None = None
    ref_psnr = 0.0
    trials: list[Trial] = []
    for label, name, precision, extra in candidates:
        opts = BackendOptions(device=device, precision=precision, extra=extra)
        ok, why = availability(name, opts)
        if not ok:
            trials.append(Trial(label, name, precision, extra, None, note=why))
            continue
        try:
            with create_backend(name, source, opts) as b:
                t0 = time.perf_counter()
                out = b.run(x)  # first call: compilation, graph capture, autotuning
                first = time.perf_counter() - t0
                ms = _median_ms(b, x, repeats, cuda)
                psnr = denoising_psnr(b, source.spec, pairs)
        except (CryoDeployError, RuntimeError, ValueError, NotImplementedError) as err:
            trials.append(Trial(label, name, precision, extra, None, note=f"failed: {err}"[:200]))
            continue
        if ref_out is None:
            ref_out, ref_psnr = out, psnr
        rel = float(np.abs(out - ref_out).max() / max(float(np.abs(ref_out).max()), 1e-12))
        gate = fp16_gate(ref_psnr, psnr, samples=len(pairs)) if precision != "fp32" else None
        trials.append(Trial(label, name, precision, extra, ms, rel, gate.drop_db if gate else None,
                            gate.passed if gate else None, note=f"first call {first:.1f} s"))
    return trials


def _median_ms(backend: Any, x: np.ndarray, repeats: int, cuda: bool) -> float:
    """Median wall time of the device-resident forward on ``x`` where the backend has one (once on
    the device, outside the timing), else of ``backend.run(x)`` with its host copies; in ms."""
    import statistics

    arg: Any = x
    forward = backend.run
    if cuda:
        import torch

        if backend.device_resident:
            forward, arg = backend.run_device, torch.from_numpy(x).to(backend.device)
            forward(arg)  # this path's own first call (graph capture for this shape)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward(arg)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def cache_path(source: ModelSource, device: str) -> Path:
    """Where :func:`default_variant` keeps its record for ``source`` on ``device`` (``chosen`` and every
    ``trials`` entry, JSON), keyed by the model's sha256, the device's name and the torch version."""
    import hashlib

    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    text = json.dumps([_CACHE_FORMAT, source.sha256, name, torch.__version__])
    return cache_root("variants") / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def default_variant(source: ModelSource, device: str) -> Trial:
    """The chosen variant for ``source`` on ``device`` (eager fp32 on the CPU), measured once and cached."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():  # no GPU: the backend says why
        return Trial("eager fp32", "auto", "fp32", (), None)
    path = cache_path(source, device)
    try:
        d = json.loads(path.read_text())
        return Trial(**{**d["chosen"], "extra": tuple(tuple(e) for e in d["chosen"]["extra"])})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("measuring the fastest correct variant of %s on %s (once; cached in %s)",
                source.path.name, device, path.parent)
    trials = measure_variants(source, device)
    chosen = choose_variant(trials)
    with atomic_write(path) as tmp:
        record = {"chosen": asdict(chosen), "trials": [asdict(t) for t in trials]}
        tmp.write_text(json.dumps(record, indent=2))
    return chosen
