"""The seeds' noise recipe (:mod:`cryodeploy.imaging.noise`) on torch tensors, where they are (CUDA or CPU).

The same definitions as the numpy path: :func:`unit_range_torch` takes the same percentiles of the same
regular subsample of rows (linear interpolation, as ``np.percentile``), the [0, 1] map clips in float32,
and a draw is ``Poisson(x * dose) / dose + N(0, sigma^2)``. The random numbers are torch's uniform and
normal ones (``torch.rand``, ``torch.randn``: Philox on CUDA) from one :class:`torch.Generator` per frame
and draw, seeded from the caller's key, so a frame's noise depends only on its key and the device type:
the numpy sampler, torch on the CPU and torch on CUDA give three different (equally distributed)
draws. torch's CUDA kernels hand out random numbers by a grid sized from the GPU's multiprocessor
count, so CUDA draws are the same for a key on the same GPU model and torch version
(:func:`torch_sampler` records both).

Poisson counts are drawn by inversion of one float64 uniform per pixel and part (count = the number
of cumulative Poisson probabilities below it), not by ``torch.poisson``: on CUDA that is cuRAND's
per-thread sampler, whose draws are correlated between pixels (pytorch/pytorch#136750; here its
sample variance at dose 500 came out 7 standard errors off). Rates above ``POISSON_PART`` are
drawn as the sum of ``ceil(dose / POISSON_PART)`` independent parts of rate ``x * dose / parts``, which
is exactly Poisson(``x * dose``) (a sum of independent Poissons is Poisson) and keeps ``exp(-rate)``
and the search short.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.noise import NoiseSpec
from cryodeploy.imaging.normalize import NormSpec, NormStats, norm_stats_torch

__all__ = ["POISSON_PART", "add_noise_torch", "frame_generator", "noisy_frame", "poisson_inversion",
           "poisson_parts", "to_unit_range_torch", "torch_sampler", "unit_range_torch"]

#: Largest rate of one Poisson part drawn by inversion.
POISSON_PART = 60.0

#: Poisson probabilities are summed until the tail beyond is below this (float64 uniforms: 2^-53).
_TAIL = 1e-17


def _f32(value: float) -> float:
    """``value`` rounded to float32, the scalar the numpy path applies."""
    return float(np.float32(value))


def torch_sampler(device: str) -> dict[str, Any]:
    """The manifest's record of torch's sampler on ``device`` (torch version, GPU name); refuses a
    device that is not 'cpu', 'cuda' or 'cuda:N', or a GPU torch does not see."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {device!r} unknown, expected 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} unknown, expected 'cpu', 'cuda' or 'cuda:N'")
    record: dict[str, Any] = {"name": "torch", "poisson": "inversion of float64 uniforms",
                              "device": dev.type, "torch": torch.__version__}
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested, but torch {torch.__version__} sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested, but torch sees "
                              f"{torch.cuda.device_count()} GPU(s)")
        record["device_name"] = torch.cuda.get_device_name(dev)
    return record


