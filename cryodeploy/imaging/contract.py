"""The image contract: how every model sees an image, written once.

``prepare`` normalizes a 2-D frame with the model's :class:`~cryodeploy.imaging.normalize.NormSpec`
and reflect-pads it at the bottom/right to a multiple of the model stride; the network runs
on that; ``finish`` crops the output back to the frame and de-normalizes it to the input's
intensity scale. The runner, the fp16 accuracy gate, parity and evaluation all go through
:class:`FrameContract`, so training, inference and every check apply the same transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec, NormStats, denormalize, norm_stats, normalize

__all__ = ["FrameContract", "PreparedFrame", "pad_to_stride", "stride_padding"]


def pad_to_stride(image: np.ndarray, stride: int) -> np.ndarray:
    """Reflect-pad a 2-D image at the bottom/right so both sides are multiples of ``stride``."""
    ph, pw = stride_padding(image.shape, stride)
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw)), mode="reflect")


def stride_padding(shape: tuple[int, ...], stride: int) -> tuple[int, int]:
    """Rows and columns a ``shape`` (H, W) image gains at the bottom/right to multiples of ``stride``;
    :class:`ConfigError` where reflection cannot give that many (the pad would reach the far side).
    The one rule of :func:`pad_to_stride` and the torch contract (:mod:`cryodeploy.imaging.device`)."""
    h, w = shape
    ph, pw = -h % stride, -w % stride
    if (ph or pw) and (ph >= h or pw >= w):
        raise ConfigError(f"image {w}x{h} is too small to pad to a multiple of the model stride {stride}")
    return ph, pw


@dataclass(frozen=True)
class PreparedFrame:
    """A frame as the network takes it: ``image`` normalized and padded; ``shape`` the frame's own."""

    image: np.ndarray
    shape: tuple[int, int]
    stats: NormStats


@dataclass(frozen=True)
class FrameContract:
    """Normalize → pad to stride → run → crop → de-normalize, for one model's normalization and stride."""

    normalization: NormSpec = field(default_factory=NormSpec)
    stride: int = 1

    def pad(self, image: np.ndarray) -> np.ndarray:
        """``image`` reflect-padded to a multiple of the stride (itself when it already is one)."""
        return pad_to_stride(image, self.stride)

    @staticmethod
    def crop(output: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The top-left ``shape`` of a (padded) output."""
        return output[: shape[0], : shape[1]]

    def prepare(self, frame: np.ndarray, stats: NormStats | None = None) -> PreparedFrame:
        """``frame`` normalized (with ``stats``, or its own robust statistics) and padded, as float32."""
        s = norm_stats(frame, self.normalization) if stats is None else stats
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        return PreparedFrame(self.pad(normalize(frame, s)), shape, s)

    def finish(
        self, output: np.ndarray, stats: NormStats, shape: tuple[int, int] | None = None,
        keep_normalized: bool = False,
    ) -> np.ndarray:
        """A network output cropped to ``shape`` (if given) and de-normalized (unless ``keep_normalized``)."""
        y = output if shape is None else self.crop(output, shape)
        return y if keep_normalized else denormalize(y, stats)

    def apply(
        self, frame: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], keep_normalized: bool = False
    ) -> np.ndarray:
        """The whole contract around ``forward`` (a padded, normalized 2-D float32 image to its output)."""
        p = self.prepare(frame)
        return self.finish(forward(p.image), p.stats, p.shape, keep_normalized)
