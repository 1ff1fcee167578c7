"""The TensorRT runner: one execution context per CUDA stream, device buffers from torch tensors."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import tensorrt as trt
import torch

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.backends.trt.cache import read_sidecar
from cryodeploy.backends.trt.loader import LoadedEngine, device_index, load_engine
from cryodeploy.backends.trt.profile import ProfileShapes, plan_batches, select_shape
from cryodeploy.errors import ModelError

__all__ = ["TrtBackend"]


def _io_names(engine: trt.ICudaEngine, path: Path) -> tuple[str, str]:
    inputs: list[str] = []
    outputs: list[str] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
            raise ModelError(f"{path}: tensor {name!r} is {engine.get_tensor_dtype(name)}, expected float32")
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: found inputs {inputs} and outputs {outputs}, expected one of each")
    return inputs[0], outputs[0]


class TrtBackend(Backend):
    """Runs a TensorRT engine; batches are split/padded to the profile's batch range.

    Its precision is the engine's (from the sidecar). :meth:`infer` runs device tensors on a
    given torch CUDA stream, each stream with its own execution context.
    """

    name = "trt"

    def __init__(self, engine_path: str | os.PathLike[str], options: BackendOptions) -> None:
        self.path = Path(engine_path)
        sidecar = read_sidecar(self.path)
        super().__init__(replace(options, precision=sidecar.key.precision))
        index = device_index(options.device)
        self._device = torch.device("cuda", index)
        allow = bool(options.get("allow_accuracy_loss", False))
        self._loaded: LoadedEngine | None = load_engine(self.path, sidecar, index, allow)
        engine = self._loaded.engine
        self._input, self._output = _io_names(engine, self.path)
        dims = engine.get_tensor_profile_shape(self._input, 0)
        self.profile = ProfileShapes.from_input_shapes([[d[i] for i in range(len(d))] for d in dims])
        self._stride = int(sidecar.model.get("stride", 1))
        self._stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]  # torch: unannotated
        self._contexts: dict[int, trt.IExecutionContext] = {}

    def _context(self, stream: torch.cuda.Stream) -> trt.IExecutionContext:
        if self._loaded is None:
            raise ModelError(f"{self.path}: backend is closed")
        ctx = self._contexts.get(stream.cuda_stream)
        if ctx is None:
            created: trt.IExecutionContext | None = self._loaded.engine.create_execution_context()
            if created is None:
                raise ModelError(f"{self.path}: TensorRT could not create an execution context (GPU memory?)")
            ctx = self._contexts[stream.cuda_stream] = created
        return ctx

    def infer(self, x: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Run ``x`` ``[N, 1, H, W]`` or ``[N, 1, D, H, W]`` (inside the profile) on ``stream``; returns
        the output on the GPU, valid once ``stream`` has reached this point."""
        self.profile.require(int(x.shape[0]), tuple(int(d) for d in x.shape[2:]), str(self.path))
        s = stream if stream is not None else self._stream
        s.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.device(self._device), torch.cuda.stream(s):  # TensorRT runs on the current device
            ctx = self._context(s)
            x = x.to(self._device, torch.float32).contiguous()
            x.record_stream(s)  # TensorRT reads it on s, whichever stream allocated it
            y = torch.empty_like(x)
            if not ctx.set_input_shape(self._input, trt.Dims(list(x.shape))):
                raise ModelError(f"{self.path}: TensorRT rejected input shape {tuple(x.shape)}")
            out_shape = ctx.get_tensor_shape(self._output)
            if tuple(out_shape[i] for i in range(len(out_shape))) != tuple(x.shape):
                raise ModelError(f"{self.path}: engine output shape {out_shape}, expected {tuple(x.shape)}")
            ctx.set_tensor_address(self._input, x.data_ptr())
            ctx.set_tensor_address(self._output, y.data_ptr())
            if not ctx.execute_async_v3(s.cuda_stream):
                raise ModelError(f"{self.path}: TensorRT execution failed (see its log)")
        return y

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a CUDA tensor ``[N, 1, H, W]`` (``[N, 1, D, H, W]``) inside the profile; the result
        is ordered on the caller's current stream."""
        current = torch.cuda.current_stream(self._device)
        y = self.infer(x, self._stream)
        current.wait_stream(self._stream)
        y.record_stream(current)
        return y

    def fit_geometry(self, tile: int, batch: int) -> tuple[int, int]:
        """The square (cubic) tile and batch nearest to those wanted that this engine's profile accepts."""
        b, sides = select_shape(self.profile, batch, tile, self._stride)
        t = min(sides)
        if t < max(self.profile.min[1:]):
            raise ModelError(f"{self.path}: profile {self.profile.describe()} admits no square tile")
        return t, b

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n, sides = batch.shape[0], tuple(int(d) for d in batch.shape[2:])
        self.profile.require(self.profile.min[0], sides, str(self.path))
        host = torch.from_numpy(batch)
        out = np.empty_like(batch)
        for start, stop, size in plan_batches(n, self.profile.min[0], self.profile.max[0]):
            chunk = host[start:stop]
            if size > stop - start:
                chunk = torch.cat([chunk, chunk.new_zeros((size - (stop - start), 1, *sides))])
            with torch.cuda.stream(self._stream):
                y = self.infer(chunk.pin_memory().to(self._device, non_blocking=True), self._stream)
                out[start:stop] = y[: stop - start].cpu().numpy()
        return out

    def close(self) -> None:
        """Release the execution contexts and the engine (idempotent)."""
        self._contexts.clear()
        self._loaded = None
