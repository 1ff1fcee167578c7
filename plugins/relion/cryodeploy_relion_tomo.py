#!/usr/bin/env python3
"""A RELION 5 External job that denoises the tomograms of a tomograms STAR file with a cryodeploy
volume model (e.g. unet3d).

RELION 5's External job has no tomogram input field; it passes ``--in_mics`` for its *Input
micrographs* field (which records the input edge in the pipeline) and ``--<label> <value>`` for
each Param, so either of these reaches the script, run from the project directory::

    cryodeploy_relion_tomo.py --o External/job008/ --in_mics Tomograms/job006/tomograms.star \
        --model /models/unet3d.safetensors [--source auto] [--device cuda] [--tile auto] --j 4
    cryodeploy_relion_tomo.py --o External/job008/ --in_tomoset Tomograms/job006/tomograms.star ...

With both half tomograms (``rlnTomoReconstructedTomogramHalf1``/``Half2``, what *Reconstruct
tomograms* writes for denoising) each half is denoised and the two results are averaged (as
cryoCARE's predict does); otherwise ``rlnTomoReconstructedTomogram`` is denoised. The job writes,
as RELION 5's own *Denoise tomograms* job does, ``--o``/``tomograms/rec_<rlnTomoName>.mrc`` and
``--o``/``tomograms.star`` (every input table, column and row kept verbatim, plus
``rlnTomoReconstructedTomogramDenoised`` naming the denoised file), a ``logfile.pdf``,
``RELION_OUTPUT_NODES.star`` (``TomogramGroupMetadata.star.relion`` and the log) and finally
``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` (one line, also on stderr). Abort and
Continue behave as in ``cryodeploy_relion.py``. See README.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # the micrograph job's shared pieces
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryodeploy_relion import (
    ABORT_NOW,
    NODE_LABEL_LOGFILE,
    JobAborted,
    OutputFolderError,
    _fail,
    _outdir_from,
    _Parser,
    _relative_to_project,
    check_outdir,
    run_marked,
    write_pdf_log,
)
from relion_tomostar import (
    DEFAULT_STAR_VERSION,
    DENOISED_COLUMN,
    NODE_LABEL_TOMOGRAMS,
    SOURCES,
    TOMO_DIR,
    Tomogram,
    TomogramStar,
    plan_tomograms,
    read_tomogram_star,
    write_output_nodes,
    write_star,
)

from cryodeploy.errors import ConfigError, CryoDeployError, InputError
from cryodeploy.io.tomopairs import TOMOGRAM_COLUMN

__all__ = ["LOGFILE", "OUTPUT_STAR", "TomoJobOptions", "main", "parse_args", "run_job", "write_logfile"]

log = logging.getLogger("cryodeploy.relion.tomo")

OUTPUT_STAR = "tomograms.star"
LOGFILE = "logfile.pdf"


@dataclass(frozen=True)
class TomoJobOptions:
    """What RELION passes to the job (``--o``, the tomograms STAR, ``--j``) plus our parameters."""

    outdir: Path
    in_tomoset: Path
    model: str = "default"
    source: str = "auto"
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    tile: str = "auto"
    threads: int = 1
    gpu: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"--source {self.source}: expected auto, halves or tomogram")
        if self.tile != "auto" and not self.tile.isdigit():
            raise ConfigError(f"--tile {self.tile}: expected 'auto' or a whole number of voxels")
        if self.threads < 1:
            raise ConfigError(f"--j {self.threads}: expected at least 1 thread")
        if self.gpu and not re.fullmatch(r"\d+([,:]\d+)*", self.gpu.strip()):
            raise ConfigError(f"--gpu {self.gpu}: expected GPU ids such as 0 or 0,1 (or empty for any)")

    @property
    def compute_device(self) -> str:
        """``--device`` if given, else from ``--gpu`` (its first id; empty: any GPU), else auto."""
        if self.device != "auto" or self.gpu is None:
            return self.device
        first = re.split(r"[,:]", self.gpu.strip())[0]
        return f"cuda:{first}" if first else "cuda"


def _denoise_one(denoiser: Any, tomo: Tomogram, tile: int | str) -> None:
    """Denoise ``tomo``'s volumes, average them, write the output atomically with the first input's
    header (voxel size from the STAR file only where the header has none)."""
    import numpy as np

    from cryodeploy import __version__
    from cryodeploy.io.volumes import read_volume, read_volume_header, write_volume

    headers = [read_volume_header(p) for p in tomo.inputs]  # cheap checks before any work
    for path, h in zip(tomo.inputs[1:], headers[1:], strict=True):
        if h.shape != headers[0].shape:
            raise InputError(f"{path}: shape {h.shape} differs from {tomo.inputs[0]}'s {headers[0].shape}, "
                             "expected two halves of one tomogram")
    total: np.ndarray | None = None
    for path in tomo.inputs:  # one volume in memory at a time, besides the sum
        out = denoiser(read_volume(path).data, tile=tile)
        total = out if total is None else total + out
    assert total is not None
    header = headers[0]
    if tomo.voxel_size and not any(header.voxel_size):
        header = dataclasses.replace(header, voxel_size=(tomo.voxel_size,) * 3)
    elif tomo.voxel_size and abs(header.voxel_size[0] - tomo.voxel_size) > 0.01 * tomo.voxel_size:
        log.warning("%s: header voxel size %.4g A, the STAR file gives %.4g A; keeping the header's",
                    tomo.inputs[0], header.voxel_size[0], tomo.voxel_size)
    label = f"cryodeploy {__version__} RELION tomo ({denoiser.spec.architecture}, mean of {len(tomo.inputs)})"
    write_volume(tomo.output, total / len(tomo.inputs), header, protect=tomo.inputs, label=label)


def _denoise(tomos: list[Tomogram], options: TomoJobOptions, outdir: Path) -> str:
    """Denoise every tomogram whose output does not exist yet, checking for an abort request before
    each; raise if any failed (the others are kept). Returns the backend label ("-": nothing to do)."""
    from cryodeploy import Denoiser

    todo = [t for t in tomos if not t.output.exists()]
    log.info("%d tomograms: %d already denoised, %d to do", len(tomos), len(tomos) - len(todo), len(todo))
    if not todo:
        return "-"
    tile: int | str = int(options.tile) if options.tile.isdigit() else "auto"
    failed: list[str] = []
    (outdir / TOMO_DIR).mkdir(parents=True, exist_ok=True)
    with Denoiser.load(options.model, device=options.compute_device, backend=options.backend,
                       precision=options.precision, threads=options.threads) as denoiser:
        if denoiser.spec.ndim != 3:
            raise InputError(f"--model {options.model}: {denoiser.spec.architecture} is a 2-D image model, "
                             "expected a volume model (e.g. unet3d) for tomograms")
        log.info("model %s on %s (%s)", options.model, denoiser.backend.label, platform.node())
        for i, tomo in enumerate(todo):
            if (outdir / ABORT_NOW).exists():
                raise JobAborted(f"aborted by RELION ({ABORT_NOW}) after {i} of {len(todo)} tomograms")
            t0 = time.perf_counter()
            try:
                _denoise_one(denoiser, tomo, tile)
                status = "done"
            except CryoDeployError as err:
                failed.append(str(err))
                status = f"failed: {err}"
            except MemoryError as err:
                failed.append(f"{tomo.inputs[0]}: out of memory ({err}); try a smaller --tile")
                status = f"failed: {failed[-1]}"
            log.info("%d/%d %s: %s (%.1f s)", i + 1, len(todo), tomo.name, status, time.perf_counter() - t0)
        label = denoiser.backend.label
    if failed:
        raise InputError(f"{len(failed)} of {len(tomos)} tomograms failed; first: {failed[0]}")
    return label


def write_logfile(target: Path, lines: Sequence[str], example: tuple[Path, Path] | None) -> Path:
    """A one-page PDF log for RELION's display: the summary lines and, if given, the central XY and
    XZ sections of one input tomogram beside its denoised copy."""
    from cryodeploy.io.volumes import read_volume

    panels = []
    if example is not None:
        for i, (path, title) in enumerate(((example[0], "input"), (example[1], "denoised"))):
            vol = read_volume(path).data
            sections = ((vol[vol.shape[0] // 2], "XY"), (vol[:, vol.shape[1] // 2], "XZ"))
            for j, (section, axis) in enumerate(sections):
                rect = (0.05 + 0.47 * i, 0.42 - 0.34 * j, 0.43, 0.3)
                panels.append((section, f"{title} {axis}: {path.name}", rect))
    return write_pdf_log(target, lines, panels)


def _rel(path: Path, project_dir: Path) -> str:
    """``path`` relative to the project (as RELION names files), or absolute if outside it."""
    return str(_relative_to_project(path, project_dir))


def _job(options: TomoJobOptions, project_dir: Path) -> tuple[Path, TomogramStar, list[Tomogram]]:
    """The job's output folder, the STAR file read and its tomograms; ``--o`` checked."""
    star_path = options.in_tomoset if options.in_tomoset.is_absolute() else project_dir / options.in_tomoset
    outdir = Path(os.path.abspath(options.outdir if options.outdir.is_absolute()
                                  else project_dir / options.outdir))
    check_outdir(outdir, project_dir, ())
    star = read_tomogram_star(star_path)
    tomos = plan_tomograms(star, options.source, project_dir, outdir)
    check_outdir(outdir, project_dir, [star_path, *(p for t in tomos for p in t.inputs)])
    return outdir, star, tomos


