"""TensorRT optimization profiles over (batch, height, width): ``--shapes`` parsing and validation,
and choosing the batch and tile a runner uses inside a profile. Pure Python."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryodeploy.errors import ConfigError, ModelError

__all__ = ["DEFAULT_SHAPES", "ProfileShapes", "Shape3", "parse_shapes", "plan_batches", "select_shape"]

#: (batch, height, width) of the model input ``[N, 1, H, W]``.
Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class ProfileShapes:
    """A TensorRT optimization profile over (batch, height, width): min <= opt <= max per dimension."""

    min: Shape3
    opt: Shape3
    max: Shape3

    def __post_init__(self) -> None:
        for name, shape in self._named():
            if len(shape) != 3 or any(int(d) < 1 for d in shape):
                raise ConfigError(
                    f"profile {name} shape {shape}, expected 3 positive sizes (batch, height, width)"
                )
        for i, dim in enumerate(("batch", "height", "width")):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise ConfigError(
                    f"profile {dim}: found min {self.min[i]}, opt {self.opt[i]}, max {self.max[i]}, "
                    "expected min <= opt <= max"
                )

    def _named(self) -> tuple[tuple[str, Shape3], ...]:
        return ("min", self.min), ("opt", self.opt), ("max", self.max)

    def check_stride(self, stride: int) -> None:
        """Raise :class:`ConfigError` unless every tile size is a multiple of the model's ``stride``."""
        for name, shape in self._named():
            if shape[1] % stride or shape[2] % stride:
                raise ConfigError(
                    f"profile {name} tile {shape[1]}x{shape[2]}: not a multiple of the model stride {stride}"
                )

    def input_shapes(self) -> list[tuple[int, int, int, int]]:
        """The min, opt and max shapes of the ``[N, 1, H, W]`` input tensor."""
        return [(b, 1, h, w) for b, h, w in (self.min, self.opt, self.max)]

    def contains(self, batch: int, height: int, width: int) -> bool:
        """Whether an input of this batch and tile size is inside the profile."""
        want = (batch, height, width)
        return all(lo <= v <= hi for lo, v, hi in zip(self.min, want, self.max, strict=True))

    def require(self, batch: int, height: int, width: int, where: str) -> None:
        """Raise :class:`ModelError` naming ``where`` unless this input fits the profile."""
        if not self.contains(batch, height, width):
            lo, hi = self.min, self.max
            raise ModelError(
                f"{where}: found batch {batch} of {height}x{width} tiles, expected batch {lo[0]}..{hi[0]} "
                f"and tiles {lo[1]}x{lo[2]}..{hi[1]}x{hi[2]} (the engine's profile); rebuild the engine "
                "with --shapes covering it, or use a tile size inside the profile"
            )

    def describe(self) -> str:
        """The ``--shapes`` text of this profile, e.g. ``1x256x256,4x1024x1024,8x2048x2048``."""
        return ",".join("x".join(str(d) for d in s) for s in (self.min, self.opt, self.max))

    @classmethod
    def from_input_shapes(cls, shapes: list[list[int]]) -> ProfileShapes:
        """From three ``[N, 1, H, W]`` shapes (min, opt, max), as an engine reports them."""
        if len(shapes) != 3 or any(len(s) != 4 or s[1] != 1 for s in shapes):
            raise ModelError(f"engine profile shapes {shapes}, expected min/opt/max of [N, 1, H, W]")
        lo, opt, hi = ((int(s[0]), int(s[2]), int(s[3])) for s in shapes)
        return cls(lo, opt, hi)


DEFAULT_SHAPES = ProfileShapes((1, 256, 256), (4, 1024, 1024), (8, 2048, 2048))

_SHAPE_RE = re.compile(r"^\s*(\d+)x(\d+)(?:x(\d+))?\s*$")


def parse_shapes(text: str, stride: int = 1) -> ProfileShapes:
    """Parse ``--shapes MIN,OPT,MAX`` where each is ``BATCHxTILE`` or ``BATCHxHEIGHTxWIDTH``.

    Checks min <= opt <= max per dimension and that tiles are multiples of ``stride``.
    """
    parts = text.split(",")
    if len(parts) != 3:
        raise ConfigError(
            f"--shapes {text!r}: found {len(parts)} shapes, expected MIN,OPT,MAX "
            "like 1x256x256,4x1024x1024,8x2048x2048"
        )
    shapes: list[Shape3] = []
    for part in parts:
        m = _SHAPE_RE.match(part)
        if m is None:
            raise ConfigError(f"--shapes {text!r}: found {part.strip()!r}, expected BATCHxHEIGHTxWIDTH")
        b, h, w = m.group(1), m.group(2), m.group(3) or m.group(2)
        shapes.append((int(b), int(h), int(w)))
    profile = ProfileShapes(*shapes)
    profile.check_stride(stride)
    return profile


def select_shape(
    profile: ProfileShapes, batch: int, tile: int | tuple[int, int], stride: int = 1
) -> tuple[int, tuple[int, int]]:
    """The batch and tile (height, width) to use when the runner wants ``batch`` tiles of size ``tile``.

    The tile is clamped into the profile's range and rounded down to a multiple of ``stride``
    (never below the profile's minimum); the batch is clamped into the profile's batch range.
    """
    want = (tile, tile) if isinstance(tile, int) else tile
    if batch < 1 or min(want) < 1:
        raise ConfigError(f"batch {batch} and tile {want} must be positive")
    size = []
    for i, t in enumerate(want, start=1):
        lo, hi = profile.min[i], profile.max[i]
        t = min(max(t, lo), hi)
        t = max(lo, t - t % stride)
        size.append(t)
    return min(max(batch, profile.min[0]), profile.max[0]), (size[0], size[1])


def plan_batches(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split ``n`` items into runs ``(start, stop, run_size)``: at most ``max_batch`` each, each
    padded up to ``min_batch`` (``run_size`` >= stop - start) so every run fits the profile."""
    if n < 1 or not 1 <= min_batch <= max_batch:
        raise ConfigError(f"cannot plan {n} items into batches of {min_batch}..{max_batch}")
    runs = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        runs.append((start, stop, max(stop - start, min_batch)))
    return runs
