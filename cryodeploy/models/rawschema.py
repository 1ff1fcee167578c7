"""``layers.json`` of a raw weight folder as a schema: every rule on the document itself, in one place
(pydantic, strict). What needs the architecture or the bytes (shapes, sizes, hashes, the layout
fingerprint) is checked by :func:`cryodeploy.models.rawweights.load_raw` against them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = ["LAYOUT", "RAW_FORMAT", "RawFile", "RawLayer", "RawLayers"]

RAW_FORMAT = "cryodeploy-raw/1"
LAYOUT = "(out,in,kH,kW)"
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class RawFile(BaseModel):
    """One raw float32 file: its name in the folder, shape, byte layout, hash and (4-d) fingerprint."""

    model_config = _STRICT
    file: str
    shape: list[Any]  # compared with the architecture's shape, which names the offending file
    dtype: Literal["float32"]
    byte_order: Literal["little"]
    layout: str | None = None
    nbytes: int | None = Field(default=None, ge=0)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    axis_sums: dict[str, list[Any]] | None = None


class RawLayer(BaseModel):
    """One conv layer: ``convN``, its module path, its weight file and its bias file (None: no bias)."""

    model_config = _STRICT
    name: str
    module: str
    weight: RawFile
    bias: RawFile | None = None

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any) -> Any:
        """Each file entry is an object naming a file inside the folder (the message names the layer)."""
        if not isinstance(data, dict):
            return data
        layer = data.get("name")
        for key in ("weight", "bias"):
            entry = data.get(key)
            if entry is None and key == "bias":
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"{layer} file entry is {type(entry).__name__}, expected an object")
            name = entry.get("file")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{layer} file {name!r}, expected a file name in the folder")
        return data


class RawLayers(BaseModel):
    """The whole document; ``model`` is a :class:`~cryodeploy.models.ModelSpec` dict, checked by it."""

    model_config = _STRICT
    format: str
    model: dict[str, Any]
    layers: list[RawLayer]
    layout: str | None = None
    dtype: Literal["float32"] | None = None
    byte_order: Literal["little"] | None = None
    order: Literal["C"] | None = None
    source_sha256: str | None = None

    @field_validator("format", "layout")
    @classmethod
    def _tags(cls, value: str | None, info: ValidationInfo) -> str | None:
        want = RAW_FORMAT if info.field_name == "format" else LAYOUT
        if value is not None and value != want:
            raise ValueError(f"found {info.field_name} {value!r}, expected {want!r}")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _objects(cls, value: Any) -> Any:
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            raise ValueError("'layers' must be a list of objects, one per conv layer")
        return value
