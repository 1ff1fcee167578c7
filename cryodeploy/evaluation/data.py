"""What an evaluation runs on: the data (:class:`PairsData`, :class:`StoreData`,
:class:`HalvesData`), its options (:class:`EvalConfig`), the items read from the data and the
methods (models, baselines, other tools' output folders) that denoise them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError
from cryodeploy.imaging import metrics as M

__all__ = [
    "EvalConfig", "EvalData", "HalvesData", "Item", "Method", "PairedSource", "PairsData", "SplitData",
    "StoreData", "VolumeSplitData",
    "build_methods", "check_outputs", "matched_files", "micrograph_files", "micrograph_items", "model_info",
    "read_frame",
    "voxel_size",
]


@dataclass(frozen=True)
class PairsData:
    """Noisy micrographs in ``noisy_dir`` with clean targets of the same file names in ``clean_dir``."""

    noisy_dir: Path
    clean_dir: Path


@dataclass(frozen=True)
class StoreData:
    """Patches of ``split`` of the patch store at ``store`` (the split must have targets)."""

    store: Path
    split: str = "test"


@dataclass(frozen=True)
class HalvesData:
    """Micrographs without a clean target: ``inputs`` (files, globs, folders, STAR files) are split
    into diagonal halves; ``half_pairs`` = two folders of independent halves (e.g. even/odd frame
    sums) matched by file name."""

    inputs: tuple[str, ...] = ()
    half_pairs: tuple[Path, Path] | None = None


@dataclass(frozen=True)
class SplitData:
    """Micrographs without a clean target, each split into two independent halves: ``split`` is
    auto, thin (binomial thinning of counts) or diagonal; ``write_halves`` = a folder to write the
    halves into (for other tools to denoise)."""

    inputs: tuple[str, ...] = ()
    split: str = "auto"
    write_halves: Path | None = None

    def __post_init__(self) -> None:
        if self.split not in ("auto", "thin", "diagonal"):
            raise ConfigError(f"split is {self.split!r}, expected auto, thin or diagonal")


@dataclass(frozen=True)
class VolumeSplitData:
    """Tomograms without (or with) a clean target, scored on two independent halves each: ``inputs``
    (files, globs, folders, RELION 5 tomograms STAR files), paired by name with ``even_odd``, and/or
    ``half_pairs`` = two folders of even and odd halves of the same file names. ``split``: auto
    (even/odd where given, else binomial thinning of integer counts) or thin. ``clean``: a folder of
    exact clean volumes named as the even halves (or ``NAME.mrc``); ``write_halves``: a folder to write
    the halves into (for other tools to denoise)."""

    inputs: tuple[str, ...] = ()
    even_odd: bool = False
    half_pairs: tuple[Path, Path] | None = None
    split: str = "auto"
    clean: Path | None = None
    write_halves: Path | None = None

    def __post_init__(self) -> None:
        if self.split not in ("auto", "thin"):
            raise ConfigError(f"split is {self.split!r}, expected auto or thin for tomograms")
        if not self.inputs and self.half_pairs is None:
            raise ConfigError("found no tomograms, expected inputs or half_pairs (EVEN_DIR, ODD_DIR)")
        if self.even_odd and not self.inputs:
            raise ConfigError("even_odd pairs inputs by name, but no inputs are given")


EvalData = PairsData | StoreData | HalvesData | SplitData | VolumeSplitData


@dataclass(frozen=True)
class EvalConfig:
    """Options of :func:`evaluate`.

    ``compare`` maps a tool name to a folder of its denoised files (matched by file name);
    ``mean_shift_tolerance`` flags ``|mean(pred) - mean(target)| > tol * std(target)``;
    ``limit`` evaluates only the first items; ``seed`` fixes the pixel subsample of the plots.
    """

    model_b: str | None = None
    compare: tuple[tuple[str, Path], ...] = ()
    train_log: Path | None = None
    device: str = "auto"
    backend: str = "auto"
    val_fraction: float = 0.2
    sigmas: tuple[float, ...] = M.DEFAULT_SIGMAS
    mean_shift_tolerance: float = 0.1
    limit: int | None = None
    crop: int = 128
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction <= 1:
            raise ConfigError(f"val_fraction is {self.val_fraction}, expected 0 < fraction <= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit is {self.limit}, expected >= 1")
        if self.crop < 16:
            raise ConfigError(f"crop is {self.crop}, expected >= 16 px")
        taken = {"identity", "gaussian", "constant", "clean", "noisy", "model", "model-b"}
        for name, folder in self.compare:
            if name in taken or not name:
                raise ConfigError(f"--compare name {name!r} is empty or taken, expected a new name")
            taken.add(name)
            if not Path(folder).is_dir():
                raise ConfigError(f"--compare {name}={folder}: no such folder")


@dataclass(frozen=True)
class Item:
    """One evaluated image: ``key`` (file name) and ``frame`` locate it in other folders."""

    name: str
    noisy: np.ndarray
    clean: np.ndarray | None
    key: str = ""
    frame: int | None = None
    voxel_size: float | None = None


@dataclass(frozen=True)
class Method:
    """A way to produce a denoised image: ``run`` maps an array to its denoised array (models and
    baselines); ``folder`` holds precomputed outputs of another tool, matched by file name;
    ``label`` says what runs it, for the report."""

    name: str
    run: Callable[[np.ndarray], np.ndarray] | None = None
    folder: Path | None = None
    label: str = ""

    def apply(self, item: Item) -> np.ndarray:
        """The denoised version of ``item.noisy``."""
        if self.run is not None:
            out = self.run(item.noisy)
        else:
            out = read_frame(Path(str(self.folder)) / item.key, item.frame)
        if out.shape != item.noisy.shape:
            raise InputError(f"{self.name} output for {item.name}: found shape {out.shape}, "
                             f"expected {item.noisy.shape}")
        return np.asarray(out, dtype=np.float32)


def read_frame(path: Path, frame: int | None) -> np.ndarray:
    """A 2-D image of an MRC file (frame ``frame`` of a stack)."""
    from cryodeploy.io.mrc import read_micrograph

    if not path.is_file():
        raise InputError(f"{path}: no such file (expected an output matched by file name)")
    data = read_micrograph(path, min_size=8).data
    if frame is None:
        if data.ndim != 2:
            raise InputError(f"{path}: found a stack {data.shape}, expected a 2-D image")
        return data
    if data.ndim != 3 or frame >= data.shape[0]:
        raise InputError(f"{path}: found shape {data.shape}, expected a stack with frame {frame}")
    return data[frame]


def micrograph_items(paths: list[Path], limit: int | None) -> Iterator[tuple[Item, str]]:
    """The frames of ``paths`` (the first ``limit``), read one file at a time, each with where it
    came from (``path`` or ``path[frame]``)."""
    from cryodeploy.io.mrc import read_micrograph

    n = 0
    for path in paths:
        mic = read_micrograph(path)
        vs = voxel_size(path)
        stack = mic.data.ndim == 3
        for f, frame in enumerate(mic.frames()):
            if n == limit:
                return
            yield (Item(f"{path.name}[{f}]" if stack else path.name, frame, None, key=path.name,
                        frame=f if stack else None, voxel_size=vs), f"{path}[{f}]" if stack else str(path))
            n += 1


def voxel_size(path: Path) -> float | None:
    """The MRC voxel size (Angstrom/px), or None when unset."""
    from cryodeploy.io.mrc import read_header

    vs = read_header(path).voxel_size[0]
    return float(vs) if vs > 0 else None


def micrograph_files(folder: Path) -> list[Path]:
    """The .mrc/.mrcs files of ``folder``, sorted by name."""
    from cryodeploy.io.inputs import MICROGRAPH_SUFFIXES

    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MICROGRAPH_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: found no .mrc/.mrcs files, expected micrographs")
    return files


def matched_files(first: Path, second: Path) -> list[tuple[Path, Path]]:
    """Pairs of same-named micrographs in two folders; every file of ``first`` must be in ``second``."""
    files = micrograph_files(first)
    missing = [p.name for p in files if not (second / p.name).is_file()]
    if missing:
        raise InputError(f"{second}: found no file for {len(missing)} of {len(files)} micrographs of "
                         f"{first} (first: {missing[0]}), expected the same file names")
    return [(p, second / p.name) for p in files]


class PairedSource:
    """Items with targets: ``count`` and a fresh iterator per pass."""

    def __init__(self, data: PairsData | StoreData, limit: int | None) -> None:
        self.data = data
        if isinstance(data, PairsData):
            from cryodeploy.io.mrc import read_header

            self.pairs = matched_files(Path(data.noisy_dir), Path(data.clean_dir))
            self.frames = [read_header(p).n_frames for p, _ in self.pairs]
            total = sum(self.frames)
            self.voxel_size = voxel_size(self.pairs[0][0])
        else:
            from cryodeploy.errors import StoreError
            from cryodeploy.training.store import PatchStore

            self.store = PatchStore(data.store)
            if not self.store.has_target(data.split):
                raise StoreError(f"{data.store}: split {data.split!r} has no targets, expected input/target "
                                 "pairs (use --halves for data without a clean target)")
            total = self.store.count(data.split)
            self.voxel_size = None
        if total < 1:
            raise InputError(f"{self._where()}: found no items to evaluate")
        self.count = min(total, limit) if limit else total

    def _where(self) -> str:
        d = self.data
        return str(d.noisy_dir) if isinstance(d, PairsData) else f"{d.store} split {d.split}"

    def describe(self) -> dict[str, Any]:
        d = self.data
        if isinstance(d, PairsData):
            return {"kind": "pairs", "noisy": str(d.noisy_dir), "clean": str(d.clean_dir),
                    "items": self.count}
        return {"kind": "store", "store": str(d.store), "split": d.split, "items": self.count}

    def items(self) -> Iterator[Item]:
        n = 0
        if isinstance(self.data, StoreData):
            split = self.data.split
            for start in range(0, self.count, 32):
                idx = np.arange(start, min(start + 32, self.count))
                inputs = self.store.read(split, idx, "input")
                targets = self.store.read(split, idx, "target")
                for i, x, y in zip(idx, inputs, targets, strict=True):
                    yield Item(f"{split}[{i}]", x, y)
            return
        from cryodeploy.io.mrc import read_micrograph

        for (noisy_path, clean_path), frames in zip(self.pairs, self.frames, strict=True):
            noisy, clean = read_micrograph(noisy_path).data, read_micrograph(clean_path).data
            if noisy.shape != clean.shape:
                raise InputError(f"{clean_path}: found shape {clean.shape}, expected {noisy.shape} "
                                 f"as {noisy_path}")
            for f in range(frames):
                if n == self.count:
                    return
                stack = noisy.ndim == 3
                yield Item(f"{noisy_path.name}[{f}]" if stack else noisy_path.name,
                           noisy[f] if stack else noisy, clean[f] if stack else clean,
                           key=noisy_path.name, frame=f if stack else None, voxel_size=self.voxel_size)
                n += 1


def _model_method(name: str, model: str, config: EvalConfig, normalized: bool, stack: ExitStack) -> Method:
    """The model through :class:`~cryodeploy.inference.denoiser.Denoiser` (normalize, tiled forward,
    denormalize), or, for already-normalized patches, its backend's forward pass alone."""
    from cryodeploy.inference.denoiser import Denoiser

    d = stack.enter_context(Denoiser.load(model, device=config.device, backend=config.backend))
    if not normalized:
        return Method(name, lambda x: np.asarray(d(x), dtype=np.float32),
                      label=f"Denoiser on {d.backend.label}")
    contract = d.spec.contract

    def forward(x: np.ndarray) -> np.ndarray:
        xp = contract.pad(np.ascontiguousarray(x, dtype=np.float32))
        return contract.crop(d.backend.run(xp[None, None])[0, 0], x.shape)

    return Method(name, forward, label=f"{d.backend.label} forward pass on normalized patches")


