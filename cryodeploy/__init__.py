"""cryodeploy: train, export and deploy cryo-EM micrograph denoising networks.

The public API is small: :class:`Denoiser` (load a model, denoise arrays and files),
:func:`load_model`, and the error types. Importing this package imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, InputError, ModelError, OutputError

if TYPE_CHECKING:
    from cryodeploy.inference.denoiser import Denoiser

__all__ = [
    "CryoDeployError",
    "Denoiser",
    "InputError",
    "ModelError",
    "OutputError",
    "__version__",
    "load_model",
]


def load_model(model: str = "default") -> Any:
    """Resolve a model name or path to a :class:`~cryodeploy.backends.sources.ModelSource`."""
    from cryodeploy.backends.sources import load_source

    return load_source(model)


def __getattr__(name: str) -> Any:
    if name == "Denoiser":
        from cryodeploy.inference.denoiser import Denoiser

        return Denoiser
    raise AttributeError(f"module 'cryodeploy' has no attribute {name!r}")
