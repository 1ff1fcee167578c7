"""Tile plans: cut an image into overlapping windows whose centres stitch to the whole-image forward.

Construction (why the result is exact for a convolutional net without downsampling):

- A network with zero 'same' padding pads *every* layer's input at the image border. Padding
  the image with zeros and running a tile that sticks out of the image is therefore wrong from
  layer 2 on (``relu(conv1(0)) = relu(bias) != 0``). So no window ever sticks out of the image:
  a window that reaches a border is shifted inwards until its edge *is* the border, and the
  network's own padding then acts exactly where the whole-image forward applies it.
- Every window has the same shape ``(min(T, H), min(T, W))``, so tiles of one image (and of
  images of one size) share a batch.
- Each window owns a *valid* region (its centre); on sides that are not the image border,
  at least ``halo >= receptive radius`` pixels separate the valid region from the window edge,
  so no output pixel there sees the window's artificial padding.

For a net with total stride ``s`` (a U-Net), H and W are first padded to multiples of ``s``
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
from cryodeploy.imaging.contract import pad_to_stride

__all__ = ["Tile", "TilePlan", "halo_for", "min_tile"]

Region = tuple[slice, slice]


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
    """The tiling of one image of ``shape`` (padded to ``padded_shape``) into equal windows."""

    shape: tuple[int, int]
    padded_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: int
    stride: int
    tiles: tuple[Tile, ...]

    @classmethod
    def create(cls, shape: tuple[int, int], tile: int, radius: int, stride: int = 1) -> TilePlan:
        """Plan tiles of side ``tile`` (rounded down to the stride) for a model of ``radius``/``stride``."""
        if stride < 1:
            raise ConfigError(f"model stride must be >= 1, found {stride}")
        halo = halo_for(radius, stride)
        t = int(tile) // stride * stride
        if t < min_tile(radius, stride):
            raise ConfigError(
                f"tile {tile} is too small for the model (halo {halo} px each side, stride {stride}): "
                f"expected at least {min_tile(radius, stride)}"
            )
        h, w = int(shape[0]), int(shape[1])
        ph, pw = h + (-h % stride), w + (-w % stride)
        rows, cols = _axis_cuts(ph, t, halo), _axis_cuts(pw, t, halo)
        tiles = tuple(
            Tile(
                window=(slice(ys, ye), slice(xs, xe)),
                valid=(slice(ya, yb), slice(xa, xb)),
                inner=(slice(ya - ys, yb - ys), slice(xa - xs, xb - xs)),
            )
            for ys, ye, ya, yb in rows
            for xs, xe, xa, xb in cols
        )
        return cls((h, w), (ph, pw), (min(t, ph), min(t, pw)), halo, stride, tiles)

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
        """The image-sized top-left part of a padded array."""
        return padded[: self.shape[0], : self.shape[1]]
