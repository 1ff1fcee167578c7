"""Find, check and deserialize TensorRT engines.

An engine runs only on the GPU model and TensorRT version it was built with: its sidecar says
which, and a mismatch is a :class:`~cryodeploy.errors.ModelError` naming both, never a crash
inside TensorRT.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import tensorrt as trt
import torch

from cryodeploy.backends.trt.cache import EngineSidecar, Platform, check_gate, check_platform
from cryodeploy.errors import ConfigError, ModelError

__all__ = ["LoadedEngine", "TrtLogger", "current_platform", "device_index", "load_engine"]

log = logging.getLogger(__name__)


class TrtLogger(trt.ILogger):
    """Routes TensorRT's messages to :mod:`logging` (errors as errors, the rest as debug)."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)

    def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
        if severity <= trt.ILogger.Severity.ERROR:
            log.error("TensorRT: %s", msg)
        elif severity == trt.ILogger.Severity.WARNING:
            log.warning("TensorRT: %s", msg)
        else:
            log.debug("TensorRT: %s", msg)


def current_platform(device: int = 0) -> Platform:
    """The GPU ``device`` and the TensorRT version an engine built now is bound to."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return Platform(torch.cuda.get_device_name(device), f"{major}.{minor}", trt.__version__)


@dataclass(frozen=True)
class LoadedEngine:
    """A deserialized engine with the runtime and logger it needs to stay alive."""

    logger: TrtLogger
    runtime: trt.Runtime
    engine: trt.ICudaEngine


def device_index(device: str) -> int:
    """CUDA device ordinal of ``"cuda"`` / ``"cuda:N"`` (``"cuda"`` means the current device)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(f"TensorRT needs a CUDA device, found {device!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def load_engine(
    path: Path, sidecar: EngineSidecar, device: int, allow_accuracy_loss: bool = False
) -> LoadedEngine:
    """Deserialize the engine at ``path`` on ``device`` after checking its sidecar: same GPU and
    TensorRT version, unchanged file, and (fp16) a passed accuracy gate unless loss is allowed."""
    check_platform(path, sidecar.key.platform, current_platform(device))
    check_gate(path, sidecar, allow_accuracy_loss)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read the engine ({err.strerror or err})") from err
    if hashlib.sha256(data).hexdigest() != sidecar.engine_sha256:
        raise ModelError(f"{path}: engine file differs from the one its sidecar describes (sha256 mismatch)")
    logger = TrtLogger()
    with torch.cuda.device(device):
        runtime = trt.Runtime(logger)
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ModelError(f"{path}: TensorRT could not deserialize the engine (see its log)")
    return LoadedEngine(logger, runtime, engine)
