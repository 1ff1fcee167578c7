"""Split-gain table of a model beside identity, the mean, the best Gaussian and other tools' outputs.

Runs ``cryodeploy evaluate --split`` (the library call) on MRC files and prints a markdown table:
mean split gain (dB) and per micrograph, signal error per band relative to identity, change to
the input, residual spread (patchwork) and red flags. Other tools' outputs come as folders of
the same halves (``--compare topaz=DIR``): run once with ``--write-halves H``, denoise ``H/*.mrc``
with the other tool into DIR (same file names), then run again with ``--compare``.

Usage (GPU machine; mrcfile/starfile carried in /tmp/site)::

    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/split_eval.py --model default --device cuda \
        --write-halves $OUT/halves /path/to/micrographs/*.mrc
    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/split_eval.py --model default --device cuda \
        --compare topaz-unet=$OUT/topaz_unet /path/to/micrographs/*.mrc

Writes ``$OUT/split_eval/`` (metrics.json, index.html, split_eval.md). ``--restack`` first rewrites
3-D files (e.g. particle stacks written with space group 1) as image stacks under ``$OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _restack(inputs: list[str], folder: Path) -> list[str]:
    import mrcfile
    import numpy as np

    from cryodeploy.io.mrc import MicrographHeader, write_micrograph

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in inputs:
        with mrcfile.open(name, permissive=True) as mrc:
            data, vs = np.asarray(mrc.data, np.float32), float(mrc.voxel_size.x)
        if data.ndim == 3:
            target = folder / (Path(name).stem + ".mrcs")
            write_micrograph(target, data, MicrographHeader(data.shape, 2, (vs,) * 3, (0.0, 0.0, 0.0)))
            name = str(target)
        out.append(name)
    return out


def _fmt(v: Any, f: str = "{:.2f}") -> str:
    return "n/a" if v is None else f.format(v)


def table(result: dict[str, Any]) -> str:
    """The markdown table of ``result`` (an evaluation's metrics dict)."""
    bands = result["bands"]["names"]
    items = [r["name"] for r in result["methods"]["identity"]["per_item"]]
    flags: dict[str, list[str]] = {}
    for f in result["red_flags"]:
        flags.setdefault(f["method"], []).append(f["check"])
    head = (["method", "split gain (dB) ± sd", *[f"{n}" for n in items[:8]], *[f"E {b}" for b in bands],
             "change", "residual spread", "red flags"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["methods"].items():
        label = f"gaussian (sigma {m['sigma']:g})" if name == "gaussian" else name
        gain = _fmt(m["split_gain_db"]) + (f" ± {m['split_gain_sd_db']:.2f}" if m["split_gain_sd_db"] else "")
        row = [label, gain, *[_fmt(r["split_gain_db"]) for r in m["per_item"][:8]],
               *[_fmt(v, "{:.3f}") for v in m["band_error"]], _fmt(m["change"], "{:.3f}"),
               _fmt(m["residual_spread"], "{:.3f}"), ", ".join(flags.get(name, [])) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    from cryodeploy.evaluation.evaluate import EvalConfig, SplitData, evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="MRC micrographs or stacks")
    p.add_argument("--model", default="default")
    p.add_argument("--split", default="auto", choices=["auto", "thin", "diagonal"])
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--write-halves", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restack", action="store_true")
    a = p.parse_args()
    out = Path(os.environ.get("OUT", "."))
    inputs = _restack(a.inputs, out / "restacked") if a.restack else a.inputs
    compare = tuple((n, Path(d)) for n, _, d in (c.partition("=") for c in a.compare))
    config = EvalConfig(compare=compare, device=a.device, backend=a.backend, seed=a.seed, quiet=True)
    result = evaluate(a.model, SplitData(tuple(inputs), a.split, a.write_halves), out / "split_eval", config)
    kinds = ", ".join(result["split_kinds"])
    text = (f"split evaluation of {a.model} on {result['n_items']} images ({kinds}); "
            f"E per band relative to identity\n\n{table(result)}\n")
    print(text)
    (out / "split_eval" / "split_eval.md").write_text(text)
    print(json.dumps({k: {"split_gain_db": m["split_gain_db"]} for k, m in result["methods"].items()}))


if __name__ == "__main__":
    main()
