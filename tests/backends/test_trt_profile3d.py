"""TensorRT optimization profiles of volume models: (batch, depth, height, width), pure Python."""

from __future__ import annotations

import pytest

from cryodeploy.backends.trt.cache import BuildConfig
from cryodeploy.backends.trt.profile import DEFAULT_SHAPES_3D, ProfileShapes, parse_shapes, select_shape
from cryodeploy.errors import ConfigError, ModelError

PROFILE = ProfileShapes((1, 32, 64, 64), (2, 64, 128, 128), (4, 128, 256, 256))


def test_3d_profiles_parse_round_trip_and_give_5d_input_shapes() -> None:
    assert parse_shapes("1x32x64x64,2x64x128x128,4x128x256x256") == PROFILE
    assert parse_shapes(PROFILE.describe()) == PROFILE and PROFILE.ndim == 3
    assert parse_shapes("1x64,2x128,4x256", ndim=3) == ProfileShapes((1, 64, 64, 64), (2, 128, 128, 128),
                                                                     (4, 256, 256, 256)) == DEFAULT_SHAPES_3D
    assert PROFILE.input_shapes() == [(1, 1, 32, 64, 64), (2, 1, 64, 128, 128), (4, 1, 128, 256, 256)]
    assert ProfileShapes.from_input_shapes([list(s) for s in PROFILE.input_shapes()]) == PROFILE
    with pytest.raises(ModelError, match=r"expected min/opt/max of \[N, 1, H, W\] or \[N, 1, D, H, W\]"):
        ProfileShapes.from_input_shapes([[1, 1, 8, 8, 8], [2, 1, 16, 16], [4, 1, 32, 32, 32]])


def test_3d_profiles_check_every_side() -> None:
    with pytest.raises(ConfigError, match="depth: found min 64, opt 32, max 128"):
        parse_shapes("1x64x64x64,2x32x128x128,4x128x256x256")
    with pytest.raises(ConfigError, match="min tile 30x64x64: not a multiple of the model stride 4"):
        parse_shapes("1x30x64x64,2x64x128x128,4x128x256x256", stride=4)
    with pytest.raises(ConfigError, match="the same number in min, opt and max"):
        parse_shapes("1x64x64,2x64x128x128,4x128x256x256")
    with pytest.raises(ConfigError, match="has 2-D tiles, expected a volume model"):
        BuildConfig.from_options("fp16", "1x64x64,2x128x128,4x256x256", 256, False, stride=4, ndim=3)
    assert BuildConfig.from_options("fp16", None, 256, False, stride=4, ndim=3).shapes == DEFAULT_SHAPES_3D


def test_3d_select_shape_and_require() -> None:
    assert select_shape(PROFILE, 8, 100, stride=8) == (4, (96, 96, 96))
    assert select_shape(PROFILE, 1, (20, 300, 130), stride=4) == (1, (32, 256, 128))
    PROFILE.require(3, (64, 64, 256), "v.engine")
    with pytest.raises(ModelError, match=r"v.engine: found batch 1 of 16x64x64 tiles, expected batch 1..4 "
                                         r"and tiles 32x64x64..128x256x256"):
        PROFILE.require(1, (16, 64, 64), "v.engine")
    assert not PROFILE.contains(1, (64, 64))  # an image tile is never inside a volume profile
