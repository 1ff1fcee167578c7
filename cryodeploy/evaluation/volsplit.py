"""Evaluation of tomograms without clean targets: score denoisers on two independent halves of each.

Halves (:mod:`cryodeploy.imaging.volsplits`): the even/odd tomograms where given (paired by name,
by two folders, or by a RELION 5 tomograms STAR), else binomial thinning of a tomogram of integer
counts (a reconstruction is not counts: thinning refuses it). The whole input x is the mean of the
halves (even/odd) or the tomogram itself (thinned).

Every method f is scored by split gain (dB over identity), signal error per frequency band relative
to identity, the FSC of f(A) and f(B) (resolution at 0.143 and at the half-bit threshold), the
change it makes to x (RMS(f(x) - x) / std(x), power ratio per band) and, where clean volumes are
given (``synth --volume`` writes them), PSNR and MSE of f(x) against the clean volume. Methods:
identity, the best 3-D Gaussian (sigma: the lowest mean split error over all tomograms), the model(s),
and other tools' outputs on the halves written by ``write_halves`` (``NAME_A.mrc``, ``NAME_B.mrc``,
``NAME_full.mrc`` per tomogram): e.g. Topaz-Denoise's ``denoise3d`` run on that folder.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError, OutputError
from cryodeploy.evaluation.data import EvalConfig, Method, VolumeSplitData, check_outputs
from cryodeploy.evaluation.flags import split_red_flags
from cryodeploy.imaging import metrics as M
from cryodeploy.imaging import splits as S
from cryodeploy.imaging import volsplits as V

if TYPE_CHECKING:
    from cryodeploy.evaluation.report import Figures
    from cryodeploy.io.tomopairs import TomoPair
    from cryodeploy.io.volumes import VolumeHeader

__all__ = ["VOLUME_METRICS", "Tomogram", "evaluate_volume_split", "orthogonal_views",
           "tomogram_halves_names"]

#: Scalar metrics reported per tomogram and averaged per method.
VOLUME_METRICS = ("split_gain_db", "split_error", "fsc_0.143", "fsc_half_bit", "change", "corr_input",
                  "mean_shift", "std_ratio", "psnr", "mse")
NOTES = {
    "split_gain": "-10 log10(E), E = (mean(MSE(f(A), B), MSE(f(B), A)) - s2) / s2, s2 = MSE(A, B) / 2 over "
                  "all voxels; identity 0 dB, higher is better; per tomogram, then averaged",
    "band_error": "E per frequency band: the signal error left in the band relative to identity's "
                  "(1 = as noisy as the input, 0 = perfect)",
    "fsc": "Fourier shell correlation of f(A) and f(B) (shells 1/n wide, n the shortest side, 10% cosine "
           "edge taper); resolutions where the mean curve first falls below 0.143 and below the half-bit "
           "threshold of one tomogram's shells",
    "change": "RMS(f(x) - x) / std(x) on the whole input x (the mean of the even/odd halves, or the "
              "thinned tomogram); power ratio = power of f(x) over x's per band",
    "psnr": "PSNR and MSE of f(x) against the clean volume (data range max - min of the clean volume)",
}


@dataclass(frozen=True)
class Tomogram:
    """One tomogram's halves ``a``, ``b``, whole input ``x`` and optional ``clean`` volume."""

    name: str
    a: np.ndarray
    b: np.ndarray
    x: np.ndarray
    clean: np.ndarray | None
    kind: str
    voxel_size: float | None
    header: VolumeHeader
    sources: dict[str, str | None]


def tomogram_halves_names(name: str) -> tuple[str, str, str]:
    """File names of half A, half B and the whole input of tomogram ``name`` in a halves folder."""
    return f"{name}_A.mrc", f"{name}_B.mrc", f"{name}_full.mrc"


def _pairs(data: VolumeSplitData, limit: int | None) -> list[TomoPair]:
    from cryodeploy.io.tomopairs import expand_tomograms, pair_folders

    pairs = list(expand_tomograms(list(data.inputs), data.even_odd)) if data.inputs else []
    if data.half_pairs is not None:
        pairs += pair_folders(*data.half_pairs)
    names = [p.name for p in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"found tomogram {dup[0]!r} twice among the inputs, expected distinct names")
    if data.split == "thin" and any(p.odd is not None for p in pairs):
        odd = next(p for p in pairs if p.odd is not None)
        raise ConfigError(f"{odd.odd}: split thin takes single tomograms, but {odd.name!r} has even/odd "
                          "halves (split auto scores them)")
    return pairs[:limit] if limit else pairs