def check_outputs(methods: list[Method], names: list[str], what: str = "micrographs",
                  expected: str = "the same file names") -> None:
    """Every output folder among ``methods`` must hold a file for each of ``names`` (``what`` they
    are and ``expected`` name the files in the error)."""
    for m in methods:
        if m.folder is None:
            continue
        missing = [n for n in names if not (m.folder / n).is_file()]
        if missing:
            raise InputError(f"{m.folder}: found no {m.name} output for {len(missing)} of {len(names)} "
                             f"{what} (first: {missing[0]}), expected {expected}")


def model_info(model: str) -> dict[str, Any]:
    """Path, kind, architecture and sha256 of a model, for the report."""
    from cryodeploy.backends.sources import load_source

    s = load_source(model)
    return {"path": str(s.path), "kind": s.kind, "architecture": s.spec.architecture, "ndim": s.spec.ndim,
            "sha256": s.sha256}


def build_methods(model: str, config: EvalConfig, normalized: bool, stack: ExitStack) -> list[Method]:
    """The model, the optional second model and the ``compare`` folders as :class:`Method`s;
    ``stack`` closes the loaded models."""
    methods = [_model_method("model", model, config, normalized, stack)]
    if config.model_b:
        methods.append(_model_method("model-b", config.model_b, config, normalized, stack))
    if config.compare and normalized:
        raise ConfigError("--compare needs file data (--pairs, --halves or --split), not patch store data")
    methods += [Method(name, folder=Path(folder)) for name, folder in config.compare]
    return methods
