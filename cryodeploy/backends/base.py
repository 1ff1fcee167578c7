"""The one Backend interface: the runner, parity and bench code know nothing else.

Modelled on Polygraphy's runners: a backend is built (lazily loading or building its
artefact), activated, asked to ``run`` batches, and closed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError

__all__ = ["MAX_THREADS", "PRECISIONS", "Backend", "BackendOptions"]

PRECISIONS = ("fp32", "fp16", "bf16")


#: most CPU threads a backend may be asked for (more only multiplies per-thread buffers)
MAX_THREADS = 1024


@dataclass(frozen=True)
class BackendOptions:
    """How to run: device ("cpu", "cuda", "cuda:1"), precision, and backend-specific knobs.

    ``threads`` (CPU intra-op threads, 0 = library default), ``tf32`` (allow TF32 on GPU; off
    for strict fp32 parity), ``extra`` for options one backend alone understands.
    """

    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 0
    tf32: bool = False
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("device", self.device), ("precision", self.precision)):
            if not isinstance(value, str):
                raise ConfigError(f"{name} {value!r}: expected a string")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int):
            raise ConfigError(f"threads {self.threads!r}: expected an integer")
        if self.threads > MAX_THREADS:
            raise ConfigError(
                f"threads {self.threads}: expected at most {MAX_THREADS} (0: the library default)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision {self.precision!r} unknown, expected one of {', '.join(PRECISIONS)}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device {self.device!r} unknown, expected 'cpu', 'cuda' or 'cuda:N'")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, found {self.threads}")

    def get(self, key: str, default: Any = None) -> Any:
        """Value of a backend-specific option."""
        return dict(self.extra).get(key, default)


class Backend(ABC):
    """Runs a denoising model on batches ``[N, 1, H, W]`` (volume models: ``[N, 1, D, H, W]``) float32
    -> same shape float32 (numpy).

    Subclasses implement :meth:`_run`; :meth:`run` checks shapes and dtypes around it.
    """

    #: registry name, e.g. "torch", "ort", "trt"
    name: str = ""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @property
    def device(self) -> str:
        """Device the backend computes on."""
        return self.options.device

    @property
    def precision(self) -> str:
        """Compute precision ("fp32", "fp16", "bf16")."""
        return self.options.precision

    @property
    def label(self) -> str:
        """Human-readable identity, e.g. ``torch/cuda/fp16``."""
        return f"{self.name}/{self.device}/{self.precision}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise a normalized batch ``[N, 1, H, W]`` or ``[N, 1, D, H, W]`` float32; returns float32 of
        the same shape."""
        if batch.ndim not in (4, 5) or batch.shape[1] != 1:
            raise ValueError(
                f"{self.label}: batch shape {batch.shape}, expected [N, 1, H, W] or [N, 1, D, H, W]"
            )
        out = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        if out.shape != batch.shape:
            raise RuntimeError(f"{self.label}: output shape {out.shape} differs from input {batch.shape}")
        return out

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Backend-specific inference on a contiguous float32 batch."""

    @property
    def device_resident(self) -> bool:
        """True if :meth:`run_device` is implemented (the runner's device frame path can use it)."""
        return type(self).run_device is not Backend.run_device

    def run_device(self, x: Any) -> Any:
        """Denoise a batch already on the backend's device (a torch CUDA tensor [N,1,H,W] float32),
        returning a device tensor, with no host copies. Backends that can, override this;
        benchmarks use it to time the computation alone."""
        raise NotImplementedError(f"{self.label}: no device-resident path")

    def close(self) -> None:
        """Release device memory and sessions (idempotent)."""
        return None

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
