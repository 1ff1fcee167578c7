"""Choose the default model by held-out evaluation (never by training loss) and export it.

Reads OUTDIR/eval/<candidate>/real_dose20/metrics.json (real held-out regions, moderate dose)
and synth_dose20, keeps candidates never below the noisy input on any held-out item, and takes
the best mean PSNR on the real data. Writes OUTDIR/choice.json (every candidate's numbers) and
OUTDIR/default/ (checkpoint + model.onnx); prints the chosen name. Usage: ``python models/choose.py OUTDIR``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from cryodeploy.export.onnx import export_onnx


def _methods(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["methods"]  # type: ignore[no-any-return]


def main() -> None:
    out = Path(sys.argv[1])
    table: dict[str, dict[str, float | bool]] = {}
    for cand in sorted(p.name for p in (out / "eval").iterdir()):
        row: dict[str, float | bool] = {"never_below_identity": True}
        for kind in ("real_dose20", "synth_dose20"):
            m = _methods(out / "eval" / cand / kind / "metrics.json")
            for method in ("model", "identity", "gaussian"):
                row[f"{kind}_{method}_psnr"] = m[method]["psnr"]
            row[f"{kind}_model_corr"] = m["model"]["corr"]
            for item, ident in zip(m["model"]["per_item"], m["identity"]["per_item"], strict=True):
                if item["psnr"] < ident["psnr"]:
                    row["never_below_identity"] = False
        table[cand] = row
    ok = [k for k, v in table.items() if v["never_below_identity"]] or list(table)
    best = max(ok, key=lambda k: float(table[k]["real_dose20_model_psnr"]))
    (out / "choice.json").write_text(json.dumps({"chosen": best, "candidates": table}, indent=2) + "\n")
    dst = out / "default"
    dst.mkdir(exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(out / "runs" / best / f"best{suffix}", dst / f"best{suffix}")
    export_onnx(dst / "best.safetensors", dst / "model.onnx")
    print(best)


if __name__ == "__main__":
    main()