def _clean_path(folder: Path, pair: TomoPair) -> Path:
    for p in (folder / pair.even.name, folder / f"{pair.name}.mrc", folder / f"{pair.name}.rec"):
        if p.is_file():
            return p
    raise InputError(f"{folder}: found no clean volume for {pair.name!r}, expected {pair.even.name} or "
                     f"{pair.name}.mrc")


def _read(pair: TomoPair, data: VolumeSplitData, seed: int) -> Tomogram:
    from cryodeploy.io.volumes import read_volume

    even = read_volume(pair.even)
    shape = even.data.shape
    vs = even.header.voxel_size[0] or None
    if pair.odd is not None:
        odd = read_volume(pair.odd).data
        if odd.shape != shape:
            raise InputError(f"{pair.odd}: found shape {odd.shape}, expected {shape} as its even half "
                             f"{pair.even}")
        a, b, kind = even.data, odd, "even/odd"
        x = (0.5 * (a.astype(np.float64) + b)).astype(np.float32)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(pair.name.encode())])
        a, b = V.thin_volume(even.data, rng, 1.0, name=str(pair.even))
        x, kind = even.data, "thinned (integer counts)"
    clean = None
    clean_path = None
    if data.clean is not None:
        clean_path = _clean_path(Path(data.clean), pair)
        clean = read_volume(clean_path).data
        if clean.shape != shape:
            raise InputError(f"{clean_path}: found shape {clean.shape}, expected {shape} as {pair.even}")
    sources = {"even": str(pair.even), "odd": str(pair.odd) if pair.odd else None,
               "clean": str(clean_path) if clean_path else None}
    return Tomogram(pair.name, a, b, x, clean, kind, vs, even.header, sources)


def _tomograms(pairs: list[TomoPair], data: VolumeSplitData, seed: int) -> Iterator[Tomogram]:
    for p in pairs:
        yield _read(p, data, seed)


@dataclass(frozen=True)
class _Method:
    name: str
    halves: Callable[[Tomogram], tuple[np.ndarray, np.ndarray]]
    full: Callable[[Tomogram], np.ndarray]


def _runnable(name: str, run: Callable[[np.ndarray], np.ndarray]) -> _Method:
    return _Method(name, lambda t: (run(t.a), run(t.b)), lambda t: run(t.x))


def _folder(method: Method) -> _Method:
    from cryodeploy.io.volumes import read_volume

    folder = Path(str(method.folder))

    def read(t: Tomogram, k: int) -> np.ndarray:
        path = folder / tomogram_halves_names(t.name)[k]
        out = read_volume(path).data
        if out.shape != t.a.shape:
            raise InputError(f"{path}: found shape {out.shape}, expected {t.a.shape} ({method.name} output)")
        return out

    return _Method(method.name, lambda t: (read(t, 0), read(t, 1)), lambda t: read(t, 2))


def _methods(methods: list[Method], sigma: float) -> list[_Method]:
    def const(v: np.ndarray) -> np.ndarray:
        return np.full(v.shape, np.mean(v, dtype=np.float64), np.float32)

    out = [_runnable("identity", lambda v: np.asarray(v, np.float32)), _runnable("constant", const),
           _runnable("gaussian", lambda v: M.gaussian_filter(v, sigma))]
    return out + [_runnable(m.name, m.run) if m.run is not None else _folder(m) for m in methods]


def _write_halves(folder: Path, t: Tomogram) -> None:
    from dataclasses import replace

    from cryodeploy.io.volumes import write_volume

    header = replace(t.header, mode=2, extended_header=b"", exttyp=b"", labels=())
    for name, arr in zip(tomogram_halves_names(t.name), (t.a, t.b, t.x), strict=True):
        write_volume(folder / name, arr, header, label=f"cryodeploy evaluate --volumes: {t.kind}")


def _corr(p: np.ndarray, q: np.ndarray) -> float:
    a = p.astype(np.float64).ravel() - p.mean(dtype=np.float64)
    b = q.astype(np.float64).ravel() - q.mean(dtype=np.float64)
    den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.dot(a, b)) / den if den > 0 else 0.0


