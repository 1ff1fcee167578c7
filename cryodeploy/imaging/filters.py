"""Classical filters and Fourier binning on 2-D frames (numpy, float32 in and out).

- :func:`fourier_bin`: downsample by ``n`` by keeping the central ``(H // n, W // n)`` Fourier
  coefficients (the output's Nyquist row/column, for even sizes, set to 0): no aliasing, and
  content below the new Nyquist frequency kept exactly; the pixel size grows by H/h'.
- :func:`lowpass`: zero every spatial frequency above ``1 / resolution`` with a raised-cosine
  edge of :data:`EDGE_WIDTH` cycles per pixel; ``resolution`` in Å with the pixel size, else
  in pixels (the period of the finest kept detail; 2 px = Nyquist).
- :func:`gaussian`: Gaussian blur of standard deviation ``sigma`` pixels (reflecting borders).

:class:`FrameFilters` is what ``cryodeploy denoise`` applies around the network (binning
first, then the low-pass and Gaussian either before or after the network), and how it
changes the header of the output. The Fourier filters treat the frame as periodic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.io.mrc import MicrographHeader

__all__ = ["EDGE_WIDTH", "NUMPY_OPS", "FilterOps", "FrameFilters", "check_lowpass", "fourier_bin", "gaussian",
           "header_pixel_size", "lowpass", "lowpass_transfer"]

#: width of the raised-cosine edge of :func:`lowpass`, in cycles per pixel
EDGE_WIDTH = 0.02


def _centre_slices(n: int, m: int) -> np.ndarray:
    """Indices (in numpy's FFT order) of the ``m`` lowest frequencies of an ``n``-point transform."""
    return np.fft.ifftshift(np.arange(m) - m // 2) % n


def fourier_bin(frame: np.ndarray, factor: int) -> np.ndarray:
    """``frame`` downsampled by ``factor`` through Fourier cropping to ``(H // factor, W // factor)``."""
    if factor < 1:
        raise ConfigError(f"bin factor {factor}: expected an integer >= 1")
    if factor == 1:
        return np.asarray(frame, dtype=np.float32)
    h, w = frame.shape
    oh, ow = h // factor, w // factor
    if oh < 1 or ow < 1:
        raise ConfigError(f"bin factor {factor}: a {w}x{h} frame would have no pixels left")
    spectrum = np.fft.fft2(np.asarray(frame, dtype=np.float64))
    cropped = spectrum[np.ix_(_centre_slices(h, oh), _centre_slices(w, ow))]
    if oh % 2 == 0:  # an even output size: its Nyquist row/column has no real-valued partner, drop it
        cropped[oh // 2, :] = 0
    if ow % 2 == 0:
        cropped[:, ow // 2] = 0
    out = np.fft.ifft2(cropped).real * (oh * ow) / (h * w)
    return out.astype(np.float32)


def lowpass_transfer(shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """The low-pass filter's real transfer function on ``np.fft.rfft2``'s grid; ``cutoff`` in cycles/px."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    t = np.clip((f - cutoff) / EDGE_WIDTH, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def check_lowpass(resolution: float, pixel_size: float | None) -> float:
    """The pixel size :func:`lowpass` uses (1 without one); :class:`ConfigError` if ``resolution``
    is finer than Nyquist."""
    px = pixel_size if pixel_size and pixel_size > 0 else 1.0
    if not resolution >= 2 * px:
        unit = "Å" if pixel_size else "px"
        raise ConfigError(
            f"lowpass {resolution:g} {unit}: expected at least 2 pixels ({2 * px:g} {unit}, Nyquist)"
        )
    return px


def lowpass(frame: np.ndarray, resolution: float, pixel_size: float | None = None) -> np.ndarray:
    """``frame`` with detail finer than ``resolution`` (Å if ``pixel_size`` is given, else px) removed."""
    px = check_lowpass(resolution, pixel_size)
    arr = np.asarray(frame, dtype=np.float64)
    spectrum = np.fft.rfft2(arr) * lowpass_transfer(arr.shape, px / resolution)
    return np.fft.irfft2(spectrum, s=arr.shape).astype(np.float32)


def gaussian(frame: np.ndarray, sigma: float) -> np.ndarray:
    """``frame`` blurred with a Gaussian of ``sigma`` pixels (borders reflected, kernel to 4 sigma)."""
    from scipy.ndimage import gaussian_filter

    if not sigma > 0:
        raise ConfigError(f"gaussian sigma {sigma:g}: expected > 0 pixels")
    return gaussian_filter(np.asarray(frame, dtype=np.float32), sigma, mode="reflect", truncate=4.0)


@dataclass(frozen=True)
class FilterOps:
    """The operations :class:`FrameFilters` composes, for one kind of array: numpy here
    (:data:`NUMPY_OPS`), torch tensors in :data:`cryodeploy.imaging.device_filters.TORCH_OPS`."""

    fourier_bin: Callable[[Any, int], Any]
    lowpass: Callable[[Any, float, float | None], Any]
    gaussian: Callable[[Any, float], Any]


NUMPY_OPS = FilterOps(fourier_bin, lowpass, gaussian)


@dataclass(frozen=True)
class FrameFilters:
    """Binning and filters around the network: ``bin`` first, then ``lowpass`` (Å with a known pixel
    size, else px) and ``gaussian`` (sigma in pixels of the binned frame) ``at`` before or after it."""

    bin: int = 1
    lowpass: float | None = None
    gaussian: float | None = None
    at: Literal["before", "after"] = "before"

    def __post_init__(self) -> None:
        if isinstance(self.bin, bool) or not isinstance(self.bin, int) or self.bin < 1:
            raise ConfigError(f"bin {self.bin!r}: expected an integer >= 1")
        if self.lowpass is not None and not self.lowpass > 0:
            raise ConfigError(f"lowpass {self.lowpass!r}: expected a positive resolution")
        if self.gaussian is not None and not self.gaussian > 0:
            raise ConfigError(f"gaussian {self.gaussian!r}: expected a positive sigma in pixels")
        if self.at not in ("before", "after"):
            raise ConfigError(f"filters at {self.at!r}: expected 'before' or 'after'")

    @property
    def active(self) -> bool:
        """True when anything is applied."""
        return self.bin > 1 or self.lowpass is not None or self.gaussian is not None

    def header(self, header: MicrographHeader) -> MicrographHeader:
        """The output's header: binned shape and pixel size (x, y) scaled by the size ratio."""
        if self.bin == 1:
            return header
        h, w = header.frame_shape
        oh, ow = h // self.bin, w // self.bin
        vx, vy, vz = header.voxel_size
        shape = (header.shape[0], oh, ow) if header.is_stack else (oh, ow)
        return dataclasses.replace(header, shape=shape, voxel_size=(vx * w / ow, vy * h / oh, vz))

    def _filter(self, frame: Any, pixel_size: float | None, ops: FilterOps) -> Any:
        if self.lowpass is not None:
            frame = ops.lowpass(frame, self.lowpass, pixel_size)
        if self.gaussian is not None:
            frame = ops.gaussian(frame, self.gaussian)
        return frame

    def before(self, frame: Any, header: MicrographHeader, ops: FilterOps = NUMPY_OPS) -> Any:
        """A frame as the network gets it: binned, and filtered if ``at == "before"``; ``ops``: the
        operations for the frame's kind of array (numpy by default; torch:
        :data:`~cryodeploy.imaging.device_filters.TORCH_OPS`)."""
        frame = ops.fourier_bin(frame, self.bin)
        if self.at != "before":
            return frame
        return self._filter(frame, header_pixel_size(self.header(header)), ops)

    @property
    def filters_after(self) -> bool:
        """True when a filter is applied to the network's output (``at == "after"``)."""
        return self.at == "after" and (self.lowpass is not None or self.gaussian is not None)

    def after(self, frame: Any, header: MicrographHeader, ops: FilterOps = NUMPY_OPS) -> Any:
        """A denoised frame (binned shape) filtered if ``at == "after"``; ``header``: the output's
        (what :meth:`header` made of the input's), whose pixel size the low-pass uses."""
        return self._filter(frame, header_pixel_size(header), ops) if self.at == "after" else frame


def header_pixel_size(header: MicrographHeader) -> float | None:
    """The frame's pixel size in Å, or None when the header does not know it (0)."""
    return float(header.voxel_size[0]) if header.voxel_size[0] > 0 else None
