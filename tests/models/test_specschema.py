"""The model config schema: a broken field of a model config is one ConfigError naming the field."""

from __future__ import annotations

import pytest

from cryodeploy.errors import ConfigError
from cryodeploy.models import ModelSpec

CASES = {
    "text-stride": (lambda d: d.update(stride="1"),
                    "model config: found stride '1', expected a valid integer"),
    "bool-radius": (lambda d: d.update(receptive_radius=True),
                    "model config: found receptive_radius True, expected a valid integer"),
    "params-list": (lambda d: d.update(params=[16]),
                    "model config: found params [16], expected a valid dictionary"),
    "number-architecture": (lambda d: d.update(architecture=3),
                            "model config: found architecture 3, expected a valid string"),
    "no-architecture": (lambda d: d.pop("architecture"),
                    "model config: found no 'architecture', expected one"),
    "unknown-field": (lambda d: d.update(weights="m.bin"), "model config: found unknown field 'weights'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_config_field_errors(case: str) -> None:
    doc = ModelSpec("unet", params={"base_channels": 8, "depth": 2}).to_dict()
    change, message = CASES[case]
    change(doc)
    with pytest.raises(ConfigError) as err:
        ModelSpec.from_dict(doc)
    assert str(err.value) == message


def test_round_trip_and_non_object_documents() -> None:
    spec = ModelSpec("unet", params={"base_channels": 8, "depth": 2})
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError) as err:
        ModelSpec.from_dict([])  # type: ignore[arg-type]
    assert str(err.value) == "model config format 'a JSON list', expected 'cryodeploy-model/1'"
