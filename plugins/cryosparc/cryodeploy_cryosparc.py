#!/usr/bin/env python3
"""A cryoSPARC external job (via cryosparc-tools) that denoises micrographs with cryodeploy.

:func:`run` creates an External job in a project workspace, connects it to a job's exposures
output, denoises every ``micrograph_blob`` into the job's folder and saves an ``exposure``
output named ``denoised_micrographs`` that passes every input slot through and adds the
denoised files in a ``micrograph_blob`` typed slot (``micrograph_blob_denoised`` by default,
the slot cryoSPARC's own Micrograph Denoiser fills; ``--slot micrograph_blob`` replaces the
micrographs for all downstream jobs instead).

:func:`denoise_dataset` is the server-free part: cryosparc ``Dataset`` in, ``Dataset`` out.
Run from the command line on a machine that sees the project directory::

    CRYOSPARC_BASE_URL=http://csmaster:39000 CRYOSPARC_EMAIL=me@lab CRYOSPARC_PASSWORD=... \
    python cryodeploy_cryosparc.py P3 W1 J12 exposures_accepted --model cnn3.safetensors --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cryodeploy.errors import CryoDeployError, InputError, first_line
from cryodeploy.io.mrc import read_header

if TYPE_CHECKING:
    from cryosparc.dataset import Dataset
    from cryosparc.tools import CryoSPARC

__all__ = [
    "DEFAULT_SLOT", "INPUT_NAME", "OUTPUT_NAME", "ConnectionFailed", "build_parser", "connect",
    "denoise_dataset", "main", "output_paths", "run",
]

log = logging.getLogger("cryodeploy.cryosparc")

#: Output slot for the denoised micrographs (dtype micrograph_blob).
DEFAULT_SLOT = "micrograph_blob_denoised"
#: The external job's input and output names.
INPUT_NAME = "micrographs"
OUTPUT_NAME = "denoised_micrographs"
_SOURCE_SLOT = "micrograph_blob"


def output_paths(
    paths: Sequence[str], project_dir: Path, outdir_rel: str
) -> list[tuple[Path, PurePosixPath]]:
    """(input absolute, output project-relative) paths: each keeps its relative path below ``outdir_rel``.

    cryoSPARC paths are relative to the project directory (``J3/motioncorrected/x.mrc``); absolute
    ones go below ``outdir_rel/_abs/``. Two different inputs sharing an output are an :class:`InputError`.
    """
    out: list[tuple[Path, PurePosixPath]] = []
    owner: dict[PurePosixPath, str] = {}
    base = PurePosixPath(outdir_rel)
    for raw in paths:
        norm = PurePosixPath(os.path.normpath(raw))
        if norm.is_absolute():
            rel = base / "_abs" / PurePosixPath(*norm.parts[1:])
        elif norm.parts[:1] == ("..",):
            raise InputError(f"{raw}: path leaves the project directory, expected a project-relative path")
        else:
            rel = base / norm
        if owner.setdefault(rel, raw) != raw:
            raise InputError(
                f"{raw}: its output {rel} is also the output of {owner[rel]}, expected unique paths"
            )
        out.append((Path(project_dir) / norm, rel))
    return out


def _denoise_all(pairs: list[tuple[Path, Path]], denoiser: Any, skip_existing: bool) -> None:
    """Denoise each input to its output; raise :class:`InputError` naming the first one not written."""
    todo = [(src, dst) for src, dst in pairs if not (skip_existing and dst.exists())]
    summary = denoiser.denoise_pairs(
        todo, skip_existing=skip_existing, overwrite=not skip_existing, shard=(0, 1), quiet=True
    )
    results = {Path(r.output): r for r in summary.files}
    failed = [(results[dst].error or f"{dst}: not written") for _, dst in todo if not dst.exists()]
    if failed:
        raise InputError(f"{len(failed)} of {len(pairs)} micrographs failed; first: {failed[0]}")


def denoise_dataset(
    dataset: Dataset,
    project_dir: str | os.PathLike[str],
    outdir_rel: str,
    denoiser: Any,
    *,
    slot: str = DEFAULT_SLOT,
    skip_existing: bool = True,
) -> Dataset:
    """Denoise the ``micrograph_blob/path`` files of ``dataset`` into ``project_dir/outdir_rel``.

    Returns a new Dataset with the same ``uid`` column and the fields of a ``micrograph_blob``
    result under ``slot`` (``path`` project-relative, ``idx``, ``shape`` [ny, nx], ``psize_A``,
    ``format`` "MRC/<mode>", ``is_background_subtracted``), ready for ``job.save_output``.
    ``denoiser`` is a :class:`cryodeploy.Denoiser`.
    """
    from cryosparc.dataset import Dataset

    if f"{_SOURCE_SLOT}/path" not in dataset:
        raise InputError(f"input dataset: found fields {dataset.fields()}, expected {_SOURCE_SLOT}/path")
    project = Path(project_dir)
    pairs = output_paths([str(p) for p in dataset[f"{_SOURCE_SLOT}/path"]], project, outdir_rel)
    _denoise_all([(src, project / rel) for src, rel in pairs], denoiser, skip_existing)
    headers = [read_header(project / rel) for _, rel in pairs]
    out = Dataset({"uid": dataset["uid"]}).add_fields(
        [
            (f"{slot}/path", "O"),
            (f"{slot}/idx", "u4"),
            (f"{slot}/shape", "u4", (2,)),
            (f"{slot}/psize_A", "f4"),
            (f"{slot}/format", "O"),
            (f"{slot}/is_background_subtracted", "u1"),
        ]
    )
    out[f"{slot}/path"] = [str(rel) for _, rel in pairs]
    out[f"{slot}/shape"] = [h.frame_shape for h in headers]
    out[f"{slot}/format"] = [f"MRC/{h.mode}" for h in headers]
    psize = dataset.get(f"{_SOURCE_SLOT}/psize_A")
    out[f"{slot}/psize_A"] = [
        float(psize[i]) if psize is not None and psize[i] > 0 else h.voxel_size[0]
        for i, h in enumerate(headers)
    ]
    if f"{_SOURCE_SLOT}/is_background_subtracted" in dataset:
        out[f"{slot}/is_background_subtracted"] = dataset[f"{_SOURCE_SLOT}/is_background_subtracted"]
    return out


def run(
    cs: CryoSPARC,
    project_uid: str,
    workspace_uid: str,
    input_job: str,
    input_output: str,
    *,
    model: str = "default",
    device: str = "auto",
    backend: str = "auto",
    precision: str = "fp32",
    slot: str = DEFAULT_SLOT,
    title: str = "cryodeploy denoise",
) -> str:
    """Create, run and complete an External job denoising ``input_job``'s ``input_output`` exposures.

    Returns the new job's uid. The job is marked failed (with the error) if anything raises.
    """
    from cryodeploy import Denoiser

    project = cs.find_project(project_uid)
    job = project.create_external_job(workspace_uid, title=title)
    job.connect(INPUT_NAME, input_job, input_output, slots=[_SOURCE_SLOT])
    job.add_output(
        "exposure", OUTPUT_NAME, passthrough=INPUT_NAME, slots=[{"name": slot, "dtype": "micrograph_blob"}]
    )
    with job.run():
        micrographs = job.load_input(INPUT_NAME, [_SOURCE_SLOT])
        job.log(f"denoising {len(micrographs)} micrographs with model {model} on {device}")
        outdir_rel = f"{job.uid}/denoised"
        with Denoiser.load(model, device=device, backend=backend, precision=precision) as denoiser:
            result = denoise_dataset(micrographs, str(project.dir), outdir_rel, denoiser, slot=slot)
        job.save_output(OUTPUT_NAME, result)
        job.log(f"saved {len(result)} denoised micrographs in {outdir_rel} (slot {slot})")
    return job.uid


def build_parser() -> argparse.ArgumentParser:
    """The command line; parsing it needs neither cryosparc-tools nor a server."""
    p = argparse.ArgumentParser(
        description="Denoise a cryoSPARC job's micrographs in a new External job. Credentials: "
        "CRYOSPARC_BASE_URL (or --url), CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD, or a saved "
        "'python -m cryosparc.tools login' session. Needs pip install 'cryodeploy[cryosparc]'."
    )
    p.add_argument("project_uid", help="project uid, e.g. P3")
    p.add_argument("workspace_uid", help="workspace uid the new job goes into, e.g. W1")
    p.add_argument("input_job", help="job uid whose output holds the micrographs, e.g. J12")
    p.add_argument("input_output", help="that job's output name, e.g. exposures_accepted")
    p.add_argument("--model", default="default",
                   help="cryodeploy model: default, a checkpoint, raw weights, .onnx or an engine "
                   "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="cryodeploy backend, or auto (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="compute precision (default: %(default)s)")
    p.add_argument("--slot", default=DEFAULT_SLOT,
                   help="output slot of the denoised micrographs; micrograph_blob replaces the originals "
                   "downstream (default: %(default)s)")
    p.add_argument("--url", default=None,
                   help="cryoSPARC base URL, e.g. http://csmaster:39000 (default: $CRYOSPARC_BASE_URL)")
    p.add_argument("--timeout", type=int, default=30,
                   help="seconds to wait for the server (default: %(default)s)")
    return p


def connect(url: str | None, timeout: int, environ: dict[str, str] | None = None) -> CryoSPARC:
    """A connected ``CryoSPARC``; :class:`ConnectionFailed` with one line when it cannot be had."""
    env = dict(os.environ if environ is None else environ)
    base_url = url or env.get("CRYOSPARC_BASE_URL")
    if not base_url:
        raise ConnectionFailed("no cryoSPARC server given: set CRYOSPARC_BASE_URL or pass --url")
    try:
        from cryosparc.tools import CryoSPARC
    except ImportError:
        raise ConnectionFailed(
            "cryosparc-tools is not installed: pip install 'cryodeploy[cryosparc]' "
            "(its major.minor version must match the server's)"
        ) from None
    email, password = env.get("CRYOSPARC_EMAIL"), env.get("CRYOSPARC_PASSWORD")
    try:
        with warnings.catch_warnings():  # its per-retry warnings: the one line below says it all
            warnings.simplefilter("ignore")
            return CryoSPARC(base_url, email=email, password=password, timeout=timeout)
    except ValueError:  # no credentials and no saved session
        raise ConnectionFailed(
            f"no cryoSPARC credentials for {base_url}: set CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD "
            "(or run python -m cryosparc.tools login)"
        ) from None
    except Exception as err:  # cryosparc-tools wraps network and login failures in a RuntimeError
        cause = err.__cause__ or err
        raise ConnectionFailed(
            f"cannot connect to cryoSPARC at {base_url}: {first_line(cause, type(cause).__name__)}"
        ) from None


class ConnectionFailed(CryoDeployError):
    """The cryoSPARC server cannot be used (not given, not installed, no credentials, unreachable)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: parse, connect (``CRYOSPARC_*`` environment variables) and :func:`run`.

    Errors are one line on stderr (``error: ...``) and a non-zero exit status.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cs = connect(args.url, args.timeout)
        uid = run(
            cs,
            args.project_uid,
            args.workspace_uid,
            args.input_job,
            args.input_output,
            model=args.model,
            device=args.device,
            backend=args.backend,
            precision=args.precision,
            slot=args.slot,
        )
    except CryoDeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.project_uid} {uid}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
