"""Checkpoint files are byte-reproducible: the same weights always give the same bytes (issue 22, item 5)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import load_checkpoint, read_safetensors_header, save_checkpoint


def _arange_model() -> torch.nn.Module:
    model = build_model(ModelSpec("cnn3", params={"channels": 2}))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 100 * i)
    return model


def test_same_weights_give_identical_bytes_and_a_fixed_header(tmp_path: Path) -> None:
    spec = ModelSpec("cnn3", params={"channels": 2})
    a = save_checkpoint(tmp_path / "a.safetensors", _arange_model(), spec)
    b = save_checkpoint(tmp_path / "b.safetensors", _arange_model(), spec)
    assert a.read_bytes() == b.read_bytes()
    (n,) = struct.unpack("<Q", a.read_bytes()[:8])
    assert n % 8 == 0
    header = a.read_bytes()[8 : 8 + n].decode().rstrip(" ")
    assert header == (
        '{"__metadata__":{"architecture":"cnn3","format":"cryodeploy-model/1"},'
        '"conv1.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        '"conv1.weight":{"dtype":"F32","shape":[2,1,3,3],"data_offsets":[8,80]},'
        '"conv2.bias":{"dtype":"F32","shape":[2],"data_offsets":[80,88]},'
        '"conv2.weight":{"dtype":"F32","shape":[2,2,3,3],"data_offsets":[88,232]},'
        '"conv3.bias":{"dtype":"F32","shape":[1],"data_offsets":[232,236]},'
        '"conv3.weight":{"dtype":"F32","shape":[1,2,3,3],"data_offsets":[236,308]}}'
    )
    # the file is a standard safetensors file: the library reads back exactly the weights
    want = _arange_model().state_dict()
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == {"architecture": "cnn3", "format": "cryodeploy-model/1"}
        assert sorted(f.keys()) == sorted(want)
        assert all(torch.equal(f.get_tensor(k), want[k]) for k in want)
    model, loaded = load_checkpoint(a)
    assert loaded == spec and all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert read_safetensors_header(a)["conv2.weight"] == ("F32", (2, 2, 3, 3))
    assert json.loads(a.with_suffix(".json").read_text())["params"] == {"channels": 2}
