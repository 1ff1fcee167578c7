"""Denoising quality without real clean targets: the acceptance benchmark of the default model.

Run (GPU machine; prints a markdown table, writes ``quality.json`` and ``quality.md`` to --out):
    python3 benchmarks/bench_quality.py --model default --model NAME=CKPT ... \
        --real shared_data/empiar_10076_7.mrc --device cuda --out $OUT/quality [--topaz]
CPU smoke test: ``python3 benchmarks/bench_quality.py --model default --size 256 --count 2``.

Methods: identity, the best Gaussian low-pass (an oracle: sigma chosen per data set on the very
items scored), each ``--model`` (through :class:`cryodeploy.Denoiser`, i.e. the runner's image
contract and tiling) and, with ``--topaz``, Topaz-Denoise's pretrained ``unet`` run by
``benchmarks/topaz_denoise.py`` in a subprocess (its own environment: ``PYTHONPATH`` with topaz-em, or
the python named by ``TOPAZ_PYTHON``).

1. Held-out realistic simulation (:mod:`cryodeploy.imaging.simulate`, seed ``--seed``) at doses
   5, 20, 50 e-/px: mean PSNR against the exact clean image, data range = clean max - min.
2. Real images (``--real``, e.g. the EMPIAR-10076 particle images, whose noise is near-white):
   diagonal split (:func:`cryodeploy.imaging.metrics.split_diagonals`): halves A and B share
   the signal with independent noise; split gain = -10 log10(E), E = (mean(MSE(f(A), B),
   MSE(f(B), A)) - s2) / s2, s2 = MSE(A, B) / 2 (pooled over all images; the library's
   :func:`cryodeploy.imaging.splits.split_gain`): identity scores 0 dB.
3. Uniformity ("no patchwork"): on a flat Poisson field (constant rate 20 e-/px) the noise left
   per 64^2 window, r = std(f(x) - rate) / std(x - rate); reported: mean r and the spread
   (coefficient of variation over windows), beside the spread of a Gaussian that leaves the same
   mean noise (a spatially uniform filter: its spread is only the sampling noise of the window
   estimates, which grows with the smoothing). On the dose-20 simulated micrographs the same
   ratio against the clean image, rms(f(x) - clean) / rms(x - clean), and its spread (content-
   dependent: reported, not bounded); and the flat-field measures on simulated empty fields (ice
   texture and gradient, no particles), where a uniform denoiser again shows only sampling spread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

Denoise = Callable[[np.ndarray], np.ndarray]

DOSES = (5.0, 20.0, 50.0)
TEST_SEED = 20261201
FLAT_RATE = 20.0
WINDOW = 64
#: wide enough that the best sigma lies inside (at dose 5 it is 16 on seed 20261201's 128 micrographs,
#: 24 on seed 20270101's)
SIM_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0)
HALF_SIGMAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- data -----------------------------------------------------------------------------------------
def sim_test_set(size: int, count: int, seed: int = TEST_SEED, device: str = "cpu",
                 doses: tuple[float, ...] = DOSES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``count`` held-out simulated micrographs of ``size``^2 per dose: {``dose5``: (noisy, clean)}."""
    from cryodeploy.imaging.simulate import SimConfig, simulate

    out = {}
    for d in doses:
        b = simulate(SimConfig(shape=(size, size), dose_e_per_px=(d, d)), count, seed + int(d), device=device)
        out[f"dose{d:g}"] = (b.noisy.cpu().numpy(), b.clean.cpu().numpy())
    return out


