"""ONNX export: a checkpoint becomes ``model.onnx`` that carries everything needed to use it.

The graph takes ``input`` ``[batch, 1, height, width]`` float32 (normalized micrograph tiles;
height and width multiples of the model's stride; a volume model's ``[batch, 1, depth, height,
width]``) and returns ``output`` of the same shape; batch and every side are dynamic.
``metadata_props`` hold the architecture, its parameters, receptive radius, stride,
normalization, the source checkpoint's sha256, the cryodeploy version, and the full
:class:`~cryodeploy.models.ModelSpec` as JSON under ``model_spec``, so :func:`read_onnx_spec`
rebuilds the spec without the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import ConfigError, CryoDeployError, ModelError, first_line
from cryodeploy.files import cache_root
from cryodeploy.models import ModelSpec

if TYPE_CHECKING:
    import onnx
    import torch

    from cryodeploy.models.source import ModelSource

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "SPEC_KEY",
    "VERIFY_RTOL",
    "cached_onnx",
    "check_against_torch",
    "check_graph",
    "convert_fp16",
    "export_onnx",
    "onnx_metadata",
    "read_onnx_spec",
    "usable_cache_entry",
    "verify_shape",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: metadata key holding the full ModelSpec JSON (written last, so a cut-off file loses it)
SPEC_KEY = "model_spec"
#: the dynamic axes of the input and output, by the model's spatial dimensions
_AXES = {2: {0: "batch", 2: "height", 3: "width"}, 3: {0: "batch", 2: "depth", 3: "height", 4: "width"}}
_LAYOUTS = {2: "NCHW float32 [batch,1,height,width], normalized; height and width multiples of stride",
            3: "NCDHW float32 [batch,1,depth,height,width], normalized; depth, height and width multiples "
               "of stride"}
#: an export must reproduce PyTorch to this relative error (max|a-b| / max|b|) on a random input
VERIFY_RTOL = 1e-5

def _exportable(src: ModelSource) -> ModelSource:
    if src.kind not in ("checkpoint", "raw"):
        raise ModelError(
            f"{src.path}: found an {src.kind} model, expected a checkpoint or raw weight folder to export"
        )
    return src


def _example_input(spec: ModelSpec) -> torch.Tensor:
    import torch

    step = max(spec.stride, 16)
    return torch.zeros(1, 1, *(2 * step,) * (spec.ndim - 2), 3 * step, 2 * step)


def _torch_export(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import torch

    with warnings.catch_warnings():
        # the TorchScript exporter announces its own deprecation on every call; the torch.export
        # one also works (verified on torch 2.13) but takes ~4 s and only writes opset >= 18 natively
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        dims = _AXES[example.dim() - 2]
        axes = {INPUT_NAME: dims, OUTPUT_NAME: dims}
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
        )


def _metadata(src: ModelSource, verified: str) -> dict[str, str]:
    spec = src.spec
    return {
        "architecture": spec.architecture,
        "params": json.dumps(spec.params, sort_keys=True),
        "receptive_radius": str(spec.receptive_radius),
        "stride": str(spec.stride),
        "normalization": json.dumps(spec.normalization.to_dict(), sort_keys=True),
        "source_kind": src.kind,
        "source_sha256": src.sha256,
        "cryodeploy_version": __version__,
        "precision": "fp32",
        "layout": _LAYOUTS[spec.ndim],
        "verified": verified,
        SPEC_KEY: json.dumps(spec.to_dict(), sort_keys=True),
    }


def _set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        log.warning("--simplify skipped: onnxslim is not installed (pip install 'cryodeploy[onnx]')")
        return model
    return onnxslim.slim(model)


def _check(model: onnx.ModelProto, where: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"{where}: exported graph fails onnx.checker ({str(err).splitlines()[0]})") from err


def verify_shape(spec: ModelSpec) -> tuple[int, ...]:
    """The random input used to verify an export: batch 2, non-square, odd sides unless the stride
    forbids (volumes: 23 x 37 x 29 before rounding up to the stride)."""
    s = spec.stride
    sides = (67, 45) if spec.ndim == 2 else (23, 37, 29)
    return (2, 1, *(-(-n // s) * s for n in sides))


def _verify(graph: onnx.ModelProto, module: torch.nn.Module, spec: ModelSpec, where: Path) -> str:
    try:
        import onnxruntime
    except ImportError:
        return "no (onnxruntime not installed)"
    import torch

    shape = verify_shape(spec)
    err = check_against_torch(graph.SerializeToString(), module, shape, np.random.default_rng(0))
    if not err <= VERIFY_RTOL:
        raise ModelError(
            f"{where}: exported graph disagrees with PyTorch, found relative error {err:.3g} on a random "
            f"{'x'.join(map(str, shape))} input, expected <= {VERIFY_RTOL:g}"
        )
    return (f"onnxruntime {onnxruntime.__version__} CPU vs torch {torch.__version__} fp32: "
            f"relative error {err:.3g} on random input {'x'.join(map(str, shape))}")


def export_onnx(
    source: ModelSource,
    out_path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
) -> Path:
    """Export a loaded checkpoint or raw-weight source to ONNX at ``out_path``.

    The file is written atomically and passes ``onnx.checker.check_model(full_check=True)``.
    Where onnxruntime is installed the graph is first run on a random input and compared with
    PyTorch (relative error <= 1e-5, see :func:`check_against_torch`); the outcome is stored in
    the ``verified`` metadata. Raises :class:`ModelError` for a model that cannot be loaded,
    exported or verified, :class:`ConfigError` for an unsupported opset.
    """
    import onnx

    from cryodeploy.files import atomic_write

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset {opset} unsupported, expected {MIN_OPSET}..{newest}")
    src = _exportable(source)
    module = src.torch_module().float().eval()
    out = Path(out_path)
    with atomic_write(out) as tmp:
        try:
            _torch_export(module, _example_input(src.spec), tmp, opset)
        except CryoDeployError:
            raise
        except Exception as err:  # torch raises many unrelated types; the user needs one line
            first = first_line(err)
            raise ModelError(f"{src.path}: torch.onnx.export failed ({type(err).__name__}: {first})") from err
        graph = onnx.load(str(tmp))
        if simplify:
            graph = _simplify(graph)
        graph.producer_name, graph.producer_version = "cryodeploy", __version__
        graph.doc_string = f"cryodeploy {src.spec.architecture} denoiser exported from {src.path.name}"
        verified = _verify(graph, module, src.spec, out)
        _set_metadata(graph, _metadata(src, verified))
        _check(graph, out)
        onnx.save(graph, str(tmp))
    log.info("exported %s to %s (opset %d)", src.path, out, opset)
    return out


#: operators a denoiser never needs and that can run unbounded (control flow, sequences, randomness
#: aside): a graph holding one is refused before a session runs it
_REFUSED_OPS = frozenset({"Loop", "Scan", "If", "SequenceMap", "ConcatFromSequence", "SplitToSequence",
                          "SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase",
                          "SequenceLength", "SequenceEmpty"})
#: operators whose output size (or repeat count) is the product of a constant input: its index
_SIZED_OPS = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1}
#: most nodes, weight bytes and elements of one constant-sized tensor a denoiser graph may hold
MAX_NODES = 20_000
MAX_WEIGHT_BYTES = 1 << 30
MAX_CONSTANT_ELEMENTS = 1 << 28


def check_graph(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Refuse, statically, a graph a denoiser never is: control flow, foreign operator domains,
    absurd node counts or weights, a constant-shaped tensor of more than MAX_CONSTANT_ELEMENTS."""
    from onnx import numpy_helper

    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    if len(nodes) > MAX_NODES:
        raise ModelError(f"{path}: graph has {len(nodes)} nodes, expected at most {MAX_NODES} for a denoiser")
    weights = sum(len(t.raw_data) or 4 * int(np.prod(t.dims)) for t in model.graph.initializer)
    if weights > MAX_WEIGHT_BYTES:
        raise ModelError(f"{path}: graph holds {weights} bytes of weights, "
                         f"expected at most {MAX_WEIGHT_BYTES}")
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = node.attribute[0].t
    for node in nodes:
        if node.op_type in _REFUSED_OPS or node.domain not in ("", "ai.onnx"):
            kind = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise ModelError(f"{path}: graph holds a {kind} node ({node.name or node.output[0]}), which a "
                             "denoiser never needs; refusing to run it")
        inputs = [constants.get(name) for name in node.input]
        if node.op_type in _SIZED_OPS and len(inputs) > _SIZED_OPS[node.op_type]:
            shape = inputs[_SIZED_OPS[node.op_type]]
            count = -1.0 if shape is None else float(np.prod(numpy_helper.to_array(shape).astype(np.float64)))
        elif node.op_type == "Range" and len(inputs) == 3 and all(t is not None for t in inputs):
            start, limit, delta = (float(numpy_helper.to_array(t)) for t in inputs)  # type: ignore[arg-type]
            count = abs((limit - start) / delta) if delta else float("inf")
        else:
            continue
        if count > MAX_CONSTANT_ELEMENTS:
            raise ModelError(f"{path}: {node.op_type} node ({node.name or node.output[0]}) makes "
                             f"{count:.3g} elements, expected at most {MAX_CONSTANT_ELEMENTS}")


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file; :class:`ModelError` if it is missing or not valid ONNX,
    or holds a graph :func:`check_graph` refuses."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
        onnx.checker.check_model(model)
    except FileNotFoundError as err:
        raise ModelError(f"{p}: no such ONNX file") from err
    except (DecodeError, onnx.checker.ValidationError, OSError) as err:
        detail = first_line(err, type(err).__name__)
        raise ModelError(f"{p}: not a valid ONNX model, truncated or corrupt ({detail})") from err
    check_graph(model, p)
    return {entry.key: entry.value for entry in model.metadata_props}


