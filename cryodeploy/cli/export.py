"""``cryodeploy export``: a checkpoint to ``OUTDIR/model.onnx`` (and optionally raw per-layer weights).

The steps run in pipeline order: ONNX first, then whatever is built from it.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--outdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write model.onnx into (created if missing); optional with --raw alone.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=17), help="ONNX opset.")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxslim (skipped if absent).")
@click.option("--raw", "raw_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write raw per-layer weights (conv{i}_weight.bin + layers.json) to DIR.")
@click.option("--trt", is_flag=True,
              help="Also build TensorRT engines from model.onnx into OUTDIR/engines (needs TensorRT, a GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "both"]), default=None,
              help="Engine precision with --trt [default: both]; fp16 must pass the 0.1 dB PSNR gate.")
@click.option("--shapes", default=None, metavar="MIN,OPT,MAX",
              help="Engine profile, BATCHxHEIGHTxWIDTH each [default: 1x256x256,4x1024x1024,8x2048x2048].")
@click.option("--workspace", type=click.IntRange(min=1), default=None,
              help="TensorRT builder workspace in MiB [default: 2048].")
@click.option("--allow-accuracy-loss", is_flag=True, help="Keep an fp16 engine that fails the accuracy gate.")
def export(
    checkpoint: Path, outdir: Path | None, opset: int, simplify: bool, raw_dir: Path | None, trt: bool,
    precision: str | None, shapes: str | None, workspace: int | None, allow_accuracy_loss: bool,
) -> None:
    """Export CHECKPOINT (a .safetensors file, its .json, or a run folder) to OUTDIR/model.onnx.

    With --raw DIR and no -o, only the raw per-layer weights are written.
    """
    from cryodeploy.backends.sources import load_source
    from cryodeploy.errors import OutputError
    from cryodeploy.export.onnx import export_onnx, onnx_metadata

    build = None
    if trt:  # checked before anything is written; without TensorRT this says how to install it
        from cryodeploy.backends.trt.cache import BuildConfig
        from cryodeploy.backends.trt.probe import require_tensorrt

        require_tensorrt()
    elif precision or shapes or workspace or allow_accuracy_loss:
        raise click.UsageError("--precision, --shapes, --workspace and --allow-accuracy-loss need --trt")
    if outdir is None:
        if raw_dir is None or trt or simplify:
            raise click.UsageError("-o/--outdir is required (only --raw DIR alone can go without it)")
        from cryodeploy.models.rawweights import export_raw

        click.echo(f"wrote raw weights {export_raw(checkpoint, raw_dir)}")
        return
    source = load_source(checkpoint)
    if trt:
        build = BuildConfig.from_options(precision or "both", shapes, workspace or 2048, allow_accuracy_loss,
                                         source.spec.stride, source.spec.ndim)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{outdir}: cannot create the output folder ({err.strerror or err})") from err
    onnx_path = export_onnx(source, outdir / "model.onnx", opset=opset, simplify=simplify)
    meta = onnx_metadata(onnx_path)
    click.echo(f"wrote {onnx_path} (opset {opset}, {meta['architecture']}, receptive radius "
               f"{meta['receptive_radius']} px, stride {meta['stride']})")
    click.echo(f"  verified: {meta['verified']}")
    if raw_dir is not None:
        from cryodeploy.models.rawweights import export_raw

        click.echo(f"wrote raw weights {export_raw(checkpoint, raw_dir)}")
    if build is not None:
        from cryodeploy.backends.trt.build import build_engines

        for record in build_engines(onnx_path, outdir / "engines", build):
            click.echo(record.describe())
