"""The seeds' noise recipe on torch tensors: the numpy path's [0, 1] map, exact Poisson + Gaussian
moments (tolerances derived from the sample sizes), determinism per stream; on CUDA where there is one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import smooth_image

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.noise import NoiseSpec, to_unit_range, unit_range
from cryodeploy.imaging.noise_torch import (
    add_noise_torch,
    frame_generator,
    noisy_frame,
    poisson_parts,
    to_unit_range_torch,
    torch_sampler,
    unit_range_torch,
)
from cryodeploy.imaging.normalize import NormSpec, normalize

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("shape", [(300, 257), (2100, 64), (7, 5)])
def test_unit_range_is_the_numpy_paths(shape: tuple[int, int]) -> None:
    image = 7 + 3 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    lo, hi = unit_range(image)
    assert unit_range_torch(torch.from_numpy(image)) == (lo, hi)  # the same float64 percentiles
    got = to_unit_range_torch(torch.from_numpy(image), lo, hi).numpy()
    assert got.tobytes() == to_unit_range(image).tobytes()
    with pytest.raises(ConfigError, match="no dynamic range"):
        unit_range_torch(torch.ones(8, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dose", "parts"), [(20.0, 1), (500.0, 9)])
def test_draw_has_the_noise_models_mean_and_variance(device: str, dose: float, parts: int) -> None:
    """x = 0.3 on 10^6 pixels: mean x, variance x / dose + sigma^2. Tolerances are 5 standard errors:
    of the mean sqrt(var / n); of the sample variance var * sqrt((2 + k) / n), k the excess kurtosis
    (x / dose^3) / var^2 of the Poisson term (the Gaussian has none)."""
    x, sigma, n = 0.3, 0.05, 1000 * 1000
    assert poisson_parts(dose) == parts  # dose 500 is drawn as 9 parts of rate <= 60
    spec = NoiseSpec(dose=dose, sigma=sigma)
    clean = torch.full((1000, 1000), x, device=device)
    noisy = add_noise_torch(clean, spec, frame_generator(np.random.SeedSequence(7), device), dose).double()
    var = x / dose + sigma**2
    kurt = (x / dose**3) / var**2
    assert abs(float(noisy.mean()) - x) < 5 * math.sqrt(var / n)
    assert abs(float(noisy.var(unbiased=False)) - var) < 5 * var * math.sqrt((2 + kurt) / n)
    gen = frame_generator(np.random.SeedSequence(7), device)
    counts = add_noise_torch(clean, NoiseSpec(dose=dose, sigma=0), gen, dose).double() * dose
    assert float((counts - counts.round()).abs().max()) < 1e-3  # Poisson counts / dose: whole counts
    # the Poisson variance alone is its mean (x * dose), 5 standard errors sqrt((2 + 1/lam) / n) * lam
    lam = x * dose
    assert abs(float(counts.double().var()) - lam) < 5 * lam * math.sqrt((2 + 1 / lam) / n)


@pytest.mark.parametrize("device", DEVICES)
def test_same_stream_same_draw(device: str) -> None:
    clean = torch.rand(64, 80, generator=torch.Generator().manual_seed(0)).to(device)
    spec = NoiseSpec()

    def draw(*key: int) -> torch.Tensor:
        gen = frame_generator(np.random.SeedSequence([3, 1, 0], spawn_key=key), device)
        return add_noise_torch(clean, spec, gen, spec.dose)

    assert torch.equal(draw(0, 0), draw(0, 0))
    assert not torch.equal(draw(0, 0), draw(0, 1)) and not torch.equal(draw(0, 0), draw(1, 0))


def test_noisy_frame_targets_are_the_normalized_unit_image() -> None:
    image = 100 + 40 * smooth_image(np.random.default_rng(1), (96, 128))
    seq = [np.random.SeedSequence([0, 1, 0], spawn_key=(0, d)) for d in range(2)]
    inp, tgt, stats = noisy_frame(image, NoiseSpec(), 20.0, seq[:1], NormSpec(), "cpu")
    assert inp.dtype == tgt.dtype == np.float32 and inp.shape == tgt.shape == image.shape
    assert tgt.tobytes() == normalize(to_unit_range(image), stats).tobytes()
    assert abs(float(inp.mean())) < 0.2 and 0.8 < float(inp.std()) < 1.2  # the input is normalized
    a, b, _ = noisy_frame(image, NoiseSpec(), 20.0, seq, NormSpec(), "cpu")
    assert a.tobytes() == inp.tobytes() and not np.array_equal(a, b)  # draw 0 is the same, draw 1 another


def test_sampler_record_and_bad_devices() -> None:
    assert torch_sampler("cpu") == {"name": "torch", "poisson": "inversion of float64 uniforms",
                                   "device": "cpu", "torch": torch.__version__}
    for bad in ("gpu", "mps"):
        with pytest.raises(ConfigError, match=rf"device '{bad}' unknown"):
            torch_sampler(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            torch_sampler("cuda")
    else:
        assert torch_sampler("cuda")["device_name"] == torch.cuda.get_device_name(0)
