"""Evaluate a denoiser against baselines and write ``metrics.json`` plus an HTML report.

Kinds of data:

* :class:`PairsData` - noisy and clean micrographs in two folders, matched by file name;
* :class:`StoreData` - a patch store split with targets (patches already normalized, so the
  network runs on them directly);
* :class:`HalvesData` - real micrographs without a clean target: Fourier ring correlation of
  independent halves (see :mod:`cryodeploy.evaluation.halves`);
* :class:`SplitData` - real micrographs without a clean target, scored by split gain on two
  independent halves (see :mod:`cryodeploy.evaluation.split`);
* :class:`VolumeSplitData` - tomograms, scored on even/odd or thinned halves, with clean volumes
  where given (see :mod:`cryodeploy.evaluation.volsplit`).

Every evaluation with a target scores the model against the noisy input ("identity") and the
best Gaussian low-pass ("gaussian", sigma chosen on the first ``val_fraction`` of the items),
plus an optional second model and folders of other tools' outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError, OutputError
from cryodeploy.evaluation.data import (
    EvalConfig,
    EvalData,
    HalvesData,
    Method,
    PairedSource,
    PairsData,
    SplitData,
    StoreData,
    VolumeSplitData,
    build_methods,
    check_outputs,
    model_info,
)
from cryodeploy.evaluation.flags import red_flags
from cryodeploy.evaluation.report import Figures, pick_crop, write_report
from cryodeploy.files import new_folders_removed_if_empty
from cryodeploy.imaging import metrics as M

__all__ = ["EvalConfig", "HalvesData", "Method", "PairsData", "SplitData", "StoreData", "VolumeSplitData",
           "evaluate"]

log = logging.getLogger(__name__)

#: Metrics reported per item and averaged at the top of each method.
METRICS = ("psnr", "ssim", "mse", "rmse", "corr", "mean_shift", "std_ratio", "flat_noise")
DATA_RANGE_NOTE = "PSNR and SSIM use each item's clean image range, max(clean) - min(clean)"


def item_metrics(pred: np.ndarray, clean: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """All per-item metrics of one prediction against its clean target."""
    sd = float(np.std(clean))
    err = M.mse(pred, clean)
    return {
        "psnr": M.psnr(pred, clean), "ssim": M.ssim(pred, clean), "mse": err,
        "rmse": float(np.sqrt(err)), "corr": M.pearson(pred, clean),
        "mean_shift": float((np.mean(pred, dtype=np.float64) - np.mean(clean, dtype=np.float64)) / sd),
        "std_ratio": float(np.std(pred, dtype=np.float64)) / sd,
        "flat_noise": M.flat_noise(pred, mask) if mask is not None else None,
    }


def _evaluate_paired(source: PairedSource, methods: list[Method],
                     config: EvalConfig) -> tuple[dict[str, Any], Figures]:
    from cryodeploy.progress import progress

    n_val = max(1, math.ceil(config.val_fraction * source.count))
    scores = np.zeros(len(config.sigmas))
    for i, item in enumerate(source.items()):
        if i == n_val:
            break
        assert item.clean is not None
        scores += M.best_gaussian_sigma([item.noisy], [item.clean], config.sigmas)[1]
    scores /= n_val
    sigma = float(config.sigmas[int(np.argmax(scores))])
    all_methods = [Method("identity", lambda x: x),
                   Method("gaussian", lambda x: M.gaussian_filter(x, sigma)), *methods]
    records: dict[str, list[dict[str, Any]]] = {m.name: [] for m in all_methods}
    seconds = dict.fromkeys(records, 0.0)
    frc_sum: dict[str, np.ndarray] = {}
    freq: np.ndarray | None = None
    flat_clean: list[float] = []
    rng = np.random.default_rng(config.seed)
    per_item_samples = max(500, 100_000 // source.count)
    samples: dict[str, list[np.ndarray]] = {"clean": [], **{m.name: [] for m in all_methods}}
    crops: dict[str, np.ndarray] = {}
    crop_text = ""
    with progress(source.count, "evaluate", config.quiet) as task:
        for i, item in enumerate(source.items()):
            clean = item.clean
            assert clean is not None
            idx = rng.choice(clean.size, min(clean.size, per_item_samples), replace=False)
            samples["clean"].append(clean.ravel()[idx])
            mask = M.flat_mask(clean) if min(clean.shape) > 64 else None
            if mask is not None:
                flat_clean.append(M.flat_noise(clean, mask))
            if i == 0:
                y, x, c = pick_crop(clean, config.crop)
                crop_text = f"{item.name}, rows {y}-{y + c - 1}, columns {x}-{x + c - 1}"
            for m in all_methods:
                t0 = time.perf_counter()
                pred = m.apply(item)
                seconds[m.name] += time.perf_counter() - t0
                records[m.name].append({"name": item.name, **item_metrics(pred, clean, mask)})
                samples[m.name].append(pred.ravel()[idx])
                f, curve = M.frc(pred, clean, item.voxel_size)
                if freq is None:
                    freq = f
                curve = np.interp(freq, f, curve) if f.shape != freq.shape else curve
                frc_sum[m.name] = frc_sum.get(m.name, 0.0) + curve
                if i == 0:
                    crops[m.name] = pred[y:y + c, x:x + c]
            if i == 0:
                crops["clean"] = clean[y:y + c, x:x + c]
            task.advance(1)
    assert freq is not None
    result_methods: dict[str, dict[str, Any]] = {}
    curves = {}
    for m in all_methods:
        curves[m.name] = frc_sum[m.name] / source.count
        res = M.summarize(records[m.name], METRICS)
        res["frc_0.5"] = M.frc_crossing(freq, curves[m.name], 0.5)
        res["frc_0.143"] = M.frc_crossing(freq, curves[m.name], 0.143)
        res["seconds"] = seconds[m.name]
        if m.folder is not None:
            res["folder"] = str(m.folder)
        result_methods[m.name] = res
    result_methods["gaussian"].update({
        "sigma": sigma,
        "sigma_chosen_on": f"first {n_val} of {source.count} items ({config.val_fraction:.0%}), by mean PSNR",
        "sigma_scores": {f"{s:g}": float(v) for s, v in zip(config.sigmas, scores, strict=True)},
    })
    unit = "1/A" if source.voxel_size else "1/px"
    result = {
        "mode": source.describe()["kind"], "data": source.describe(), "n_items": source.count,
        "data_range": DATA_RANGE_NOTE, "means": "top-level values of each method are means over items",
        "mean_shift": "(mean(pred) - mean(clean)) / std(clean), per item; std ratio = std(pred) / std(clean)",
        "flat_noise": "std of (image - Gaussian low-pass, sigma 8 px) in the flattest 10% of the clean image "
                      "(local variance of its low-pass over 32 px)",
        "flat_noise_clean": float(np.mean(flat_clean)) if flat_clean else None,
        "methods": result_methods, "warnings": [],
        "frc": {"against": "clean", "unit": unit, "freq": freq.tolist(),
                "curves": {k: v.tolist() for k, v in curves.items()}},
    }
    figures = Figures(crops=crops, crop_text=crop_text,
                      samples={k: np.concatenate(v) for k, v in samples.items()}, target="clean")
    return result, figures


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate(model: str | os.PathLike[str], data: EvalData, outdir: str | os.PathLike[str],
             config: EvalConfig | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (and baselines) on ``data``; write ``metrics.json``, ``index.html`` and
    the plots to ``outdir``; return the metrics dict (see ``metrics.json``). On an error, an
    output folder created here is removed again if empty."""
    with new_folders_removed_if_empty(outdir):
        return _evaluate(model, data, outdir, config or EvalConfig())


