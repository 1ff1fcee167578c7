"""The ONNX Runtime runner: inference only; the session is built by :mod:`.loader`.

On CUDA the input and output are bound (IOBinding) to device buffers owned by torch, so a
batch crosses the bus once each way through pinned staging buffers, with no copies made by
ONNX Runtime itself; :meth:`OrtBackend.run_device` skips the host entirely.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.backends.ort.loader import ort_errors
from cryodeploy.errors import ModelError, first_line
from cryodeploy.export.onnx import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnxruntime
    import torch

__all__ = ["OrtBackend"]


class OrtBackend(Backend):
    """ONNX Runtime on the CPU execution provider, or on the CUDA one with IOBinding."""

    name = "ort"

    def __init__(
        self, session: onnxruntime.InferenceSession, options: BackendOptions, model_file: Path
    ) -> None:
        super().__init__(options)
        self._session: onnxruntime.InferenceSession | None = session
        self.model_file = model_file
        self._cuda = options.device.startswith("cuda")
        # shape -> (pinned host in, device in, device out, pinned host out); only the latest shape is kept
        self._staging: dict[tuple[int, ...], tuple[Any, Any, Any, Any]] = {}
        import onnxruntime  # imported already: the session is built

        self._options = onnxruntime.RunOptions()
        self._options.log_severity_level = 4  # a failure (e.g. out of memory) is the exception's one line

    @property
    def session(self) -> onnxruntime.InferenceSession:
        """The open session (raises after :meth:`close`)."""
        if self._session is None:
            raise RuntimeError(f"{self.label}: backend is closed")
        return self._session

    def _failed(self, shape: tuple[int, ...], err: BaseException) -> ModelError:
        detail = first_line(err, type(err).__name__)
        return ModelError(f"{self.model_file}: ONNX Runtime failed on a batch {list(shape)} ({detail})")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._cuda:
            return self._run_cuda(batch)
        session = self.session
        try:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: batch}, self._options)[0]
        except ort_errors() as err:
            raise self._failed(batch.shape, err) from err
        return np.asarray(out, dtype=np.float32)

    def _buffers(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any, Any]:
        import torch

        if shape not in self._staging:
            self._staging.clear()
            dev = torch.device(self.device)
            self._staging[shape] = (
                torch.empty(shape, dtype=torch.float32, pin_memory=True),
                torch.empty(shape, dtype=torch.float32, device=dev),
                torch.empty(shape, dtype=torch.float32, device=dev),
                torch.empty(shape, dtype=torch.float32, pin_memory=True),
            )
        return self._staging[shape]

    def _run_cuda(self, batch: np.ndarray) -> np.ndarray:
        import torch

        host_in, dev_in, dev_out, host_out = self._buffers(batch.shape)
        host_in.numpy()[...] = batch
        dev_in.copy_(host_in, non_blocking=True)
        self._infer(dev_in, dev_out)
        host_out.copy_(dev_out, non_blocking=True)
        torch.cuda.current_stream(dev_out.device).synchronize()
        return np.array(host_out.numpy(), copy=True)

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a float32 CUDA tensor ``[N,1,H,W]`` already on this backend's device; no host copies."""
        import torch

        if not self._cuda:
            raise NotImplementedError(f"{self.label}: no device-resident path on the CPU")
        x = x.contiguous()
        out = torch.empty_like(x)
        self._infer(x, out)
        return out

    def _infer(self, x: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        # ORT computes on its own stream: the input written on torch's stream must be complete.
        torch.cuda.current_stream(x.device).synchronize()
        index = x.device.index or 0
        session = self.session
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        try:
            session.run_with_iobinding(binding, self._options)  # returns after its stream is synchronized
        except ort_errors() as err:
            raise self._failed(tuple(x.shape), err) from err
        binding.synchronize_outputs()

    def close(self) -> None:
        """Drop the session and device buffers."""
        self._staging.clear()
        self._session = None