def frame_generator(seq: np.random.SeedSequence, device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` seeded from ``seq`` (e.g. keyed by seed, micrograph, frame, draw)."""
    state = seq.generate_state(1, np.uint64)[0]
    return torch.Generator(device=torch.device(device)).manual_seed(int(state))


def _percentiles(values: torch.Tensor, percentiles: Sequence[float]) -> list[float]:
    """``np.percentile(values, percentiles)`` (linear interpolation, numpy's rounding) of a tensor."""
    ordered = torch.sort(values.reshape(-1).to(torch.float64)).values
    n = ordered.numel()
    pos = [p / 100.0 * (n - 1) for p in percentiles]
    first = [min(int(q), n - 1) for q in pos]
    index = torch.tensor([k for i in first for k in (i, min(i + 1, n - 1))], device=ordered.device)
    ends = ordered[index].tolist()
    out = []
    for k, (q, i) in enumerate(zip(pos, first, strict=True)):
        a, b, t = ends[2 * k], ends[2 * k + 1], q - i
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))
    return out


def unit_range_torch(
    image: torch.Tensor, low_percentile: float = 0.1, high_percentile: float = 99.9
) -> tuple[float, float]:
    """:func:`~cryodeploy.imaging.noise.unit_range` of a 2-D tensor, on its device (one host sync)."""
    sample = image[:: max(1, image.shape[0] // 1024)].reshape(-1)
    lo, hi = _percentiles(sample, [low_percentile, high_percentile])
    if hi <= lo:
        raise ConfigError("image has no dynamic range to map to [0, 1]")
    return lo, hi


def to_unit_range_torch(image: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clip((image - lo) / (hi - lo), 0, 1)`` in float32, as the numpy path computes it."""
    x = image.to(torch.float32) - _f32(lo)
    x /= _f32(hi - lo)
    return x.clamp_(0.0, 1.0)


def poisson_parts(dose: float) -> int:
    """How many independent Poisson parts a draw at ``dose`` takes (each of rate <= POISSON_PART)."""
    return max(1, math.ceil(dose / POISSON_PART))


def _terms(rate: float) -> int:
    """How many Poisson terms (0, 1, ...) carry all but ``_TAIL`` of the mass at ``rate`` (a Chernoff
    bound: P(N >= k) <= exp(-rate) (e rate / k)^k for k > rate)."""
    k = max(math.ceil(rate) + 1, 1)
    while rate > 0 and -rate + k * (1.0 + math.log(rate / k)) > math.log(_TAIL):
        k += 1
    return k


def poisson_inversion(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson(``rate``) counts (float32, on ``rate``'s device; rates <= POISSON_PART), by inversion:
    the number of cumulative probabilities F(0), F(1), ... below one uniform per pixel."""
    lam = rate.double()
    u = torch.rand(lam.shape, generator=generator, device=lam.device, dtype=torch.float64)
    term = torch.exp(-lam)
    cdf = term.clone()
    counts = (u > cdf).to(torch.float32)
    for k in range(1, _terms(float(lam.max()) if lam.numel() else 0.0)):
        term.mul_(lam).div_(k)
        cdf.add_(term)
        counts.add_(u > cdf)
    return counts


def add_noise_torch(
    clean01: torch.Tensor, spec: NoiseSpec, generator: torch.Generator, dose: float
) -> torch.Tensor:
    """One noisy draw of a [0, 1] float32 image under ``spec`` at ``dose``, float32, on its device:
    the Poisson parts first, then the Gaussian, all from ``generator``."""
    x = clean01.clamp(min=0.0)
    if dose > 0:
        parts = poisson_parts(dose)
        rate = x * _f32(dose / parts)
        counts = poisson_inversion(rate, generator)
        for _ in range(parts - 1):
            counts += poisson_inversion(rate, generator)
        noisy = counts.div_(_f32(dose))
    else:
        noisy = x.clone()
    if spec.sigma > 0:
        gauss = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        noisy += gauss.mul_(_f32(spec.sigma))
    return noisy


def noisy_frame(
    image: np.ndarray,
    spec: NoiseSpec,
    dose: float,
    streams: Sequence[np.random.SeedSequence],
    normalization: NormSpec,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray, NormStats]:
    """Input and target of one frame, as float32 numpy arrays, and the statistics that normalized both.

    One stream: the input is a draw, the target the [0, 1] image (``noise`` targets); two streams: two
    independent draws (``noise2noise``). Both are normalized with the input's statistics
    (:func:`~cryodeploy.imaging.normalize.norm_stats_torch`). Every step runs on ``device``; on a GPU
    on a stream of its own (so frames prepared by several threads overlap their copies and kernels),
    from and back into pinned host memory.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return _noisy_frame(image, spec, dose, streams, normalization, dev)
    stream = _thread_stream(dev)
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        out = _noisy_frame(image, spec, dose, streams, normalization, dev)
        stream.synchronize()
    return out


_streams = threading.local()


def _thread_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's CUDA stream on ``device`` (one each, so the caching allocator reuses its blocks)."""
    cache: dict[torch.device, torch.cuda.Stream] = _streams.__dict__.setdefault("by_device", {})
    if device not in cache:
        cache[device] = torch.cuda.Stream(device)
    return cache[device]


def _noisy_frame(
    image: np.ndarray,
    spec: NoiseSpec,
    dose: float,
    streams: Sequence[np.random.SeedSequence],
    normalization: NormSpec,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, NormStats]:
    """:func:`noisy_frame` on the current stream; on a GPU the results are ready once it is synchronized."""
    cuda = device.type == "cuda"
    with warnings.catch_warnings():  # a read-only array (a memory map) is only read: no copy needed
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if cuda:
        x = torch.empty(x.shape, dtype=torch.float32, pin_memory=True).copy_(x).to(device, non_blocking=True)
    lo, hi = unit_range_torch(x)
    clean01 = to_unit_range_torch(x, lo, hi)
    del x
    draws = [add_noise_torch(clean01, spec, frame_generator(seq, device), dose) for seq in streams]
    inp, tgt = draws[0], draws[1] if len(draws) > 1 else clean01
    center, scale = (float(v[0]) for v in norm_stats_torch(inp[None], normalization))
    stats = NormStats(center=center, scale=scale)
    shift = _f32(center / scale)
    out = [t.div_(_f32(scale)).sub_(shift) for t in (inp, tgt)]
    if cuda:
        out = [torch.empty(t.shape, dtype=torch.float32, pin_memory=True).copy_(t, non_blocking=True)
               for t in out]
    return out[0].numpy(), out[1].numpy(), stats
