"""The patch store's ``manifest.json`` as a schema: every field rule that
:class:`~cryodeploy.training.store.PatchStore` checks before it looks at the data files, in one place
(pydantic, strict: no int for a string, no bool for an int). Fields beyond these (provenance: sources,
normalization, noise) are kept as written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = ["FORMAT", "SPLITS", "SplitEntry", "StoreManifest"]

#: Value of the manifest's "format" field that this code reads and writes.
FORMAT = "cryodeploy-patches/1"
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
    patch: tuple[int, int]
    dtype: Literal["float32"]
    byte_order: Literal["little"]
    splits: dict[str, SplitEntry] = Field(min_length=1)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(f"found format {value!r}, expected {FORMAT!r}")
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
    def _shape(cls, value: object) -> tuple[int, int]:
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"found patch {value!r}, expected [H, W] of positive integers")
        return (value[0], value[1])
