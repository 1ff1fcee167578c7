"""Movies (frame stacks): streamed frame by frame into sums, and even/odd sums as Noise2Noise pairs.

A movie is an MRC/MRCS stack (memory-mapped: one frame read at a time) or a multi-page TIFF
(one page at a time), frames first. EER is not read (no maintained reader installs here).
Each frame is multiplied by the gain reference if one is given (the MotionCor2/RELION
convention: a 2-D MRC or TIFF of the frame's shape). Sums are float64 while accumulating;
memory is two sums and one frame, whatever the number of frames. Binning (Fourier cropping,
:func:`cryodeploy.imaging.filters.fourier_bin`) is applied to the sums, which equals binning
every frame first because the crop is linear.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryodeploy.errors import ConfigError, InputError, first_line
from cryodeploy.imaging.filters import fourier_bin
from cryodeploy.io.mrc import MIN_SIZE, Micrograph, MicrographHeader, validate_array, write_micrograph

__all__ = ["MOVIE_SUFFIXES", "MovieConfig", "MovieSums", "movie_frames", "movie_micrograph", "sum_movie",
           "write_even_odd"]

MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff")


@dataclass(frozen=True)
class MovieConfig:
    """How frames become sums: an optional ``gain`` reference (multiplied in) and a ``bin`` factor."""

    gain: Path | None = None
    bin: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bin, bool) or not isinstance(self.bin, int) or self.bin < 1:
            raise ConfigError(f"movie bin {self.bin!r}: expected an integer >= 1")
        if self.gain is not None:
            object.__setattr__(self, "gain", Path(self.gain))


@dataclass
class MovieSums:
    """The even (0, 2, ...) and odd (1, 3, ...) frame sums of a movie, and its pixel size (Å, 0: unknown)."""

    even: np.ndarray
    odd: np.ndarray
    frames: int
    pixel_size: float

    @property
    def total(self) -> np.ndarray:
        """The sum of every frame."""
        return (self.even.astype(np.float64) + self.odd).astype(np.float32)

    def header(self) -> MicrographHeader:
        """An MRC header for one of the sums (float32, 2-D, with the pixel size)."""
        px = self.pixel_size
        return MicrographHeader(shape=self.even.shape, mode=2, voxel_size=(px, px, px),
                                origin=(0.0, 0.0, 0.0))


def _tiff_frames(path: Path) -> tuple[Iterator[np.ndarray], float]:
    import tifffile

    def frames() -> Iterator[np.ndarray]:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                yield np.asarray(page.asarray(), dtype=np.float32)  # type: ignore[union-attr]

    return frames(), 0.0


def _mrc_frames(path: Path) -> tuple[Iterator[np.ndarray], float]:
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    px = float(mrc.voxel_size.x)

    def frames() -> Iterator[np.ndarray]:
        with mrc:
            data = mrc.data
            stack = data.reshape(1, *data.shape) if data.ndim == 2 else data
            for frame in stack:
                yield np.array(frame, dtype=np.float32)  # a copy: one frame in memory at a time

    return frames(), px


def movie_frames(path: str | os.PathLike[str]) -> tuple[Iterator[np.ndarray], float]:
    """(an iterator over the movie's frames as float32, its pixel size in Å or 0 if unknown)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file, expected a movie ({', '.join(MOVIE_SUFFIXES)})")
    suffix = p.suffix.lower()
    if suffix == ".eer":
        raise InputError(f"{p}: EER movies are not supported (no maintained EER reader); convert to TIFF")
    if suffix not in MOVIE_SUFFIXES:
        raise InputError(f"{p}: unknown movie type {suffix!r}, expected one of {', '.join(MOVIE_SUFFIXES)}")
    try:
        return _tiff_frames(p) if suffix in (".tif", ".tiff") else _mrc_frames(p)
    except (ValueError, OSError, EOFError, TypeError, IndexError) as err:
        raise InputError(f"{p}: not a readable movie ({first_line(err, type(err).__name__)})") from err


def _gain(config: MovieConfig) -> np.ndarray | None:
    if config.gain is None:
        return None
    if config.gain.suffix.lower() in (".tif", ".tiff"):
        frames, _ = _tiff_frames(config.gain)
    else:
        frames, _ = _mrc_frames(config.gain)
    try:
        gain = next(frames)
    except (StopIteration, ValueError, OSError) as err:
        raise InputError(f"{config.gain}: not a readable gain reference ({err})") from err
    if not np.isfinite(gain).all():
        raise InputError(f"{config.gain}: found non-finite values, expected a finite gain reference")
    return gain


def sum_movie(path: str | os.PathLike[str], config: MovieConfig | None = None) -> MovieSums:
    """Stream ``path``'s frames (times the gain) into even and odd sums, then bin them."""
    cfg = config or MovieConfig()
    p = Path(path)
    gain = _gain(cfg)
    frames, px = movie_frames(p)
    sums: list[np.ndarray] = []
    n = 0
    try:
        for n, frame in enumerate(frames, start=1):
            if frame.ndim != 2:
                raise InputError(f"{p}: frame {n - 1} has shape {frame.shape}, expected 2-D frames")
            if gain is not None:
                if gain.shape != frame.shape:
                    raise InputError(f"{cfg.gain}: gain reference is {gain.shape[1]}x{gain.shape[0]}, "
                                     f"expected the {frame.shape[1]}x{frame.shape[0]} frames of {p}")
                frame = frame * gain
            if len(sums) < 2:
                sums.append(frame.astype(np.float64))
            elif sums[0].shape != frame.shape:
                raise InputError(f"{p}: frame {n - 1} has shape {frame.shape}, expected {sums[0].shape}")
            else:
                sums[(n - 1) % 2] += frame
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{p}: not a readable movie ({first_line(err, type(err).__name__)})") from err
    if n < 2:
        raise InputError(f"{p}: found {n} frame(s), expected a movie of at least 2 frames")
    even, odd = (fourier_bin(s, cfg.bin) for s in sums)
    return MovieSums(even, odd, n, px * cfg.bin if px > 0 else 0.0)


def movie_micrograph(path: str | os.PathLike[str], config: MovieConfig | None = None,
                     min_size: int = MIN_SIZE) -> Micrograph:
    """The sum of all of ``path``'s frames as a validated :class:`Micrograph` (what ``denoise`` runs on)."""
    sums = sum_movie(path, config)
    total = sums.total
    validate_array(total, path, min_size)
    return Micrograph(path=Path(path), data=total, header=sums.header())


def write_even_odd(paths: Sequence[str | os.PathLike[str]], folder: str | os.PathLike[str],
                   config: MovieConfig | None = None) -> tuple[list[Path], list[Path]]:
    """Write each movie's even and odd sums to ``folder/even/<stem>.mrc`` and ``folder/odd/<stem>.mrc``."""
    out = Path(folder)
    even_paths: list[Path] = []
    odd_paths: list[Path] = []
    stems: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw)
        if stems.setdefault(p.stem, p) != p:
            raise InputError(f"{stems[p.stem]} and {p} would both write {p.stem}.mrc: rename one of them")
    for sub in ("even", "odd"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for raw in paths:
        p = Path(raw)
        sums = sum_movie(p, config)
        label = f"cryodeploy movie sum of {p.name}"
        even_paths.append(write_micrograph(out / "even" / f"{p.stem}.mrc", sums.even, sums.header(),
                                           label=f"{label}: even frames", protect=(p,)))
        odd_paths.append(write_micrograph(out / "odd" / f"{p.stem}.mrc", sums.odd, sums.header(),
                                          label=f"{label}: odd frames", protect=(p,)))
    return even_paths, odd_paths
