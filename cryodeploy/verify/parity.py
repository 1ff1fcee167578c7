"""Cross-backend parity: every available backend and precision denoises the same whole micrographs
(volume models: tomograms, each one frame) through the runner, and the written outputs are
compared with each other and with a float64 PyTorch reference.

Definitions (per micrograph, all frames of a stack together; the report keeps the worst file):

- Outputs are compared in the network's output space: the runner writes them normalized
  (``keep_normalized``), so large intensity offsets cannot hide errors.
- **max abs** = ``max|a - b|``; **relative error** = ``max|a - b| / max|b|`` where ``b`` is the
  reference side of the pair (the baseline backend's fp32 output, or the float64 reference);
  **PSNR** between outputs = ``10 log10(range(b)^2 / mean((a - b)^2))``.
- The **float64 reference** is the checkpoint's torch module in float64 on the CPU, run on the
  whole micrograph (normalized exactly as the runner does, padded to the stride the same way).
- **Denoising PSNR** (with clean targets): the output de-normalized with the input's own
  statistics, against the clean image, data range = the clean image's range; mean over files.

Checks: an fp32 result must agree with the baseline fp32 result and with the float64 reference
to ``rtol`` (default 1e-5; TF32 is off unless asked). An fp16/bf16 result fails when its
denoising PSNR is more than ``max_psnr_loss_db`` (default 0.1 dB) below the fp32 result of the
same backend (else of the baseline); without clean targets that check cannot be made and the
reduced-precision numbers are informational. Unavailable backends are listed with the reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cryodeploy.backends import BACKENDS, PRECISIONS, BackendOptions, create_backend
from cryodeploy.backends.registry import auto_device_options
from cryodeploy.errors import BackendUnavailable, ConfigError, CryoDeployError, ModelError
from cryodeploy.imaging.normalize import NormStats, norm_stats
from cryodeploy.io.mrc import read_micrograph
from cryodeploy.io.volumes import read_volume

if TYPE_CHECKING:
    import torch

    from cryodeploy.imaging.contract import FrameContract
    from cryodeploy.models.source import ModelSource

__all__ = [
    "PairResult", "ParityConfig", "ParityReport", "VariantResult", "compare_arrays", "render", "run_parity",
]

log = logging.getLogger(__name__)

REFERENCE = "reference/cpu/float64"
Check = Literal["fp32", "psnr-loss", "info"]


@dataclass(frozen=True)
class ParityConfig:
    """What to compare: ``backends`` (None = every registered one), ``precisions``, on ``device``."""

    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    #: the device was "auto": a backend that cannot use CUDA here runs on the CPU
    cpu_fallback: bool = False
    threads: int = 0
    tf32: bool = False
    tile: int | Literal["auto"] = "auto"
    batch: int | Literal["auto"] = "auto"
    rtol: float = 1e-5
    max_psnr_loss_db: float = 0.1
    reference: bool = True
    quiet: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends or () if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"backends {unknown} unknown, expected some of {', '.join(BACKENDS)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ConfigError(f"precisions {list(self.precisions)}, expected some of {', '.join(PRECISIONS)}")
        if not self.rtol > 0 or not self.max_psnr_loss_db >= 0:
            raise ConfigError(f"rtol {self.rtol} must be > 0 and max PSNR loss {self.max_psnr_loss_db} >= 0")
        BackendOptions(device=self.device, threads=self.threads)  # validates device and threads

    def names(self) -> tuple[str, ...]:
        """The backends to try, in order (the first fp32 success is the baseline)."""
        return self.backends if self.backends is not None else tuple(BACKENDS)


@dataclass
class VariantResult:
    """One backend at one precision: ``ok``, ``unavailable`` (with the reason) or ``failed``."""

    backend: str
    precision: str
    label: str
    status: Literal["ok", "unavailable", "failed"]
    reason: str = ""
    seconds: float | None = None
    denoising_psnr: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class PairResult:
    """``a`` compared with ``b`` (the reference side); ``ok`` is None for informational pairs."""

    a: str
    b: str
    check: Check
    max_abs: float = 0.0
    rel: float = 0.0
    psnr: float = float("inf")
    psnr_loss_db: float | None = None
    limit: str = ""
    ok: bool | None = None


@dataclass
class ParityReport:
    """Everything :func:`run_parity` measured; :attr:`ok` decides the exit code."""

    model: str
    model_sha256: str
    device: str
    inputs: list[str]
    targets: bool
    reference: str
    variants: list[VariantResult]
    pairs: list[PairResult]
    config: dict[str, Any]

    @property
    def failures(self) -> list[str]:
        """One line per failed check or failed run; empty when parity holds."""
        lines = [f"{v.label}: run failed ({v.reason})" for v in self.variants if v.status == "failed"]
        for name in self.config.get("requested") or ():  # asked for by name: it must run at some precision
            rows = [v for v in self.variants if v.backend == name]
            if rows and not any(v.status == "ok" for v in rows):
                lines.append(f"{name}: requested but did not run ({rows[0].reason or rows[0].status})")
        lines += [f"{p.a} vs {p.b}: {p.limit}" for p in self.pairs if p.ok is False]
        if not any(p.ok is not None for p in self.pairs):
            lines.append("nothing was checked: fewer than two results and no float64 reference")
        return lines

    @property
    def ok(self) -> bool:
        """True when every check passed, no available backend failed, every backend requested by name
        ran, and something was checked."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (an infinite PSNR, from identical outputs, as the string "inf")."""
        d = asdict(self)
        d.update(format="cryodeploy-parity/1", ok=self.ok, failures=self.failures, definitions=DEFINITIONS)
        return _jsonable(d)  # type: ignore[no-any-return]

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` atomically."""
        from cryodeploy.files import atomic_write

        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


DEFINITIONS = {
    "space": "outputs compared normalized (the network's output), per micrograph; worst file reported",
    "max_abs": "max|a-b|",
    "rel": "max|a-b| / max|b|, b = reference side of the pair",
    "psnr": "10 log10(range(b)^2 / mean((a-b)^2)) between outputs",
    "denoising_psnr": "output de-normalized with the input's statistics vs the clean target; "
                      "data range = target range; mean over files",
    "reference": "checkpoint's torch module in float64 on the CPU on the whole (stride-padded) micrograph",
}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def compare_arrays(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(max abs, relative error, PSNR) of ``a`` against ``b`` as defined in this module."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    diff = np.abs(x - y)
    max_abs = float(diff.max())
    rel = max_abs / max(float(np.abs(y).max()), np.finfo(np.float64).tiny)
    mse = float(np.mean(diff * diff))
    span = float(y.max() - y.min())
    psnr = float("inf") if mse == 0 else float(10 * np.log10(max(span, np.finfo(np.float64).tiny) ** 2 / mse))
    return max_abs, rel, psnr


def _frames(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """The frames of a micrograph (``ndim`` 2: its images) or of a volume (``ndim`` 3: one volume)."""
    if ndim == 3:
        return read_volume(path).data[None]
    data = read_micrograph(path).data
    return data.reshape(-1, *data.shape[-2:])


def _run_variant(source: ModelSource, name: str, precision: str, inputs: Sequence[Path], workdir: Path,
                 config: ParityConfig) -> VariantResult:
    from cryodeploy.inference.runner import RunConfig, denoise_files

    opts = BackendOptions(device=config.device, precision=precision, threads=config.threads, tf32=config.tf32)
    if config.cpu_fallback:
        opts = auto_device_options(name, opts)
    label = f"{name}/{opts.device}/{precision}"
    try:  # raises BackendUnavailable with availability()'s reason
        backend = create_backend(name, source, opts)
    except (BackendUnavailable, ModelError) as err:
        return VariantResult(name, precision, label, "unavailable", str(err))
    run = RunConfig(tile=config.tile, batch=config.batch, keep_normalized=True, overwrite=True, quiet=True,
                    shard=(0, 1))
    try:
        with backend:
            summary = denoise_files(inputs, workdir / f"{name}-{precision}", backend, source.spec, run)
    except CryoDeployError as err:
        return VariantResult(name, precision, label, "failed", str(err))
    failed = [f.error or f.input for f in summary.files if f.status != "done"]
    if failed:
        return VariantResult(name, precision, label, "failed", f"{len(failed)} file(s): {failed[0]}")
    return VariantResult(name, precision, label, "ok", seconds=summary.seconds,
                         outputs={f.input: f.output for f in summary.files})


def _reference_module(source: ModelSource, config: ParityConfig) -> tuple[torch.nn.Module | None, str]:
    if not config.reference:
        return None, "not requested"
    try:
        return source.torch_module().double().eval(), "torch float64, CPU, whole micrograph"
    except ModelError as err:
        return None, f"unavailable ({err})"


def _reference(
    module: torch.nn.Module, frames: np.ndarray, stats: list[NormStats], contract: FrameContract
) -> np.ndarray:
    """The float64 whole-frame forward of each frame, in normalized units."""
    import torch

    out = np.empty(frames.shape, np.float64)
    for i, (frame, s) in enumerate(zip(frames, stats, strict=True)):
        p = contract.prepare(frame, s)
        with torch.inference_mode():
            y = module(torch.from_numpy(p.image.astype(np.float64))[None, None])[0, 0].numpy()
        out[i] = contract.crop(y, p.shape)
    return out


def _plan_pairs(variants: list[VariantResult], reference: bool, targets: bool) -> list[PairResult]:
    done = [v for v in variants if v.status == "ok"]
    fp32 = {v.backend: v for v in done if v.precision == "fp32"}
    base = next(iter(fp32.values()), None)
    pairs = []
    for v in done:
        if v.precision == "fp32" and v is not base and base is not None:
            pairs.append(PairResult(v.label, base.label, "fp32"))
        elif v.precision != "fp32":
            ref = fp32.get(v.backend, base)
            if ref is not None:
                pairs.append(PairResult(v.label, ref.label, "psnr-loss" if targets else "info"))
    if reference:
        pairs += [PairResult(v.label, REFERENCE, "fp32" if v.precision == "fp32" else "info") for v in done]
    return pairs


def _measure(
    pairs: list[PairResult], variants: list[VariantResult], inputs: Sequence[Path],
    targets: Mapping[Path, Path] | None, module: torch.nn.Module | None, source: ModelSource,
) -> None:
    from cryodeploy.imaging.metrics import psnr

    done = [v for v in variants if v.status == "ok"]
    scores: dict[str, list[float]] = {v.label: [] for v in done}
    for p in pairs:
        p.psnr = float("inf")
    for path in inputs:
        ndim = source.spec.ndim
        frames = _frames(path, ndim)
        stats = [norm_stats(f, source.spec.normalization) for f in frames]
        out = {v.label: _frames(v.outputs[str(path)], ndim) for v in done}
        if module is not None:
            out[REFERENCE] = _reference(module, frames, stats, source.spec.contract)
        for p in pairs:
            max_abs, rel, pair_psnr = compare_arrays(out[p.a], out[p.b])
            p.max_abs, p.rel, p.psnr = max(p.max_abs, max_abs), max(p.rel, rel), min(p.psnr, pair_psnr)
        if targets is not None:
            clean = _frames(targets[path], ndim).astype(np.float64)
            for v in done:
                y = out[v.label].astype(np.float64)
                per_frame = [psnr(y[i] * s.scale + s.center, clean[i], data_range=float(np.ptp(clean[i])))
                             for i, s in enumerate(stats)]
                scores[v.label].append(float(np.mean(per_frame)))
    for v in done:
        v.denoising_psnr = float(np.mean(scores[v.label])) if scores[v.label] else None


def _judge(pairs: list[PairResult], variants: list[VariantResult], config: ParityConfig) -> None:
    by_label = {v.label: v for v in variants}
    for p in pairs:
        if p.check == "fp32":
            p.ok = p.rel <= config.rtol
            p.limit = f"relative error {p.rel:.3g}, expected <= {config.rtol:g}"
        elif p.check == "psnr-loss":
            a, b = by_label[p.a].denoising_psnr, by_label[p.b].denoising_psnr
            assert a is not None and b is not None
            p.psnr_loss_db = b - a
            p.ok = p.psnr_loss_db <= config.max_psnr_loss_db
            p.limit = f"denoising PSNR loss {p.psnr_loss_db:.3f} dB, expected <= {config.max_psnr_loss_db:g}"
        else:
            p.limit = "informational (no clean target)" if p.b != REFERENCE else "informational"


def run_parity(
    source: ModelSource, inputs: Sequence[str | os.PathLike[str]], workdir: str | os.PathLike[str],
    config: ParityConfig, targets: Mapping[Path, Path] | None = None,
) -> ParityReport:
    """Denoise ``inputs`` with each requested backend/precision into ``workdir``; compare (see module doc).

    ``targets`` maps each input to its clean image (enables the reduced-precision PSNR check).
    """
    from cryodeploy.progress import progress

    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("parity needs at least one input micrograph")
    if targets is not None:
        missing = [str(p) for p in paths if p not in targets or not Path(targets[p]).is_file()]
        if missing:
            raise ConfigError(f"no clean target for {missing[0]} (and {len(missing) - 1} more)")
    work = Path(workdir)
    variants = []
    combos = [(n, p) for n in config.names() for p in config.precisions]
    with progress(len(combos) + 1, "parity", config.quiet) as bar:
        for name, precision in combos:
            variants.append(_run_variant(source, name, precision, paths, work, config))
            bar.advance(1, last=variants[-1].label)
        module, ref_note = _reference_module(source, config)
        pairs = _plan_pairs(variants, module is not None, targets is not None)
        _measure(pairs, variants, paths, targets, module, source)
        bar.advance(1, last="compared")
    _judge(pairs, variants, config)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    cfg["backends"] = list(config.names())
    cfg["requested"] = list(config.backends) if config.backends is not None else None
    return ParityReport(str(source.path), source.sha256, config.device, [str(p) for p in paths],
                        targets is not None, ref_note, variants, pairs, cfg)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: ParityReport) -> list[Any]:
    """Rich renderables: the variants table, the pairs table, and the verdict."""
    from rich.table import Table
    from rich.text import Text

    runs = Table(title=f"parity of {Path(report.model).name} on {report.device}: runs", title_justify="left")
    for col in ("backend/device/precision", "status", "seconds", "denoising PSNR dB", "reason"):
        runs.add_column(col)
    for v in report.variants:
        # reasons are plain text: Text() keeps "pip install 'cryodeploy[ort]'" from being read as markup
        runs.add_row(Text(v.label), v.status, _fmt(v.seconds, ".2f"), _fmt(v.denoising_psnr, ".3f"),
                     Text(v.reason))
    ref_status = "ok" if report.reference.startswith("torch") else "skipped"
    runs.add_row(REFERENCE, ref_status, "", "", Text(report.reference))
    pairs = Table(title="comparisons (worst micrograph)", title_justify="left")
    for col in ("result", "vs", "max abs", "rel error", "PSNR dB", "check", "verdict"):
        pairs.add_column(col)
    verdicts = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "info"}
    for p in report.pairs:
        pairs.add_row(Text(p.a), Text(p.b), f"{p.max_abs:.3g}", f"{p.rel:.3g}", f"{p.psnr:.1f}",
                      Text(p.limit), verdicts[p.ok])
    verdict = Text("parity: PASS", style="bold green") if report.ok else Text(
        "parity: FAIL\n" + "\n".join(report.failures), style="bold red")
    return [runs, pairs, verdict]
