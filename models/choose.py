"""Choose the default model by held-out evaluation (never by training loss) and export it.

Reads OUTDIR/eval/<candidate>/real_dose20/metrics.json (moderate dose, real held-out regions),
keeps candidates never below the noisy input on any held-out item at any dose, and takes the
best mean PSNR. Writes OUTDIR/choice.json (every candidate's numbers) and OUTDIR/default/
(checkpoint + model.onnx). Usage: ``python models/choose.py OUTDIR``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from cryodeploy.export.onnx import export_onnx


def _m(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())["methods"]  # type: ignore[no-any-return]


def main() -> None:
    out = Path(sys.argv[1])
    table: dict[str, dict[str, float | bool]] = {}
    for cand in sorted(p.name for p in (out / "eval").iterdir()):
        row: dict[str, float | bool] = {"never_below_identity": True}
        for d in (10, 20, 40):
            m = _m(out / "eval" / cand / f"real_dose{d}" / "metrics.json")
            row[f"psnr_dose{d}"] = m["model"]["psnr"]
            row[f"identity_dose{d}"] = m["identity"]["psnr"]
            row[f"gaussian_dose{d}"] = m["gaussian"]["psnr"]
            row[f"corr_dose{d}"] = m["model"]["corr"]
            for item, ident in zip(m["model"]["per_item"], m["identity"]["per_item"], strict=True):
                if item["psnr"] < ident["psnr"]:
                    row["never_below_identity"] = False
        s = _m(out / "eval" / cand / "synth" / "metrics.json")
        row["psnr_synth"] = s["model"]["psnr"]
        row["identity_synth"] = s["identity"]["psnr"]
        row["gaussian_synth"] = s["gaussian"]["psnr"]
        table[cand] = row
    ok = {k: v for k, v in table.items() if v["never_below_identity"]}
    best = max(ok or table, key=lambda k: float(table[k]["psnr_dose20"]))
    (out / "choice.json").write_text(json.dumps({"chosen": best, "candidates": table}, indent=2) + "\n")
    dst = out / "default"
    dst.mkdir(exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(out / "runs" / best / f"best{suffix}", dst / f"best{suffix}")
    export_onnx(dst / "best.safetensors", dst / "model.onnx")
    print(json.dumps({"chosen": best, "candidates": table}, indent=2))


if __name__ == "__main__":
    main()
