"""The engine sidecar (``<engine>.json``) as a schema: every field rule on the document, in one place
(pydantic, strict). :class:`~cryodeploy.backends.trt.cache.EngineSidecar` is built from it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GateDoc", "KeyDoc", "SidecarDoc"]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class KeyDoc(BaseModel):
    """The cache key fields, as :meth:`EngineKey.fields` writes them (compared, not trusted)."""

    model_config = _STRICT
    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profile: str


class GateDoc(BaseModel):
    """The fp16 gate's outcome; ``drop_db`` and ``passed`` are derived, written for readers."""

    model_config = _STRICT
    psnr_fp32: float
    psnr_fp16: float
    drop_db: float | None = None
    max_drop_db: float = Field(ge=0)
    samples: int = Field(ge=0)
    passed: bool | None = None


class SidecarDoc(BaseModel):
    """The whole sidecar; ``format`` is checked before it (another format is another version, not an error
    in this one)."""

    model_config = _STRICT
    format: str
    key: KeyDoc
    model: dict[str, Any]
    engine_sha256: str = Field(pattern="^[0-9a-f]{64}$")
    build_seconds: float = Field(ge=0)
    created: str
    workspace_bytes: int = Field(ge=0)
    onnx_path: str
    fp16_gate: GateDoc | None = None
    loss_accepted: bool = False
