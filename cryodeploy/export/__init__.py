"""Export a trained model to deployable artefacts: ONNX (:mod:`.onnx`), TensorRT engines (:mod:`.tensorrt`).

Importing this package imports neither torch nor onnx; the functions import them when called.
"""

from __future__ import annotations

from cryodeploy.export.onnx import cached_onnx, check_against_torch, convert_fp16, export_onnx, read_onnx_spec

__all__ = [
    "cached_onnx", "check_against_torch", "convert_fp16", "export_onnx", "read_onnx_spec",
]
