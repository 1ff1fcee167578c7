#!/usr/bin/env python3
"""A RELION External job that denoises the micrographs of a micrographs STAR file with cryodeploy.

RELION runs it from the project directory as::

    cryodeploy_relion.py --o External/job004/ --in_mics CtfFind/job003/micrographs_ctf.star \
        --model /models/cnn3.safetensors [--device cuda] [--backend auto] [--tile auto] \
        [--precision fp32] [--relion_version auto] --j 4

and reads back what it leaves in ``--o``: ``micrographs_denoised.star`` (every input table,
column and row, with ``rlnMicrographName`` pointing at the denoised copies), ``logfile.pdf``,
``RELION_OUTPUT_NODES.star`` (both as nodes) and finally ``RELION_JOB_EXIT_SUCCESS`` or
``RELION_JOB_EXIT_FAILURE`` (whose one-line reason is also printed to stderr, i.e. ``run.err``).
When RELION asks for an abort (``RELION_JOB_ABORT_NOW`` in ``--o``) the job stops before the
next micrograph, keeps the finished ones and writes ``RELION_JOB_EXIT_ABORTED``. ``--gpu``
(RELION's GPU ids) picks the CUDA device unless ``--device`` is given.

Denoised files keep the path they had relative to the project directory, below ``--o``:
``MotionCorr/job002/Movies/a.mrc`` -> ``External/job004/MotionCorr/job002/Movies/a.mrc``, so
names from different jobs or folders never collide and never leave ``--o``. A rerun
(RELION's "Continue") skips micrographs whose denoised file already exists. See README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryodeploy.errors import ConfigError, CryoDeployError, InputError
from cryodeploy.files import atomic_write

__all__ = [
    "ABORTED",
    "ABORT_NOW",
    "FAILURE",
    "LOGFILE",
    "NODES_FILE",
    "OUTPUT_STAR",
    "SUCCESS",
    "JobAborted",
    "JobOptions",
    "MicrographStar",
    "detect_node_style",
    "main",
    "output_paths",
    "parse_args",
    "read_micrograph_star",
    "run_job",
    "write_logfile",
    "write_micrograph_star",
    "write_output_nodes",
    "write_pdf_log",
]

log = logging.getLogger("cryodeploy.relion")

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
LOGFILE = "logfile.pdf"
#: RELION 3.1 node type of a PDF log file (NODE_PDF_LOGFILE) and the RELION 4/5 label.
NODE_TYPE_LOGFILE = 13
NODE_LABEL_LOGFILE = "LogFile.pdf.relion"
#: the ``# version`` line RELION 3.1/4 writes; RELION 5 writes 50001 (kept when the input has it).
DEFAULT_STAR_VERSION = 30001
NODES_FILE = "RELION_OUTPUT_NODES.star"
OUTPUT_STAR = "micrographs_denoised.star"
#: RELION 3.1 node type of a micrographs STAR file (NODE_MICS).
NODE_TYPE_MICROGRAPHS = 1
#: RELION 4/5 node type label of a micrographs STAR file.
NODE_LABEL_MICROGRAPHS = "MicrographGroupMetadata.star.relion"
_VERSION_RE = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class JobOptions:
    """What RELION passes to the job (``--o``, ``--in_mics``, ``--j``) plus our parameters."""

    outdir: Path
    in_mics: Path
    model: str = "default"
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    tile: str = "auto"
    threads: int = 1
    relion_version: str = "auto"
    gpu: str | None = None

    def __post_init__(self) -> None:
        if self.tile != "auto" and not self.tile.isdigit():
            raise ConfigError(f"--tile {self.tile}: expected 'auto' or a whole number of pixels")
        if self.relion_version not in ("auto", "3", "3.1", "4", "5"):
            raise ConfigError(f"--relion_version {self.relion_version}: expected auto, 3.1, 4 or 5")
        if self.threads < 1:
            raise ConfigError(f"--j {self.threads}: expected at least 1 thread")
        if self.gpu and not re.fullmatch(r"\d+([,:]\d+)*", self.gpu.strip()):
            raise ConfigError(f"--gpu {self.gpu}: expected GPU ids such as 0 or 0,1 (or empty for any)")

    @property
    def compute_device(self) -> str:
        """``--device`` if given, else from ``--gpu`` (its first id; empty: any GPU), else auto."""
        if self.device != "auto" or self.gpu is None:
            return self.device
        ids = re.split(r"[,:]", self.gpu.strip())
        return f"cuda:{ids[0]}" if ids[0] else "cuda"


class JobAborted(CryoDeployError):
    """RELION asked the job to stop (``RELION_JOB_ABORT_NOW``)."""


@dataclass
class MicrographStar:
    """A micrographs STAR file: its tables in file order, all values kept as the text they were."""

    path: Path
    blocks: dict[str, Any]  # block name -> pandas.DataFrame
    table: str  # the block holding rlnMicrographName ("micrographs", or "" in the old form)
    version: int | None  # from a "# version NNNNN" comment, None if absent

    @property
    def names(self) -> list[str]:
        """The ``rlnMicrographName`` values, in row order."""
        return [str(n) for n in self.blocks[self.table]["rlnMicrographName"]]


def read_micrograph_star(path: str | os.PathLike[str]) -> MicrographStar:
    """Read a RELION 3.0 (single table) or 3.1-5 (data_optics + data_micrographs) micrographs STAR file."""
    import pandas as pd
    import starfile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file, expected a RELION micrographs STAR file")
    text = p.read_text(errors="replace")
    try:
        first = starfile.read(p, always_dict=True)
        # Re-read with every column as text, so values are written back exactly as they were.
        columns = sorted({c for b in first.values() if isinstance(b, pd.DataFrame) for c in b.columns})
        blocks = starfile.read(p, always_dict=True, parse_as_string=columns)
    except Exception as err:  # starfile raises many types on malformed input
        raise InputError(f"{p}: not a readable STAR file ({type(err).__name__}: {err})") from err
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and "rlnMicrographName" in block.columns:
            version = _VERSION_RE.search(text)
            return MicrographStar(p, dict(blocks), name, int(version.group(1)) if version else None)
    raise InputError(f"{p}: found no table with rlnMicrographName, expected a RELION micrographs STAR file")


def write_micrograph_star(star: MicrographStar, target: Path) -> None:
    """Write ``star``'s tables atomically, each after RELION's ``# version`` line (the input's, or
    :data:`DEFAULT_STAR_VERSION`)."""
    import starfile

    version = f"# version {star.version or DEFAULT_STAR_VERSION}\n\n"
    with atomic_write(target, protect=(star.path,)) as tmp:
        chunks = []
        for name, block in star.blocks.items():  # one at a time: the version line goes before each block
            starfile.write({name: block}, tmp, overwrite=True)
            text = tmp.read_text()
            chunks.append(version + text[text.index("data_") :])  # without starfile's "# Created by" line
        tmp.write_text("\n".join(chunks))


def _relative_to_project(path: Path, project_dir: Path) -> Path:
    """``path`` (absolute, normalised) relative to the project, or unchanged if it lies outside."""
    try:
        return path.relative_to(project_dir)
    except ValueError:
        return path


def output_paths(names: Sequence[str], project_dir: Path, outdir: Path) -> list[tuple[Path, Path]]:
    """(input, output) absolute paths: each micrograph keeps its project-relative path below ``outdir``.

    Paths outside the project go below ``outdir/_abs/`` with their full absolute path. Two
    different inputs that would share an output are an :class:`InputError`.
    """
    project_dir = Path(os.path.abspath(project_dir))
    outdir = Path(os.path.abspath(outdir))
    pairs: list[tuple[Path, Path]] = []
    owner: dict[Path, Path] = {}
    for name in names:
        src = Path(os.path.normpath(project_dir / name))  # keeps symlinked folders (Movies -> /data)
        rel = _relative_to_project(src, project_dir)
        dst = outdir / (rel if not rel.is_absolute() else Path("_abs", *rel.parts[1:]))
        if owner.setdefault(dst, src) != src:
            raise InputError(
                f"{name}: its output {dst} is also the output of {owner[dst]}, expected unique paths"
            )
        pairs.append((src, dst))
    return pairs


def detect_node_style(project_dir: Path, star: MicrographStar, relion_version: str = "auto") -> int:
    """RELION major version whose RELION_OUTPUT_NODES.star form to write: 3 (numeric type) or 4 (labels).

    ``auto`` looks at the project's ``default_pipeline.star`` (labels there mean RELION 4/5),
    then at the input STAR's ``# version`` line (50001 or later means RELION 5), else 3.
    """
    if relion_version != "auto":
        return 3 if relion_version.startswith("3") else 4
    pipeline = project_dir / "default_pipeline.star"
    if pipeline.is_file():
        text = pipeline.read_text(errors="replace")
        if "_rlnPipeLineProcessTypeLabel" in text or "_rlnPipeLineNodeTypeLabel" in text:
            return 4
        if "_rlnPipeLineProcessType" in text or "_rlnPipeLineNodeType" in text:
            return 3
    return 4 if star.version is not None and star.version >= 50000 else 3


def write_output_nodes(outdir: Path, node_name: str, style: int, log_name: str | None = None,
                       version: int = DEFAULT_STAR_VERSION) -> Path:
    """Write ``outdir/RELION_OUTPUT_NODES.star`` declaring ``node_name`` a micrographs STAR file
    (and ``log_name``, if given, the job's PDF log file), after a ``# version`` line."""
    import pandas as pd
    import starfile

    names = [node_name] + ([log_name] if log_name else [])
    if style == 3:
        kinds = [NODE_TYPE_MICROGRAPHS, NODE_TYPE_LOGFILE][: len(names)]
        table = pd.DataFrame({"rlnPipeLineNodeName": names, "rlnPipeLineNodeType": kinds})
    else:
        labels = [NODE_LABEL_MICROGRAPHS, NODE_LABEL_LOGFILE][: len(names)]
        table = pd.DataFrame({"rlnPipeLineNodeName": names, "rlnPipeLineNodeTypeLabel": labels})
    target = outdir / NODES_FILE
    with atomic_write(target) as tmp:
        starfile.write({"output_nodes": table}, tmp, overwrite=True)
        text = tmp.read_text()
        tmp.write_text(f"# version {version}\n\n" + text[text.index("data_"):])
    return target


def write_logfile(target: Path, lines: Sequence[str], example: tuple[Path, Path] | None) -> Path:
    """A one-page PDF log for RELION's display: the job's summary lines and, if given, one input
    micrograph beside its denoised copy."""
    from cryodeploy.io.mrc import read_micrograph

    panels = []
    if example is not None:
        for i, (path, title) in enumerate(((example[0], "input"), (example[1], "denoised"))):
            frame = read_micrograph(path).data
            panels.append((frame.reshape(-1, *frame.shape[-2:])[0], f"{title}: {path.name}",
                           (0.05 + 0.47 * i, 0.1, 0.43, 0.6)))
    return write_pdf_log(target, lines, panels)


def write_pdf_log(target: Path, lines: Sequence[str],
                  panels: Sequence[tuple[Any, str, tuple[float, float, float, float]]]) -> Path:
    """An A4 PDF (atomically): ``lines`` as monospace text at the top, then each panel ``(image,
    title, (left, bottom, width, height) in page fractions)`` downsampled, 1-99 % contrast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cryodeploy.io.preview import downsample

    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.05, 0.97, "\n".join(lines), va="top", family="monospace", fontsize=9)
    for image, title, rect in panels:
        img = downsample(image)
        lo, hi = np.percentile(img, [1, 99])
        ax = fig.add_axes(rect)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    with atomic_write(target) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)
    return target


def _denoise(pairs: list[tuple[Path, Path]], options: JobOptions, outdir: Path) -> str:
    """Denoise each input into its output (outputs that exist are kept), one micrograph at a time
    so that an abort request stops before the next; raise if any is not written. Returns the
    backend's label ("-" when nothing was left to do)."""
    from cryodeploy import Denoiser

    todo = [(src, dst) for src, dst in pairs if not dst.exists()]
    log.info("%d micrographs: %d already denoised, %d to do", len(pairs), len(pairs) - len(todo), len(todo))
    if not todo:
        return "-"
    tile: int | str = int(options.tile) if options.tile.isdigit() else "auto"
    failed: list[str] = []
    with Denoiser.load(
        options.model,
        device=options.compute_device,
        backend=options.backend,
        precision=options.precision,
        threads=options.threads,
    ) as denoiser:
        log.info("model %s on %s (%s)", options.model, denoiser.backend.label, platform.node())
        for i, (src, dst) in enumerate(todo):
            if (outdir / ABORT_NOW).exists():
                raise JobAborted(f"aborted by RELION ({ABORT_NOW}) after {i} of {len(todo)} micrographs")
            # shard (0, 1): all files here, whatever RANK or SLURM_ARRAY_TASK_ID the job inherited
            result = denoiser.denoise_pairs([(src, dst)], tile=tile, skip_existing=True, shard=(0, 1),
                                            quiet=True).files[0]
            if not dst.exists():
                failed.append(result.error or f"{dst}: not written")
            log.info("%d/%d %s: %s (%.2f s)", i + 1, len(todo), src.name, result.status, result.seconds)
        label = denoiser.backend.label
    log.info("denoised %d micrographs, %d failed", len(todo) - len(failed), len(failed))
    if failed:
        raise InputError(f"{len(failed)} of {len(pairs)} micrographs failed; first: {failed[0]}")
    return label


class OutputFolderError(ConfigError):
    """``--o`` is the project folder or holds the job's inputs: nothing may be written there."""


def check_outdir(outdir: Path, project_dir: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that is the project folder or contains an input (absolute paths):
    its outputs would be the raw inputs themselves, reported as already denoised."""
    out = Path(os.path.abspath(outdir))
    if out == Path(os.path.abspath(project_dir)):
        raise OutputFolderError(f"--o {outdir}: is the project folder, expected a new job folder "
                                "such as External/job004/")
    for src in inputs:
        if Path(os.path.abspath(src)).is_relative_to(out):
            raise OutputFolderError(f"--o {outdir}: contains the input {src}, expected a new job folder "
                                    "such as External/job004/")


def _job_paths(options: JobOptions, project_dir: Path) -> tuple[Path, Path, MicrographStar]:
    """The job's absolute input STAR, output folder, and the STAR file read; ``--o`` checked."""
    in_mics = options.in_mics if options.in_mics.is_absolute() else project_dir / options.in_mics
    outdir = options.outdir if options.outdir.is_absolute() else project_dir / options.outdir
    check_outdir(outdir, project_dir, ())
    star = read_micrograph_star(in_mics)
    names = [Path(os.path.normpath(project_dir / n)) for n in star.names]
    check_outdir(outdir, project_dir, [in_mics, *names])
    return in_mics, outdir, star


def run_job(options: JobOptions, project_dir: Path) -> Path:
    """Denoise every micrograph of ``options.in_mics`` and write the output STAR and nodes files.

    Returns the output STAR path. Raises :class:`~cryodeploy.errors.CryoDeployError` on failure.
    """
    project_dir = Path(os.path.abspath(project_dir))
    _, outdir, star = _job_paths(options, project_dir)
    pairs = output_paths(star.names, project_dir, outdir)
    label = _denoise(pairs, options, outdir)
    star.blocks[star.table] = star.blocks[star.table].copy()
    star.blocks[star.table]["rlnMicrographName"] = [
        str(_relative_to_project(dst, project_dir)) for _, dst in pairs
    ]
    target = outdir / OUTPUT_STAR
    write_micrograph_star(star, target)
    style = detect_node_style(project_dir, star, options.relion_version)
    logfile = write_logfile(outdir / LOGFILE, [
        "cryodeploy denoise (RELION External job)", f"input: {options.in_mics}", f"output: {OUTPUT_STAR}",
        f"micrographs: {len(pairs)}", f"model: {options.model}", f"backend: {label}",
        f"host: {platform.node()}",
    ], pairs[0] if pairs else None)
    write_output_nodes(outdir, str(_relative_to_project(target, project_dir)), style,
                       str(_relative_to_project(logfile, project_dir)), star.version or DEFAULT_STAR_VERSION)
    log.info(
        "wrote %s (%d micrographs, RELION %s node file)", target, len(pairs), "3.1" if style == 3 else "4/5"
    )
    return target


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`ConfigError` instead of exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


def _parser() -> _Parser:
    p = _Parser(description="RELION External job: denoise micrographs with cryodeploy.", allow_abbrev=False)
    p.add_argument("--o", required=True, type=Path, help="output directory (RELION's job directory)")
    p.add_argument("--in_mics", type=Path, help="input micrographs STAR file")
    p.add_argument("--model", default="default", help="checkpoint, ONNX file or model name")
    p.add_argument("--backend", default="auto", help="torch, ort, trt or auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--tile", default="auto", help="tile size in pixels or auto")
    p.add_argument("--relion_version", default="auto", help="3.1, 4, 5 or auto (node file form)")
    p.add_argument("--j", default=1, type=int, help="threads")
    p.add_argument("--gpu", nargs="?", const="", default=None,
                   help="GPU ids from RELION (first one used; empty: any GPU) unless --device is given")
    return p


def parse_args(argv: Sequence[str]) -> JobOptions:
    """Parse RELION's command line; unknown arguments (``--pipeline_control DIR``...) are ignored."""
    args, unknown = _parser().parse_known_args(list(argv))
    if unknown:
        log.warning("ignoring arguments: %s", " ".join(unknown))
    if args.in_mics is None:
        raise ConfigError("--in_mics: missing, expected the input micrographs STAR file")
    return JobOptions(
        outdir=args.o,
        in_mics=args.in_mics,
        model=args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        tile=args.tile,
        threads=args.j,
        relion_version=args.relion_version,
        gpu=args.gpu,
    )


def _outdir_from(argv: Sequence[str]) -> Path | None:
    """``--o`` even when the rest of the command line is unusable (to leave the failure marker)."""
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--o", type=Path)
    try:
        return parser.parse_known_args(list(argv))[0].o
    except ConfigError:
        return None


def _fail(reason: str, outdir: Path | None) -> None:
    """Report a failure on stderr (RELION's run.err) and in the failure marker, one line each."""
    reason = " ".join(reason.split())
    print(f"error: {reason}", file=sys.stderr, flush=True)
    if outdir is not None:
        try:
            (outdir / FAILURE).write_text(reason + "\n")
        except OSError as err:
            print(f"error: {outdir / FAILURE}: cannot write ({err.strerror or err})", file=sys.stderr)


def _refuse_outdir(argv: Sequence[str], project_dir: Path) -> None:
    """:class:`OutputFolderError` for a bad ``--o``, checked before anything in it is touched; other
    problems of the command line are left to the run, which reports them in the usual way."""
    try:
        options = parse_args(argv)
    except CryoDeployError:
        return
    try:
        _job_paths(options, Path(os.path.abspath(project_dir)))
    except OutputFolderError:
        raise
    except CryoDeployError:
        return


def main(argv: Sequence[str] | None = None, project_dir: Path | None = None) -> int:
    """Run the job as RELION does; returns the exit status (0 success, 1 failure)."""
    argv = sys.argv[1:] if argv is None else argv
    project_dir = Path.cwd() if project_dir is None else project_dir
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("cryodeploy RELION job on host %s, pid %d", platform.node(), os.getpid())
    outdir = _outdir_from(argv)
    if outdir is not None and not outdir.is_absolute():
        outdir = project_dir / outdir
    try:
        _refuse_outdir(argv, project_dir)
    except OutputFolderError as err:  # no marker: the folder is not this job's (it may be another job's)
        _fail(str(err), None)
        return 1
    return run_marked(outdir, lambda: run_job(parse_args(argv), project_dir))


def run_marked(outdir: Path | None, work: Callable[[], None],
               outputs: tuple[str, ...] = (OUTPUT_STAR, LOGFILE)) -> int:
    """Run ``work`` as the job in ``outdir``: the markers and ``outputs`` of an earlier run removed
    first (a Continue starts from a clean slate, finished denoised files aside), then exactly one of
    the success, failure or aborted markers left; returns the exit status (0 success, 1 failure or
    abort)."""
    try:
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
            for stale in (SUCCESS, FAILURE, ABORTED, NODES_FILE, *outputs):
                (outdir / stale).unlink(missing_ok=True)
        work()
    except JobAborted as err:
        assert outdir is not None
        log.info("%s", err)
        (outdir / ABORTED).touch()
        (outdir / ABORT_NOW).unlink(missing_ok=True)  # handled: a later Continue runs normally
        return 1
    except CryoDeployError as err:
        _fail(str(err), outdir)
        return 1
    except Exception as err:  # the job must always leave a marker for RELION
        traceback.print_exc()
        _fail(f"{type(err).__name__}: {err}", outdir)
        return 1
    assert outdir is not None  # parse_args requires --o
    (outdir / SUCCESS).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
