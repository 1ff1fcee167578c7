"""Build TensorRT engines from ONNX into the engine cache (fp32 and/or gated fp16).

Written against the TensorRT 10 Python API and type-checked with its stubs; networks are
strongly typed (an fp16 engine is built from an fp16 copy of the ONNX), which TensorRT 10
supports and TensorRT 11 requires.

Import this module only where TensorRT's runtime is present (check with
:func:`~cryodeploy.backends.trt.probe.require_tensorrt`, which :func:`build_engines` calls
too); the configs, cache keys and sidecars live in :mod:`.engine_cache`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import tensorrt as trt

from cryodeploy.backends.gate import denoising_psnr, fp16_gate, synthetic_calibration
from cryodeploy.backends.trt.cache import (
    BuildConfig,
    EngineKey,
    EngineRecord,
    EngineSidecar,
    cache_lookup,
    check_gate,
    timing_cache_path,
    write_sidecar,
)
from cryodeploy.backends.trt.loader import TrtLogger, current_platform
from cryodeploy.backends.trt.probe import require_tensorrt
from cryodeploy.errors import ModelError
from cryodeploy.models import ModelSpec

__all__ = ["build_engines"]

log = logging.getLogger(__name__)


def _parse(onnx_path: Path, builder: trt.Builder, logger: trt.ILogger) -> tuple[trt.INetworkDefinition, str]:
    # strongly typed: the ONNX's own types decide the precision (TensorRT 11 removed BuilderFlag.FP16,
    # and 10.12 deprecated it); on 11 the flag is accepted and ignored, strong typing being the only mode
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse the ONNX model ({errors})")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise ModelError(
            f"{onnx_path}: found {network.num_inputs} inputs and {network.num_outputs} outputs, "
            "expected 1 and 1"
        )
    return network, network.get_input(0).name


def _timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        log.warning("%s: timing cache does not match this GPU or TensorRT; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _build(
    onnx_path: Path, spec: ModelSpec, key: EngineKey, cache_dir: Path, config: BuildConfig
) -> EngineRecord:
    from cryodeploy.export.onnx import convert_fp16
    from cryodeploy.files import atomic_write, file_sha256

    logger = TrtLogger()
    builder = trt.Builder(logger)
    graph = onnx_path
    if key.precision == "fp16":  # an fp16 graph (float32 input/output kept), built strongly typed
        graph = convert_fp16(onnx_path, cache_dir / f"{key.onnx_sha256[:24]}-fp16.onnx")
    network, input_name = _parse(graph, builder, logger)
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if key.precision == "fp32":
        cfg.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine computes in fp32, for parity with torch/ORT
    profile = builder.create_optimization_profile()
    lo, opt, hi = (trt.Dims(list(s)) for s in key.profile.input_shapes())
    profile.set_shape(input_name, lo, opt, hi)
    cfg.add_optimization_profile(profile)
    timing = config.timing_cache or timing_cache_path(cache_dir, key.platform)
    _timing_cache(cfg, timing)
    log.info("building %s engine for %s on %s", key.precision, onnx_path, key.platform.describe())
    start = time.perf_counter()
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, cfg)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT failed to build the {key.precision} engine (see its log)")
    path = cache_dir / key.engine_name()
    with atomic_write(path) as tmp:
        tmp.write_bytes(serialized)
    with atomic_write(timing) as tmp:
        tmp.write_bytes(cfg.get_timing_cache().serialize())
    sidecar = EngineSidecar(
        key=key, model=spec.to_dict(), engine_sha256=file_sha256(path), build_seconds=round(seconds, 3),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        workspace_bytes=config.workspace_bytes, onnx_path=os.fspath(onnx_path.resolve()),
    )
    write_sidecar(path, sidecar)
    return EngineRecord(path, sidecar, reused=False)


def _gate(fp32: EngineRecord, fp16: EngineRecord, spec: ModelSpec, config: BuildConfig) -> EngineRecord:
    """Measure the fp16 engine against the fp32 engine and record the result in its sidecar."""
    from cryodeploy.backends.base import BackendOptions
    from cryodeploy.backends.trt.runner import TrtBackend

    tile = fp16.key.profile.opt[1:]
    pairs = list(config.calibration) or synthetic_calibration(
        spec, tile, config.calibration_count, config.calibration_seed
    )
    opts = BackendOptions(device=f"cuda:{config.device}", extra=(("allow_accuracy_loss", True),))
    with TrtBackend(fp32.path, opts) as ref:
        psnr32 = denoising_psnr(ref, spec, pairs)
    with TrtBackend(fp16.path, opts) as half:
        psnr16 = denoising_psnr(half, spec, pairs)
    sidecar = replace(fp16.sidecar, gate=fp16_gate(psnr32, psnr16, config.max_drop_db, len(pairs)))
    write_sidecar(fp16.path, sidecar)
    return replace(fp16, sidecar=sidecar)


def build_engines(
    onnx_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str], config: BuildConfig | None = None
) -> list[EngineRecord]:
    """Engines for ``onnx_path`` in ``config.precisions`` from the cache in ``cache_dir``, built if
    missing or if the cached one's key differs; one record per requested precision, in order.

    An fp16 engine is always gated against the fp32 engine (built too, as the reference);
    :class:`ModelError` with the numbers if it loses more than ``max_drop_db`` of PSNR, unless
    ``allow_accuracy_loss``.
    """
    from cryodeploy.export.onnx import read_onnx_spec
    from cryodeploy.files import file_sha256

    cfg = config or BuildConfig()
    require_tensorrt(cfg.device)
    onnx_file, cache = Path(onnx_path), Path(cache_dir)
    spec = read_onnx_spec(onnx_file)
    cfg.shapes.check_stride(spec.stride)
    cfg.shapes.check_ndim(spec.ndim)
    cache.mkdir(parents=True, exist_ok=True)
    platform = current_platform(cfg.device)
    onnx_sha = file_sha256(onnx_file)
    wanted = ("fp32", "fp16") if "fp16" in cfg.precisions else ("fp32",)
    records: dict[str, EngineRecord] = {}
    for precision in wanted:
        key = EngineKey(onnx_sha, platform, precision, cfg.shapes)
        decision = cache_lookup(cache, key)
        log.info("%s engine %s: %s (%s)", precision, decision.path.name, decision.action, decision.reason)
        if decision.sidecar is not None:
            records[precision] = EngineRecord(decision.path, decision.sidecar, reused=True)
        else:
            records[precision] = _build(onnx_file, spec, key, cache, cfg)
    if "fp16" in records:
        half = records["fp16"]
        if half.sidecar.gate is None:
            half = _gate(records["fp32"], half, spec, cfg)
        else:  # a cached engine's numbers, judged by this call's threshold and flag alone
            g = half.sidecar.gate
            rejudged = fp16_gate(g.psnr_fp32, g.psnr_fp16, cfg.max_drop_db, g.samples)
            half = replace(half, sidecar=replace(half.sidecar, gate=rejudged, loss_accepted=False))
        gate = half.sidecar.gate
        assert gate is not None
        log.info("%s: %s", half.path.name, gate.message())
        check_gate(half.path, half.sidecar, cfg.allow_accuracy_loss)
        if not gate.passed:
            log.warning("%s: keeping it because accuracy loss is allowed", gate.message())
            half = replace(half, sidecar=replace(half.sidecar, loss_accepted=True))
            write_sidecar(half.path, half.sidecar)
        records["fp16"] = half
    return [records[p] for p in cfg.precisions]
