"""An ensemble of backends as one backend: every member runs the same batch, the outputs are averaged.

The runner, tiling and parity see one :class:`~cryodeploy.backends.base.Backend`; the members
keep their own backends (torch, ort, ...). The ensemble's geometry is that of
:func:`dominant_spec`: its receptive radius covers every member's and its stride is a multiple of
every member's, so tiled runs equal whole-image runs for every member and hence for the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.errors import ConfigError

if TYPE_CHECKING:
    from cryodeploy.models import ModelSpec

__all__ = ["EnsembleBackend", "dominant_spec"]


def dominant_spec(specs: Sequence[ModelSpec], names: Sequence[str]) -> int:
    """Index of the member whose geometry serves the whole ensemble (largest radius and stride).

    :class:`ConfigError` when the members normalize differently (their outputs would not be on
    one scale) or no member has both the largest radius and a stride every other stride divides.
    """
    first = specs[0].normalization
    for spec, name in zip(specs[1:], names[1:], strict=True):
        if spec.normalization != first:
            raise ConfigError(f"ensemble: {name} normalizes {spec.normalization}, {names[0]} {first}; "
                              "members must share one normalization")
    radius = max(s.receptive_radius for s in specs)
    for i, s in enumerate(specs):
        if s.receptive_radius == radius and all(s.stride % o.stride == 0 for o in specs):
            return i
    raise ConfigError("ensemble: no member has both the largest receptive radius and a stride that is a "
                      f"multiple of every other (found {[(s.receptive_radius, s.stride) for s in specs]})")


class EnsembleBackend(Backend):
    """The mean (accumulated in float64) of ``members``' outputs on each batch."""

    name = "ensemble"

    def __init__(self, members: Sequence[Backend]) -> None:
        if len(members) < 2:
            raise ConfigError(f"ensemble: found {len(members)} member(s), expected at least 2")
        super().__init__(BackendOptions(device=members[0].device, precision=members[0].precision))
        self.members = list(members)

    @property
    def label(self) -> str:
        """``ensemble[<member label>, ...]``."""
        return "ensemble[" + ", ".join(m.label for m in self.members) + "]"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        total = np.zeros(batch.shape, np.float64)
        for m in self.members:
            total += m.run(batch)
        return (total / len(self.members)).astype(np.float32)

    @property
    def device_resident(self) -> bool:
        """True when every member has a device-resident forward (then the frames can stay on the device)."""
        return all(m.device_resident for m in self.members)

    def run_device(self, x: Any) -> Any:
        """The members' device outputs averaged (accumulated in float64) on the device; needs
        :attr:`device_resident`."""
        if not self.device_resident:
            raise NotImplementedError(f"{self.label}: a member has no device-resident path")
        outs = [m.run_device(x) for m in self.members]
        total = outs[0].double()
        for y in outs[1:]:
            total += y.double()
        return (total / len(outs)).float()

    def close(self) -> None:
        """Close every member."""
        for m in self.members:
            m.close()
