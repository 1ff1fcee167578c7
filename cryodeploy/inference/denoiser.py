"""The Python API: ``Denoiser.load(model, device, backend)``, then ``d(array)``, ``d.denoise_files(...)``
or ``d.denoise_pairs(...)``.

    from cryodeploy import Denoiser
    with Denoiser.load("default", device="auto") as d:
        clean = d(noisy)                  # 2-D image or 3-D stack; with a volume model a (D, H, W) volume
        summary = d.denoise_files(paths, "denoised/", skip_existing=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from cryodeploy.backends import Backend
    from cryodeploy.inference.jobs import RunConfig, RunSummary
    from cryodeploy.models import ModelSpec
    from cryodeploy.models.source import ModelSource

__all__ = ["Denoiser", "resolve_device"]

def resolve_device(device: str = "auto", environ: dict[str, str] | None = None) -> str:
    """``auto``: ``cuda`` if torch sees a GPU, else ``cpu``; ``cuda`` under torchrun: ``cuda:LOCAL_RANK``."""
    env = os.environ if environ is None else environ
    if not isinstance(device, str):
        raise ConfigError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in env:
        if not env["LOCAL_RANK"].isdigit():
            raise ConfigError(f"LOCAL_RANK {env['LOCAL_RANK']!r}: expected a non-negative integer")
        device = f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def _check_array(array: object) -> np.ndarray:
    """``array`` as a real-valued numpy array; refuses masked, complex, object and string arrays."""
    if isinstance(array, np.ma.MaskedArray):
        raise InputError("array: found a masked array; fill the masked pixels first (e.g. np.ma.filled)")
    try:
        arr = np.asarray(array)
    except (TypeError, ValueError) as err:
        raise InputError(f"array: cannot be read as a numpy array ({err})") from err
    if arr.dtype.kind not in "biuf":
        raise InputError(f"array: found dtype {arr.dtype}, expected real numbers (integer or float)")
    return arr


def _run_config(config: RunConfig | None, options: dict[str, Any]) -> RunConfig:
    """``config``, or a :class:`~cryodeploy.inference.runner.RunConfig` built from ``options`` (not both)."""
    from cryodeploy.inference.runner import RunConfig

    if config is not None and options:
        raise ConfigError(f"pass either a RunConfig or options, not both (found {sorted(options)})")
    return config if config is not None else RunConfig.from_options(**options)


class Denoiser:
    """A loaded model on one backend: call it on arrays, or run it over files."""

    def __init__(self, source: ModelSource, backend: Backend, members: Sequence[ModelSource] = ()) -> None:
        self.source = source
        self.backend = backend
        #: every model of an ensemble (``source`` is the one whose geometry the ensemble uses)
        self.members = list(members) or [source]

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = "default",
        device: str = "auto",
        backend: str = "auto",
        precision: str = "fp32",
        threads: int = 0,
        tf32: bool = False,
        **options: Any,
    ) -> Denoiser:
        """Load ``model`` (``"default"``, a checkpoint/run folder, raw weights, ``.onnx`` or an engine).

        ``precision``: fp32/fp16/bf16, or ``auto`` (:func:`~cryodeploy.inference.variants.default_variant`:
        the fastest variant passing parity and the fp16 gate on CUDA, fp32 elsewhere).
        ``device``: ``auto``/``cpu``/``cuda``/``cuda:N``; ``backend``: ``auto`` (see
        :data:`~cryodeploy.backends.BACKEND_PREFERENCE`) or a registered name; ``options`` go to the backend
        (e.g. ``cuda_graphs=True`` for torch). A list of models is an ensemble: each runs on
        ``backend`` (with ``auto`` precision: each member's own default variant) and the outputs are
        averaged (:mod:`cryodeploy.backends.ensemble`).
        """
        from cryodeploy.backends import BackendOptions, create_auto, create_backend
        from cryodeploy.backends.registry import auto_device_options
        from cryodeploy.backends.sources import load_source

        models: list[Any] = list(model) if isinstance(model, list | tuple) else [model]
        if not models:
            raise ConfigError("no model given")
        for m in models:
            if not isinstance(m, str | os.PathLike):
                raise ConfigError(f"model {model!r}: expected 'default' or a path, or a list of them")
        if not isinstance(backend, str):
            raise ConfigError(f"backend {backend!r}: expected 'auto' or a backend name")
        sources = [load_source(m) for m in models]
        dev = resolve_device(device)
        # (backend name, precision, options) per member; precision auto: each member's fastest correct
        # variant on CUDA (inference/variants.py), eager fp32 elsewhere
        plans = [(backend, precision, options)] * len(sources)
        if precision == "auto":
            from cryodeploy.inference.variants import default_variant

            plans = []
            for source in sources:
                chosen = default_variant(source, dev)
                if backend in ("auto", chosen.backend) and not options:
                    plans.append((chosen.backend, chosen.precision, dict(chosen.extra)))
                else:
                    plans.append((backend, chosen.precision, options))
        backends: list[Backend] = []
        try:
            for source, (name, prec, extra) in zip(sources, plans, strict=True):
                opts = BackendOptions(device=dev, precision=prec, threads=threads, tf32=tf32,
                                      extra=tuple(sorted(extra.items())))
                if device == "auto" and name != "auto":
                    opts = auto_device_options(name, opts, precision_chosen=precision == "auto")
                backends.append(create_auto(source, opts) if name == "auto"
                                else create_backend(name, source, opts))
            if len(sources) == 1:
                return cls(sources[0], backends[0])
            from cryodeploy.backends.ensemble import EnsembleBackend, dominant_spec

            lead = dominant_spec([s.spec for s in sources], [str(m) for m in models])
            return cls(sources[lead], EnsembleBackend(backends), sources)
        except BaseException:
            for b in backends:
                b.close()
            raise

    @property
    def spec(self) -> ModelSpec:
        """The model's geometry and normalization."""
        return self.source.spec

    def __call__(self, array: np.ndarray, tile: int | str = "auto", batch: int | str = "auto") -> np.ndarray:
        """Denoise a 2-D image or a 3-D stack (frames first) with an image model, or a (D, H, W) volume
        with a volume model (:attr:`spec` ``.ndim`` 3); same shape, in the input's intensity scale."""
        from cryodeploy.inference.jobs import check_geometry
        from cryodeploy.inference.runner import denoise_image
        from cryodeploy.inference.volumes import denoise_volume

        check_geometry(tile, batch)
        arr = _check_array(array)
        if self.spec.ndim == 3:
            return denoise_volume(arr, self.backend, self.spec, tile=tile, batch=batch)
        return denoise_image(arr, self.backend, self.spec, tile=tile, batch=batch)

    def denoise_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        outdir: str | os.PathLike[str],
        config: RunConfig | None = None,
        **options: Any,
    ) -> RunSummary:
        """Denoise files into ``outdir`` with ``config``, or with ``options`` naming
        :class:`~cryodeploy.inference.runner.RunConfig` fields (``skip_existing=True``, ``tile=512``, ...)."""
        from cryodeploy.inference.runner import denoise_files

        return denoise_files(paths, Path(outdir), self.backend, self.spec, _run_config(config, options))

    def denoise_pairs(
        self,
        pairs: Iterable[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        config: RunConfig | None = None,
        **options: Any,
    ) -> RunSummary:
        """Denoise each ``(input, output)`` pair (outputs in any folders); ``config``/``options`` as
        for :meth:`denoise_files`."""
        from cryodeploy.inference.runner import denoise_pairs

        return denoise_pairs(pairs, self.backend, self.spec, _run_config(config, options))

    def close(self) -> None:
        """Release the backend (idempotent)."""
        self.backend.close()

    def __enter__(self) -> Denoiser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(s.path.name for s in self.members)
        return f"Denoiser({names}, {self.spec.architecture}, {self.backend.label})"

