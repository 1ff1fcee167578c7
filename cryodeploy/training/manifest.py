"""The patch store's ``manifest.json`` as a schema: every field rule that
:class:`~cryodeploy.training.store.PatchStore` checks before it looks at the data files, in one place
(pydantic, strict: no int for a string, no bool for an int). Fields beyond these (provenance: sources,
normalization, noise) are kept as written.

Versions: ``cryodeploy-patches/1`` holds 2-D patches (``patch`` = [H, W]); ``cryodeploy-patches/2``
adds ``ndim`` (2 or 3) and ``patch`` of that many sides ([D, H, W] for volumes). 2-D stores are
still written as version 1, so every reader of version 1 reads them unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["FORMAT", "FORMATS", "FORMAT_ND", "SPLITS", "SplitEntry", "StoreManifest", "format_for"]

#: The manifest "format" of a store of 2-D patches.
FORMAT = "cryodeploy-patches/1"
#: The manifest "format" of a store with an ``ndim`` field (3-D patches).
FORMAT_ND = "cryodeploy-patches/2"
#: The formats this code reads.
FORMATS = (FORMAT, FORMAT_ND)


def format_for(ndim: int) -> str:
    """The format a store of ``ndim``-D patches is written in."""
    return FORMAT if ndim == 2 else FORMAT_ND
#: The splits a store may hold, in manifest order.
SPLITS = ("train", "test")


def _file_name(name: str) -> str:
    if not name or Path(name).name != name:
        raise ValueError(f"data file {name!r} invalid, expected a file name inside the store")
    return name


DataFile = Annotated[str, AfterValidator(_file_name)]


class SplitEntry(BaseModel):
    """One split: its input file, its target file (None: no targets) and the patch count."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    input: DataFile
    target: DataFile | None = None
    count: int = Field(ge=0)


class StoreManifest(BaseModel):
    """The fields a store is read by."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    format: str
    patch: tuple[int, ...]
    ndim: Literal[2, 3] | None = None
    dtype: Literal["float32"]
    byte_order: Literal["little"]
    splits: dict[str, SplitEntry] = Field(min_length=1)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"found format {value!r}, expected {' or '.join(map(repr, FORMATS))}")
        return value

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: dict[str, SplitEntry]) -> dict[str, SplitEntry]:
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ValueError(f"found splits {unknown}, expected only {list(SPLITS)}")
        return value

    @field_validator("patch", mode="before")
    @classmethod
    def _shape(cls, value: object) -> tuple[int, ...]:
        if (not isinstance(value, list) or len(value) not in (2, 3)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"found patch {value!r}, expected [H, W] or [D, H, W] of positive integers")
        return tuple(value)

    @model_validator(mode="after")
    def _dimensions(self) -> StoreManifest:
        if self.format == FORMAT and (self.ndim is not None or len(self.patch) != 2):
            raise ValueError(f"found patch {list(self.patch)} and ndim {self.ndim} in format {FORMAT!r}, "
                             "expected [H, W] and no ndim")
        if self.format == FORMAT_ND and self.ndim != len(self.patch):
            raise ValueError(f"found patch {list(self.patch)} and ndim {self.ndim}, expected ndim = "
                             "the number of patch sides")
        return self

    @property
    def dims(self) -> int:
        """2 or 3: the number of patch sides."""
        return len(self.patch)
