"""Hostile model files: checked before memory is spent (issue 22, item 3).

A safetensors header is compared with the config's tensor names and shapes before any tensor is
read; a raw ``layers.json`` is validated (types, integer shapes, parameter bounds, file sizes,
regular files only) before a model is built. Each case ends in one ``error: <file>: ...`` line.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mrc_cases import unsharded_env
from test_bad_models import CPU, _assert_error, _checkpoint_copy, _denoise, _raw_copy

pytestmark = pytest.mark.timeout(180)

GB = 1 << 30


def _header(path: Path) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8 : 8 + n]), n


def _rewrite_header(path: Path, change: Callable[[dict, int], int]) -> None:
    """Replace ``path``'s safetensors header by ``change(header, data_bytes)``'s edit; the data stays,
    and the file is extended (sparsely, no disk used) to the size ``change`` returns."""
    header, n = _header(path)
    data = path.read_bytes()[8 + n :]
    size = change(header, len(data))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    os.truncate(path, 8 + len(text) + size)


def _extra_tensor(nbytes: int) -> Callable[[dict, int], int]:
    def change(header: dict, end: int) -> int:
        header["huge"] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [end, end + nbytes]}
        return end + nbytes

    return change


def _grow_conv3(header: dict, end: int) -> int:
    """conv3.weight, the last tensor of the file, redeclared as 4 GB."""
    start = header["conv3.weight"]["data_offsets"][0]
    header["conv3.weight"] = {"dtype": "F32", "shape": [GB, 1, 1, 1], "data_offsets": [start, start + 4 * GB]}
    return start + 4 * GB


SAFETENSORS_CASES: dict[str, tuple[Callable[[dict, int], int], str]] = {
    "extra-100GB-tensor": (
        _extra_tensor(100 * GB), "weights do not match architecture cnn3 (unexpected ['huge'])"
    ),
    "conv3-4GB": (_grow_conv3, "conv3.weight: found (1073741824, 1, 1, 1), expected (1, 16, 3, 3)"),
    "offsets-past-the-end": (
        lambda h, end: (h["conv3.bias"].update(data_offsets=[end, end + 4]), end)[1],
        "not a readable safetensors file (tensor data overlaps or leaves a gap at byte",
    ),
    "text-shape": (
        lambda h, end: (h["conv3.bias"].update(shape=["1"]), end)[1],
        "not a readable safetensors file (tensor 'conv3.bias': malformed header entry)",
    ),
    "integer-dtype": (
        lambda h, end: (h["conv3.bias"].update(dtype="I32"), end)[1],
        "not a readable safetensors file (tensor 'conv3.bias': malformed header entry)",
    ),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_header_is_checked_before_any_tensor_is_read(
    tmp_path: Path, cnn3_checkpoint: Path, micrograph: Path, case: str
) -> None:
    change, needle = SAFETENSORS_CASES[case]
    weights = _checkpoint_copy(cnn3_checkpoint, tmp_path / "ckpt")
    _rewrite_header(weights, change)
    _assert_error(_denoise(micrograph, weights, tmp_path / "out"), tmp_path / "out", weights, needle)
    assert weights.stat().st_blocks * 512 < 1 << 20  # the huge sizes are declared, never on disk


def _meta_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "layers.json").read_text())
        change(meta)
        (folder / "layers.json").write_text(json.dumps(meta))

    return edit


def _replace_file(make: Callable[[Path], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / "conv1_weight.bin").unlink()
        make(folder / "conv1_weight.bin")

    return edit


RAW_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "1e5-channels": (
        _meta_edit(lambda m: m["model"]["params"].update(channels=10**5)),
        "layers.json",
        ": invalid model config (cnn3 parameter channels=100000, expected an integer from 1 to 1024)",
    ),
    "file-is-dev-zero": (
        _meta_edit(lambda m: m["layers"][0]["weight"].update(file="/dev/zero")),
        "layers.json",
        ": conv1 file '/dev/zero', expected a file name in the folder",
    ),
    "symlink-to-dev-zero": (
        _replace_file(lambda p: p.symlink_to("/dev/zero")),
        "conv1_weight.bin",
        ": not a regular file (found a character device)",
    ),
    "fifo": (_replace_file(os.mkfifo), "conv1_weight.bin", ": not a regular file (found a named pipe)"),
    "sparse-10GB-file": (
        _replace_file(lambda p: (p.write_bytes(b""), os.truncate(p, 10 * GB))),
        "conv1_weight.bin",
        ": found 10737418240 bytes, expected 576 for conv1 shape (16, 1, 3, 3)",
    ),
    "string-as-layer": (
        _meta_edit(lambda m: m.update(layers=["conv1", "conv2", "conv3"])),
        "layers.json",
        ": 'layers' must be a list of objects, one per conv layer",
    ),
    "string-as-file-entry": (
        _meta_edit(lambda m: m["layers"][0].update(weight="conv1_weight.bin")),
        "layers.json",
        ": conv1 file entry is str, expected an object",
    ),
    "text-in-shape": (
        _meta_edit(lambda m: m["layers"][0]["weight"].update(shape=["16", 1, 3, 3])),
        "conv1_weight.bin",
        ": layers.json gives conv1 shape ['16', 1, 3, 3], expected (16, 1, 3, 3)",
    ),
    "text-axis-sums": (
        _meta_edit(lambda m: m["layers"][0]["weight"].update(axis_sums={"out": ["x"]})),
        "conv1_weight.bin",
        ": weights read as (out,in,kH,kW) do not match the layout fingerprint",
    ),
    "deep-json": (
        lambda d: (d / "layers.json").write_text("[" * 100_000),
        "layers.json",
        ": not valid JSON (nested too deeply)",
    ),
    "layers-json-is-a-fifo": (
        lambda d: ((d / "layers.json").unlink(), os.mkfifo(d / "layers.json")),
        "layers.json",
        ": not a regular file (found a named pipe)",
    ),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_layers_json_is_validated_before_the_model_is_built(
    tmp_path: Path, raw_folder: Path, micrograph: Path, case: str
) -> None:
    change, name, needle = RAW_CASES[case]
    folder = _raw_copy(raw_folder, tmp_path / "raw", change)
    _assert_error(_denoise(micrograph, folder, tmp_path / "out"), tmp_path / "out", folder / name, needle)


def test_zero_channels_real_process_prints_one_line_without_torch_warnings(
    tmp_path: Path, cnn3_checkpoint: Path, micrograph: Path
) -> None:
    weights = _checkpoint_copy(cnn3_checkpoint, tmp_path / "ckpt")
    cfg = weights.with_suffix(".json")
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "params": {"channels": 0}}))
    cmd = [sys.executable, "-m", "cryodeploy", "denoise", str(micrograph), "-o", str(tmp_path / "out"),
           "--model", str(weights), *CPU]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=unsharded_env())
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == [
        f"error: {cfg}: invalid model config (cnn3 parameter channels=0, expected an integer from 1 to 1024)"
    ]
    assert not (tmp_path / "out").exists()


def _graph(src: Path, dst: Path, nodes: list, initializers: list | None = None) -> Path:
    """A graph from ``input`` to ``output`` made of ``nodes``, carrying ``src``'s cryodeploy metadata."""
    import onnx
    from onnx import TensorProto, helper

    names = ("input", "output")
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 1, "h", "w"]) for n in names]
    graph = helper.make_graph(nodes, "hostile", io[:1], io[1:], initializer=initializers or [])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("evil.ops", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    for entry in onnx.load(str(src)).metadata_props:
        model.metadata_props.add().CopyFrom(entry)
    onnx.save(model, str(dst))
    return dst


def _loop_2_62(src: Path, dst: Path) -> Path:
    """The hang of issue 22: a Loop of 2^62 iterations (identity body) that ignored SIGINT."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)],
    )
    inits = [helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
             helper.make_tensor("cond", TensorProto.BOOL, [], [True])]
    node = helper.make_node("Loop", ["trips", "cond", "input"], ["output"], body=body, name="forever")
    return _graph(src, dst, [node], inits)


def _huge_constant(src: Path, dst: Path) -> Path:
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1 << 20, 1 << 20, 1 << 10])
    return _graph(src, dst, [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="big"),
                             helper.make_node("Identity", ["input"], ["output"])], [shape])


def _custom_op(src: Path, dst: Path) -> Path:
    from onnx import helper

    return _graph(src, dst, [helper.make_node("Fancy", ["input"], ["output"], domain="evil.ops", name="x")])


GRAPH_CASES = {
    "loop-2^62": (
        _loop_2_62, ": graph holds a Loop node (forever), which a denoiser never needs; refusing to run it"
    ),
    "constant-of-shape-2^50": (
        _huge_constant, ": ConstantOfShape node (big) makes 1.13e+15 elements, expected at most 268435456"
    ),
    "custom-domain": (_custom_op, ": graph holds a evil.ops::Fancy node (x), which a denoiser never needs"),
}


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_onnx_graph_is_checked_statically_before_a_session_runs_it(
    tmp_path: Path, cnn3_onnx: Path, micrograph: Path, case: str
) -> None:
    make, needle = GRAPH_CASES[case]
    model = make(cnn3_onnx, tmp_path / "m.onnx")
    args = ("--backend", "ort", "--device", "cpu", "--batch", "2", "-q")
    _assert_error(_denoise(micrograph, model, tmp_path / "out", args), tmp_path / "out", model, needle)
