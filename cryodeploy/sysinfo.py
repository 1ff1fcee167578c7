"""What this machine offers: package versions, devices, and which backends can run."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from typing import Any

__all__ = ["package_version", "system_info"]


def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    """Whether ``module`` imports here (an installed distribution may still fail to import)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _devices() -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = [
        {"device": "cpu", "threads": os.cpu_count() or 1, "name": platform.processor() or platform.machine()}
    ]
    try:
        import torch
    except ImportError:
        return devices

    devices[0]["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": prop.name,
                    "memory_gib": round(prop.total_memory / 2**30, 1),
                    "compute_capability": f"{prop.major}.{prop.minor}",
                }
            )
    return devices


def system_info() -> dict[str, Any]:
    """Versions, devices and backend availability as a JSON-ready dict."""
    from cryodeploy._version import __version__
    from cryodeploy.backends import BACKENDS, BackendOptions, availability
    from cryodeploy.backends.trt.probe import tensorrt_runtime

    versions: dict[str, str | None] = {"cryodeploy": __version__, "python": platform.python_version()}
    for dist in (
        "numpy",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "mrcfile",
        "starfile",
    ):
        versions[dist] = package_version(dist)
    import torch

    versions["torch"] = str(torch.__version__)  # with its build tag (+cu130, +cpu): which CUDA it needs
    if not _importable("onnxruntime"):  # both distributions provide the module
        versions["onnxruntime"] = versions["onnxruntime-gpu"] = None
    trt, _ = tensorrt_runtime()  # the runtime's own version: the type stubs are a distribution too
    versions["tensorrt"] = str(getattr(trt, "__version__", "unknown")) if trt is not None else None
    devices = _devices()
    backends: dict[str, dict[str, str | bool]] = {}
    has_cuda = any(d["device"].startswith("cuda") for d in devices)
    # a backend counts as available if it runs in any of these; otherwise the first reason is shown
    probes = [BackendOptions(device="cuda", precision=p) for p in ("fp32", "fp16")] if has_cuda else []
    probes.append(BackendOptions(device="cpu"))
    for name in sorted(BACKENDS):
        results = [availability(name, opts) for opts in probes]
        ok, reason = next((r for r in results if r[0]), results[0])
        backends[name] = {"available": ok, "reason": reason}
    return {"versions": versions, "devices": devices, "backends": backends}
