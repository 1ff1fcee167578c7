"""What a denoising run does before any work: its configuration, the shard of the file list it
owns, one output path per input (by default its own name in the output folder, never two
inputs on one output), and the summary it reports at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryodeploy.errors import ConfigError, OutputError
from cryodeploy.files import TEMP_PREFIX
from cryodeploy.imaging.filters import FrameFilters
from cryodeploy.imaging.movies import MovieConfig
from cryodeploy.inference.claims import CLAIM_PREFIX, try_claim
from cryodeploy.io.writers import output_format

__all__ = [
    "LAUNCHERS",
    "FileResult",
    "Job",
    "RunConfig",
    "RunSummary",
    "check_geometry",
    "orphaned_jobs",
    "output_name",
    "output_pairs",
    "parse_shard",
    "plan_jobs",
    "resolve_shard",
]

Status = Literal["pending", "done", "skipped", "failed"]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based shard i of n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard {text!r}: expected 'i/n' with integers, e.g. 0/4") from None
    return _check_shard(i, n, f"shard {text!r}")


def _check_shard(i: int, n: int, what: str) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"{what}: found index {i} of {n}, expected 0 <= index < count")
    return i, n


#: largest explicit tile side and batch: beyond them a run would allocate more than any machine holds
MAX_TILE = 32768
MAX_BATCH = 1024
#: largest explicit batch x tile x tile (pixels of one input batch; 2^30 float32 pixels are 4 GiB)
MAX_BATCH_PIXELS = 1 << 30


def check_geometry(tile: object, batch: object) -> None:
    """Refuse a tile or batch that is not ``"auto"`` or a positive integer within the limits above."""
    for name, value, limit in (("tile", tile, MAX_TILE), ("batch", batch, MAX_BATCH)):
        if value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r}: expected 'auto' or a positive integer")
        if value > limit:
            raise ConfigError(f"{name} {value}: expected at most {limit}")
    if isinstance(tile, int) and isinstance(batch, int) and batch * tile * tile > MAX_BATCH_PIXELS:
        raise ConfigError(f"batch {batch} x tile {tile}x{tile} is {batch * tile * tile} pixels per batch, "
                          f"expected at most {MAX_BATCH_PIXELS}; lower --batch or --tile")


@dataclass(frozen=True)
class RunConfig:
    """How :func:`cryodeploy.inference.runner.denoise_files` runs; validated on construction.

    ``tile``/``batch``: ``"auto"`` (fit the device's free memory) or an int. ``shard``: ``(i, n)``,
    ``"i/n"``, or None for the environment (torchrun RANK/WORLD_SIZE, SLURM array) or the whole
    list. ``pull``: share the whole list with any number of other runs on the same output
    folder, started at any time (no shard; existing outputs skipped; each run takes the next
    file nobody has claimed; see :mod:`cryodeploy.inference.runner`). ``output_format``: a name
    in :data:`cryodeploy.io.writers.FORMATS`. ``queue_depth`` bounds the micrograph frames held
    between reader, model and writer. ``filters``: binning and classical filters around the
    network (:class:`cryodeploy.imaging.filters.FrameFilters`). ``movies``: the inputs are movies,
    each summed (:mod:`cryodeploy.imaging.movies`) before denoising; outputs are named ``.mrc``.
    ``frame_path``: where frames are read into, normalized, tiled and written from: ``"device"``
    (torch tensors on the backend's device, for backends with a device-resident forward),
    ``"host"`` (numpy), or ``"auto"`` (device for such backends on CUDA; always host for
    ``movies``, which are summed on the host; ``filters`` run on either path). ``io_threads``:
    reader and writer threads each.
    """

    tile: int | Literal["auto"] = "auto"
    batch: int | Literal["auto"] = "auto"
    output_dtype: Literal["float32", "float16"] = "float32"
    output_format: str = "mrc"
    suffix: str = ""
    skip_existing: bool = False
    overwrite: bool = False
    pull: bool = False
    shard: tuple[int, int] | str | None = None
    summary: Path | str | None = None
    quiet: bool = False
    preview: bool = False
    keep_normalized: bool = False
    filters: FrameFilters = field(default_factory=FrameFilters)
    movies: MovieConfig | None = None
    queue_depth: int = 2
    frame_path: Literal["auto", "host", "device"] = "auto"
    io_threads: int = 2
    #: fsync each output before renaming it into place (durable after a power loss); off, outputs are
    #: still atomic (complete or absent for readers and after a crash of the process)
    fsync: bool = True

    def __post_init__(self) -> None:
        check_geometry(self.tile, self.batch)
        if self.output_dtype not in ("float32", "float16"):
            raise ConfigError(f"output dtype {self.output_dtype!r}: expected float32 or float16")
        output_format(self.output_format)
        if self.preview and self.output_format == "png":
            raise ConfigError("preview and output format png would write the same <name>.png: choose one")
        if any(c in self.suffix for c in ("/", "\\", "\0")):
            raise ConfigError(f"suffix {self.suffix!r}: must not contain path separators")
        if self.pull and (self.overwrite or self.shard is not None):
            raise ConfigError("pull shares the whole list and keeps finished outputs: "
                              "it takes neither shard nor overwrite")
        if self.pull:
            object.__setattr__(self, "skip_existing", True)
        if self.skip_existing and self.overwrite:
            raise ConfigError("skip_existing and overwrite contradict each other: choose one")
        if not isinstance(self.filters, FrameFilters):
            raise ConfigError(f"filters {self.filters!r}: expected a FrameFilters")
        if self.queue_depth < 1:
            raise ConfigError(f"queue_depth {self.queue_depth}: expected >= 1")
        if self.frame_path not in ("auto", "host", "device"):
            raise ConfigError(f"frame_path {self.frame_path!r}: expected 'auto', 'host' or 'device'")
        if self.frame_path == "device" and self.movies is not None:
            raise ConfigError("frame_path 'device': movies are summed on the host frame path; "
                              "use 'auto' or 'host'")
        threads = self.io_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 16:
            raise ConfigError(f"io_threads {self.io_threads!r}: expected an integer from 1 to 16")
        if isinstance(self.shard, str):
            object.__setattr__(self, "shard", parse_shard(self.shard))
        elif self.shard is not None:
            object.__setattr__(self, "shard", _check_shard(int(self.shard[0]), int(self.shard[1]), "shard"))
        if self.summary is not None:
            object.__setattr__(self, "summary", Path(self.summary))

    @classmethod
    def from_options(cls, **options: Any) -> RunConfig:
        """Build from keyword options, naming unknown ones in a :class:`ConfigError`."""
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            known = sorted(cls.__dataclass_fields__)
            raise ConfigError(f"unknown run options {unknown}, expected some of {known}")
        return cls(**options)


#: (rank, size) variables of the process launchers, first match wins: torchrun, Open MPI, MPICH/Intel
#: MPI (PMI), and a SLURM job step (``srun``; SLURM_NTASKS alone is also set in a plain batch script,
#: where one process must not take 1/n of the list, so the step's own task count is required).
LAUNCHERS = (
    ("RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
)


def resolve_shard(shard: tuple[int, int] | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The shard to run: explicit, else from the environment, else (0, 1).

    From the environment: a process launcher's rank and size (:data:`LAUNCHERS`), a SLURM array
    task (``SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT``), or both: then array task ``a`` of ``A`` with
    rank ``r`` of ``n`` runs shard ``a * n + r`` of ``A * n``.
    """
    env = os.environ if environ is None else environ
    if shard is not None:
        return shard
    try:
        rank = next(((int(env[r]), int(env[s]), f"{r}/{s}") for r, s in LAUNCHERS if r in env and s in env),
                    None)
        array = None
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
            index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))) // step
            array = _check_shard(index, int(env["SLURM_ARRAY_TASK_COUNT"]), "SLURM_ARRAY_TASK_ID/COUNT")
    except ValueError as err:
        raise ConfigError(f"shard from the environment: {err}") from err
    if rank is not None:
        r, n = _check_shard(rank[0], rank[1], rank[2])
        return (array[0] * n + r, array[1] * n) if array else (r, n)
    return array or (0, 1)


