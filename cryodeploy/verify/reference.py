"""Reference bundles: one fixed training step written down, so another implementation can be checked.

A bundle (a folder) holds the weights as raw per-layer files (``weights/``, see
:mod:`cryodeploy.models.rawweights`), a fixed normalized input batch and its target, the forward
output, the MSE loss (mean over all elements) and the gradient of that loss for every
parameter, each as a raw float32 little-endian C-order file, plus ``manifest.json`` with
every array's shape, dtype and sha256. Gradient files use the raw weights' names
(``grad_conv1_weight.bin`` is the gradient of ``weights/conv1_weight.bin``, same layout).
:func:`check_reference` recomputes everything and reports each array's max abs error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cryodeploy.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["REFERENCE_FORMAT", "ArrayCheck", "RefArray", "RefManifest", "ReferenceReport", "check_reference",
           "make_reference"]

REFERENCE_FORMAT = "cryodeploy-reference/1"
#: fp32 tolerance on every array's max abs error
TOLERANCE = 1e-5
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


def _inside(name: str) -> str:
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"file {name!r} invalid, expected a name inside the bundle")
    return name


class RefArray(BaseModel):
    """One array of a bundle's ``manifest.json``: its raw file, shape, byte layout, role and hash."""

    model_config = _STRICT
    file: str
    shape: list[int]
    dtype: Literal["float32"]
    byte_order: Literal["little"]
    role: Literal["input", "target", "output", "loss", "gradient"]
    sha256: str = Field(pattern="^[0-9a-f]{64}$")

    _file = field_validator("file")(_inside)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(n < 0 for n in shape):
            raise ValueError(f"found shape {shape}, expected non-negative sizes")
        return shape


class RefManifest(BaseModel):
    """A bundle's ``manifest.json``: what :func:`check_reference` reads, every rule in one place."""

    model_config = _STRICT
    format: str
    weights: str = "weights"
    model: dict[str, Any]
    loss: str
    tolerance: float = Field(default=TOLERANCE, gt=0)
    seed: int
    created_by: str
    arrays: dict[str, RefArray]

    _weights = field_validator("weights")(_inside)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value != REFERENCE_FORMAT:
            raise ValueError(f"found format {value!r}, expected {REFERENCE_FORMAT!r}")
        return value

    @model_validator(mode="after")
    def _roles(self) -> RefManifest:
        for role in ("input", "target"):
            if self.arrays.get(role) is None or self.arrays[role].role != role:
                raise ValueError(f"found no {role!r} array with role {role!r}, expected one")
        return self


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth [0, 1] image of Gaussian blobs (particle-like structure)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.zeros((size, size))
    for _ in range(10):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, size / 6)
        img += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return (img / img.max()).astype(np.float32)


