"""Write synthetic tomograms (:mod:`cryodeploy.imaging.simulate.tomogram`) as MRC volumes: the exact
clean volume beside two independent noisy halves, and a RELION 5 style tomograms STAR naming them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryodeploy._version import __version__
from cryodeploy.errors import ConfigError, OutputError
from cryodeploy.files import atomic_write
from cryodeploy.imaging.simulate.tomoscene import TomoConfig
from cryodeploy.io.tomopairs import HALF_COLUMNS, TOMOGRAM_COLUMN
from cryodeploy.io.volumes import VolumeHeader, write_volume
from cryodeploy.progress import progress

__all__ = ["TOMO_SUBDIRS", "synth_tomograms"]

#: Sub-folders written by :func:`synth_tomograms`: the clean volume and the even and odd halves.
TOMO_SUBDIRS = ("clean", "even", "odd")
#: The STAR file beside them (rlnTomoName, the full = clean tomogram, the two halves).
STAR_NAME = "tomograms.star"


def _prepare(out: Path, overwrite: bool) -> None:
    old = sorted(p for sub in TOMO_SUBDIRS for p in (out / sub).glob("*.mrc"))
    if (out / "synth.json").exists() or old:
        if not overwrite:
            raise OutputError(f"{out}: already holds a dataset; choose another folder or use --overwrite")
        for p in old:
            if p.name.startswith("tomo_"):
                p.unlink()
    try:
        for sub in TOMO_SUBDIRS:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create output folders ({err.strerror or err})") from err


def _write_star(out: Path, names: list[str]) -> None:
    """A RELION 5 style ``global`` table, written as text so reruns give the same bytes."""
    columns = ("rlnTomoName", TOMOGRAM_COLUMN, *HALF_COLUMNS)
    lines = ["", "# version 50001", "", "data_global", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(columns, 1)]
    lines += [f"{n}\tclean/{n}.mrc\teven/{n}.mrc\todd/{n}.mrc" for n in names]
    with atomic_write(out / STAR_NAME) as tmp:
        tmp.write_text("\n".join(lines) + "\n\n")


def synth_tomograms(
    outdir: str | os.PathLike[str],
    config: TomoConfig,
    count: int = 1,
    device: str = "cpu",
    quiet: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``count`` tomograms to ``outdir/{clean,even,odd}/tomo_NNNN.mrc`` (voxel size kept in
    the headers, origin 0), ``outdir/tomograms.star`` (paths relative to ``outdir``; the clean
    volume as ``rlnTomoReconstructedTomogram``) and ``outdir/synth.json`` (the config and each
    tomogram's drawn scene). Tomogram ``i`` depends only on the config, ``i`` and the device.
    A folder holding a dataset is refused unless ``overwrite``. Returns the even paths."""
    import torch

    from cryodeploy.imaging.simulate.tomogram import simulate_tomogram

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"synth count is {count!r}, expected an integer >= 1")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"synth device {device!r} invalid ({err})") from err
    out = Path(outdir)
    _prepare(out, overwrite)
    vs = float(config.voxel_size)
    header = VolumeHeader(shape=config.shape, mode=2, voxel_size=(vs, vs, vs), origin=(0.0, 0.0, 0.0))
    evens, metas, names = [], [], []
    with progress(count, "synth", quiet) as task:
        for i in range(count):
            tomo = simulate_tomogram(config, i, dev)
            name = f"tomo_{i:04d}"
            label = f"cryodeploy synth --volume seed={config.seed} index={i} dose={config.dose:g}"
            for sub in TOMO_SUBDIRS:
                write_volume(
                    out / sub / f"{name}.mrc",
                    getattr(tomo, sub).cpu().numpy(),
                    header,
                    label=f"{label} {sub}",
                )
            evens.append(out / "even" / f"{name}.mrc")
            metas.append(tomo.meta)
            names.append(name)
            task.advance(1)
    _write_star(out, names)
    record = {
        "format": "cryodeploy-synth-tomo/1",
        "created_by": f"cryodeploy {__version__}",
        "device": str(dev),
        "config": config.to_dict(),
        "subdirs": list(TOMO_SUBDIRS),
        "tomograms": metas,
    }
    with atomic_write(out / "synth.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return evens