#: longest file name (bytes) of Linux, macOS and Windows file systems
NAME_MAX = 255


def output_name(source: Path, suffix: str = "", extension: str | None = None) -> str:
    """The output file name of input ``source``: its own name, ``suffix`` added to the stem, and
    its extension replaced by ``extension`` (e.g. ``".tif"``) when given."""
    name = Path(source).name
    stem, dot, ext = name.rpartition(".")
    if not (dot and stem):
        stem, ext = name, ""
    end = extension if extension is not None else (f".{ext}" if ext else "")
    out = f"{stem}{suffix}{end}"
    if out in ("", ".", "..") or Path(out).name != out or out.startswith((TEMP_PREFIX, CLAIM_PREFIX)):
        raise OutputError(f"{source}: cannot derive a safe output name (found {out!r})")
    return out


@dataclass
class FileResult:
    """One input's outcome: status done/skipped/failed, wall seconds, and the error or reason."""

    input: str
    output: str
    status: Status = "pending"
    seconds: float = 0.0
    error: str | None = None
    frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Job:
    """A planned input -> output; ``planned`` is the output's identity when planned (None: absent)."""

    input: Path
    output: Path
    planned: tuple[int, int] | None
    result: FileResult
    runtime: dict[str, Any] = field(default_factory=dict)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, or None if it does not exist; a rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def output_pairs(
    paths: Iterable[str | os.PathLike[str]], outdir: Path, suffix: str = "", extension: str | None = None
) -> list[tuple[Path, Path]]:
    """(input, output) for each input: the output is ``outdir`` / its :func:`output_name`."""
    return [(src, outdir / output_name(src, suffix, extension)) for src in map(Path, paths)]


