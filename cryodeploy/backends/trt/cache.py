"""The TensorRT engine cache: build configs, cache keys, JSON sidecars, platform and gate checks.

Pure Python (no TensorRT; torch only to look for a CUDA device), so all of it is tested on
machines without a GPU. An engine is stored as ``<precision>-<hash of key>.engine`` with
``<same name>.json`` beside it; a cached engine is reused only when every key field in its
sidecar equals the wanted key and the engine file still has the hash recorded at build time;
otherwise it is rebuilt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryodeploy.backends.gate import CalibrationPair, GateResult
from cryodeploy.backends.trt.profile import DEFAULT_SHAPES, ProfileShapes, default_shapes, parse_shapes
from cryodeploy.errors import ConfigError, ModelError

__all__ = [
    "ENGINE_PRECISIONS",
    "BuildConfig",
    "CacheDecision",
    "EngineKey",
    "EngineRecord",
    "EngineSidecar",
    "Platform",
    "cache_lookup",
    "check_gate",
    "check_platform",
    "key_differences",
    "read_sidecar",
    "sidecar_path",
    "timing_cache_path",
    "write_sidecar",
]

SIDECAR_FORMAT = "cryodeploy-engine/1"
ENGINE_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildConfig:
    """How to build engines: precisions, optimization profile, workspace, timing cache, fp16 gate.

    ``calibration`` pairs (noisy, clean) feed the fp16 gate; when empty, ``calibration_count``
    synthetic micrographs of the profile's opt tile are drawn with ``calibration_seed``.
    ``timing_cache`` defaults to a per-GPU file in the cache folder.
    """

    precisions: tuple[str, ...] = ("fp32", "fp16")
    shapes: ProfileShapes = DEFAULT_SHAPES
    workspace_bytes: int = 2 << 30
    timing_cache: Path | None = None
    calibration: tuple[CalibrationPair, ...] = field(default=(), compare=False, repr=False)
    calibration_count: int = 4
    calibration_seed: int = 0
    allow_accuracy_loss: bool = False
    max_drop_db: float = 0.1
    device: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in ENGINE_PRECISIONS]
        if bad or not self.precisions:
            raise ConfigError(f"engine precisions {list(self.precisions)}, expected some of fp32, fp16")
        if self.workspace_bytes < 1 << 20:
            raise ConfigError(f"TensorRT workspace {self.workspace_bytes} bytes, expected at least 1 MiB")

    @classmethod
    def from_options(
        cls, precision: str, shapes: str | None, workspace_mib: int, allow_accuracy_loss: bool, stride: int,
        ndim: int = 2,
    ) -> BuildConfig:
        """From the command line: ``precision`` fp32|fp16|both, ``--shapes`` text (None: the default of
        an ``ndim`` model)."""
        choices = {"fp32": ("fp32",), "fp16": ("fp16",), "both": ("fp32", "fp16")}
        if precision not in choices:
            raise ConfigError(f"engine precision {precision!r}, expected fp32, fp16 or both")
        profile = parse_shapes(shapes, ndim=ndim) if shapes else default_shapes(ndim)
        profile.check_stride(stride)
        profile.check_ndim(ndim)
        return cls(precisions=choices[precision], shapes=profile, workspace_bytes=workspace_mib << 20,
                   allow_accuracy_loss=allow_accuracy_loss)


@dataclass(frozen=True)
class Platform:
    """What an engine is bound to: the GPU (name and compute capability) and the TensorRT version."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str

    def describe(self) -> str:
        """E.g. ``NVIDIA H100 80GB HBM3 (sm 9.0) / TensorRT 10.13.0.35``."""
        return f"{self.gpu_name} (sm {self.compute_capability}) / TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class EngineKey:
    """The engine cache key of design.md: ONNX hash, platform, precision and profile."""

    onnx_sha256: str
    platform: Platform
    precision: str
    profile: ProfileShapes

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ConfigError(
                f"engine precision {self.precision!r}, expected one of {', '.join(ENGINE_PRECISIONS)}"
            )

    def fields(self) -> dict[str, str]:
        """Every key field as a flat string mapping (what the sidecar stores and lookups compare)."""
        return {
            "onnx_sha256": self.onnx_sha256,
            "gpu_name": self.platform.gpu_name,
            "compute_capability": self.platform.compute_capability,
            "tensorrt_version": self.platform.tensorrt_version,
            "precision": self.precision,
            "profile": self.profile.describe(),
        }

    def digest(self) -> str:
        """Hex sha256 of the key fields."""
        import hashlib

        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    def engine_name(self) -> str:
        """The engine's file name in the cache, e.g. ``fp16-1f3a...c2.engine``."""
        return f"{self.precision}-{self.digest()[:24]}.engine"

    @classmethod
    def from_fields(cls, d: dict[str, Any]) -> EngineKey:
        """Inverse of :meth:`fields` (``d`` as the sidecar schema's ``KeyDoc`` accepts it)."""
        platform = Platform(d["gpu_name"], d["compute_capability"], d["tensorrt_version"])
        return cls(d["onnx_sha256"], platform, d["precision"], parse_shapes(d["profile"]))


