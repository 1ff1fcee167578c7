"""The fp16 accuracy gate: an fp16 engine must denoise within 0.1 dB PSNR of the fp32 reference.

The arithmetic (:func:`fp16_gate`) is pure; :func:`denoising_psnr` measures any
:class:`~cryodeploy.backends.Backend` on calibration pairs (noisy input, clean target), which
:func:`synthetic_calibration` draws from :mod:`cryodeploy.imaging.synth` with the model's noise
model (for volume models: synthetic tomograms of :mod:`cryodeploy.imaging.simulate.tomogram`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError

if TYPE_CHECKING:
    from cryodeploy.backends.base import Backend
    from cryodeploy.models import ModelSpec

__all__ = ["CalibrationPair", "GateResult", "denoising_psnr", "fp16_gate", "synthetic_calibration"]

#: (noisy input, clean target): float32 images (volume models: volumes) on the same intensity scale.
CalibrationPair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class GateResult:
    """The fp16 accuracy gate: denoising PSNR of the fp32 reference and of the fp16 engine."""

    psnr_fp32: float
    psnr_fp16: float
    max_drop_db: float = 0.1
    samples: int = 0

    @property
    def drop_db(self) -> float:
        """PSNR lost by fp16 (negative when fp16 scores higher), rounded to 1e-9 dB."""
        if math.isinf(self.psnr_fp32) and self.psnr_fp32 == self.psnr_fp16:
            return 0.0
        return round(self.psnr_fp32 - self.psnr_fp16, 9)

    @property
    def passed(self) -> bool:
        """True when the drop is at most ``max_drop_db`` (never when a PSNR is NaN)."""
        drop = self.drop_db
        return not math.isnan(drop) and drop <= self.max_drop_db

    def message(self) -> str:
        """One line with the numbers."""
        verdict = "within" if self.passed else "exceeds"
        return (
            f"fp16 denoising PSNR {self.psnr_fp16:.3f} dB vs fp32 {self.psnr_fp32:.3f} dB on "
            f"{self.samples} calibration micrographs: drop {self.drop_db:.3f} dB {verdict} "
            f"the {self.max_drop_db:g} dB allowed"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with the derived drop and verdict, for readers of the sidecar)."""
        return {"psnr_fp32": self.psnr_fp32, "psnr_fp16": self.psnr_fp16, "drop_db": self.drop_db,
                "max_drop_db": self.max_drop_db, "samples": self.samples, "passed": self.passed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["psnr_fp32"]), float(d["psnr_fp16"]), float(d["max_drop_db"]), int(d["samples"]))


def fp16_gate(psnr_fp32: float, psnr_fp16: float, max_drop_db: float = 0.1, samples: int = 0) -> GateResult:
    """Judge an fp16 engine: it passes when its PSNR is at most ``max_drop_db`` below fp32's."""
    if not max_drop_db >= 0:
        raise ConfigError(f"max PSNR drop {max_drop_db} dB, expected >= 0")
    return GateResult(float(psnr_fp32), float(psnr_fp16), float(max_drop_db), samples)


def synthetic_calibration(
    spec: ModelSpec, shape: tuple[int, ...], count: int = 4, seed: int = 0
) -> list[CalibrationPair]:
    """``count`` synthetic micrographs of ``shape`` with their clean targets, noised with the model's
    own noise model (its ``spec.noise``; the default Poisson + Gaussian if it has none). For a 3-D
    ``shape``: synthetic tomograms of the simulator's defaults (their own dose), the even half with
    the exact clean volume."""
    from cryodeploy.imaging.noise import NoiseSpec, add_noise
    from cryodeploy.imaging.synth import render_clean

    if count < 1:
        raise ConfigError(f"calibration count {count}, expected >= 1")
    if len(shape) == 3:
        from cryodeploy.imaging.simulate.tomogram import simulate_tomogram
        from cryodeploy.imaging.simulate.tomoscene import TomoConfig

        cfg = TomoConfig(shape=(int(shape[0]), int(shape[1]), int(shape[2])), seed=seed)
        tomograms = (simulate_tomogram(cfg, i) for i in range(count))
        return [(t.even.numpy(), t.clean.numpy()) for t in tomograms]
    noise = NoiseSpec.from_dict(spec.noise) if spec.noise else NoiseSpec()
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        clean = render_clean(rng, (shape[0], shape[1]))
        pairs.append((add_noise(clean, noise, rng), clean))
    return pairs


def denoising_psnr(backend: Backend, spec: ModelSpec, pairs: list[CalibrationPair]) -> float:
    """Mean PSNR (dB) of ``backend``'s whole-image denoising against the clean targets.

    Each noisy image goes through the model's image contract as one ``[1, 1, H, W]`` batch
    (a volume as ``[1, 1, D, H, W]``; normalized, padded to stride, cropped, de-normalized) and is
    scored with the target's value range as the data range.
    """
    from cryodeploy.imaging.metrics import psnr

    if not pairs:
        raise ConfigError("no calibration pairs to measure PSNR on")
    scores = []
    for noisy, clean in pairs:
        out = spec.contract.apply(noisy, lambda x: backend.run(x[None, None])[0, 0])
        target = np.asarray(clean, np.float32)
        scores.append(psnr(out, target, data_range=float(target.max() - target.min())))
    return float(np.mean(scores))