def create_output_folders(folders: Iterable[Path]) -> None:
    """Create each output folder (and its parents) if missing; :class:`OutputError` naming the one that
    cannot be made."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{folder}: cannot create the output folder ({err.strerror or err})") from err


def plan_jobs(pairs: Iterable[tuple[Path, Path]], config: RunConfig) -> list[Job]:
    """This shard's (input, output) jobs; every conflict is an error before any work.

    Two inputs of the whole list (not just this shard) on one output (its name compared
    case-insensitively, previews included), an output that is its own input, or existing
    outputs without ``skip_existing``/``overwrite`` raise :class:`OutputError`.
    """
    # one job per pair (two spellings of one path are one file), keeping the first spelling
    unique = {(os.path.abspath(s), os.path.abspath(o)): (s, o) for s, o in reversed(list(pairs))}
    everything = sorted(unique.values(), key=lambda pair: (str(pair[0]), str(pair[1])))
    owner: dict[tuple[str, str], tuple[Path, Path]] = {}
    for src, out in everything:
        names = [out.name] + ([out.stem + ".png"] if config.preview else [])
        for name in names:
            other = owner.setdefault((os.path.abspath(out.parent), name.casefold()), (src, out))
            if other != (src, out):
                raise OutputError(
                    f"{other[0]} and {src} would both write {out.parent / name}: rename one of them"
                )
    i, n = (0, 1) if config.pull else resolve_shard(config.shard if isinstance(config.shard, tuple) else None)
    jobs: list[Job] = []
    existing: list[Path] = []
    for src, out in everything[i::n]:  # round-robin over the sorted list: shards are disjoint
        size = len(os.fsencode(out.name))
        if size > NAME_MAX:  # this file fails alone; stat() of such a name would raise ENAMETOOLONG
            error = (f"{out}: output name is {size} bytes, longer than the {NAME_MAX}-byte limit of a "
                     "file name; shorten the input name or the suffix")
            jobs.append(Job(src, out, None, FileResult(str(src), str(out), "failed", error=error)))
            continue
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise OutputError(f"{out}: the output would replace its input; use another folder or a suffix")
        job = Job(src, out, file_identity(out), FileResult(str(src), str(out)))
        if job.planned is not None and not config.overwrite:
            if config.skip_existing:
                job.result.status, job.result.error = "skipped", "output exists"
            else:
                existing.append(out)
        jobs.append(job)
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]}: output exists{more}; use --skip-existing or --overwrite")
    return jobs


def orphaned_jobs(jobs: list[Job]) -> list[Job]:
    """Jobs skipped as claimed by another run whose output is still missing and whose claim is free
    now (that run died); reset to pending, to be run again."""
    orphans = []
    for job in jobs:
        if job.result.status != "skipped" or not (job.result.error or "").startswith("being written"):
            continue
        if job.output.exists():
            continue
        claim = try_claim(job.output)
        if claim is None:  # still held by a live run: it will finish the file
            continue
        claim.release()
        job.planned, job.result.status, job.result.error = None, "pending", None
        orphans.append(job)
    return orphans


@dataclass
class RunSummary:
    """The outcome of a run: one :class:`FileResult` per input of this shard, in processing order.

    ``stage_seconds``: how long each pipeline stage (read, compute, write, commit) was busy, summed
    over its threads; their total above ``seconds`` (the wall time) is the stages' overlap.
    ``warmup_seconds``: the one synthetic frame run on a GPU before the files (not in ``seconds``).
    """

    files: list[FileResult]
    seconds: float
    backend: str
    shard: tuple[int, int] = (0, 1)
    tile: int | None = None
    batch: int | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    warmup_seconds: float = 0.0

    def count(self, status: Status) -> int:
        """Number of files with ``status``."""
        return sum(f.status == status for f in self.files)

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return self.count("failed") == 0

    @property
    def megabytes_per_second(self) -> float:
        """Input megabytes of the denoised files per wall second."""
        return sum(f.bytes_in for f in self.files) / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        """One line: counts, seconds and throughput."""
        return (
            f"denoised {self.count('done')}, skipped {self.count('skipped')}, failed {self.count('failed')} "
            f"in {self.seconds:.1f} s ({self.megabytes_per_second:.1f} MB/s)"
            + (f" after a {self.warmup_seconds:.1f} s warm-up" if self.warmup_seconds >= 0.05 else "")
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": "cryodeploy-denoise-summary/1",
            "backend": self.backend,
            "shard": list(self.shard),
            "tile": self.tile,
            "batch": self.batch,
            "seconds": round(self.seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "files": [{**asdict(f), "seconds": round(f.seconds, 3)} for f in self.files],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the summary JSON atomically (under a claim, so a concurrent cleanup leaves it alone)."""
        from cryodeploy.files import atomic_write

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        claim = try_claim(target, blocking=True)
        assert claim is not None  # a blocking claim waits instead of giving up
        with claim, atomic_write(target) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target
