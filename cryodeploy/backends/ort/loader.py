"""ONNX Runtime loader: the ONNX file for a model source (exported and cached if needed, fp16 variant
on request) and an ``InferenceSession`` configured from :class:`BackendOptions`.

Backend-specific options (``BackendOptions.extra``):

- ``graph_optimization``: ``disable`` | ``basic`` | ``extended`` | ``layout`` | ``all`` (default ``all``)
- ``cudnn_conv_algo_search``: ``HEURISTIC`` (default here) | ``EXHAUSTIVE`` (ORT's own default) | ``DEFAULT``.
  Measured for CNN3 at 4096^2 on an H200 (benchmarks/bench_ort.py, TF32 off): HEURISTIC 16.0 ms,
  EXHAUSTIVE 18.8 ms, DEFAULT 39.9 ms; eager PyTorch fp32 15.6 ms in the same run.
- ``prefer_nhwc``: run convolutions in NHWC on CUDA (default false)
- ``cudnn_conv_use_max_workspace``: let cuDNN use a large workspace (ORT's default: true)

TF32 is off on CUDA unless ``BackendOptions.tf32``; ``threads`` sets ``intra_op_num_threads``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryodeploy.backends.base import BackendOptions
from cryodeploy.errors import BackendUnavailable, ConfigError, ModelError, first_line

if TYPE_CHECKING:
    import onnxruntime

    from cryodeploy.models.source import ModelSource

__all__ = [
    "CONV_SEARCH", "GRAPH_LEVELS", "build_session", "import_ort", "model_path", "ort_errors", "providers",
    "session_options",
]

log = logging.getLogger(__name__)

GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
CONV_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def import_ort(device: str) -> Any:
    """Import onnxruntime; on CUDA import torch first so its CUDA and cuDNN libraries are loaded."""
    if device.startswith("cuda"):
        import torch  # noqa: F401  (loads libcudart/libcudnn that onnxruntime-gpu links against)
    import onnxruntime

    return onnxruntime


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises (its own types do not derive from RuntimeError; a
    ``std::bad_alloc`` arrives as a MemoryError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "RuntimeException", "InvalidProtobuf",
             "NotImplemented", "EPFail")
    return (*(getattr(state, n) for n in names if hasattr(state, n)), RuntimeError, ValueError, MemoryError)


def _device_id(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _flag(options: BackendOptions, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def session_options(options: BackendOptions) -> onnxruntime.SessionOptions:
    """Session options: graph optimization level, CPU threads, quiet logging."""
    ort = import_ort(options.device)
    level = str(options.get("graph_optimization", "all")).lower()
    if level not in GRAPH_LEVELS:
        raise ConfigError(
            f"ort graph_optimization {level!r} unknown, expected one of {', '.join(GRAPH_LEVELS)}"
        )
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[level])
    if options.threads:
        so.intra_op_num_threads = options.threads
    so.log_severity_level = 4  # errors surface as exceptions; ORT would also print them
    return so


def providers(options: BackendOptions) -> list[tuple[str, dict[str, str]]]:
    """Execution providers in priority order, with their options."""
    if not options.device.startswith("cuda"):
        return [("CPUExecutionProvider", {})]
    search = str(options.get("cudnn_conv_algo_search", "HEURISTIC")).upper()
    if search not in CONV_SEARCH:
        raise ConfigError(
            f"ort cudnn_conv_algo_search {search!r} unknown, expected one of {', '.join(CONV_SEARCH)}"
        )
    cuda = {
        "device_id": str(_device_id(options.device)),
        "cudnn_conv_algo_search": search,
        "use_tf32": "1" if options.tf32 else "0",
    }
    # passed only when asked for, so a build that lacks one of them still starts with the defaults
    if _flag(options, "prefer_nhwc", False):
        cuda["prefer_nhwc"] = "1"
    if options.get("cudnn_conv_use_max_workspace") is not None:
        big = _flag(options, "cudnn_conv_use_max_workspace", True)
        cuda["cudnn_conv_use_max_workspace"] = "1" if big else "0"
    return [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]


def model_path(source: ModelSource, precision: str) -> Path:
    """The ONNX file to load: the source's (exported to the cache if it is a checkpoint), fp16 on request."""
    from cryodeploy.export.onnx import cached_onnx, convert_fp16, usable_cache_entry
    from cryodeploy.files import cache_root, file_sha256, seal

    fp32 = cached_onnx(source)
    if precision == "fp32":
        return fp32
    half = cache_root("onnx") / f"{file_sha256(fp32)}-fp16.onnx"
    if usable_cache_entry(half, "precision", "fp16"):
        return half
    return seal(convert_fp16(fp32, half))


def build_session(path: Path, options: BackendOptions) -> onnxruntime.InferenceSession:
    """An ``InferenceSession`` for ``path``; on CUDA, refuses a session that fell back to the CPU."""
    ort = import_ort(options.device)
    ort.set_default_logger_severity(4)  # the process-wide logger too: errors come as exceptions
    wanted = providers(options)
    try:  # a failed start prints an "EP Error" banner to stdout before a retry: the error says it
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(str(path), session_options(options), providers=wanted)
    except ort_errors() as err:
        detail = first_line(err, type(err).__name__)
        raise ModelError(f"{path}: ONNX Runtime cannot load it ({detail})") from err
    active = session.get_providers()
    if wanted[0][0] not in active:
        raise BackendUnavailable(
            f"ort: {wanted[0][0]} did not start (session runs on {', '.join(active)}); "
            "check that onnxruntime-gpu matches the CUDA/cuDNN libraries"
        )
    return session
