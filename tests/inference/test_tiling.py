"""Tiled inference equals the whole-image forward: exactly (<= 1e-6 fp32) for CNN3, measured for the U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.errors import ConfigError
from cryodeploy.imaging.contract import pad_to_stride
from cryodeploy.imaging.normalize import norm_stats, normalize
from cryodeploy.inference.runner import denoise_image
from cryodeploy.inference.tiling import TilePlan, halo_for, min_tile
from cryodeploy.models.checkpoint import load_checkpoint

# (image shape, tile): tile+1 sizes, odd sizes, K3 aspect 5760x4092 scaled by 1/16, tiles 16 .. > image
CNN3_CASES = [
    ((65, 65), 64), ((17, 17), 16), ((97, 131), 16), ((97, 131), 31), ((97, 131), 64),
    ((256, 360), 16), ((256, 360), 100), ((256, 360), 255), ((256, 360), 1024),
    ((33, 257), 32), ((200, 33), 7), ((1, 40), 16),
]


def _whole(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(image))[None, None])[0, 0].numpy()


def _tiled(model: torch.nn.Module, plan: TilePlan, image: np.ndarray) -> np.ndarray:
    padded = plan.pad(image)
    windows = np.stack([plan.extract(padded, i) for i in range(len(plan))])[:, None]
    with torch.no_grad():
        results = model(torch.from_numpy(windows))[:, 0].numpy()
    out = np.full(plan.padded_shape, np.nan, np.float32)
    for i, result in enumerate(results):
        plan.stitch(out, i, result)
    return plan.crop(out)


@pytest.mark.parametrize(("shape", "tile"), CNN3_CASES)
def test_cnn3_tiled_equals_whole_image(cnn3_checkpoint, rng, shape, tile) -> None:
    model, spec = load_checkpoint(cnn3_checkpoint)
    image = rng.standard_normal(shape).astype(np.float32)
    plan = TilePlan.create(shape, tile, spec.receptive_radius, spec.stride)
    assert len(plan) > 1 or max(shape) <= tile
    diff = np.abs(_tiled(model, plan, image) - _whole(model, image)).max()
    assert diff <= 1e-6


def test_cnn3_runner_equals_whole_image_with_shared_batches(cnn3_checkpoint, rng) -> None:
    """Through the runner: normalize -> tiles in batches (a partial last batch) -> stitch -> denormalize."""
    model, spec = load_checkpoint(cnn3_checkpoint)
    image = (rng.standard_normal((2, 256, 360)) * 30 + 500).astype(np.float32)
    with TorchBackend(model, BackendOptions()) as backend:
        got = denoise_image(image, backend, spec, tile=64, batch=4, keep_normalized=True)  # 35 tiles/frame
    for frame, out in zip(image, got, strict=True):
        ref = _whole(model, normalize(frame, norm_stats(frame, spec.normalization)))
        assert np.abs(out - ref).max() <= 1e-6


def test_zero_padding_the_input_is_not_exact(cnn3_checkpoint, rng) -> None:
    """Negative control: tiles padded with zeros outside the image (instead of ending at the border)
    differ from the whole-image forward near the border, because deeper layers see relu(bias)."""
    model, spec = load_checkpoint(cnn3_checkpoint)
    image = rng.standard_normal((64, 64)).astype(np.float32)
    h = halo_for(spec.receptive_radius)
    padded = np.pad(image, h)
    naive = np.empty_like(image)
    for y in range(0, 64, 32):
        for x in range(0, 64, 32):
            naive[y:y + 32, x:x + 32] = _whole(model, padded[y:y + 32 + 2 * h, x:x + 32 + 2 * h])[h:-h, h:-h]
    diff = np.abs(naive - _whole(model, image))
    assert diff[0].max() > 1e-3
    assert diff[h:-h, h:-h].max() <= 1e-6


def test_unet_tiled_difference_is_measured(unet_checkpoint, rng) -> None:
    model, spec = load_checkpoint(unet_checkpoint)
    assert spec.stride == 4
    image = rng.standard_normal((131, 150)).astype(np.float32)  # not multiples of the stride
    whole = _whole(model, pad_to_stride(image, spec.stride))[:131, :150]
    worst = 0.0
    for tile in (min_tile(spec.receptive_radius, spec.stride), 64, 130, 256):
        plan = TilePlan.create(image.shape, tile, spec.receptive_radius, spec.stride)
        assert all(t.window[0].start % 4 == 0 and t.window[1].start % 4 == 0 for t in plan.tiles)
        rel = np.abs(_tiled(model, plan, image) - whole).max() / whole.std()
        worst = max(worst, float(rel))
    print(f"U-Net (base 8, depth 2) tiled vs whole image: max |diff| / std = {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.parametrize(("shape", "tile", "radius", "stride"), [
    ((97, 131), 16, 3, 1), ((256, 360), 100, 3, 1), ((255, 362), 64, 24, 4), ((40, 40), 500, 3, 1),
    ((1000, 130), 130, 52, 8),
])
def test_plan_partitions_the_image(shape, tile, radius, stride) -> None:
    plan = TilePlan.create(shape, tile, radius, stride)
    owner = np.zeros(plan.padded_shape, np.int32)
    ph, pw = plan.padded_shape
    for t in plan.tiles:
        owner[t.valid] += 1
        ws, wv = t.window, t.valid
        assert (ws[0].stop - ws[0].start, ws[1].stop - ws[1].start) == plan.tile_shape
        assert ws[0].start >= 0 and ws[0].stop <= ph and ws[1].start >= 0 and ws[1].stop <= pw
        for axis, n in ((0, ph), (1, pw)):
            assert wv[axis].start - ws[axis].start >= plan.halo or ws[axis].start == 0
            assert ws[axis].stop - wv[axis].stop >= plan.halo or ws[axis].stop == n
            assert ws[axis].start % stride == 0
    assert (owner == 1).all()


def test_pad_to_stride_reflects() -> None:
    image = np.arange(30, dtype=np.float32).reshape(5, 6)
    padded = pad_to_stride(image, 4)
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[5, :6], image[3])
    np.testing.assert_array_equal(padded[:5, 6], image[:, 4])
    assert pad_to_stride(image, 1) is image


def test_too_small_tile_is_a_config_error() -> None:
    assert min_tile(3) == 7 and min_tile(24, 4) == 52
    with pytest.raises(ConfigError, match="tile 6 is too small"):
        TilePlan.create((100, 100), 6, 3)
    with pytest.raises(ConfigError, match="tile 160 is too small"):
        TilePlan.create((160, 150), 160, 108, 16)


def test_image_smaller_than_the_receptive_field_equals_whole_image(rng) -> None:
    """A depth-4 U-Net (radius 108) on 160x144 (a split half of a 320² particle image): accepted,
    one tile, equal to the whole padded image's forward; only sides under 2 strides are refused."""
    from cryodeploy.imaging.normalize import NormSpec
    from cryodeploy.inference.batching import fit_geometry
    from cryodeploy.inference.frames import min_input_size
    from cryodeploy.models import ModelSpec, build_model

    torch.manual_seed(3)
    spec = ModelSpec("unet", {"base_channels": 8, "depth": 4}, normalization=NormSpec())
    model = build_model(spec).eval()
    assert spec.receptive_radius == 108 and spec.stride == 16 and min_input_size(spec) == 32
    image = (rng.standard_normal((160, 144)) * 3 + 10).astype(np.float32)
    with TorchBackend(model, BackendOptions()) as backend:
        norm = normalize(image, norm_stats(image, spec.normalization))
        # auto on a GPU: no smaller than the halo's minimum (240), which here is one 160x144 tile
        tile, _ = fit_geometry((160, 144), spec, 2**34)
        assert tile == min_tile(spec.receptive_radius, spec.stride) == 240
        assert len(TilePlan.create((160, 144), tile, spec.receptive_radius, spec.stride)) == 1
        for tile in ("auto", 240):
            got = denoise_image(image, backend, spec, tile=tile, keep_normalized=True)
            assert np.abs(got - _whole(model, norm)).max() <= 1e-5
        with pytest.raises(Exception, match="at least 32x32"):
            denoise_image(image[:31], backend, spec)
