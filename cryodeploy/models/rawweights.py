"""The seeds' weight interchange: one raw float32 file per conv weight and bias, plus ``layers.json``.

Layout (what another program must write to be loaded here):

- ``conv{i}_weight.bin``: float32, little-endian, shape ``(out, in, kH, kW)`` in C order
  (the last index varies fastest); ``conv{i}_bias.bin``: float32 little-endian ``(out,)``.
  ``i`` counts the model's ``Conv2d`` layers from 1 in module order, so the format covers
  every architecture built only from convolutions (CNN3 and the U-Net; pooling, upsampling
  and activations carry no weights). A model with other parameters is refused.
- ``layers.json``: format tag, the :class:`~cryodeploy.models.ModelSpec`, and per layer its
  name, module path, and for each file its shape, dtype, byte order, layout, byte count,
  ``sha256`` of the bytes and ``axis_sums``.

Why two checks. Sizes alone cannot catch the seeds' bug: a ``(kH, kW, in, out)`` file has
exactly the bytes of an ``(out, in, kH, kW)`` one. ``sha256`` catches any change to a file
after it was described, but a foreign writer that scrambles its copy and hashes what it wrote
produces a matching hash. ``axis_sums`` is the layout fingerprint: the weight tensor summed
over all axes but one, for each named axis (``out``, ``in``, ``kH``, ``kW``). A writer
computes it from its in-memory array by *named* indices, independent of the byte order it
writes; the loader recomputes it from the file read as ``(out, in, kH, kW)``. A transposed
or scrambled file moves values between output channels and kernel positions, so the
marginals disagree (unless the weights are symmetric in a way that makes the mix-up
harmless). Both fields are required: a folder without them is refused, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, ModelError
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.rawschema import LAYOUT, RAW_FORMAT, RawFile, RawLayers

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUT", "RAW_FORMAT", "axis_sums", "export_raw", "load_raw", "raw_layers", "write_raw_array"]

_AXES = ("out", "in", "kH", "kW")
#: relative tolerance of the fingerprint (sums of float32 values in another summation order)
_SUM_RTOL = 1e-4


def axis_sums(weight: np.ndarray) -> dict[str, list[float]]:
    """Marginal sums of an ``(out, in, kH, kW)`` array per named axis (float64), the layout fingerprint."""
    w = np.asarray(weight, dtype=np.float64)
    return {name: [float(v) for v in w.sum(axis=tuple(a for a in range(4) if a != k))]
            for k, name in enumerate(_AXES)}


def raw_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d]]:
    """The model's ``Conv2d`` layers in module order as (module path, layer); refuses other parameters."""
    from torch import nn

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    covered = {f"{name}.{p}" for name, m in convs for p, _ in m.named_parameters(recurse=False)}
    other = sorted(set(dict(model.named_parameters())) - covered)
    if other:
        raise ModelError(f"raw weights hold only Conv2d layers; this model also has parameters {other}")
    return convs


def write_raw_array(path: Path, array: np.ndarray, **fields: Any) -> dict[str, Any]:
    """Write ``array`` to ``path`` as raw float32 little-endian C-order bytes (a 0-d array stays 0-d);
    returns its description: file, shape, dtype, byte_order, then ``fields``, then sha256."""
    data = np.asarray(array, dtype="<f4")
    raw = data.tobytes(order="C")
    path.write_bytes(raw)
    return {"file": path.name, "shape": list(data.shape), "dtype": "float32", "byte_order": "little",
            **fields, "sha256": hashlib.sha256(raw).hexdigest()}


def _file_entry(path: Path, array: np.ndarray, layout: str) -> dict[str, Any]:
    entry = write_raw_array(path, array, layout=layout, nbytes=4 * array.size)
    if array.ndim == 4:
        entry["axis_sums"] = axis_sums(array)
    return entry


