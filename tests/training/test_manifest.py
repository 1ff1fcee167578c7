"""The patch store's manifest.json schema: each broken field is one StoreError naming the file and field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cryodeploy.errors import StoreError
from cryodeploy.training.store import MANIFEST, PatchStore, StoreWriter


def _store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, (8, 8)) as w:
        w.append("train", rng.standard_normal((3, 8, 8)).astype(np.float32),
                 rng.standard_normal((3, 8, 8)).astype(np.float32))
        w.finish(sources=[], normalization={"method": "none"})
    return path


CASES: dict[str, tuple[Callable[[dict], object], str]] = {
    "text-count": (lambda m: m["splits"]["train"].update(count="3"),
                   "found splits.train.count '3', expected a valid integer"),
    "bool-count": (lambda m: m["splits"]["train"].update(count=True),
                   "found splits.train.count True, expected a valid integer"),
    "negative-count": (lambda m: m["splits"]["train"].update(count=-1),
                       "found splits.train.count -1, expected greater than or equal to 0"),
    "no-input": (lambda m: m["splits"]["train"].pop("input"), "found no 'splits.train.input', expected one"),
    "unknown-split-field": (lambda m: m["splits"]["train"].update(weights="w.bin"),
                            "found unknown field 'splits.train.weights'"),
    "unknown-split": (lambda m: m["splits"].update(val=m["splits"]["train"]),
                      "found splits ['val'], expected only ['train', 'test']"),
    "no-splits": (lambda m: m.update(splits={}), "found splits {}, expected at least 1 item"),
    "patch-int": (lambda m: m.update(patch=8),
                  "found patch 8, expected [H, W] or [D, H, W] of positive integers"),
    "patch-zero": (lambda m: m.update(patch=[8, 0]),
                   "found patch [8, 0], expected [H, W] or [D, H, W] of positive integers"),
    "byte-order": (lambda m: m.update(byte_order="big"), "found byte_order 'big', expected 'little'"),
    "not-a-name": (lambda m: m["splits"]["train"].update(target="sub/t.bin"),
                   "data file 'sub/t.bin' invalid, expected a file name inside the store"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifest_field_errors_name_file_and_field(tmp_path: Path, case: str) -> None:
    store = _store(tmp_path / "s")
    m = json.loads((store / MANIFEST).read_text())
    CASES[case][0](m)
    (store / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError) as err:
        PatchStore(store)
    assert str(err.value) == f"{store / MANIFEST}: {CASES[case][1]}"


def test_provenance_fields_are_kept_and_null_target_means_no_targets(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    m = json.loads((store / MANIFEST).read_text())
    m["splits"]["train"]["target"] = None
    (store / MANIFEST).write_text(json.dumps(m))
    opened = PatchStore(store)
    assert opened.patch == (8, 8) and opened.count("train") == 3 and not opened.has_target("train")
    assert opened.manifest["normalization"] == {"method": "none"}
