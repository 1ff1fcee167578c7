"""Where preprocessing draws its noise, and what the store's manifest says about it.

``numpy``: numpy's generators on the CPU, one per band of rows (the default; the stores of earlier
versions). ``torch``: torch's samplers on a device, one generator per frame and draw
(:func:`~cryodeploy.imaging.noise_torch.noisy_frame`), for ``noise`` and ``noise2noise`` targets of
micrographs. The two (and torch on the CPU vs on CUDA) give different, equally distributed stores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError

__all__ = ["SAMPLERS", "check_sampler", "sampler_record"]

#: Where the noise is drawn: numpy on the CPU, or torch on a device.
SAMPLERS = ("numpy", "torch")


def check_sampler(sampler: str, device: str, targets: str, ndim: int) -> None:
    """Refuse an unknown sampler, the torch sampler for targets it does not draw, or a device for numpy's."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} unknown, expected one of {', '.join(SAMPLERS)}")
    if sampler == "torch" and (targets not in ("noise", "noise2noise") or ndim != 2):
        what = repr(targets) if ndim == 2 else "volumes"
        raise ConfigError(f"the torch sampler (device {device!r}) draws noise and noise2noise targets of "
                          f"micrographs, not {what}; use the CPU (numpy) for them")
    if sampler == "numpy" and device != "cpu":
        raise ConfigError(f"device {device!r} needs the torch sampler; numpy's runs on the cpu")


def sampler_record(sampler: str, device: str, targets: str) -> dict[str, Any] | None:
    """The manifest's ``sampler``: what drew the store's noise (None for pairs: no noise); refuses a
    device torch does not have."""
    if targets == "pairs":
        return None
    if sampler == "numpy":
        return {"name": "numpy", "numpy": np.__version__}
    from cryodeploy.imaging.noise_torch import torch_sampler

    return torch_sampler(device)
