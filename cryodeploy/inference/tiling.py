"""Tile plans: cut an image (or a volume) into overlapping windows whose centres stitch to the
whole-image forward. Everything below holds along each axis, so a plan of a (D, H, W) volume
is the product of its three axes' cuts, as that of an (H, W) image is of two.

Construction (why the result is exact for a convolutional net without downsampling):

- A network with zero 'same' padding pads *every* layer's input at the image border. Padding
  the image with zeros and running a tile that sticks out of the image is therefore wrong from
  layer 2 on (``relu(conv1(0)) = relu(bias) != 0``). So no window ever sticks out of the image:
  a window that reaches a border is shifted inwards until its edge *is* the border, and the
  network's own padding then acts exactly where the whole-image forward applies it.
- Every window has the same shape ``(min(T, H), min(T, W))`` (and ``min(T, D)`` in 3-D), so
  tiles of one image (and of images of one size) share a batch.
- Each window owns a *valid* region (its centre); on sides that are not the image border,
  at least ``halo >= receptive radius`` pixels separate the valid region from the window edge,
  so no output pixel there sees the window's artificial padding.

For a net with total stride ``s`` (a U-Net), every side is first padded to multiples of ``s``
by reflection at the bottom/right (:func:`~cryodeploy.imaging.contract.pad_to_stride`, identical for
whole-image and tiled runs; reflection avoids a step edge in the padded strip), and the tile,
halo and every window offset are multiples of ``s``, so pooling grids of a tile coincide with
the whole image's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.contract import crop_to, pad_to_stride

__all__ = ["Tile", "TilePlan", "halo_for", "min_tile"]

Region = tuple[slice, ...]


def halo_for(radius: int, stride: int = 1) -> int:
    """The halo: the receptive radius rounded up to a multiple of ``stride``."""
    return -(-int(radius) // stride) * stride


def min_tile(radius: int, stride: int = 1) -> int:
    """The smallest tile side that leaves a valid centre after two halos."""
    return 2 * halo_for(radius, stride) + stride


@dataclass(frozen=True)
class Tile:
    """One window: ``window`` is read from the padded image, ``valid`` (padded-image coordinates)
    is the part of the output it owns, ``inner`` is ``valid`` relative to the window."""

    window: Region
    valid: Region
    inner: Region


def _axis_cuts(n: int, t: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(window start, window end, valid start, valid end) along one axis of length ``n``."""
    if n <= t:
        return [(0, n, 0, n)]
    tv = t - 2 * halo
    count = -(-(n - 2 * halo) // tv)
    bounds = [0, *(halo + k * tv for k in range(1, count)), n]
    cuts = []
    for a, b in itertools.pairwise(bounds):
        start = min(max(a - halo, 0), n - t)
        cuts.append((start, start + t, a, b))
    return cuts


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one image or volume of ``shape`` (padded to ``padded_shape``) into equal windows."""

    shape: tuple[int, ...]
    padded_shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    halo: int
    stride: int
    tiles: tuple[Tile, ...]

    @classmethod
    def create(cls, shape: tuple[int, ...], tile: int, radius: int, stride: int = 1) -> TilePlan:
        """Plan tiles of side ``tile`` (rounded down to the stride; the same along every axis of
        ``shape``) for a model of ``radius``/``stride``."""
        if stride < 1:
            raise ConfigError(f"model stride must be >= 1, found {stride}")
        halo = halo_for(radius, stride)
        t = int(tile) // stride * stride
        if t < min_tile(radius, stride):
            raise ConfigError(
                f"tile {tile} is too small for the model (halo {halo} px each side, stride {stride}): "
                f"expected at least {min_tile(radius, stride)}"
            )
        size = tuple(int(n) for n in shape)
        padded = tuple(n + -n % stride for n in size)
        axes = [_axis_cuts(n, t, halo) for n in padded]
        tiles = tuple(
            Tile(
                window=tuple(slice(s, e) for s, e, _, _ in cuts),
                valid=tuple(slice(a, b) for _, _, a, b in cuts),
                inner=tuple(slice(a - s, b - s) for s, _, a, b in cuts),
            )
            for cuts in itertools.product(*axes)
        )
        return cls(size, padded, tuple(min(t, n) for n in padded), halo, stride, tiles)

    def __len__(self) -> int:
        return len(self.tiles)

    def pad(self, image: np.ndarray) -> np.ndarray:
        """The image padded to :attr:`padded_shape` (see :func:`pad_to_stride`)."""
        if image.shape != self.shape:
            raise ValueError(f"image shape {image.shape} differs from the plan's {self.shape}")
        return pad_to_stride(image, self.stride)

    def extract(self, padded: np.ndarray, index: int) -> np.ndarray:
        """The window of tile ``index`` (a view of the padded image)."""
        return padded[self.tiles[index].window]

    def stitch(self, out: np.ndarray, index: int, result: np.ndarray) -> None:
        """Copy the valid centre of tile ``index``'s ``result`` into the padded output ``out``."""
        t = self.tiles[index]
        out[t.valid] = result[t.inner]

    def crop(self, padded: np.ndarray) -> np.ndarray:
        """The image-sized leading corner of a padded array."""
        return crop_to(padded, self.shape)