def _record(m: _Method, t: Tomogram, edges: list[float]) -> tuple[dict[str, Any], V.Fsc, np.ndarray]:
    fa, fb = m.halves(t)
    fx = np.asarray(m.full(t), np.float32)
    x = t.x.astype(np.float64)
    sd = float(x.std())
    err = V.volume_split_error(fa, fb, t.a, t.b)
    curve = V.fsc(fa, fb, t.voxel_size)
    flat = float(np.ptp(fa)) == 0.0 or float(np.ptp(fb)) == 0.0  # a constant: no FSC to cross
    rec: dict[str, Any] = {
        "name": t.name, "split_error": err, "split_gain_db": float(-10.0 * np.log10(err)) + 0.0 if err > 0
        else None, "split_gain_sd_db": S.split_gain_sd(err, t.a.size),
        "band_error": V.volume_band_errors(fa, fb, t.a, t.b, edges),
        "power_ratio": V.volume_power_ratio(fx, t.x, edges).tolist(),
        "fsc_0.143": None if flat else curve.resolution(0.143),
        "fsc_half_bit": None if flat else _half_bit(curve.freq, curve.curve, curve.voxels),
        "change": float(np.sqrt(np.mean((fx - x) ** 2))) / sd, "corr_input": _corr(fx, t.x),
        "mean_shift": float((fx.mean(dtype=np.float64) - x.mean()) / sd),
        "std_ratio": float(fx.std(dtype=np.float64)) / sd, "psnr": None, "mse": None}
    if t.clean is not None:
        rec["psnr"], rec["mse"] = M.psnr(fx, t.clean), M.mse(fx, t.clean)
    return rec, curve, fx


def _half_bit(freq: np.ndarray, curve: np.ndarray, voxels: np.ndarray) -> float | None:
    return M.frc_crossing(freq, curve - V.half_bit_threshold(voxels), 0.0)


def _mean_lists(records: list[dict[str, Any]], key: str) -> list[float | None]:
    rows = np.array([[np.nan if v is None else v for v in r[key]] for r in records], dtype=np.float64)
    return [float(np.mean(c[np.isfinite(c)])) if np.isfinite(c).any() else None for c in rows.T]