def real_halves(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal halves (A, B) of each frame of an MRC image or stack, as [N, H/2, W/2] stacks;
    refused (:class:`~cryodeploy.errors.InputError`) where a frame's halves are not independent, as
    the split evaluation refuses them (:func:`cryodeploy.evaluation.split.require_independent`).

    Read with mrcfile directly: extracted particle stacks are often marked as volumes (space group 1).
    """
    import mrcfile

    from cryodeploy.evaluation.split import require_independent
    from cryodeploy.imaging.metrics import split_diagonals
    from cryodeploy.imaging.splits import independence

    with mrcfile.open(path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
    frames = data.reshape((-1, *data.shape[-2:]))
    pairs = [split_diagonals(f) for f in frames]
    for i, (a, b) in enumerate(pairs):
        require_independent(independence(a, b), "diagonal", f"{path} (frame {i})")
    return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def empty_field(size: int, count: int, seed: int = TEST_SEED, device: str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Simulated empty fields at dose 20 (ice texture and gradient, carbon, contamination, detector;
    no particles): (noisy, clean) stacks."""
    from cryodeploy.imaging.simulate import SimConfig, simulate

    b = simulate(SimConfig(shape=(size, size), dose_e_per_px=(20.0, 20.0), p_empty=1.0), count, seed + 1,
                 device=device)
    return b.noisy.cpu().numpy(), b.clean.cpu().numpy()


def flat_field(size: int, seed: int = TEST_SEED) -> np.ndarray:
    """A flat Poisson field of rate :data:`FLAT_RATE`, [1, size, size] float32."""
    return np.random.default_rng(seed).poisson(FLAT_RATE, (1, size, size)).astype(np.float32)


# --- metrics --------------------------------------------------------------------------------------
def image_psnrs(out: np.ndarray, clean: np.ndarray) -> list[float]:
    """PSNR of each image of a stack, over its clean image's max - min."""
    from cryodeploy.imaging.metrics import psnr

    return [float(psnr(o, c)) for o, c in zip(out, clean, strict=True)]


def mean_psnr(out: np.ndarray, clean: np.ndarray) -> float:
    """Mean PSNR over the images of a stack."""
    return float(np.mean(image_psnrs(out, clean)))


def paired_gain(method: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean per-image PSNR gain of a method over a baseline on the same images, and its standard error
    (the images differ far more from each other than the methods do, so the gain is judged paired)."""
    d = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


def split_gain(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """:func:`cryodeploy.imaging.splits.split_gain` (dB) of the denoised halves ``fa = f(A)``,
    ``fb = f(B)`` of [N, H, W] stacks, pooled over the stack (its frames stacked into one 2-D image)."""
    from cryodeploy.imaging.splits import split_gain as gain

    return gain(*(np.asarray(x).reshape(-1, x.shape[-1]) for x in (fa, fb, a, b)))


# --- methods --------------------------------------------------------------------------------------
def gaussian(sigma: float) -> Denoise:
    """The Gaussian low-pass of each image of a stack."""
    from cryodeploy.imaging.metrics import gaussian_filter

    def run(x: np.ndarray) -> np.ndarray:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # scipy's filter releases the GIL
            return np.stack(list(pool.map(lambda f: gaussian_filter(f, sigma), x)))

    return run


def model_method(model: str, device: str) -> Denoise:
    """A cryodeploy model through the runner (normalize, tile, run, denormalize)."""
    from cryodeploy import Denoiser

    d = Denoiser.load(model, device=device, backend="torch")
    return lambda x: d(x)


def topaz_timeout(stacks: dict[str, np.ndarray]) -> float:
    """Seconds Topaz is given for ``stacks``: 300 plus 10 per megapixel (on a 2-core CPU its unet takes
    ~6-11 s per 1024^2 micrograph; on an H200 a run of 128 per dose takes under a minute)."""
    return 300.0 + 10.0 * sum(x.size for x in stacks.values()) / 1e6


def run_topaz(stacks: dict[str, np.ndarray], device: str, workdir: Path) -> dict[str, np.ndarray]:
    """Topaz-Denoise's pretrained ``unet`` on each stack (benchmarks/topaz_denoise.py in a subprocess,
    given :func:`topaz_timeout`)."""
    from cryodeploy.io.mrc import read_micrograph, write_micrograph

    src, dst = workdir / "topaz_in", workdir / "topaz_out"
    src.mkdir(parents=True, exist_ok=True)
    for name, x in stacks.items():
        write_micrograph(src / f"{name}.mrc", x)
    script = Path(__file__).with_name("topaz_denoise.py")
    python = os.environ.get("TOPAZ_PYTHON", sys.executable)
    subprocess.run([python, str(script), str(src), "-o", str(dst), "--model", "unet",
                    "--device", "cuda" if device.startswith("cuda") else "cpu", "-q"],
                   check=True, timeout=topaz_timeout(stacks))
    return {name: read_micrograph(dst / f"{name}.mrc").data.reshape(x.shape) for name, x in stacks.items()}


# --- the benchmark --------------------------------------------------------------------------------
def evaluate_outputs(outputs: dict[str, np.ndarray], sim: dict[str, tuple[np.ndarray, np.ndarray]],
                     halves: tuple[np.ndarray, np.ndarray] | None, flat: np.ndarray,
                     empty: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Scores of one method from its outputs on every data set (keys as :func:`input_stacks`)."""
    row: dict[str, Any] = {}
    for key, (_, clean) in sim.items():
        row[f"image_psnrs_{key}"] = image_psnrs(outputs[key], clean)
        row[f"psnr_{key}"] = float(np.mean(row[f"image_psnrs_{key}"]))
    from cryodeploy.imaging.metrics import patchiness, spread, window_noise_left

    if "dose20" in sim:
        r = window_noise_left(outputs["dose20"], *sim["dose20"], WINDOW)
        row["sim_noise_left"], row["sim_spread"] = float(np.mean(r)), spread(r)

    p = patchiness(outputs["flat"], flat, np.full_like(flat, FLAT_RATE), WINDOW)
    row["flat_noise_left"], row["flat_spread"], row["flat_spread_uniform"] = (
        p["noise_left"], p["spread"], p["uniform_spread"])
    p = patchiness(outputs["empty"], *empty, WINDOW)
    row["empty_noise_left"], row["empty_spread"], row["empty_spread_uniform"] = (
        p["noise_left"], p["spread"], p["uniform_spread"])
    if halves is not None:
        row["split_gain"] = split_gain(outputs["real_A"], outputs["real_B"], *halves)
    return row


def input_stacks(sim: dict[str, tuple[np.ndarray, np.ndarray]], halves: tuple[np.ndarray, np.ndarray] | None,
                 flat: np.ndarray, empty: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Every stack a method denoises, by name."""
    stacks = {k: v[0] for k, v in sim.items()} | {"flat": flat, "empty": empty[0]}
    if halves is not None:
        stacks |= {"real_A": halves[0], "real_B": halves[1]}
    return stacks


def best_gaussian(sim: dict[str, tuple[np.ndarray, np.ndarray]], halves: tuple[np.ndarray, np.ndarray] | None,
                  flat: np.ndarray, empty: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """The best Gaussian per data set (oracle sigma): its scores and the sigmas."""
    outputs: dict[str, np.ndarray] = {}
    sigmas: dict[str, float] = {}
    for key, (noisy, clean) in sim.items():
        scores = [mean_psnr(gaussian(s)(noisy), clean) for s in SIM_SIGMAS]
        sigmas[key] = SIM_SIGMAS[int(np.argmax(scores))]
        outputs[key] = gaussian(sigmas[key])(noisy)
    if halves is not None:
        a, b = halves
        gains = [split_gain(gaussian(s)(a), gaussian(s)(b), a, b) for s in HALF_SIGMAS]
        sigmas["real"] = HALF_SIGMAS[int(np.argmax(gains))]
        outputs["real_A"], outputs["real_B"] = gaussian(sigmas["real"])(a), gaussian(sigmas["real"])(b)
    sigmas["flat"] = sigmas.get("dose20", 2.0)
    outputs["flat"] = gaussian(sigmas["flat"])(flat)
    outputs["empty"] = gaussian(sigmas["flat"])(empty[0])
    return evaluate_outputs(outputs, sim, halves, flat, empty), sigmas


def run_benchmark(models: dict[str, str], real: str | None, device: str, size: int, count: int,
                  topaz: bool, workdir: Path, seed: int = TEST_SEED) -> dict[str, Any]:
    """All methods on all data sets; a method that fails is reported with its error, not fatal."""
    sim = sim_test_set(size, count, seed, device)
    halves = real_halves(real) if real else None
    flat = flat_field(size, seed)
    empty = empty_field(size, max(1, count // 4), seed, device)
    stacks = input_stacks(sim, halves, flat, empty)
    rows: dict[str, Any] = {"identity": evaluate_outputs(stacks, sim, halves, flat, empty)}
    means = {k: np.stack([np.full_like(f, np.mean(f, dtype=np.float64)) for f in v])
             for k, v in stacks.items()}
    rows["constant"] = evaluate_outputs(means, sim, halves, flat, empty)  # each image's own mean
    rows["gaussian"], sigmas = best_gaussian(sim, halves, flat, empty)
    rows["gaussian"]["sigmas"] = sigmas
    for name, path in models.items():
        try:
            f = model_method(path, device)
            rows[name] = evaluate_outputs({k: f(v) for k, v in stacks.items()}, sim, halves, flat, empty)
        except Exception as err:  # one model's failure must not lose the others' results
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
    if topaz:
        try:
            outputs = run_topaz(stacks, device, workdir)
            rows["topaz_unet"] = evaluate_outputs(outputs, sim, halves, flat, empty)
        except Exception as err:
            rows["topaz_unet"] = {"error": f"{type(err).__name__}: {err}"}
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": _device_name(device), "host": platform.node(), "size": size, "count": count,
            "seed": seed, "doses": list(DOSES), "real": real, "methods": rows}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


COLUMNS = (("psnr_dose5", "PSNR d5"), ("psnr_dose20", "PSNR d20"), ("psnr_dose50", "PSNR d50"),
           ("split_gain", "split gain real"), ("flat_noise_left", "flat noise left"),
           ("flat_spread", "flat spread"),
           ("flat_spread_uniform", "uniform filter's spread"), ("empty_spread", "empty-field spread"),
           ("empty_spread_uniform", "uniform filter's spread"), ("sim_noise_left", "sim noise left"),
           ("sim_spread", "sim spread"))


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table (dB for PSNR and split gain)."""
    lines = [f"Quality benchmark, {result['date']}, {result['device']}; simulation {result['count']} x "
             f"{result['size']}^2 per dose (seed {result['seed']}); real: {result['real']}", "",
             "| method | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |")
            continue
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else "-" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gauss = result["methods"].get("gaussian", {})
    keys = [k for k in gauss if k.startswith("image_psnrs_")]
    if keys:
        lines += ["", "PSNR gain over the best Gaussian: mean over the same images ± its standard error (dB)",
                  "", "| method | " + " | ".join(k.removeprefix("image_psnrs_") for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for name, row in result["methods"].items():
            if name in ("identity", "constant", "gaussian") or "error" in row:
                continue
            gains = [paired_gain(row[k], gauss[k]) for k in keys]
            cells = [f"{g:+.2f}" if math.isnan(se) else f"{g:+.2f} ± {se:.2f}" for g, se in gains]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: Path) -> None:
    """``quality.json`` and ``quality.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "quality.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT or CHECKPOINT (repeatable)")
    p.add_argument("--real", default=None, help="real MRC image/stack with pixel-independent noise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=1024, help="simulated micrograph size (px)")
    p.add_argument("--count", type=int, default=128, help="simulated micrographs per dose (the acceptance: "
                   "128, standard error of the gain over the best Gaussian ~0.12 dB)")
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--topaz", action="store_true", default=os.environ.get("TOPAZ") == "1",
                   help="also Topaz-Denoise unet (default: on when TOPAZ=1)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT)")
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) if "=" in m else (Path(m).stem, m) for m in args.model)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_benchmark(models, args.real, args.device, args.size, args.count, args.topaz, Path(tmp),
                               args.seed)
    write_results(result, out)
    print(markdown(result))


if __name__ == "__main__":
    main()
