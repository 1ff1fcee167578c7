"""layers.json's schema: each broken field is one ModelError naming layers.json and the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cryodeploy.errors import ModelError
from cryodeploy.models.rawweights import export_raw, load_raw

CASES: dict[str, tuple[Callable[[dict], object], str]] = {
    "format": (lambda m: m.update(format="cryodeploy-raw/2"),
               "found format 'cryodeploy-raw/2', expected 'cryodeploy-raw/1'"),
    "no-layers": (lambda m: m.pop("layers"), "found no 'layers', expected one"),
    "layout": (lambda m: m.update(layout="(kH,kW,in,out)"),
               "found layout '(kH,kW,in,out)', expected '(out,in,kH,kW)'"),
    "unknown-field": (lambda m: m.update(tile=64), "found unknown field 'tile'"),
    "unknown-entry-field": (lambda m: m["layers"][1]["bias"].update(scale=2.0),
                            "found unknown field 'layers.1.bias.scale'"),
    "dtype": (lambda m: m["layers"][0]["weight"].update(dtype="float16"),
              "found layers.0.weight.dtype 'float16', expected 'float32'"),
    "byte-order": (lambda m: m["layers"][2]["bias"].update(byte_order="big"),
                   "found layers.2.bias.byte_order 'big', expected 'little'"),
    "short-hash": (lambda m: m["layers"][0]["weight"].update(sha256="abc"),
                   "found layers.0.weight.sha256 'abc', "
                   "expected string should match pattern '^[0-9a-f]{64}$'"),
    "no-hash": (lambda m: m["layers"][0]["bias"].pop("sha256"),
                "found no 'layers.0.bias.sha256', expected one"),
    "sums-not-object": (lambda m: m["layers"][0]["weight"].update(axis_sums=[1.0]),
                        "found layers.0.weight.axis_sums [1.0], expected a valid dictionary"),
    "text-name": (lambda m: m["layers"][0].update(name=1), "found layers.0.name 1, expected a valid string"),
    "parent-file": (lambda m: m["layers"][1]["weight"].update(file=".."),
                    "conv2 file '..', expected a file name in the folder"),
    "model-not-object": (lambda m: m.update(model="cnn3"), "found model 'cnn3', expected a valid dictionary"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layers_json_field_errors_name_file_and_field(cnn3_checkpoint: Path, tmp_path: Path,
                                                      case: str) -> None:
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    meta = json.loads((out / "layers.json").read_text())
    CASES[case][0](meta)
    (out / "layers.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as err:
        load_raw(out)
    assert str(err.value) == f"{out / 'layers.json'}: {CASES[case][1]}"


def test_null_bias_for_a_biased_layer_is_refused(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    out = export_raw(cnn3_checkpoint, tmp_path / "raw")
    meta = json.loads((out / "layers.json").read_text())
    meta["layers"][2]["bias"] = None
    (out / "layers.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as err:
        load_raw(out)
    assert str(err.value) == f"{out / 'layers.json'}: conv3 bias is None, expected a file"