def orthogonal_views(volume: np.ndarray, gap: int = 2) -> np.ndarray:
    """The central XY section with the central YZ section to its right and XZ below (NaN between)."""
    nz, ny, nx = volume.shape
    out = np.full((ny + gap + nz, nx + gap + nz), np.nan, np.float32)
    out[:ny, :nx] = volume[nz // 2]
    out[:ny, nx + gap:] = volume[:, :, nx // 2].T
    out[ny + gap:, :nx] = volume[:, ny // 2, :]
    return out


def _prepare_halves(folder: Path | None) -> None:
    if folder is None:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the halves folder ({err.strerror or err})") from err


def evaluate_volume_split(methods: list[Method], data: VolumeSplitData,
                          config: EvalConfig) -> tuple[dict[str, Any], Figures]:
    """Split evaluation of ``methods`` (volume models, other tools' output folders) beside identity
    and the best 3-D Gaussian on the tomograms of ``data``; returns the metrics dict and the figures."""
    from cryodeploy.evaluation.report import Figures
    from cryodeploy.progress import progress

    pairs = _pairs(data, config.limit)
    _prepare_halves(data.write_halves)
    bands: set[tuple[float, ...]] = set()
    errors: list[list[float]] = []
    for t in _tomograms(pairs, data, config.seed):  # pass 1: read every tomogram, choose the Gaussian
        if data.write_halves is not None:
            _write_halves(Path(data.write_halves), t)
        bands.add(tuple(S.band_edges(t.voxel_size)[0]))
        errors.append([V.volume_split_error(M.gaussian_filter(t.a, g), M.gaussian_filter(t.b, g), t.a, t.b)
                       for g in config.sigmas])
    if len(bands) > 1:
        raise InputError("tomograms differ in voxel size (different frequency bands); evaluate them "
                         "separately")
    check_outputs(methods, [n for p in pairs for n in tomogram_halves_names(p.name)], "halves of tomograms",
                  "the files written by --write-halves")
    mean_errors = np.mean(errors, axis=0)  # E, not the gain: E of a small volume can be <= 0 (inf dB)
    sigma = float(config.sigmas[int(np.argmin(mean_errors))])
    scores = [float(-10.0 * np.log10(e)) if e > 0 else None for e in mean_errors]
    count = len(pairs)
    all_methods = _methods(methods, sigma)
    names = [m.name for m in all_methods]
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    rng = np.random.default_rng(config.seed)
    samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
    views: dict[str, np.ndarray] = {}
    splits: list[dict[str, Any]] = []
    view_text, shells, vs = "", np.zeros(0), None
    have_clean = data.clean is not None
    if have_clean:
        samples["clean"] = []
    with progress(count, "evaluate tomograms", config.quiet) as task:
        for i, t in enumerate(_tomograms(pairs, data, config.seed)):  # pass 2: score every method
            edges, _ = S.band_edges(t.voxel_size)
            vs = t.voxel_size
            idx = rng.choice(t.x.size, min(t.x.size, max(500, 100_000 // count)), replace=False)
            splits.append({"name": t.name, "split": t.kind, "shape": list(t.x.shape),
                           "voxel_size": t.voxel_size, **t.sources})
            if t.clean is not None:
                samples["clean"].append(t.clean.ravel()[idx])
            if i == 0:
                nz, ny, nx = t.x.shape
                view_text = (f"{t.name}: central XY section (z = {nz // 2}), YZ (x = {nx // 2}) to its "
                             f"right, XZ (y = {ny // 2}) below")
                if t.clean is not None:
                    views["clean"] = orthogonal_views(t.clean)
            for m in all_methods:
                rec, curve, fx = _record(m, t, edges)
                records[m.name].append(rec)
                curves[m.name].append((curve.freq, curve.curve))
                samples[m.name].append(fx.ravel()[idx])
                if i == 0:
                    views[m.name] = orthogonal_views(fx)
                    shells = curve.voxels
            task.advance(1)
    freq0 = curves["identity"][0][0]
    mean_curves = {n: np.mean([np.interp(freq0, f, c) for f, c in curves[n]], axis=0) for n in names}
    result_methods = {}
    for n in names:
        res = M.summarize(records[n], VOLUME_METRICS)
        sds = [r["split_gain_sd_db"] for r in records[n] if r["split_gain_sd_db"] is not None]
        res["split_gain_sd_db"] = float(np.sqrt(np.sum(np.square(sds)))) / len(sds) if sds else None
        res["band_error"] = _mean_lists(records[n], "band_error")
        res["power_ratio"] = _mean_lists(records[n], "power_ratio")
        if res["fsc_0.143"] is not None:
            res["fsc_0.143"] = M.frc_crossing(freq0, mean_curves[n], 0.143)
            res["fsc_half_bit"] = _half_bit(freq0, mean_curves[n], shells)
        result_methods[n] = res
    result_methods["gaussian"].update({
        "sigma": sigma,
        "sigma_chosen_on": f"all {count} tomograms, by the gain of the mean split error (sigma in voxels)",
        "sigma_scores": {f"{g:g}": v for g, v in zip(config.sigmas, scores, strict=True)}})
    band_names = S.band_edges(vs)[1]
    result = {
        "mode": "volume-split",
        "data": {"kind": "volume-split", "inputs": list(data.inputs), "even_odd": data.even_odd,
                 "half_pairs": [str(p) for p in data.half_pairs] if data.half_pairs else None,
                 "split": data.split, "clean": str(data.clean) if data.clean else None,
                 "write_halves": str(data.write_halves) if data.write_halves else None},
        "n_items": count, "methods": result_methods, "splits": splits,
        "split_kinds": sorted({str(s["split"]) for s in splits}),
        "bands": {"names": band_names, "power_names": band_names},
        "frc": {"against": "the other denoised half", "unit": "1/A" if vs else "1/px", "freq": freq0.tolist(),
                "curves": {k: v.tolist() for k, v in mean_curves.items()},
                "half_bit": V.half_bit_threshold(shells).tolist(), "ylabel": "Fourier shell correlation",
                "title": "FSC between the denoised halves (identity: the raw halves)"},
        "notes": NOTES, "warnings": [],
    }
    result["red_flags"] = split_red_flags(result_methods, config.mean_shift_tolerance)
    figures = Figures(crops=views, crop_text=view_text,
                      samples={k: np.concatenate(v) for k, v in samples.items()},
                      target="clean" if have_clean else None)
    return result, figures
