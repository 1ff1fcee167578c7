"""The image contract on torch tensors: the same :class:`~cryodeploy.imaging.contract.FrameContract`
(same normalization definition, same stride padding), run where the tensors are (CUDA or CPU).

Definitions shared with the numpy path (:mod:`cryodeploy.imaging.normalize`):

- statistics: linear-interpolated percentiles of the regular subsample ``flat[::step]``
  (``step = max(1, n // 2**20)``), then mean and population std of the pixels between them,
  all in float64 (the subsample is at most 2^21 pixels);
- ``normalize``: ``x / scale - center / scale`` in float32; ``denormalize``:
  ``(z + center / scale) * scale`` in float32 (no ``x - center`` that could overflow near the
  float32 limit).

The two implementations agree to float32 rounding: statistics within 1e-6 relative to the scale,
normalized pixels within 2 float32 ulps of their magnitude + 1 (tests/imaging/test_device.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryodeploy.errors import InputError, OutputError
from cryodeploy.imaging.contract import FrameContract, crop_to, stride_padding
from cryodeploy.imaging.normalize import NormSpec, NormStats, norm_stats_torch

__all__ = ["DeviceFrameContract", "DevicePrepared", "header_stats", "validate_frames",
           "validate_volume_tensor", "volume_header_stats"]


def _norm_stats(image: torch.Tensor, spec: NormSpec) -> NormStats:
    center, scale = norm_stats_torch(image.reshape(1, -1), spec)
    return NormStats(center=float(center[0]), scale=float(scale[0]))


def validate_frames(frames: torch.Tensor, path: object) -> None:
    """The pixel checks of :func:`~cryodeploy.io.mrc.validate_array` on ``[n, h, w]`` (one host sync)."""
    finite = torch.isfinite(frames)
    n_bad = (~finite).sum(dim=(-2, -1))
    lo = frames.amin(dim=(-2, -1))
    hi = frames.amax(dim=(-2, -1))
    bad, los, his = torch.stack([n_bad.to(lo.dtype), lo, hi]).tolist()
    for i, (nb, a, b) in enumerate(zip(bad, los, his, strict=True)):
        where = f" (frame {i})" if len(bad) > 1 else ""
        if nb:
            raise InputError(f"{path}: found {int(nb)} NaN/Inf values{where}, expected finite pixels")
        if a == b:
            raise InputError(f"{path}: image is constant ({a:g}){where}, expected non-zero variance")


def validate_volume_tensor(volume: torch.Tensor, path: object, min_size: int, min_depth: int) -> None:
    """The checks of :func:`~cryodeploy.io.volumes.validate_volume` on a [nz, ny, nx] tensor, with its
    messages (one host sync)."""
    nz, ny, nx = volume.shape
    if ny < min_size or nx < min_size or nz < min_depth:
        raise InputError(
            f"{path}: volume is {nx}x{ny}x{nz} voxels, expected at least {min_size}x{min_size}x{min_depth}"
        )
    bad = (~torch.isfinite(volume)).sum(dim=(1, 2))
    first = torch.argmax((bad > 0).to(torch.int32))
    lo, hi = volume.amin(), volume.amax()
    n_bad, k, a, b = torch.stack([bad.sum().double(), first.double(), lo.double(), hi.double()]).tolist()
    if n_bad:
        raise InputError(
            f"{path}: found {int(n_bad)} NaN/Inf values (first in section {int(k)}), expected finite voxels"
        )
    if a == b:
        raise InputError(f"{path}: volume is constant ({a:g}), expected non-zero variance")


@dataclass(frozen=True)
class DevicePrepared:
    """A frame as the network takes it (a tensor, normalized and padded); ``shape`` the frame's own."""

    image: torch.Tensor
    shape: tuple[int, ...]
    stats: NormStats


