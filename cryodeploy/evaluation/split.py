"""Evaluation without clean targets: score denoisers on two independent halves of each micrograph.

Each micrograph x is split into halves A and B (:mod:`cryodeploy.imaging.splits`): binomial
thinning where x holds counts (integers, gain 1 unless the diagonal variance/mean says they are
scaled counts), the diagonal 2x2 split otherwise (``split = auto``), or as asked (``thin``:
counts of x / gain with the gain estimated from the diagonal split; ``diagonal``). A micrograph
whose raw halves still correlate at high frequency is refused: its pixel noise is not independent.

Every method f is scored by split gain (dB over identity), signal error per frequency band
relative to identity, FRC of f(A) and f(B), the change it makes to x (RMS(f(x) - x) / std(x),
radial power ratio) and the spatial spread of the noise it removes. Methods: identity, the mean
(a constant), the best Gaussian (sigma chosen by mean split gain over all micrographs), the
model(s), and other tools' outputs on halves written by ``write_halves`` (``<base>_A.mrc``,
``<base>_B.mrc`` and ``<base>_full.mrc`` per micrograph frame).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError, OutputError
from cryodeploy.evaluation.data import EvalConfig, Item, Method, SplitData, check_outputs, micrograph_items
from cryodeploy.evaluation.flags import split_red_flags
from cryodeploy.imaging import metrics as M
from cryodeploy.imaging import splits as S

if TYPE_CHECKING:
    from cryodeploy.evaluation.report import Figures

__all__ = ["SPLIT_METRICS", "evaluate_split", "halves_names", "make_split", "require_independent",
           "split_micrograph"]

#: Scalar metrics reported per micrograph and averaged per method.
SPLIT_METRICS = ("split_gain_db", "split_error", "frc_0.5", "frc_0.143", "change", "residual_spread",
                 "corr_input", "mean_shift", "std_ratio")
#: Integer data whose diagonal variance/mean lies in this range are counts with gain 1.
UNIT_GAIN = (0.5, 2.0)
NOTES = {
    "split_gain": "-10 log10(E), E = (mean(MSE(f(A), B), MSE(f(B), A)) - s2) / s2, s2 = MSE(A, B) / 2; "
                  "identity 0 dB, higher is better; per micrograph, then averaged",
    "split_gain_sd": "standard deviation of the split-gain estimate, 10/ln10 (sqrt(2E) + 1 + E) / "
                     "(E sqrt(N)) for N pixels per half (of the mean: combined over micrographs)",
    "band_error": "E per frequency band: the signal error left in the band relative to identity's "
                  "(1 = as noisy as the input, 0 = perfect)",
    "change": "RMS(f(x) - x) / std(x) on the whole input x; power ratio = radial power spectrum of f(x) "
              "over x's",
    "residual_spread": "coefficient of variation, over the flatter half of the 64-px tiles of the halves, "
                       "of sqrt(local MSE(f(A), B) / local MSE(A, B)): how unevenly noise is removed",
}


@dataclass(frozen=True)
class Split:
    """Halves ``a``, ``b`` of one micrograph: how they were made and their pixel size."""

    a: np.ndarray
    b: np.ndarray
    kind: str
    gain: float | None
    scale: int
    check: S.Independence

    def describe(self) -> dict[str, Any]:
        return {"split": self.kind, "gain": self.gain, "frc_mid": self.check.frc_mid,
                "frc_outer": self.check.frc_outer, "independence_threshold": self.check.threshold}


def _rng(seed: int, item: Item) -> np.random.Generator:
    """The thinning generator of one micrograph frame: fixed by seed, file name and frame."""
    frame = 0 if item.frame is None else item.frame + 1
    return np.random.default_rng([seed, zlib.crc32(item.key.encode()), frame])


def make_split(x: np.ndarray, mode: str,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str, float | None, int]:
    """Halves of ``x`` for ``mode`` (auto, thin, diagonal): (a, b, split label, gain, pixel scale)."""
    integer = bool(np.all(x == np.round(x))) and float(x.min()) >= 0
    if mode == "auto":
        mode = "thin" if integer else "diagonal"
    if mode == "diagonal":
        a, b = M.split_diagonals(x)
        return a, b, "diagonal", None, 2
    if mode != "thin":
        raise ConfigError(f"split is {mode!r}, expected auto, thin or diagonal")
    estimate = S.diagonal_gain(x)
    if integer and UNIT_GAIN[0] <= estimate <= UNIT_GAIN[1]:
        a, b = S.binomial_thin(x, rng, 1.0)
        return a, b, "thin (integer counts, gain 1)", 1.0, 1
    a, b = S.binomial_thin(x, rng, estimate)
    return a, b, f"thin (scaled counts, gain {estimate:.4g} from the diagonal variance/mean)", estimate, 1


def split_micrograph(item: Item, mode: str, seed: int, where: str) -> Split:
    """The halves of ``item``; refuses (naming ``where``) halves whose noise is not independent."""
    x = np.asarray(item.noisy, dtype=np.float32)
    try:
        a, b, kind, gain, scale = make_split(x, mode, _rng(seed, item))
    except InputError as err:
        raise InputError(f"{where}: cannot make a {mode} split: {err}") from err
    check = S.independence(a, b)
    if gain is not None and gain != 1.0 and check.independent:
        # thinning x / gain makes independent halves of any image: the gain (a diagonal variance/mean)
        # only means something where the diagonal halves themselves are independent
        check = S.independence(*M.split_diagonals(x))
        kind = f"{kind}; its diagonal halves"
    require_independent(check, kind, where)
    return Split(a, b, kind, gain, scale, check)


def require_independent(check: S.Independence, kind: str, where: str) -> None:
    """:class:`InputError` naming ``where`` unless ``check`` (of the raw halves of a ``kind`` split)
    found their noise independent."""
    if not check.independent:
        raise InputError(
            f"{where}: the raw halves of a {kind.split(' ')[0]} split are not independent (FRC "
            f"{check.frc_mid:+.2f} at 1/4-3/8 and {check.frc_outer:+.2f} at 3/8-1/2 cycles/px, expected "
            f"|FRC| <= {check.threshold:.2f}): neighbouring pixels' noise correlates (interpolated, "
            "dose-weighted or low-passed data), so a split cannot score a denoiser")


def halves_names(item: Item) -> tuple[str, str, str]:
    """File names of half A, half B and the whole input of ``item`` in a halves folder."""
    base = Path(item.key).stem + ("" if item.frame is None else f"_{item.frame:04d}")
    return f"{base}_A.mrc", f"{base}_B.mrc", f"{base}_full.mrc"


@dataclass(frozen=True)
class SplitMethod:
    """A method as the split evaluation runs it: on both halves, and on the whole input."""

    name: str
    halves: Callable[[Item, Split], tuple[np.ndarray, np.ndarray]]
    full: Callable[[Item, Split], np.ndarray]


def _runnable(name: str, run: Callable[[np.ndarray], np.ndarray]) -> SplitMethod:
    return SplitMethod(name, lambda item, s: (run(s.a), run(s.b)), lambda item, s: run(item.noisy))


def _folder(method: Method) -> SplitMethod:
    from cryodeploy.evaluation.data import read_frame

    folder = Path(str(method.folder))

    def read(item: Item, k: int, shape: tuple[int, ...]) -> np.ndarray:
        path = folder / halves_names(item)[k]
        out = read_frame(path, None)
        if out.shape != shape:
            raise InputError(f"{path}: found shape {out.shape}, expected {shape} ({method.name} output)")
        return out.astype(np.float32)

    return SplitMethod(method.name, lambda item, s: (read(item, 0, s.a.shape), read(item, 1, s.b.shape)),
                       lambda item, s: read(item, 2, item.noisy.shape))


def _items(data: SplitData, limit: int | None) -> Iterator[tuple[Item, str]]:
    from cryodeploy.io.inputs import expand_inputs

    return micrograph_items(expand_inputs(list(data.inputs)), limit)


def _write_halves(folder: Path, item: Item, s: Split) -> None:
    from cryodeploy.io.mrc import MicrographHeader, write_micrograph

    vs = item.voxel_size or 0.0
    for name, arr, v in zip(halves_names(item), (s.a, s.b, item.noisy), (vs * s.scale, vs * s.scale, vs),
                            strict=True):
        header = MicrographHeader(arr.shape, 2, (v, v, v), (0.0, 0.0, 0.0))
        write_micrograph(folder / name, arr, header, label=f"cryodeploy evaluate split: {s.kind}")


def _record(m: SplitMethod, item: Item, s: Split, edges: list[float],
            power_edges: list[float]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    fa, fb = m.halves(item, s)
    x = np.asarray(item.noisy, dtype=np.float64)
    fx = m.full(item, s)
    sd = float(x.std())
    vs = item.voxel_size * s.scale if item.voxel_size else None
    freq, curve = M.frc(fa, fb, vs)
    flat = float(np.ptp(fa)) == 0.0 or float(np.ptp(fb)) == 0.0  # a constant: no FRC to cross
    _, power = S.power_ratio(fx, x, power_edges)
    err = S.split_error(fa, fb, s.a, s.b)
    rec = {"name": item.name, "split_error": err, "split_gain_db": S.split_gain(fa, fb, s.a, s.b),
           "split_gain_sd_db": S.split_gain_sd(err, s.a.size),
           "band_error": S.band_errors(fa, fb, s.a, s.b, edges), "power_ratio": power.tolist(),
           "frc_0.5": None if flat else M.frc_crossing(freq, curve, 0.5),
           "frc_0.143": None if flat else M.frc_crossing(freq, curve, 0.143),
           "change": float(np.sqrt(np.mean((fx - x) ** 2))) / sd,
           "residual_spread": S.residual_spread(fa, fb, s.a, s.b),
           "corr_input": M.pearson(fx, x), "mean_shift": float((fx.mean(dtype=np.float64) - x.mean()) / sd),
           "std_ratio": float(fx.std(dtype=np.float64)) / sd}
    return rec, curve, fx



def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    freq = curves[0][0]
    return freq, np.mean([np.interp(freq, f, c) for f, c in curves], axis=0)



def _methods(methods: list[Method], sigma: float) -> list[SplitMethod]:
    def const(x: np.ndarray) -> np.ndarray:
        return np.full(x.shape, np.mean(x, dtype=np.float64), np.float32)

    out = [_runnable("identity", lambda x: np.asarray(x, np.float32)), _runnable("constant", const),
           SplitMethod("gaussian",
                       lambda item, s: (M.gaussian_filter(s.a, sigma), M.gaussian_filter(s.b, sigma)),
                       lambda item, s: M.gaussian_filter(item.noisy, sigma * s.scale))]
    return out + [_runnable(m.name, m.run) if m.run is not None else _folder(m) for m in methods]


def _mean_lists(records: list[dict[str, Any]], key: str) -> list[float | None]:
    rows = np.array([[np.nan if v is None else v for v in r[key]] for r in records], dtype=np.float64)
    means = [float(np.mean(c[np.isfinite(c)])) if np.isfinite(c).any() else None for c in rows.T]
    return means


def evaluate_split(methods: list[Method], data: SplitData,
                   config: EvalConfig) -> tuple[dict[str, Any], Figures]:
    """Split evaluation of ``methods`` (models, other tools' output folders) beside identity, the
    mean and the best Gaussian on ``data``; returns the metrics dict and the report figures."""
    from cryodeploy.evaluation.report import Figures, pick_crop
    from cryodeploy.progress import progress

    if not data.inputs:
        raise InputError("found no micrographs for --split, expected at least one input")
    if data.write_halves is not None:
        try:
            Path(data.write_halves).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{data.write_halves}: cannot create the halves folder ({err.strerror or err})"
                              ) from err
    names: list[tuple[str, str, str]] = []
    kinds: list[dict[str, Any]] = []
    bands: set[tuple[str, ...]] = set()
    gains: list[list[float]] = []
    for it, where in _items(data, config.limit):  # pass 1: check every split, choose the Gaussian
        s = split_micrograph(it, data.split, config.seed, where)
        if data.write_halves is not None:
            _write_halves(Path(data.write_halves), it, s)
        names.append(halves_names(it))
        kinds.append({"name": it.name, **s.describe()})
        bands.add(tuple(S.band_edges(it.voxel_size * s.scale if it.voxel_size else None)[1]))
        gains.append([S.split_gain(M.gaussian_filter(s.a, g), M.gaussian_filter(s.b, g), s.a, s.b)
                      for g in config.sigmas])
    if not names:
        raise InputError(f"{data.inputs[0]}: found no micrographs to evaluate")
    if len(bands) > 1:
        raise InputError("micrographs differ in pixel size or split kind (different frequency bands); "
                         "evaluate them separately")
    check_outputs(methods, [n for trio in names for n in trio], "halves and inputs",
                  "the files written by --write-halves")
    scores = np.mean(gains, axis=0).tolist()
    sigma = float(config.sigmas[int(np.argmax(scores))])
    count = len(names)
    all_methods = _methods(methods, sigma)
    records: dict[str, list[dict[str, Any]]] = {m.name: [] for m in all_methods}
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m.name: [] for m in all_methods}
    powers: dict[str, list[np.ndarray]] = {m.name: [] for m in all_methods}
    rng = np.random.default_rng(config.seed)
    samples: dict[str, list[np.ndarray]] = {m.name: [] for m in all_methods}
    crops: dict[str, np.ndarray] = {}
    crop_text = ""
    with progress(count, "evaluate split", config.quiet) as task:
        for i, (it, where) in enumerate(_items(data, config.limit)):  # pass 2: score every method
            s = split_micrograph(it, data.split, config.seed, where)
            vs = it.voxel_size * s.scale if it.voxel_size else None
            edges, _ = S.band_edges(vs)
            power_edges, power_names = S.band_edges(it.voxel_size)
            idx = rng.choice(it.noisy.size, min(it.noisy.size, max(500, 100_000 // count)), replace=False)
            if i == 0:
                y0, x0, c = pick_crop(M.gaussian_filter(it.noisy, 2.0), config.crop)
                crop_text = f"{it.name}, rows {y0}-{y0 + c - 1}, columns {x0}-{x0 + c - 1}"
            for m in all_methods:
                rec, curve, fx = _record(m, it, s, edges, power_edges)
                freq, ring = S.power_ratio(fx, it.noisy)
                records[m.name].append(rec)
                curves[m.name].append((M.frc(s.a, s.b, vs)[0], curve))
                powers[m.name].append(np.interp(np.linspace(0, 0.5, 128), freq, ring))
                samples[m.name].append(fx.ravel()[idx])
                if i == 0:
                    crops[m.name] = fx[y0:y0 + c, x0:x0 + c]
            task.advance(1)
    result_methods = {}
    for m in all_methods:
        res = M.summarize(records[m.name], SPLIT_METRICS)
        sds = [r["split_gain_sd_db"] for r in records[m.name] if r["split_gain_sd_db"] is not None]
        res["split_gain_sd_db"] = float(np.sqrt(np.sum(np.square(sds)))) / len(sds) if sds else None
        res["band_error"] = _mean_lists(records[m.name], "band_error")
        res["power_ratio"] = _mean_lists(records[m.name], "power_ratio")
        freq, mean = _mean_curve(curves[m.name])
        if res["frc_0.143"] is not None:
            res["frc_0.5"] = M.frc_crossing(freq, mean, 0.5)
            res["frc_0.143"] = M.frc_crossing(freq, mean, 0.143)
        result_methods[m.name] = res
    result_methods["gaussian"].update({
        "sigma": sigma, "sigma_chosen_on": f"all {count} micrographs, by mean split gain (sigma in "
                                           "pixels of the halves)",
        "sigma_scores": {f"{g:g}": v for g, v in zip(config.sigmas, scores, strict=True)}})
    freq0 = _mean_curve(curves["identity"])[0]
    result = {
        "mode": "split",
        "data": {"kind": "split", "inputs": list(data.inputs), "split": data.split,
                 "write_halves": str(data.write_halves) if data.write_halves else None},
        "n_items": count, "methods": result_methods, "splits": kinds,
        "split_kinds": sorted({k["split"] for k in kinds}),
        "bands": {"names": list(bands.pop()), "power_names": power_names},
        "frc": {"against": "the other denoised half", "unit": "1/A" if vs else "1/px", "freq": freq0.tolist(),
                "curves": {k: _mean_curve(v)[1].tolist() for k, v in curves.items()},
                "title": "FRC between the denoised halves (identity: the raw halves)"},
        "power": {"unit": "1/px", "freq": np.linspace(0, 0.5, 128).tolist(),
                  "curves": {k: np.mean(v, axis=0).tolist() for k, v in powers.items()}},
        "notes": NOTES,
        "warnings": [],
    }
    result["red_flags"] = split_red_flags(result_methods, config.mean_shift_tolerance)
    figures = Figures(crops=crops, crop_text=crop_text,
                      samples={k: np.concatenate(v) for k, v in samples.items()}, target=None)
    return result, figures
