#!/usr/bin/env python3
"""Make the default model on one GPU in one call: train candidates on simulation, evaluate, choose.

    python3 models/train_default.py --out $OUT --minutes 5 --real shared_data/empiar_10076_7.mrc --device cuda
CPU smoke run: ``python3 models/train_default.py --out /tmp/td --quick`` (tiny sizes, seconds).

Recipe (each candidate in its own process, all at once on the one GPU, for ``--minutes`` of wall
clock from the start): supervised training on micrographs simulated on the fly on the device
(:mod:`cryodeploy.training.simsource`: fresh micrographs every step, each normalized by its noisy
image's robust statistics exactly as the runner does, applied to noisy and clean alike, then
random crops), MSE (or, for a candidate whose loss is "psnr", MSE weighted per crop
like per-image PSNR), AdamW with a linear warm-up and a cosine decay over the time budget, bf16
autocast on CUDA, gradient clipping. A fixed held-out simulated validation set (its own seed)
is scored by PSNR against the exact clean images every ``--val-every`` seconds and at the end
(with ``--ema``, a moving average of the weights is what is scored and kept); the best is kept as
``candidates/NAME/best.safetensors`` + ``.json`` (a normal checkpoint, the recipe in its ``training``
field). Then all candidates, identity, the best Gaussian and (with
``TOPAZ=1``) Topaz-Denoise's unet go through ``benchmarks/bench_quality.py``; the choice is made
by split gain on the real images plus mean PSNR on held-out simulation (never against real sums)
among the candidates that are never below identity, and copied to ``OUT/default/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: name -> (U-Net base_channels, depth, peak lr[, loss]). Depth 3: receptive radius 52 px, depth 4: 108 px
#: (any image of >= 2 strides runs; the 160^2 split halves of 320^2 particle images too). As float32
#: safetensors base 16 d4 and base 32 d3 take 7.8 MB, base 18 d4 9.9 MB, base 20 d4 12 MB, base 24 d4 18 MB.
#: Loss: "mse" (the default) or "psnr" (:func:`~cryodeploy.training.objectives.psnr_weighted_mse`:
#: each crop counts as the per-image PSNR of the acceptance counts it, instead of by its normalized
#: error). A fifth entry caps the channels (``max_channels``; depth 5: receptive radius 220 px).
#: ``--init`` from a narrower U-Net of the same depth grows it
#: (:func:`~cryodeploy.models.unet.widen_unet`: the same function, new channels to train), from one
#: of the same width one level shallower deepens it (:func:`~cryodeploy.models.unet.deepen_unet`).
CANDIDATES: dict[str, tuple[Any, ...]] = {
    "unet_b24d3": (24, 3, 5e-4), "unet_b32d3": (32, 3, 5e-4), "unet_b32d3_lr1e3": (32, 3, 1e-3),
    "unet_b16d4": (16, 4, 5e-4), "unet_b20d4": (20, 4, 5e-4), "unet_b24d4": (24, 4, 5e-4),
    "unet_b16d4_psnr": (16, 4, 5e-4, "psnr"), "unet_b18d4_psnr": (18, 4, 5e-4, "psnr"),
    "unet_b20d4_psnr": (20, 4, 5e-4, "psnr"), "unet_b24d4_psnr": (24, 4, 5e-4, "psnr"),
    "unet_b16d5c256_psnr": (16, 5, 5e-4, "psnr", 256)}
VAL_SEED = 7001
TRAIN_SEED = 1


#: The simulator's defaults, widened to the pixel sizes and doses of split halves (twice the pixel
#: size of the micrograph, so up to ~3.5 A, with twice the dose per pixel).
TRAIN_SIM = {"pixel_size_a": (0.5, 3.5), "dose_e_per_px": (3.0, 150.0)}


def _sim_config(size: int, pixel_size: str | None = None, dose: str | None = None) -> Any:
    """The training simulation; ``pixel_size`` / ``dose`` (``"LO,HI"``) replace :data:`TRAIN_SIM`'s
    ranges (the validation set always uses :data:`TRAIN_SIM`, so runs stay comparable)."""
    from cryodeploy.errors import ConfigError
    from cryodeploy.imaging.simulate import SimConfig

    ranges: dict[str, Any] = dict(TRAIN_SIM)
    options = (("--pixel-size", "pixel_size_a", pixel_size), ("--dose", "dose_e_per_px", dose))
    for option, field, text in options:
        if text is not None:
            try:
                lo, hi = (float(v) for v in text.split(","))
            except ValueError:
                raise SystemExit(f"{option} {text!r}: expected LO,HI (two numbers)") from None
            ranges[field] = (lo, hi)
    try:
        return SimConfig(shape=(size, size), **ranges)
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def candidate_init(spec: str | None, name: str) -> str | None:
    """The checkpoint candidate ``name`` starts from: ``spec`` is one checkpoint (or ``default``) for
    every candidate, or ``NAME=CKPT,...`` for some of them (the others start from scratch)."""
    if not spec:
        return None
    if "=" not in spec:
        return spec
    pairs = dict(item.split("=", 1) for item in spec.split(",") if item)
    unknown = sorted(set(pairs) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"--init: unknown candidate {', '.join(unknown)}")
    return pairs.get(name)


def start_from(init: str, net: Any, spec: Any) -> tuple[Any, Any, bool]:
    """``net`` (built from ``spec``) with checkpoint ``init``'s weights, or ``init``'s U-Net grown to
    ``spec``: widened when it is a narrower one of the same depth, deepened when it is one of the same
    width one level shallower; returns (net, init's spec, grown)."""
    from cryodeploy.models.checkpoint import load_checkpoint
    from cryodeploy.models.unet import deepen_unet, widen_unet
    from cryodeploy.training.finetune import init_path

    start, start_spec = load_checkpoint(init_path(init))
    base, depth, cap = (spec.params[k] for k in ("base_channels", "depth", "max_channels"))
    old = start_spec.params
    unets = start_spec.architecture == spec.architecture == "unet" and not old["max_channels"]
    if unets and old["depth"] == depth and old["base_channels"] < base:  # new channels to train
        return widen_unet(start, base), start_spec, True
    if unets and old["depth"] == depth - 1 and old["base_channels"] == base:  # a new level to train
        try:
            return deepen_unet(start, cap), start_spec, True
        except ValueError as err:
            raise SystemExit(f"--init {init}: {err}") from None
    if (start_spec.architecture, start_spec.params) != (spec.architecture, spec.params):
        raise SystemExit(f"--init {init}: {start_spec.architecture} {start_spec.params} is neither "
                         f"{spec.params}, a narrower U-Net of depth {depth} nor one of depth {depth - 1}")
    net.load_state_dict(start.state_dict())
    return net, start_spec, False


def train_worker(a: argparse.Namespace) -> None:
    """Train one candidate until the deadline; keep the best by validation PSNR."""
    import numpy as np
    import torch

    from cryodeploy._version import __version__
    from cryodeploy.imaging.normalize import NormSpec
    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint
    from cryodeploy.training.objectives import psnr_weighted_mse
    from cryodeploy.training.simsource import SimSource, batch_psnr, sim_batches, sim_images

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    out = Path(a.out) / "candidates" / a.worker
    out.mkdir(parents=True, exist_ok=True)
    base, depth, peak, *rest = CANDIDATES[a.worker]
    loss_name = rest[0] if rest else "mse"
    cap = rest[1] if len(rest) > 1 else 0
    a.lr = a.lr or peak
    source = SimSource(_sim_config(a.sim_size, a.pixel_size, a.dose), crop=a.crop,
                       crops_per_image=a.crops_per_image, batch=a.batch, seed=TRAIN_SEED, redraws=a.redraws)
    recipe = {"recipe": "supervised on on-the-fly simulation (models/train_default.py)",
              "source": source.to_dict(),
              "loss": loss_name, "optimizer": "adamw", "lr": a.lr, "weight_decay": a.weight_decay,
              "schedule": "linear warm-up 3% then cosine to 2% of lr, over the wall-clock budget",
              "precision": "bf16" if cuda else "fp32", "grad_clip": 1.0, "seconds": a.seconds,
              **({"ema_decay": a.ema} if a.ema > 0 else {}),
              "validation": {"seed": VAL_SEED, "count": a.val_count, "size": a.val_size,
                             "metric": "mean psnr"}}
    versions = {"cryodeploy": __version__, "torch": torch.__version__, "numpy": np.__version__}
    spec = ModelSpec("unet", {"base_channels": base, "depth": depth, "max_channels": cap},
                     normalization=NormSpec(),
                     training=recipe, versions=versions)
    torch.manual_seed(TRAIN_SEED)
    net = build_model(spec)
    init = candidate_init(a.init, a.worker)
    if init:
        from cryodeploy.files import file_sha256
        from cryodeploy.training.finetune import init_path

        net, start_spec, grown = start_from(init, net, spec)
        recipe["init"] = {"from": str(init), "sha256": file_sha256(init_path(init)),
                          "params": start_spec.params, "grown": grown, "training": start_spec.training}
    net = net.to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                            **({"fused": True} if cuda else {}))
    amp = torch.bfloat16 if cuda else None
    vx, vy = sim_images(_sim_config(a.val_size), a.val_count, VAL_SEED, dev)

    # with --ema the weights validated and kept are an exponential moving average of the trained ones
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(a.ema)) if a.ema > 0 else None
    kept = ema.module if ema is not None else net

    def validate() -> float:
        kept.eval()
        scores = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            for i in range(0, vx.shape[0], 4):
                scores.append(batch_psnr(kept(vx[i:i + 4]).float(), vy[i:i + 4]))
        kept.train()
        return float(torch.cat(scores).mean())

    deadline = a.deadline
    t_start = time.time()
    budget = max(deadline - t_start, 1e-3)
    log = (out / "metrics.jsonl").open("w")
    best, best_step, step, last_val, loss_acc, n_acc = -math.inf, 0, 0, t_start, 0.0, 0
    batches = sim_batches(source, dev)
    try:
        start = {"step": 0, "seconds": 0.0, "val_psnr": validate()}  # where training starts (--init)
        log.write(json.dumps(start) + "\n")
        print(f"[{a.worker}] {json.dumps(start)}", flush=True)
        while time.time() < deadline and (a.max_steps <= 0 or step < a.max_steps):
            frac = max((time.time() - t_start) / budget, step / a.max_steps if a.max_steps > 0 else 0.0)
            lr = a.lr * (frac / 0.03 if frac < 0.03 else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = next(batches)
            if cuda:
                x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                pred = net(x).float()
                loss = psnr_weighted_mse(pred, y) if loss_name == "psnr" else torch.nn.functional.mse_loss(
                    pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(net)
            step += 1
            loss_acc += float(loss.detach()) if step % 25 == 0 else 0.0
            n_acc += step % 25 == 0
            final = time.time() >= deadline - a.val_reserve or (a.max_steps > 0 and step >= a.max_steps)
            if time.time() - last_val >= a.val_every or final:
                val = validate()
                last_val = time.time()
                row = {"step": step, "seconds": round(last_val - t_start, 1), "lr": lr, "val_psnr": val,
                       "loss": loss_acc / max(n_acc, 1)}
                loss_acc, n_acc = 0.0, 0
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"[{a.worker}] {json.dumps(row)}", flush=True)
                if val > best:
                    best, best_step = val, step
                    training = {**recipe, "step": step, "val_psnr": val, "samples": step * a.batch}
                    best_spec = ModelSpec("unet", spec.params, normalization=NormSpec(), training=training,
                                          versions=versions)
                    save_checkpoint(out / "best.safetensors", kept, best_spec)
                if final:
                    break
    finally:
        batches.close()  # type: ignore[attr-defined]
        log.close()
    (out / "summary.json").write_text(json.dumps({"name": a.worker, "steps": step, "best_step": best_step,
                                                  "best_val_psnr": best, "samples": step * a.batch,
                                                  "seconds": time.time() - t_start}, indent=2) + "\n")


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def choose(methods: dict[str, dict[str, Any]], names: list[str]) -> tuple[str | None, dict[str, float]]:
    """The candidate with the highest split gain (real) + mean simulated PSNR, among those never below
    identity on any item; returns it (None when none qualifies) and every candidate's score."""
    ident = methods["identity"]
    keys = [k for k in ident if k.startswith("psnr_") or k == "split_gain"]
    scores: dict[str, float] = {}
    for n in names:
        row = methods.get(n, {})
        if "error" in row or not row or any(row[k] < ident[k] for k in keys):
            continue
        psnrs = [row[k] for k in keys if k.startswith("psnr_")]
        scores[n] = float(row.get("split_gain", 0.0)) + sum(psnrs) / len(psnrs)
    return (max(scores, key=scores.__getitem__) if scores else None), scores


def orchestrate(a: argparse.Namespace) -> None:
    """Start every candidate's worker, wait until the budget, evaluate, choose, report."""
    from cryodeploy.training.finetune import init_path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = a.t0 + 60.0 * a.minutes
    procs: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}
    names = [n for n in a.candidates.split(",") if n]
    for name in names:
        (out / "candidates" / name).mkdir(parents=True, exist_ok=True)
        for stale in ("best.safetensors", "best.json", "summary.json"):
            (out / "candidates" / name / stale).unlink(missing_ok=True)
        logf = (out / "candidates" / name / "train.log").open("wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--deadline", str(deadline),
               *sys.argv[1:]]
        procs[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf)
    status = {}
    for name, (proc, logf) in procs.items():
        try:
            rc = proc.wait(timeout=max(deadline - time.time(), 0) + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        logf.close()
        status[name] = rc
        tail = (out / "candidates" / name / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        print(f"candidate {name}: exit {rc}; {tail}")
    bench = _bench_module()
    models = {n: str(out / "candidates" / n / "best.safetensors") for n in names
              if (out / "candidates" / n / "best.safetensors").is_file()}
    for item in filter(None, (a.compare or "").split(",")):  # ranked beside, never chosen
        label, _, ckpt = item.partition("=")
        models[label] = str(init_path(ckpt or label))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench.run_benchmark(models, a.real, a.device, a.eval_size, a.eval_count,
                                         os.environ.get("TOPAZ") == "1", Path(tmp))
    except Exception as err:  # keep the trained candidates and say why there is no table
        (out / "quality_error.txt").write_text(f"{type(err).__name__}: {err}\n")
        raise
    for n in names:
        summary = out / "candidates" / n / "summary.json"
        result["methods"].setdefault(n, {"error": f"training failed (exit {status[n]})"})
        if summary.is_file():
            result["methods"][n]["training"] = json.loads(summary.read_text())
    chosen, scores = choose(result["methods"], names)
    result["choice"] = {"chosen": chosen, "scores": scores, "rule": "max split_gain(real) + mean sim PSNR, "
                        "among candidates never below identity"}
    result["wall_seconds"] = time.time() - a.t0
    bench.write_results(result, out)
    if chosen is not None:
        (out / "default").mkdir(exist_ok=True)
        for ext in (".safetensors", ".json"):
            shutil.copyfile(out / "candidates" / chosen / f"best{ext}", out / "default" / f"best{ext}")
    print(bench.markdown(result))
    print(f"chosen: {chosen}  scores: {json.dumps(scores)}  wall {result['wall_seconds']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's options from ``argv`` (default: the command line), ``--quick`` applied."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "train_default_out"))
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget from the start")
    p.add_argument("--real", default=None, help="real MRC stack with pixel-independent noise (split gain)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--crops-per-image", type=int, default=4)
    p.add_argument("--sim-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.0, help="peak lr (default: the candidate's)")
    p.add_argument("--init", default=None, help="start every candidate from this checkpoint (or 'default'), "
                   "or NAME=CKPT,... for some")
    p.add_argument("--compare", default=None, help="NAME=CKPT,... (or 'default') evaluated beside the "
                   "candidates, never chosen")
    p.add_argument("--redraws", type=int, default=0, help="steps each simulation serves again at fresh doses")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--pixel-size", default=None, help=f"LO,HI A/px of the training simulation (default "
                   f"{','.join(map(str, TRAIN_SIM['pixel_size_a']))})")
    p.add_argument("--dose", default=None, help=f"LO,HI e-/px of the training simulation (default "
                   f"{','.join(map(str, TRAIN_SIM['dose_e_per_px']))})")
    p.add_argument("--ema", type=float, default=0.0, help="keep an exponential moving average of the weights "
                   "with this decay (e.g. 0.999) and validate and save it instead (0: off)")
    p.add_argument("--val-count", type=int, default=16)
    p.add_argument("--val-size", type=int, default=512)
    p.add_argument("--val-every", type=float, default=30.0, help="seconds between validations")
    p.add_argument("--val-reserve", type=float, default=5.0, help="seconds kept for the last validation")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--eval-size", type=int, default=1024)
    p.add_argument("--eval-count", type=int, default=32, help="held-out micrographs per dose for the choice "
                   "(the acceptance, benchmarks/bench_quality.py, uses 128)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.t0 = time.time()
    if a.quick:
        a.device, a.batch, a.crop, a.crops_per_image, a.sim_size = "cpu", 4, 64, 2, 128
        a.val_count, a.val_size, a.eval_size, a.eval_count = 2, 128, 128, 1
        a.minutes = min(a.minutes, 0.5)
    a.seconds = 60.0 * a.minutes
    return a


def main() -> None:
    a = parse_args()
    if a.worker:
        train_worker(a)
    else:
        orchestrate(a)


if __name__ == "__main__":
    main()