def read_onnx_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` stored in an ONNX file by :func:`export_onnx`."""
    meta = onnx_metadata(path)
    raw = meta.get(SPEC_KEY)
    if raw is None:
        raise ModelError(
            f"{path}: found no {SPEC_KEY!r} metadata, expected an ONNX file written by 'cryodeploy export'"
        )
    try:
        return ModelSpec.from_dict(json.loads(raw))
    except (json.JSONDecodeError, ConfigError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{path}: invalid {SPEC_KEY!r} metadata ({err})") from err
    except RecursionError as err:
        raise ModelError(f"{path}: invalid {SPEC_KEY!r} metadata (nested too deeply)") from err


def cached_onnx(source: ModelSource, opset: int = DEFAULT_OPSET) -> Path:
    """An ONNX file for ``source``: the file itself for an ONNX source, else an export kept in the cache.

    The cache file is named by the source's sha256 and reused only if its content still has the
    sha256 recorded when it was written (:func:`cryodeploy.files.seal`) and its metadata names
    that same source hash; any other entry is rebuilt, with a warning saying why.
    """
    from cryodeploy.files import seal

    if source.kind == "onnx":
        return source.path
    target = cache_root("onnx") / f"{source.sha256}-opset{opset}.onnx"
    if usable_cache_entry(target, "source_sha256", source.sha256):
        return target
    return seal(export_onnx(source, target, opset=opset))


def usable_cache_entry(entry: Path, key: str, value: str) -> bool:
    """Whether a cached ONNX file is intact (sealed content) and its metadata ``key`` is ``value``;
    warns with the reason when an existing entry is not (the caller then rebuilds it)."""
    from cryodeploy.files import seal_problem

    if not entry.is_file():
        return False
    problem = seal_problem(entry)
    if problem is None:
        try:
            found = onnx_metadata(entry).get(key)
            problem = None if found == value else f"its {key} is {found!r}, expected {value!r}"
        except ModelError as err:
            problem = str(err)
    if problem is not None:
        log.warning("rebuilding cached ONNX %s: it failed its content check (%s)", entry, problem)
    return problem is None


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write an fp16 copy of an fp32 ONNX model (float32 input and output kept) to ``dst``.

    Uses onnxconverter-common's converter; its metadata is kept, with ``precision`` set to fp16.
    """
    import onnx

    from cryodeploy.files import atomic_write

    try:
        from onnxconverter_common import float16
    except ImportError as err:
        raise ModelError(
            f"{src}: fp16 conversion needs onnxconverter-common (pip install 'cryodeploy[onnx]')"
        ) from err
    meta = onnx_metadata(src)
    spec = meta.pop(SPEC_KEY, None)
    meta["precision"] = "fp16"
    if spec is not None:
        meta[SPEC_KEY] = spec
    model = onnx.load(str(src))
    del model.graph.value_info[:]  # stale fp32 annotations (e.g. from onnxslim) would contradict the casts
    model = float16.convert_float_to_float16(model, keep_io_types=True)
    _set_metadata(model, meta)
    out = Path(dst)
    _check(model, out)
    with atomic_write(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def check_against_torch(
    onnx_model: str | os.PathLike[str] | bytes, module: torch.nn.Module, shape: tuple[int, ...],
    rng: np.random.Generator,
) -> float:
    """Relative error ``max|onnx - torch| / max|torch|`` of ONNX Runtime (CPU, fp32) against ``module``
    on a standard normal input of ``shape``. ``onnx_model`` is a file or serialized model bytes."""
    import onnxruntime as ort
    import torch

    x = rng.standard_normal(shape).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float64)
    with torch.inference_mode():
        want = module.float().eval()(torch.from_numpy(x)).numpy().astype(np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), np.finfo(np.float32).tiny))
