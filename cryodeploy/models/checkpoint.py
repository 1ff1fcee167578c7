"""Checkpoints: safetensors weights + a JSON :class:`ModelSpec`; never unpickles user data.

A checkpoint is a pair ``NAME.safetensors`` + ``NAME.json``. Wherever a checkpoint is taken,
the ``.safetensors`` file, the ``.json`` file, or a training run folder (meaning its
``best`` checkpoint) are accepted.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryodeploy.errors import ConfigError, ModelError, first_line
from cryodeploy.models import ModelSpec, build_model

if TYPE_CHECKING:
    import torch

__all__ = ["load_checkpoint", "read_safetensors_header", "resolve_checkpoint", "safetensors_bytes",
           "save_checkpoint"]

#: bytes per element of the safetensors dtypes a checkpoint may hold
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
#: a header larger than this is refused unread (a CNN3 header is about 600 bytes)
_HEADER_MAX = 1 << 20


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Map a run folder, ``.json`` or ``.safetensors`` path to the checkpoint's ``.safetensors`` file."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise ModelError(
            f"{p}: folder holds no checkpoint (best.safetensors, last.safetensors or model.safetensors)"
        )
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.suffix != ".safetensors":
        raise ModelError(f"{p}: not a checkpoint, expected a .safetensors file or a run folder")
    if not p.is_file():
        raise ModelError(f"{p}: no such checkpoint file")
    return p


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``state``, byte-reproducible (metadata and tensors sorted by name)."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        if t.dtype not in names:
            raise ModelError(f"{key}: dtype {t.dtype} cannot be saved, expected a floating-point tensor")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` config atomically; returns the weights path.

    The config is written first, so an interrupted save never leaves weights without a config.
    """
    from cryodeploy.files import atomic_write

    weights = Path(path).with_suffix(".safetensors")
    blob = safetensors_bytes(model.state_dict(), {"format": "cryodeploy-model/1",
                                                  "architecture": spec.architecture})
    with atomic_write(weights.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    with atomic_write(weights) as tmp:  # written by us, so the file gets the usual permissions
        tmp.write_bytes(blob)
    return weights


def _unreadable(path: Path, why: str) -> ModelError:
    return ModelError(f"{path}: not a readable safetensors file ({why})")


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) from a safetensors header, read without touching the tensor data.

    Refuses a special file, a header that is absurdly long or not a JSON object, an entry that is
    malformed, and data offsets that do not tile the rest of the file exactly (so a tensor
    declared beyond the end of the file, or a file padded with gigabytes, is refused unread).
    """
    from cryodeploy.files import open_regular

    with open_regular(path, ModelError) as (fh, size):
        head = fh.read(8)
        if len(head) < 8:
            raise _unreadable(path, f"found {size} bytes, expected at least 8")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _HEADER_MAX):
            raise _unreadable(path, f"header length {n} exceeds the {size}-byte file or {_HEADER_MAX} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _unreadable(path, f"header is not valid JSON: {first_line(err, type(err).__name__)}") from err
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, ...]] = []
    for key, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES
        shape: Any = entry.get("shape") if ok else None
        span: Any = entry.get("data_offsets") if ok else None
        ints = isinstance(shape, list) and isinstance(span, list) and len(span) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *span])
        if not ints:
            raise _unreadable(path, f"tensor {key!r}: malformed header entry")
        count = 1
        for v in shape:
            count *= v
        if span[1] - span[0] != count * _DTYPE_BYTES[entry["dtype"]]:
            raise _unreadable(path, f"tensor {key!r}: data offsets {span} do not hold shape {tuple(shape)}")
        tensors[key] = (entry["dtype"], tuple(shape))
        spans.append(tuple(span))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise _unreadable(path, f"tensor data overlaps or leaves a gap at byte {a}")
        end = b
    if end != size - 8 - n:
        raise _unreadable(path, f"tensors hold {end} bytes of data, the file has {size - 8 - n}")
    return tensors


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a checkpoint (file or run folder) into an eval-mode CPU model and its spec.

    Raises :class:`ModelError` for a missing, truncated or mismatched checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cryodeploy.files import read_json

    weights = resolve_checkpoint(path)
    cfg_path = weights.with_suffix(".json")
    try:
        config = read_json(cfg_path, ModelError)
        if not isinstance(config, dict):
            raise ConfigError(f"found {type(config).__name__}, expected a JSON object")
        spec = ModelSpec.from_dict(config)
    except FileNotFoundError as err:
        raise ModelError(f"{cfg_path}: checkpoint config missing (expected beside {weights.name})") from err
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{cfg_path}: invalid model config ({err})") from err
    import torch

    try:  # shapes from a model on the meta device: a config can declare sizes no memory holds
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelError(
            f"{cfg_path}: invalid model config (cannot build {spec.architecture} with {spec.params}: {err})"
        ) from err
    found = {k: shape for k, (_, shape) in read_safetensors_header(weights).items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        detail = "; ".join(
            s
            for s in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k}: found {found[k]}, expected {expected[k]}" for k in wrong),
            )
            if s
        )
        raise ModelError(f"{weights}: weights do not match architecture {spec.architecture} ({detail})")
    try:  # the header matched: the file holds exactly these tensors and nothing else
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: not a readable safetensors file ({err})") from err
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    return model, spec