def run_job(options: TomoJobOptions, project_dir: Path) -> Path:
    """Denoise every tomogram of ``options.in_tomoset``; write the output STAR, log and nodes files.
    Returns the output STAR path. Raises :class:`~cryodeploy.errors.CryoDeployError` on failure."""
    project_dir = Path(os.path.abspath(project_dir))
    outdir, star, tomos = _job(options, project_dir)
    label = _denoise(tomos, options, outdir)
    blocks = dict(star.blocks)
    blocks[star.table] = blocks[star.table].copy()
    blocks[star.table][DENOISED_COLUMN] = [_rel(t.output, project_dir) for t in tomos]
    version = star.version or DEFAULT_STAR_VERSION
    target = outdir / OUTPUT_STAR
    write_star(blocks, version, target, (star.path,))
    mode = "mean of the denoised halves" if len(tomos[0].inputs) == 2 else TOMOGRAM_COLUMN
    logfile = write_logfile(outdir / LOGFILE, [
        "cryodeploy denoise (RELION 5 External job, tomograms)", f"input: {options.in_tomoset}",
        f"output: {OUTPUT_STAR} ({DENOISED_COLUMN})", f"tomograms: {len(tomos)}", f"denoised: {mode}",
        f"model: {options.model}", f"backend: {label}", f"host: {platform.node()}",
    ], (tomos[0].inputs[0], tomos[0].output))
    write_output_nodes(outdir, [(_rel(target, project_dir), NODE_LABEL_TOMOGRAMS),
                                (_rel(logfile, project_dir), NODE_LABEL_LOGFILE)], version)
    log.info("wrote %s (%d tomograms, %s)", target, len(tomos), mode)
    return target


