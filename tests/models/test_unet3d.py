"""The 3-D U-Net: its declared receptive radius is exact along every axis, its spec and checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy.errors import ConfigError
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import load_checkpoint, save_checkpoint


def _reach(model: torch.nn.Module, axis: int, radius: int, stride: int) -> tuple[bool, bool]:
    """(some voxel at distance ``radius`` changes an output voxel, some at ``radius + 1`` does) along
    ``axis``, over every alignment of the output voxel to the pooling grid and both signs and sides."""
    n = 2 * radius + 4 * stride + 8
    n += -n % stride
    shape = [8, 8, 8]
    shape[axis] = n
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(axis))
    with torch.no_grad():
        base = model(x)
    changed = {radius: False, radius + 1: False}
    for p in range(radius + 2, radius + 2 + stride):
        at = [4, 4, 4]
        at[axis] = p
        for dist in changed:
            for q in (p - dist, p + dist):
                for amp in (100.0, -100.0):
                    y = x.clone()
                    spot = list(at)
                    spot[axis] = q
                    y[(0, 0, *spot)] += amp
                    with torch.no_grad():
                        out = model(y)
                    changed[dist] |= bool(out[(0, 0, *at)] != base[(0, 0, *at)])
    return changed[radius], changed[radius + 1]


@pytest.mark.parametrize("depth", [1, 2])
def test_declared_receptive_radius_is_exact_on_every_axis(depth) -> None:
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": depth})
    assert (spec.receptive_radius, spec.stride) == ({1: 10, 2: 24}[depth], 2**depth)
    model = build_model(spec).eval()
    for axis in range(3):
        assert _reach(model, axis, spec.receptive_radius, spec.stride) == (True, False)


def test_spec_declares_volume_geometry_and_round_trips() -> None:
    spec = ModelSpec("unet3d")
    assert spec.ndim == 3 and spec.params == {"base_channels": 16, "depth": 2}
    assert spec.contract.ndim == 3 and ModelSpec("unet").ndim == 2
    d = spec.to_dict()
    assert (d["ndim"], d["receptive_radius"], d["stride"]) == (3, 24, 4)
    assert ModelSpec.from_dict(d) == spec
    with pytest.raises(ConfigError, match="says ndim=2, but unet3d has 3"):
        ModelSpec.from_dict({**d, "ndim": 2})
    with pytest.raises(ConfigError, match="depth=9"):
        ModelSpec("unet3d", params={"depth": 9})
    n_params = sum(p.numel() for p in build_model(spec).parameters())
    assert n_params == 353_697  # 27 * (sum of cin * cout over the 11 convs) + biases


def test_checkpoint_round_trip_gives_the_same_output(tmp_path) -> None:
    torch.manual_seed(1)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 2})
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "v.safetensors", model, spec)
    loaded, got = load_checkpoint(path)
    assert got == spec and got.ndim == 3
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 16, 20, 24)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