@dataclass(frozen=True)
class EngineSidecar:
    """The JSON beside an engine: its key, the model it computes, how and when it was built.

    ``loss_accepted`` records that an fp16 engine failing its gate was kept on purpose
    (``--allow-accuracy-loss``), so loading that engine file later does not refuse it.
    """

    key: EngineKey
    model: dict[str, Any]
    engine_sha256: str
    build_seconds: float
    created: str
    workspace_bytes: int
    onnx_path: str
    gate: GateResult | None = None
    loss_accepted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"format": SIDECAR_FORMAT, "key": self.key.fields(), "model": self.model,
                "engine_sha256": self.engine_sha256, "build_seconds": self.build_seconds,
                "created": self.created, "workspace_bytes": self.workspace_bytes, "onnx_path": self.onnx_path,
                "fp16_gate": self.gate.to_dict() if self.gate else None, "loss_accepted": self.loss_accepted}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSidecar:
        """Inverse of :meth:`to_dict`; rejects other formats, and any field the sidecar schema
        (:class:`~cryodeploy.backends.trt.sidecar.SidecarDoc`) refuses, naming the field."""
        from cryodeploy.backends.trt.sidecar import SidecarDoc
        from cryodeploy.files import validated

        if d.get("format") != SIDECAR_FORMAT:
            raise ModelError(f"engine sidecar format {d.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        doc = validated(d, SidecarDoc, "engine sidecar is incomplete or invalid", ModelError)
        gate = doc.fp16_gate
        return cls(EngineKey.from_fields(doc.key.model_dump()), doc.model, doc.engine_sha256,
                   doc.build_seconds, doc.created, doc.workspace_bytes, doc.onnx_path,
                   GateResult.from_dict(gate.model_dump()) if gate else None, doc.loss_accepted)


def sidecar_path(engine: Path) -> Path:
    """The sidecar of ``engine``: same name, ``.json``."""
    return engine.with_suffix(".json")


def write_sidecar(engine: Path, sidecar: EngineSidecar) -> Path:
    """Write the sidecar of ``engine`` atomically; returns its path."""
    from cryodeploy.files import atomic_write

    path = sidecar_path(engine)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(sidecar.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine: Path) -> EngineSidecar:
    """Read the sidecar of ``engine``; :class:`ModelError` naming the file if missing or invalid."""
    path = sidecar_path(engine)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{engine}: sidecar {path.name} missing (engines built by 'cryodeploy export --trt' carry one)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ModelError(f"{path}: unreadable engine sidecar ({err or 'nested too deeply'})") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: found {type(data).__name__}, expected a JSON object")
    try:
        return EngineSidecar.from_dict(data)
    except (ModelError, ConfigError) as err:
        raise ModelError(f"{path}: {err}") from err


@dataclass(frozen=True)
class EngineRecord:
    """One engine in the cache, as :func:`~cryodeploy.backends.trt.build.build_engines` returns it."""

    path: Path
    sidecar: EngineSidecar
    reused: bool

    @property
    def key(self) -> EngineKey:
        """The engine's cache key."""
        return self.sidecar.key

    def describe(self) -> str:
        """One line for the user: the file, whether it was built or reused, and the fp16 gate."""
        how = "reused from the cache" if self.reused else f"built in {self.sidecar.build_seconds:.1f} s"
        gate = f"; {self.sidecar.gate.message()}" if self.sidecar.gate else ""
        return f"{self.key.precision} engine {self.path} ({how}, profile {self.key.profile.describe()}){gate}"


@dataclass(frozen=True)
class CacheDecision:
    """Whether the engine for a key can be reused from the cache or must be (re)built, and why;
    ``sidecar`` is the cached engine's (set when it is reused)."""

    action: Literal["reuse", "build"]
    path: Path
    reason: str
    sidecar: EngineSidecar | None = None


def key_differences(cached: EngineKey, wanted: EngineKey) -> list[str]:
    """Each key field that differs, as ``"field: cached X, wanted Y"``."""
    a, b = cached.fields(), wanted.fields()
    return [f"{k}: cached {a[k]!r}, wanted {b[k]!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def cache_lookup(cache_dir: Path, key: EngineKey) -> CacheDecision:
    """Decide from the cache folder whether the engine for ``key`` is reused or built."""
    from cryodeploy.files import file_sha256

    path = Path(cache_dir) / key.engine_name()
    if not path.is_file():
        return CacheDecision("build", path, "no cached engine")
    try:
        sidecar = read_sidecar(path)
    except ModelError as err:
        return CacheDecision("build", path, f"cached engine unusable: {err}")
    diffs = key_differences(sidecar.key, key)
    if diffs:
        return CacheDecision("build", path, "cached engine's key differs: " + "; ".join(diffs))
    if file_sha256(path) != sidecar.engine_sha256:
        return CacheDecision("build", path, "cached engine file changed since it was built (sha256 differs)")
    return CacheDecision("reuse", path, "cached engine matches every key field", sidecar)


def check_platform(path: Path, built: Platform, here: Platform) -> None:
    """Raise :class:`ModelError` unless an engine built on ``built`` can run on ``here``."""
    if built != here:
        raise ModelError(
            f"{path}: engine built for {built.describe()}, this is {here.describe()}; "
            "rebuild it here with 'cryodeploy export --trt'"
        )


def check_gate(path: Path, sidecar: EngineSidecar, allow_accuracy_loss: bool = False) -> None:
    """Raise :class:`ModelError` with the numbers for an fp16 engine whose accuracy gate failed or
    never ran, unless ``allow_accuracy_loss`` (now, or recorded in the sidecar when it was kept);
    fp32 engines always pass."""
    if sidecar.key.precision != "fp16" or allow_accuracy_loss or sidecar.loss_accepted:
        return
    if sidecar.gate is None:
        raise ModelError(
            f"{path}: fp16 engine has no accuracy gate result in its sidecar; rebuild it with "
            "'cryodeploy export --trt' or pass --allow-accuracy-loss"
        )
    if not sidecar.gate.passed:
        raise ModelError(f"{path}: {sidecar.gate.message()}; refusing it (--allow-accuracy-loss keeps it)")


def timing_cache_path(cache_dir: Path, platform: Platform) -> Path:
    """The persistent TensorRT timing cache for one GPU and TensorRT version inside ``cache_dir``."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", platform.gpu_name).strip("-").lower()
    name = f"timing-{slug}-sm{platform.compute_capability}-trt{platform.tensorrt_version}.cache"
    return Path(cache_dir) / name
