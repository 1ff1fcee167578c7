"""The image contract: how every model sees an image, written once.

``prepare`` normalizes a frame with the model's :class:`~cryodeploy.imaging.normalize.NormSpec`
and reflect-pads it at the far end of every axis to a multiple of the model stride; the network
runs on that; ``finish`` crops the output back to the frame and de-normalizes it to the input's
intensity scale. The runner, the fp16 accuracy gate, parity and evaluation all go through
:class:`FrameContract`, so training, inference and every check apply the same transform.
A frame is a 2-D image (H, W) for image models and a 3-D volume (D, H, W) for volume models
(``FrameContract.ndim``); the same rules apply along every axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec, NormStats, denormalize, norm_stats, normalize

__all__ = ["FrameContract", "PreparedFrame", "crop_to", "pad_to_stride", "stride_padding"]


def pad_to_stride(image: np.ndarray, stride: int) -> np.ndarray:
    """Reflect-pad an image (or volume) at the far end of every axis to multiples of ``stride``."""
    pads = stride_padding(image.shape, stride)
    if not any(pads):
        return image
    return np.pad(image, [(0, p) for p in pads], mode="reflect")


def stride_padding(shape: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """What each axis of ``shape`` ((H, W) or (D, H, W)) gains at its far end to a multiple of
    ``stride``; :class:`ConfigError` where reflection cannot give that many (the pad would reach the
    far side). The one rule of :func:`pad_to_stride` and the torch contract
    (:mod:`cryodeploy.imaging.device`)."""
    pads = tuple(-int(n) % stride for n in shape)
    if any(p >= n for p, n in zip(pads, shape, strict=True) if p):
        kind = "image" if len(shape) == 2 else "volume"
        size = "x".join(str(n) for n in reversed(shape))
        raise ConfigError(f"{kind} {size} is too small to pad to a multiple of the model stride {stride}")
    return pads


def crop_to(output: Any, shape: tuple[int, ...]) -> Any:
    """The leading ``shape`` corner of a (padded) array or tensor (its trailing axes)."""
    return output[(..., *(slice(0, n) for n in shape))]


@dataclass(frozen=True)
class PreparedFrame:
    """A frame as the network takes it: ``image`` normalized and padded; ``shape`` the frame's own."""

    image: np.ndarray
    shape: tuple[int, ...]
    stats: NormStats


@dataclass(frozen=True)
class FrameContract:
    """Normalize → pad to stride → run → crop → de-normalize, for one model's normalization and
    stride, on frames of ``ndim`` axes (2: images, 3: volumes)."""

    normalization: NormSpec = field(default_factory=NormSpec)
    stride: int = 1
    ndim: int = 2

    def check(self, frame: Any) -> tuple[int, ...]:
        """The shape of ``frame``; :class:`ConfigError` unless it has :attr:`ndim` axes."""
        shape = tuple(int(n) for n in frame.shape)
        if len(shape) != self.ndim:
            want = "a 2-D image (H, W)" if self.ndim == 2 else "a 3-D volume (D, H, W)"
            raise ConfigError(f"frame of shape {shape}: the model takes {want}")
        return shape

    def pad(self, image: np.ndarray) -> np.ndarray:
        """``image`` reflect-padded to a multiple of the stride (itself when it already is one)."""
        return pad_to_stride(image, self.stride)

    @staticmethod
    def crop(output: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The leading ``shape`` corner of a (padded) output."""
        return crop_to(output, shape)

    def prepare(self, frame: np.ndarray, stats: NormStats | None = None) -> PreparedFrame:
        """``frame`` normalized (with ``stats``, or its own robust statistics) and padded, as float32."""
        shape = self.check(frame)
        s = norm_stats(frame, self.normalization) if stats is None else stats
        return PreparedFrame(self.pad(normalize(frame, s)), shape, s)

    def finish(
        self, output: np.ndarray, stats: NormStats, shape: tuple[int, ...] | None = None,
        keep_normalized: bool = False,
    ) -> np.ndarray:
        """A network output cropped to ``shape`` (if given) and de-normalized (unless ``keep_normalized``)."""
        y = output if shape is None else self.crop(output, shape)
        return y if keep_normalized else denormalize(y, stats)

    def apply(
        self, frame: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], keep_normalized: bool = False
    ) -> np.ndarray:
        """The whole contract around ``forward`` (a padded, normalized float32 frame to its output)."""
        p = self.prepare(frame)
        return self.finish(forward(p.image), p.stats, p.shape, keep_normalized)