def _parser() -> _Parser:
    p = _Parser(description="RELION 5 External job: denoise tomograms with cryodeploy.", allow_abbrev=False)
    p.add_argument("--o", required=True, type=Path, help="output directory (RELION's job directory)")
    p.add_argument("--in_tomoset", type=Path, help="input tomograms STAR file (a Param labelled in_tomoset)")
    p.add_argument("--in_mics", type=Path, help="the same, from RELION's 'Input micrographs' field")
    p.add_argument("--model", default="default", help="volume model: checkpoint, run folder or ONNX file")
    p.add_argument("--source", default="auto", help="auto (halves if both are listed), halves or tomogram")
    p.add_argument("--backend", default="auto", help="torch, ort or auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--tile", default="auto", help="tile side in voxels or auto")
    p.add_argument("--j", default=1, type=int, help="threads")
    p.add_argument("--gpu", nargs="?", const="", default=None,
                   help="GPU ids from RELION (first one used; empty: any GPU) unless --device is given")
    return p


def parse_args(argv: Sequence[str]) -> TomoJobOptions:
    """Parse RELION's command line; unknown arguments (``--pipeline_control DIR``...) are ignored."""
    args, unknown = _parser().parse_known_args(list(argv))
    if unknown:
        log.warning("ignoring arguments: %s", " ".join(unknown))
    given = [a for a in (args.in_tomoset, args.in_mics) if a is not None]
    if not given:
        raise ConfigError("--in_tomoset: missing, expected the input tomograms STAR file "
                          "(or RELION's Input micrographs field, --in_mics)")
    if len(given) == 2 and os.path.normpath(given[0]) != os.path.normpath(given[1]):
        raise ConfigError(f"--in_tomoset {given[0]} and --in_mics {given[1]}: expected one STAR file")
    return TomoJobOptions(outdir=args.o, in_tomoset=given[0], model=args.model, source=args.source,
                          backend=args.backend, device=args.device, precision=args.precision, tile=args.tile,
                          threads=args.j, gpu=args.gpu)


def main(argv: Sequence[str] | None = None, project_dir: Path | None = None) -> int:
    """Run the job as RELION does; returns the exit status (0 success, 1 failure or abort)."""
    argv = sys.argv[1:] if argv is None else argv
    project_dir = Path(os.path.abspath(Path.cwd() if project_dir is None else project_dir))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("cryodeploy RELION tomogram job on host %s, pid %d", platform.node(), os.getpid())
    outdir = _outdir_from(argv)
    if outdir is not None and not outdir.is_absolute():
        outdir = project_dir / outdir
    options, early = None, None
    try:  # a bad --o is refused before anything in it is touched (it may be another job's folder)
        options = parse_args(argv)
        _job(options, project_dir)
    except OutputFolderError as err:
        _fail(str(err), None)
        return 1
    except CryoDeployError as err:
        early = err  # reported below, with a failure marker
    def work() -> None:
        if early is not None:
            raise early
        assert options is not None
        run_job(options, project_dir)

    return run_marked(outdir, work, (OUTPUT_STAR, LOGFILE))

if __name__ == "__main__":
    sys.exit(main())
