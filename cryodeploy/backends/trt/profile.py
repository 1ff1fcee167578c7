"""TensorRT optimization profiles over (batch, height, width), or (batch, depth, height, width) for
volume models: ``--shapes`` parsing and validation, and choosing the batch and tile a runner uses
inside a profile. Pure Python."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryodeploy.errors import ConfigError, ModelError

__all__ = ["DEFAULT_SHAPES", "DEFAULT_SHAPES_3D", "ProfileShape", "ProfileShapes", "default_shapes",
           "parse_shapes", "plan_batches", "select_shape"]

#: (batch, height, width) of an image model's input ``[N, 1, H, W]``, or (batch, depth, height,
#: width) of a volume model's ``[N, 1, D, H, W]``
ProfileShape = tuple[int, ...]

_AXES = {2: ("batch", "height", "width"), 3: ("batch", "depth", "height", "width")}


@dataclass(frozen=True)
class ProfileShapes:
    """A TensorRT optimization profile over (batch, height, width), or (batch, depth, height, width)
    for volume models: min <= opt <= max per dimension."""

    min: ProfileShape
    opt: ProfileShape
    max: ProfileShape

    def __post_init__(self) -> None:
        for name, shape in self._named():
            if len(shape) not in (3, 4) or len(shape) != len(self.min) or any(int(d) < 1 for d in shape):
                raise ConfigError(
                    f"profile {name} shape {shape}, expected 3 positive sizes (batch, height, width) "
                    "or 4 (batch, depth, height, width), the same number in min, opt and max"
                )
        for i, dim in enumerate(_AXES[self.ndim]):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise ConfigError(
                    f"profile {dim}: found min {self.min[i]}, opt {self.opt[i]}, max {self.max[i]}, "
                    "expected min <= opt <= max"
                )

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the input: 2 (images) or 3 (volumes)."""
        return len(self.min) - 1

    def _named(self) -> tuple[tuple[str, ProfileShape], ...]:
        return ("min", self.min), ("opt", self.opt), ("max", self.max)

    def check_stride(self, stride: int) -> None:
        """Raise :class:`ConfigError` unless every tile size is a multiple of the model's ``stride``."""
        for name, shape in self._named():
            if any(side % stride for side in shape[1:]):
                raise ConfigError(
                    f"profile {name} tile {_tile(shape[1:])}: not a multiple of the model stride {stride}"
                )

    def check_ndim(self, ndim: int) -> None:
        """Raise :class:`ConfigError` unless the profile's tiles have the model's ``ndim`` sides."""
        if ndim != self.ndim:
            kind = {2: "an image model: BATCHxHEIGHTxWIDTH", 3: "a volume model: BATCHxDEPTHxHEIGHTxWIDTH"}
            raise ConfigError(f"profile {self.describe()} has {self.ndim}-D tiles, expected {kind[ndim]}")

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The min, opt and max shapes of the ``[N, 1, H, W]`` (``[N, 1, D, H, W]``) input tensor."""
        return [(s[0], 1, *s[1:]) for s in (self.min, self.opt, self.max)]

    def contains(self, batch: int, sides: tuple[int, ...]) -> bool:
        """Whether an input of this batch and tile ``sides`` is inside the profile."""
        want = (batch, *sides)
        return len(want) == len(self.min) and all(
            lo <= v <= hi for lo, v, hi in zip(self.min, want, self.max, strict=True))

    def require(self, batch: int, sides: tuple[int, ...], where: str) -> None:
        """Raise :class:`ModelError` naming ``where`` unless this input fits the profile."""
        if not self.contains(batch, sides):
            lo, hi = self.min, self.max
            raise ModelError(
                f"{where}: found batch {batch} of {_tile(sides)} tiles, expected batch {lo[0]}..{hi[0]} "
                f"and tiles {_tile(lo[1:])}..{_tile(hi[1:])} (the engine's profile); rebuild the engine "
                "with --shapes covering it, or use a tile size inside the profile"
            )

    def describe(self) -> str:
        """The ``--shapes`` text of this profile, e.g. ``1x256x256,4x1024x1024,8x2048x2048``."""
        return ",".join("x".join(str(d) for d in s) for s in (self.min, self.opt, self.max))

    @classmethod
    def from_input_shapes(cls, shapes: list[list[int]]) -> ProfileShapes:
        """From three ``[N, 1, H, W]`` (or ``[N, 1, D, H, W]``) shapes (min, opt, max), as an engine
        reports them."""
        if len(shapes) != 3 or any(len(s) not in (4, 5) or len(s) != len(shapes[0]) or s[1] != 1
                                   for s in shapes):
            raise ModelError(f"engine profile shapes {shapes}, expected min/opt/max of [N, 1, H, W] "
                             "or [N, 1, D, H, W]")
        lo, opt, hi = ((int(s[0]), *(int(d) for d in s[2:])) for s in shapes)
        return cls(lo, opt, hi)


def _tile(sides: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in sides)


DEFAULT_SHAPES = ProfileShapes((1, 256, 256), (4, 1024, 1024), (8, 2048, 2048))
DEFAULT_SHAPES_3D = ProfileShapes((1, 64, 64, 64), (2, 128, 128, 128), (4, 256, 256, 256))


def default_shapes(ndim: int) -> ProfileShapes:
    """The default profile of an image (``ndim`` 2) or volume (3) model."""
    return DEFAULT_SHAPES if ndim == 2 else DEFAULT_SHAPES_3D


_SHAPE_RE = re.compile(r"^\s*(\d+(?:x\d+){1,3})\s*$")


def parse_shapes(text: str, stride: int = 1, ndim: int = 2) -> ProfileShapes:
    """Parse ``--shapes MIN,OPT,MAX`` where each is ``BATCHxTILE`` (a tile of ``ndim`` equal sides),
    ``BATCHxHEIGHTxWIDTH`` or ``BATCHxDEPTHxHEIGHTxWIDTH``.

    Checks min <= opt <= max per dimension and that tiles are multiples of ``stride``.
    """
    parts = text.split(",")
    if len(parts) != 3:
        raise ConfigError(
            f"--shapes {text!r}: found {len(parts)} shapes, expected MIN,OPT,MAX "
            "like 1x256x256,4x1024x1024,8x2048x2048"
        )
    shapes: list[ProfileShape] = []
    for part in parts:
        m = _SHAPE_RE.match(part)
        if m is None:
            raise ConfigError(f"--shapes {text!r}: found {part.strip()!r}, expected BATCHxHEIGHTxWIDTH "
                              "or BATCHxDEPTHxHEIGHTxWIDTH")
        dims = tuple(int(d) for d in m.group(1).split("x"))
        shapes.append(dims if len(dims) > 2 else (dims[0], *(dims[1],) * ndim))
    profile = ProfileShapes(*shapes)
    profile.check_stride(stride)
    return profile


def select_shape(
    profile: ProfileShapes, batch: int, tile: int | tuple[int, ...], stride: int = 1
) -> tuple[int, tuple[int, ...]]:
    """The batch and tile sides to use when the runner wants ``batch`` tiles of size ``tile``.

    The tile is clamped into the profile's range and rounded down to a multiple of ``stride``
    (never below the profile's minimum); the batch is clamped into the profile's batch range.
    """
    want = (tile,) * profile.ndim if isinstance(tile, int) else tile
    if batch < 1 or min(want) < 1:
        raise ConfigError(f"batch {batch} and tile {want} must be positive")
    size = []
    for i, t in enumerate(want, start=1):
        lo, hi = profile.min[i], profile.max[i]
        t = min(max(t, lo), hi)
        t = max(lo, t - t % stride)
        size.append(t)
    return min(max(batch, profile.min[0]), profile.max[0]), tuple(size)


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