def _evaluate(model: str | os.PathLike[str], data: EvalData, outdir: str | os.PathLike[str],
              config: EvalConfig) -> dict[str, Any]:
    from cryodeploy._version import __version__

    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create the report folder ({err.strerror or err})") from err
    if config.train_log is not None and not Path(config.train_log).is_file():
        raise InputError(f"{config.train_log}: no such training log (expected RUNDIR/metrics.jsonl)")
    models = {"model": model_info(str(model))}
    if config.model_b:
        models["model-b"] = model_info(config.model_b)
    volumes = isinstance(data, VolumeSplitData)
    for info in models.values():
        if volumes and info["ndim"] != 3:
            raise ConfigError(f"{info['path']}: a 2-D image model ({info['architecture']}) cannot denoise "
                              "tomograms, expected a volume model (e.g. unet3d)")
        if not volumes and info["ndim"] == 3:
            raise ConfigError(f"{info['path']}: a volume model ({info['architecture']}) denoises tomograms, "
                              "expected volume data (--volumes)")
    with ExitStack() as stack:
        if isinstance(data, VolumeSplitData):
            from cryodeploy.evaluation.volsplit import evaluate_volume_split

            methods = build_methods(str(model), config, False, stack)
            result, figures = evaluate_volume_split(methods, data, config)
        elif isinstance(data, HalvesData):
            from cryodeploy.evaluation.halves import evaluate_halves

            methods = build_methods(str(model), config, False, stack)
            result, figures = evaluate_halves(methods, data, config)
        elif isinstance(data, SplitData):
            from cryodeploy.evaluation.split import evaluate_split

            methods = build_methods(str(model), config, False, stack)
            result, figures = evaluate_split(methods, data, config)
        else:
            source = PairedSource(data, config.limit)
            methods = build_methods(str(model), config, isinstance(data, StoreData), stack)
            if isinstance(data, PairsData):
                check_outputs(methods, [p.name for p, _ in source.pairs])
            result, figures = _evaluate_paired(source, methods, config)
            result["red_flags"] = red_flags(result["methods"], config.mean_shift_tolerance)
        for m in methods:
            if m.name in models:
                models[m.name]["runner"] = m.label
    result = {"format": "cryodeploy-evaluation/1", "created_by": f"cryodeploy {__version__}",
              "models": models, "tolerances": {"mean_shift": config.mean_shift_tolerance}, **result}
    for f in result["red_flags"]:
        log.info("red flag: %s", f["message"])
    result = _jsonable(result)
    try:
        (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    except OSError as err:
        raise OutputError(f"{out / 'metrics.json'}: cannot write ({err.strerror or err})") from err
    write_report(out, result, figures, config.train_log)
    return result  # type: ignore[no-any-return]
