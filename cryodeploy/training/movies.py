"""A patch store straight from movies: even/odd frame sums as Noise2Noise input/target pairs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from cryodeploy.errors import OutputError
from cryodeploy.imaging.movies import MovieConfig, write_even_odd
from cryodeploy.training.preprocess import PreprocessConfig, preprocess
from cryodeploy.training.store import MANIFEST, PatchStore

__all__ = ["SUMS", "preprocess_movies"]

#: the folder inside the store holding the sums (``even/``, ``odd/``), kept for inspection
SUMS = "sums"


def preprocess_movies(
    movies: Sequence[str | os.PathLike[str]],
    store_dir: str | os.PathLike[str],
    config: PreprocessConfig,
    movie_config: MovieConfig | None = None,
    quiet: bool = False,
) -> PatchStore:
    """Sum each movie's even and odd frames into ``store_dir/sums/{even,odd}/<stem>.mrc``, then cut
    them into a patch store with the even sums as inputs and the odd sums as targets.

    ``config``'s ``targets`` and ``target_dir`` are replaced (pairs from the sums); an existing
    store is refused before any summing unless ``config.overwrite``.
    """
    store = Path(store_dir)
    if (store / MANIFEST).exists() and not config.overwrite:
        raise OutputError(f"{store}: a patch store already exists here; use --overwrite to replace it")
    even, _ = write_even_odd(movies, store / SUMS, movie_config)
    pairs = dataclasses.replace(config, targets="pairs", target_dir=store / SUMS / "odd")
    return preprocess(even, store, pairs, quiet=quiet)