@dataclass(frozen=True)
class DeviceFrameContract:
    """:class:`FrameContract` on float32 tensors, 2-D or 3-D as the contract's ``ndim`` (the statistics,
    padding and maps defined there)."""

    contract: FrameContract

    def stats(self, frame: torch.Tensor) -> NormStats:
        """Robust center and scale of ``frame``, as :func:`~cryodeploy.imaging.normalize.norm_stats`."""
        return _norm_stats(frame, self.contract.normalization)

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` reflect-padded at the far end of every axis to a multiple of the stride."""
        pads = stride_padding(tuple(image.shape), self.contract.stride)
        if not any(pads):
            return image
        widths = [w for p in reversed(pads) for w in (0, p)]
        return F.pad(image[None, None], widths, mode="reflect")[0, 0]

    def prepare(self, frame: torch.Tensor, stats: NormStats | None = None) -> DevicePrepared:
        """``frame`` normalized (with ``stats`` or its own) and padded, float32, on its device."""
        shape = self.contract.check(frame)
        s = self.stats(frame) if stats is None else stats
        z = frame.to(torch.float32).div(s.scale)
        z.sub_(s.center / s.scale)
        return DevicePrepared(self.pad(z), shape, s)

    def finish(
        self, output: torch.Tensor, stats: NormStats, shape: tuple[int, ...] | None = None,
        keep_normalized: bool = False, dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A network output cropped to ``shape``, de-normalized (unless ``keep_normalized``), as ``dtype``."""
        y = output if shape is None else crop_to(output, shape)
        if not keep_normalized:
            y = y.add(stats.center / stats.scale)
            y.mul_(stats.scale)
        return y.to(dtype)


def header_stats(
    data: torch.Tensor, path: object, dtype_name: str, before_cast: torch.Tensor | None = None
) -> tuple[float, float, float, float]:
    """(min, max, mean, rms) of an output as the MRC header stores them; :class:`OutputError` if not
    finite (saying the values overflowed ``dtype_name`` when ``before_cast``, the float32 output,
    was finite). Mean and rms (population std) are accumulated in float64, one host sync.
    """
    x = data.reshape(-1)
    lo, hi = x.amin().float(), x.amax().float()
    mean = x.mean(dtype=torch.float64)
    rms = (x.to(torch.float64) - mean).square().mean().sqrt()
    a, b, m, r = torch.stack([lo.double(), hi.double(), mean, rms]).tolist()
    if not all(v == v and abs(v) != float("inf") for v in (a, b)):
        n_bad = int((~torch.isfinite(x)).sum())
        limit = float(torch.finfo(data.dtype).max)
        why = ""
        if before_cast is not None and bool(torch.isfinite(before_cast).all()):
            why = f" (values beyond the {dtype_name} range of +-{limit:g}; write float32 instead)"
        raise OutputError(
            f"{path}: found {n_bad} NaN/Inf values in the {dtype_name} output{why}, expected finite pixels"
        )
    return a, b, m, r


def volume_header_stats(
    data: torch.Tensor, path: object, dtype_name: str, before_cast: torch.Tensor | None = None,
    slab_voxels: int = 1 << 24,
) -> tuple[float, float, float, float]:
    """:func:`header_stats` of a [nz, ny, nx] volume accumulated over slabs of sections (float64
    temporaries of one slab, not of the volume), one host sync."""
    step = max(1, slab_voxels // max(1, data.shape[1] * data.shape[2]))
    slabs = [data[z:z + step] for z in range(0, data.shape[0], step)]
    n = data.numel()
    lo = torch.stack([s.amin() for s in slabs]).amin().double()
    hi = torch.stack([s.amax() for s in slabs]).amax().double()
    mean = torch.stack([s.sum(dtype=torch.float64) for s in slabs]).sum() / n
    m2 = torch.stack([(s.to(torch.float64) - mean).square().sum() for s in slabs]).sum()
    a, b, m, r = torch.stack([lo, hi, mean, (m2 / n).sqrt()]).tolist()
    if not all(v == v and abs(v) != float("inf") for v in (a, b)):
        header_stats(data, path, dtype_name, before_cast)  # raises, saying why
    return a, b, m, r
