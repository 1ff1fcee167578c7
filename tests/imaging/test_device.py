"""The image contract on torch tensors agrees with the numpy path (the same code runs on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy.errors import InputError, OutputError
from cryodeploy.imaging.contract import FrameContract
from cryodeploy.imaging.device import DeviceFrameContract, header_stats, validate_frames
from cryodeploy.imaging.normalize import NormSpec, norm_stats
from cryodeploy.io.mrc import validate_array

F32_EPS = float(np.finfo(np.float32).eps)


def _image(rng: np.random.Generator, shape: tuple[int, int], offset: float = 5600.0) -> np.ndarray:
    img = offset + 70.0 * rng.standard_normal(shape)
    img.reshape(-1)[rng.choice(img.size, img.size // 200, replace=False)] = offset + 6e4  # hot pixels
    return img.astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 80), (1100, 1000), (2048, 1024)])  # below, above, at 2**20 (step 2)
@pytest.mark.parametrize("spec", [NormSpec(), NormSpec(low_percentile=5.0, high_percentile=90.0)])
def test_statistics_agree_with_numpy(
    rng: np.random.Generator, shape: tuple[int, int], spec: NormSpec
) -> None:
    img = _image(rng, shape)
    ref = norm_stats(img, spec)
    got = DeviceFrameContract(FrameContract(spec)).stats(torch.from_numpy(img))
    assert got.center == pytest.approx(ref.center, abs=1e-6 * ref.scale)
    assert got.scale == pytest.approx(ref.scale, rel=1e-6)


@pytest.mark.parametrize("stride", [1, 8])
@pytest.mark.parametrize("offset", [0.0, 5600.0, -3.0e4])
def test_prepare_and_finish_agree_with_numpy(rng: np.random.Generator, stride: int, offset: float) -> None:
    img = _image(rng, (100, 90), offset)
    contract = FrameContract(NormSpec(), stride)
    ref = contract.prepare(img)
    dev = DeviceFrameContract(contract).prepare(torch.from_numpy(img), ref.stats)
    z = dev.image.numpy()
    assert z.shape == ref.image.shape == (100 + -100 % stride, 90 + -90 % stride)
    assert np.all(np.abs(z - ref.image) <= 2 * F32_EPS * (np.abs(ref.image) + 1.0))  # 2 ulps of |z| + 1
    back = DeviceFrameContract(contract).finish(dev.image, ref.stats, ref.shape).numpy()
    ref_back = contract.finish(ref.image, ref.stats, ref.shape)
    assert np.all(np.abs(back - ref_back) <= 4 * F32_EPS * (np.abs(img) + abs(ref.stats.center)))
    assert np.all(np.abs(back - img) <= 4 * F32_EPS * (np.abs(img) + abs(ref.stats.center)))


def test_values_near_the_float32_limit_do_not_overflow(rng: np.random.Generator) -> None:
    img = np.clip(rng.standard_normal((64, 64)) * 2e38, -3.4e38, 3.4e38).astype(np.float32)
    contract = FrameContract()
    for prepared in (contract.prepare(img), DeviceFrameContract(contract).prepare(torch.from_numpy(img))):
        z = np.asarray(prepared.image)
        assert np.isfinite(z).all()
        assert np.isfinite(contract.finish(z, prepared.stats)).all()


def test_validation_gives_the_numpy_messages(rng: np.random.Generator) -> None:
    good = rng.standard_normal((3, 40, 40)).astype(np.float32)
    validate_frames(torch.from_numpy(good), "f.mrc")
    nan, const = good.copy(), good.copy()
    nan[1, 2, 3], nan[1, 4, 4] = np.nan, np.inf
    const[2] = 7.0
    for case in (nan, const):
        with pytest.raises(InputError) as ref:
            validate_array(case, "f.mrc")
        with pytest.raises(InputError) as got:
            validate_frames(torch.from_numpy(case), "f.mrc")
        assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_header_stats_match_mrcfile(rng: np.random.Generator, dtype: torch.dtype) -> None:
    x = torch.from_numpy(_image(rng, (300, 200), 100.0)).to(dtype)
    data = x.numpy()
    a, b, m, r = header_stats(x, "o.mrc", "float32")
    assert (a, b) == (float(data.min()), float(data.max()))
    assert m == pytest.approx(float(data.mean(dtype=np.float32)), rel=1e-6)
    assert r == pytest.approx(float(data.std(dtype=np.float32)), rel=1e-5)


def test_header_stats_refuse_a_non_finite_output_like_write_micrograph(tmp_path) -> None:
    from cryodeploy.io.mrc import write_micrograph

    big = torch.full((40, 40), 7e4, dtype=torch.float32)  # beyond float16: inf once cast
    nan = big.clone()
    nan[0, :5] = float("nan")
    for data in (big, nan):
        with pytest.raises(OutputError) as ref:
            write_micrograph(tmp_path / "o.mrc", data.numpy(), dtype="float16")
        with pytest.raises(OutputError) as got:
            header_stats(data.to(torch.float16), tmp_path / "o.mrc", "float16", data)
        assert str(got.value) == str(ref.value)
    with pytest.raises(OutputError, match=r"found 1600 NaN/Inf values in the float16 output \(values beyond"):
        header_stats(big.to(torch.float16), "o.mrc", "float16", big)