def export_raw(checkpoint: str | os.PathLike[str], outdir: str | os.PathLike[str]) -> Path:
    """Write a checkpoint's conv weights/biases as raw files + ``layers.json`` into ``outdir``; returns it."""
    from cryodeploy.files import atomic_write, file_sha256
    from cryodeploy.models.checkpoint import load_checkpoint, resolve_checkpoint

    model, spec = load_checkpoint(checkpoint)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, (module, conv) in enumerate(raw_layers(model), start=1):
        name = f"conv{i}"
        entry: dict[str, Any] = {"name": name, "module": module}
        entry["weight"] = _file_entry(out / f"{name}_weight.bin", conv.weight.detach().cpu().numpy(), LAYOUT)
        entry["bias"] = (
            None if conv.bias is None
            else _file_entry(out / f"{name}_bias.bin", conv.bias.detach().cpu().numpy(), "(out,)")
        )
        layers.append(entry)
    doc = {
        "format": RAW_FORMAT,
        "layout": LAYOUT,
        "dtype": "float32",
        "byte_order": "little",
        "order": "C",
        "model": spec.to_dict(),
        "source_sha256": file_sha256(resolve_checkpoint(checkpoint)),
        "layers": layers,
    }
    with atomic_write(out / "layers.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _dims(value: list[Any]) -> tuple[int, ...] | None:
    """A shape from JSON: a list of non-negative integers, else None."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def _read_file(folder: Path, layer: str, entry: RawFile, expected_shape: tuple[int, ...]) -> np.ndarray:
    from cryodeploy.files import open_regular

    where = folder / entry.file
    shape = _dims(entry.shape)
    if shape != expected_shape:
        raise ModelError(f"{where}: layers.json gives {layer} shape "
                         f"{entry.shape if shape is None else shape}, expected {expected_shape}")
    if len(shape) == 4 and entry.layout != LAYOUT:
        raise ModelError(f"{where}: layout {entry.layout!r} in layers.json, expected {LAYOUT!r}")
    if len(shape) == 4 and entry.axis_sums is None:
        raise ModelError(f"{where}: layers.json has no 'axis_sums' for {layer}; "
                         "refusing unverifiable weights")
    expected_bytes = 4 * int(np.prod(shape))
    try:
        with open_regular(where, ModelError) as (fh, size):
            if size != expected_bytes:  # checked before reading: a huge file is never read
                raise ModelError(f"{where}: found {size} bytes, expected {expected_bytes} "
                                 f"for {layer} shape {shape}")
            raw = fh.read(expected_bytes + 1)
    except OSError as err:
        raise ModelError(f"{where}: cannot read ({err.strerror or err})") from err
    if len(raw) != expected_bytes:  # the file changed size while it was read
        raise ModelError(f"{where}: found {len(raw)} bytes, expected {expected_bytes} "
                         f"for {layer} shape {shape}")
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise ModelError(f"{where}: sha256 differs from layers.json (file changed after it was described)")
    data = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if len(shape) == 4:
        _check_axis_sums(where, data, entry.axis_sums or {})
    return data


def _check_axis_sums(where: Path, data: np.ndarray, stored: dict[str, list[Any]]) -> None:
    found = axis_sums(data)
    scale = float(np.abs(data.astype(np.float64)).sum()) or 1.0
    for axis in _AXES:
        try:
            want = np.asarray(stored.get(axis, []), dtype=np.float64)
        except (TypeError, ValueError):
            want = np.zeros(0)
        got = np.asarray(found[axis])
        if want.shape != got.shape or np.max(np.abs(want - got)) > _SUM_RTOL * scale:
            raise ModelError(
                f"{where}: weights read as {LAYOUT} do not match the layout fingerprint in layers.json "
                f"(axis {axis!r} sums differ); the file was probably written in another order, "
                "e.g. (kH,kW,in,out)"
            )


def load_raw(folder: str | os.PathLike[str]) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a raw weight folder into an eval-mode CPU model and its spec; refuses any mismatch."""
    import torch

    from cryodeploy.files import read_document

    d = Path(folder)
    meta_path = d / "layers.json"
    meta = read_document(meta_path, RawLayers, ModelError, "a raw weight folder needs layers.json")
    try:
        spec = ModelSpec.from_dict(meta.model)
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{meta_path}: invalid model config ({err})") from err
    with torch.device("meta"):  # shapes only: every file is checked before the real model is built
        convs = raw_layers(build_model(spec))
    if len(meta.layers) != len(convs):
        raise ModelError(f"{meta_path}: found {len(meta.layers)} layers, "
                         f"expected {len(convs)} for {spec.architecture}")
    state: dict[str, torch.Tensor] = {}
    for i, ((module, conv), entry) in enumerate(zip(convs, meta.layers, strict=True), start=1):
        name = f"conv{i}"
        if entry.name != name or entry.module != module:
            raise ModelError(
                f"{meta_path}: layer {i} is {entry.name!r} ({entry.module!r}), expected {name!r} ({module!r})"
            )
        if (conv.bias is None) != (entry.bias is None):
            raise ModelError(f"{meta_path}: {name} bias is {entry.bias and entry.bias.file!r}, "
                             f"expected {'none' if conv.bias is None else 'a file'}")
        weight = _read_file(d, name, entry.weight, tuple(conv.weight.shape))
        state[f"{module}.weight"] = torch.from_numpy(weight)
        if conv.bias is not None and entry.bias is not None:
            bias = _read_file(d, name, entry.bias, tuple(conv.bias.shape))
            state[f"{module}.bias"] = torch.from_numpy(bias)
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    return model, spec
