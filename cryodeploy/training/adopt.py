"""Adopt a raw seeds-style store: write the manifest for ``train_input.bin`` ... files made elsewhere."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryodeploy.errors import StoreError
from cryodeploy.training.store import (
    _WHICH,
    MANIFEST,
    SPLITS,
    WRITING,
    PatchStore,
    _base_manifest,
    _count_patches,
    _patch_shape,
    _write_manifest,
    data_file_name,
)

__all__ = ["adopt_raw_store"]

log = logging.getLogger(__name__)


def adopt_raw_store(
    path: str | os.PathLike[str], patch: int | Sequence[int], overwrite: bool = False
) -> PatchStore:
    """Write a manifest for seeds-style raw files (``train_input.bin`` ... ``test_target.bin``).

    Each file's size must be a multiple of the patch bytes and an input and its target must
    hold the same number of patches. Normalization and noise are recorded as unknown (null).
    """
    store, shape = Path(path), _patch_shape(patch)
    if not store.is_dir():
        raise StoreError(f"{store}: no such directory")
    if (store / WRITING).exists():
        raise StoreError(f"{store}: holds the files of a 'cryodeploy preprocess' that did not finish "
                         f"({WRITING} is present); rerun preprocess with --overwrite "
                         "instead of adopting them")
    if (store / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{store}: already has a {MANIFEST}; use --overwrite to replace it")
    splits: dict[str, Any] = {}
    for split in SPLITS:
        counts: dict[str, int] = {}
        for which in _WHICH:
            f = store / data_file_name(split, which)
            if f.is_file():
                counts[which] = _count_patches(f, shape, "; wrong --patch?")
        if not counts:
            continue
        if "input" not in counts:
            raise StoreError(
                f"{store / data_file_name(split, 'target')}: found a target file, "
                f"expected {data_file_name(split, 'input')} beside it"
            )
        if counts.get("target", counts["input"]) != counts["input"]:
            raise StoreError(
                f"{store / data_file_name(split, 'target')}: found {counts['target']} patches, "
                f"expected {counts['input']} as in {data_file_name(split, 'input')}"
            )
        splits[split] = {
            "input": data_file_name(split, "input"),
            "target": data_file_name(split, "target") if "target" in counts else None,
            "count": counts["input"],
        }
    if "train" not in splits:
        raise StoreError(
            f"{store}: found no {data_file_name('train', 'input')}, expected seeds-style raw files"
        )
    manifest = _base_manifest(shape)
    manifest.update(
        splits=splits, normalization=None, noise=None, targets="unknown", sources=[], adopted=True
    )
    _write_manifest(store, manifest)
    log.info("adopted %s: %s", store, {s: e["count"] for s, e in splits.items()})
    return PatchStore(store)