def _fixed_batch(rng: np.random.Generator, batch: int, size: int, norm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Noisy inputs and clean targets [batch,1,size,size], normalized with each input's robust stats."""
    from cryodeploy.imaging.noise import NoiseSpec, add_noise
    from cryodeploy.imaging.normalize import norm_stats, normalize

    inputs, targets = [], []
    for _ in range(batch):
        clean = _blobs(rng, size)
        noisy = add_noise(clean, NoiseSpec(), rng)
        stats = norm_stats(noisy, norm)
        inputs.append(normalize(noisy, stats))
        targets.append(normalize(clean, stats))
    return np.stack(inputs)[:, None], np.stack(targets)[:, None]


def _forward_backward(model: torch.nn.Module, x: np.ndarray, t: np.ndarray,
                      device: str) -> dict[str, np.ndarray]:
    """Output, loss and per-layer gradients (raw names) of one fp32 MSE step, without TF32."""
    import torch

    from cryodeploy.models.rawweights import raw_layers

    dev = torch.device(device)
    model = model.to(dev).float()
    model.zero_grad(set_to_none=True)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = model(torch.from_numpy(x).to(dev))
        loss = torch.nn.functional.mse_loss(out, torch.from_numpy(t).to(dev))
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    arrays = {"output": out.detach().cpu().numpy(), "loss": loss.detach().cpu().numpy().reshape(())}
    for i, (_, conv) in enumerate(raw_layers(model), start=1):
        for kind, param in (("weight", conv.weight), ("bias", conv.bias)):
            if param is not None and param.grad is not None:
                arrays[f"grad_conv{i}_{kind}"] = param.grad.detach().cpu().numpy()
    return arrays


def make_reference(checkpoint: str | os.PathLike[str], outdir: str | os.PathLike[str], batch: int = 2,
                   size: int = 64, seed: int = 0) -> Path:
    """Write a reference bundle for ``checkpoint`` (a fixed ``batch`` x ``size``² batch from ``seed``)."""
    from cryodeploy._version import __version__
    from cryodeploy.files import atomic_write
    from cryodeploy.models.checkpoint import load_checkpoint
    from cryodeploy.models.rawweights import export_raw, write_raw_array

    model, spec = load_checkpoint(checkpoint)
    if batch < 1 or size < 8 or size % spec.stride:
        raise ConfigError(f"reference batch {batch} x {size}px: need batch >= 1 and size >= 8, a multiple of "
                          f"the model stride {spec.stride}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    export_raw(checkpoint, out / "weights")
    x, t = _fixed_batch(np.random.default_rng(seed), batch, size, spec.normalization)
    computed = _forward_backward(model, x, t, "cpu")
    arrays = {}
    for name, array in {"input": x, "target": t, **computed}.items():
        role = "gradient" if name.startswith("grad_") else name
        arrays[name] = write_raw_array(out / f"{name}.bin", array, role=role)
    manifest = {
        "format": REFERENCE_FORMAT,
        "weights": "weights",
        "model": spec.to_dict(),
        "loss": "mse, mean over all elements",
        "tolerance": TOLERANCE,
        "seed": seed,
        "created_by": f"cryodeploy {__version__}",
        "arrays": arrays,
    }
    with atomic_write(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class ArrayCheck:
    """One array's comparison: ``status`` is "ok", "FAIL" or "skipped" (backend cannot compute it)."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float | None
    status: str


@dataclass
class ReferenceReport:
    """The outcome of :func:`check_reference`; ``ok`` when no array exceeded the tolerance."""

    bundle: Path
    backend: str
    device: str
    tolerance: float
    arrays: list[ArrayCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every computed array is within tolerance."""
        return all(a.status != "FAIL" for a in self.arrays)

    def lines(self) -> list[str]:
        """A plain-text table, one line per array, then the verdict."""
        rows = [f"{'array':<20} {'shape':<18} {'max abs error':>14}  status"]
        for a in self.arrays:
            err = "-" if a.max_abs_error is None else f"{a.max_abs_error:.3e}"
            rows.append(f"{a.name:<20} {'x'.join(map(str, a.shape)) or 'scalar':<18} {err:>14}  {a.status}")
        verdict = "PASS" if self.ok else "FAIL"
        rows.append(f"{verdict}: {self.backend}/{self.device} against {self.bundle} "
                    f"(tolerance {self.tolerance:g})")
        return rows


def _read_array(folder: Path, entry: RefArray) -> np.ndarray:
    path = folder / entry.file
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read reference array ({err.strerror or err})") from err
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise ModelError(f"{path}: sha256 differs from manifest.json (bundle damaged)")
    if len(raw) != 4 * int(np.prod(entry.shape)):
        raise ModelError(f"{path}: found {len(raw)} bytes, expected {4 * int(np.prod(entry.shape))} "
                         f"for shape {tuple(entry.shape)}")
    return np.frombuffer(raw, dtype="<f4").reshape(entry.shape).astype(np.float32)


def _load_manifest(folder: Path) -> RefManifest:
    from cryodeploy.files import read_document

    return read_document(folder / "manifest.json", RefManifest, ModelError, "not a reference bundle")


def _backend_forward(folder: Path, backend: str, device: str, x: np.ndarray) -> np.ndarray:
    from cryodeploy.backends import BackendOptions, create_backend
    from cryodeploy.backends.sources import load_source

    with create_backend(backend, load_source(folder), BackendOptions(device=device)) as runner:
        return runner.run(x)


def check_reference(folder: str | os.PathLike[str], backend: str = "torch",
                    device: str = "cpu") -> ReferenceReport:
    """Recompute a bundle with ``backend`` on ``device`` and compare every array (max abs error).

    The torch backend recomputes output, loss and gradients; other backends run the forward
    pass only (gradients are reported as skipped).
    """
    from cryodeploy.backends import BACKENDS
    from cryodeploy.models.rawweights import load_raw

    d = Path(folder)
    manifest = _load_manifest(d)
    arrays = manifest.arrays
    expected = {name: _read_array(d, entry) for name, entry in arrays.items()}
    x, t = expected["input"], expected["target"]
    weights = d / manifest.weights
    spec = BACKENDS.get(backend)
    if spec is not None and spec.gradients:
        computed = _forward_backward(load_raw(weights)[0], x, t, device)
    else:
        out = _backend_forward(weights, backend, device, x)
        computed = {"output": out, "loss": np.asarray(np.mean((out - t) ** 2, dtype=np.float32))}
    tol = manifest.tolerance
    report = ReferenceReport(d, backend, device, tol)
    for name, entry in arrays.items():
        if entry.role in ("input", "target"):
            continue
        shape = tuple(entry.shape)
        if name not in computed:
            report.arrays.append(ArrayCheck(name, shape, None, "skipped"))
            continue
        got = computed[name]
        if got.shape != shape:
            report.arrays.append(ArrayCheck(name, shape, float("inf"), "FAIL"))
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - expected[name]))) if got.size else 0.0
        report.arrays.append(ArrayCheck(name, shape, err, "ok" if err <= tol else "FAIL"))
    return report
