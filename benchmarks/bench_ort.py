"""ONNX Runtime vs eager PyTorch for CNN3 on one micrograph, and why ORT's CUDA provider is slower.

Run (GPU machine, onnxruntime-gpu on PYTHONPATH, see docs/benchmarks.md):
    python3 benchmarks/bench_ort.py --size 4096 --out $OUT/bench_ort.json
On a CPU-only machine it runs the CPU variants on a small image (default 512).

Every variant times the forward pass of one ``[1, 1, S, S]`` float32 micrograph already on the
device (ORT through IOBinding on torch-owned CUDA buffers: no copies), warm-up first (ORT's
EXHAUSTIVE cuDNN search happens on the first run of a shape), median of ``--repeats`` wall
times between ``torch.cuda.synchronize()`` calls. Parity: each output's max|a-b| / max|ref|
against eager PyTorch fp32 with TF32 off.

The variants test one hypothesis each for "ORT CUDA EP 22 ms vs eager PyTorch 10 ms":
- TF32: torch's cuDNN convolutions allow TF32 by default; cryodeploy's ORT turns it off.
  -> torch fp32 with TF32 on and off; ORT use_tf32 0 and 1.
- Layout: the torch backend runs channels_last (NHWC); ORT runs NCHW unless ``prefer_nhwc``.
  -> torch NCHW vs channels_last; ORT prefer_nhwc 0 and 1.
- Algorithm choice: ORT's cudnn_conv_algo_search EXHAUSTIVE / HEURISTIC / DEFAULT vs torch
  with cudnn.benchmark on/off.
- Graph optimization: at "extended" and above ORT fuses Conv+ReLU into FusedConv, which runs
  cudnnConvolutionBiasActivationForward (restricted algorithm choice) -> disable/basic/extended/all.
- cuDNN workspace: cudnn_conv_use_max_workspace 0 / 1.
- Copies: run_device (no host) vs Backend.run (pinned H2D + D2H per call) vs plain
  ``session.run`` on numpy arrays (ORT's own copies) -> the cost of skipping IOBinding.
- fp16 model (onnxconverter-common, fp32 I/O kept), NCHW and NHWC, vs torch autocast fp16 channels_last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy.backends import BackendOptions, availability, create_backend
from cryodeploy.files import file_sha256
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.models.source import ModelSource
from cryodeploy.verify.bench import device_label, median_wall_ms

#: (label, precision, tf32, extra) of the ORT variants on CUDA; the first is cryodeploy's default
CUDA_VARIANTS: list[tuple[str, str, bool, dict[str, Any]]] = [
    ("fp32 HEURISTIC opt=all NCHW tf32=0 (default)", "fp32", False, {}),
    ("fp32 EXHAUSTIVE (ORT's own default)", "fp32", False, {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
    ("fp32 DEFAULT", "fp32", False, {"cudnn_conv_algo_search": "DEFAULT"}),
    ("fp32 opt=disable", "fp32", False, {"graph_optimization": "disable"}),
    ("fp32 opt=basic (no Conv+ReLU fusion)", "fp32", False, {"graph_optimization": "basic"}),
    ("fp32 opt=extended", "fp32", False, {"graph_optimization": "extended"}),
    ("fp32 max_workspace=0", "fp32", False, {"cudnn_conv_use_max_workspace": False}),
    ("fp32 NHWC", "fp32", False, {"prefer_nhwc": True}),
    ("fp32 tf32=1", "fp32", True, {}),
    ("fp32 tf32=1 NHWC", "fp32", True, {"prefer_nhwc": True}),
    ("fp32 tf32=1 NHWC opt=basic", "fp32", True, {"prefer_nhwc": True, "graph_optimization": "basic"}),
    ("fp16", "fp16", False, {}),
    ("fp16 NHWC", "fp16", False, {"prefer_nhwc": True}),
    ("fp16 NHWC opt=basic", "fp16", False, {"prefer_nhwc": True, "graph_optimization": "basic"}),
]
CPU_VARIANTS: list[tuple[str, str, bool, dict[str, Any]]] = [
    ("fp32 opt=all (default)", "fp32", False, {}),
    ("fp32 opt=disable", "fp32", False, {"graph_optimization": "disable"}),
    ("fp32 opt=basic", "fp32", False, {"graph_optimization": "basic"}),
    ("fp32 opt=extended", "fp32", False, {"graph_optimization": "extended"}),
]


def rel_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64."""
    a = torch.as_tensor(out).double().cpu()
    b = ref.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def torch_variants(
    model: torch.nn.Module, x: torch.Tensor, repeats: int
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Eager PyTorch rows; returns them and the fp32 TF32-off output (the parity reference).

    On the CPU only the layouts are compared (TF32, cuDNN and fp16 autocast are CUDA matters)."""
    cuda = x.is_cuda
    nchw = model
    nhwc = build_model(ModelSpec("cnn3")).to(x.device).eval()
    nhwc.load_state_dict(model.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    configs = [  # label, module, input, tf32, cudnn.benchmark, autocast dtype
        ("fp32 NCHW tf32=0", nchw, x, False, False, None),
        ("fp32 NCHW tf32=0 cudnn.benchmark", nchw, x, False, True, None),
        ("fp32 NCHW tf32=1 (torch's default)", nchw, x, True, False, None),
        ("fp32 channels_last tf32=0", nhwc, x_nhwc, False, False, None),
        ("fp32 channels_last tf32=1", nhwc, x_nhwc, True, False, None),
        ("fp16 autocast channels_last", nhwc, x_nhwc, False, False, torch.float16),
    ]
    rows, ref = [], None
    for label, module, inp, tf32, bench, dtype in configs:
        if (dtype is not None or tf32 or bench) and not cuda:
            continue

        def fwd(module: torch.nn.Module = module, inp: torch.Tensor = inp, dtype: Any = dtype) -> Any:
            with torch.autocast(inp.device.type, dtype=dtype, enabled=dtype is not None):
                return module(inp)

        flags = torch.backends.cudnn.flags(enabled=True, benchmark=bench, allow_tf32=tf32)
        with torch.inference_mode(), flags:
            ms = median_wall_ms(fwd, repeats, cuda=cuda)
            out = fwd().float()
        if ref is None:
            ref = out.clone()
        rows.append({"engine": "torch eager", "config": label, "ms": ms, "rel_error": rel_error(out, ref)})
    assert ref is not None
    return rows, ref


def ort_variants(source: ModelSource, x: torch.Tensor, ref: torch.Tensor, device: str, repeats: int,
                 threads: int) -> list[dict[str, Any]]:
    """ONNX Runtime rows (skipped with the reason where a variant is unavailable)."""
    cuda = device.startswith("cuda")
    rows: list[dict[str, Any]] = []
    for label, precision, tf32, extra in CUDA_VARIANTS if cuda else CPU_VARIANTS:
        opts = BackendOptions(device=device, precision=precision, tf32=tf32, threads=threads,
                              extra=tuple(extra.items()))
        ok, reason = availability("ort", opts)
        if not ok:
            rows.append({"engine": "ort", "config": label, "ms": None, "note": reason})
            continue
        with create_backend("ort", source, opts) as backend:
            if cuda:
                ms = median_wall_ms(functools.partial(backend.run_device, x), repeats, cuda=cuda)
                out = backend.run_device(x)
            else:
                host = x.numpy()
                ms = median_wall_ms(functools.partial(backend.run, host), repeats, cuda=cuda)
                out = torch.from_numpy(backend.run(host))
            rows.append({"engine": "ort", "config": label, "ms": ms, "rel_error": rel_error(out, ref)})
            if cuda and label.endswith("(default)"):
                rows += _copy_variants(backend, x, ref, repeats)
    return rows


def _copy_variants(backend: Any, x: torch.Tensor, ref: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """The default session with host copies: Backend.run (pinned staging) and plain session.run (numpy)."""
    host = x.cpu().numpy()
    session = backend.session
    rows = []
    ms = median_wall_ms(lambda: backend.run(host), repeats, cuda=True)
    rows.append({"engine": "ort", "config": "fp32 default, host in/out via pinned staging (Backend.run)",
                 "ms": ms, "rel_error": rel_error(backend.run(host), ref)})
    ms = median_wall_ms(lambda: session.run(["output"], {"input": host}), repeats, cuda=True)
    out = session.run(["output"], {"input": host})[0]
    rows.append({"engine": "ort", "config": "fp32 default, session.run on numpy (no IOBinding)", "ms": ms,
                 "rel_error": rel_error(out, ref)})
    return rows


def main() -> None:
    """Run every variant and print design.md benchmark rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=None, help="image side (default 4096 on CUDA, 512 on CPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT/torch CPU threads (0: default)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if availability("ort", BackendOptions(device="cuda"))[0] else "cpu"
    size = args.size or (4096 if device.startswith("cuda") else 512)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = ModelSpec("cnn3")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CRYODEPLOY_CACHE", str(Path(tmp) / "cache"))
        ckpt = save_checkpoint(Path(tmp) / "cnn3.safetensors", build_model(spec), spec)
        source = ModelSource("checkpoint", ckpt, spec, file_sha256(ckpt))
        model = source.torch_module().to(device).eval()
        x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        rows, ref = torch_variants(model, x, args.repeats)
        rows += ort_variants(source, x, ref, device, args.repeats, args.threads)
    base = rows[0]["ms"]
    today, dev = datetime.date.today().isoformat(), device_label(device)
    print("| date | device | what | config | value | unit | baseline (same run) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        what = f"CNN3 forward {size}², {r['engine']}"
        if r["ms"] is None:
            print(f"| {today} | {dev} | {what} | {r['config']} | n/a | ms | | {r['note']} |")
            continue
        config = f"{r['config']}; rel err vs fp32 tf32=0: {r['rel_error']:.2g}"
        print(f"| {today} | {dev} | {what} | {config} | {r['ms']:.2f} | ms | "
              f"eager fp32 NCHW tf32=0 {base:.2f} ms | {base / r['ms']:.2f}× |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": today, "device": dev, "size": size, "rows": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
