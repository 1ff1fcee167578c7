"""The PyTorch runner: inference only; the module is loaded by :mod:`cryodeploy.backends.sources`.

channels_last on CPU and CUDA (issue 6 measured CNN3 at 2048^2 on 2 CPU threads: 627 ms
channels_last vs 1277 ms NCHW). On CUDA a batch goes through reusable pinned host buffers
and a dedicated stream with non-blocking copies.

Options (``BackendOptions.extra``): ``cuda_graphs`` (capture one CUDA graph per input shape
and replay it), ``compile`` (run the module through ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.files import cache_root

__all__ = ["TorchBackend"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _CudaStaging:
    """Pinned host in/out buffers, device buffers and (optionally) a captured graph for one shape."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, layout: torch.memory_format) -> None:
        self.host_in = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self.host_out = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self.dev_in = torch.empty(shape, dtype=torch.float32, device=device).contiguous(memory_format=layout)
        self.dev_out: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class TorchBackend(Backend):
    """Eager PyTorch; autocast for fp16/bf16 (fp32 accumulate); optional CUDA graphs.

    Memory layout: channels_last (volume models: channels_last_3d) on the CPU and for fp16/bf16 on
    CUDA; NCHW for fp32 on CUDA,
    where cuDNN's fp32 kernels are faster in NCHW (CNN3 at 4096^2 on an H200, TF32 off:
    15.6 ms NCHW vs 23.3 ms channels_last, benchmarks/bench_ort.py).
    """

    name = "torch"

    def __init__(self, module: torch.nn.Module, options: BackendOptions) -> None:
        super().__init__(options)
        self._device = torch.device(options.device)
        self._cuda = self._device.type == "cuda"
        volumes = any(isinstance(m, torch.nn.Conv3d) for m in module.modules())
        channels_last = torch.channels_last_3d if volumes else torch.channels_last
        self._layout = (
            torch.contiguous_format if self._cuda and options.precision == "fp32" else channels_last
        )
        self._module = module.to(self._device).eval().to(memory_format=self._layout)  # type: ignore[call-overload]
        if options.get("compile", False):  # inductor's graph cache kept across processes
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root("inductor")))
            # static shapes: each frame size gets its own kernels (no slower dynamic-shape recompile
            # when a process meets a second size, e.g. the variant trial's and then the files')
            self._module = torch.compile(self._module, dynamic=False)  # type: ignore[assignment]
        self._graphs = bool(options.get("cuda_graphs", False)) and self._cuda
        self._staging: dict[tuple[int, ...], _CudaStaging] = {}
        self._stream = torch.cuda.Stream(self._device) if self._cuda else None
        if options.threads and not self._cuda:
            torch.set_num_threads(options.threads)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # the autocast weight cache would be captured into a graph and go stale; graphs need it off
        dtype = _DTYPES[self.precision]
        return torch.autocast(self._device.type, dtype=dtype, cache_enabled=not self._graphs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x`` (float32 out, also under autocast)."""
        flags = torch.backends.cudnn.flags(enabled=True, allow_tf32=self.options.tf32)
        with torch.inference_mode(), flags, self._autocast():
            y = self._module(x)
        return y.float()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self._cuda:
            x = torch.from_numpy(batch).contiguous(memory_format=self._layout)
            return np.ascontiguousarray(self._forward(x).numpy())
        return self._run_cuda(batch)

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 batch already on this device -> float32 device tensor, with no host copies.

        With CUDA graphs the result is the graph's static output buffer: valid until the next
        call with the same shape (the tiled engine copies it out at once)."""
        if not self._graphs:
            return self._forward(x.contiguous(memory_format=self._layout))
        st = self._staging.get(tuple(x.shape))
        if st is None:
            st = self._staging[tuple(x.shape)] = _CudaStaging(tuple(x.shape), self._device, self._layout)
        st.dev_in.copy_(x)
        if st.graph is None:
            torch.cuda.current_stream(self._device).synchronize()  # dev_in is written before the capture
        self._replay(st)
        assert st.dev_out is not None
        return st.dev_out

    def _run_cuda(self, batch: np.ndarray) -> np.ndarray:
        assert self._stream is not None
        st = self._staging.get(batch.shape)
        if st is None:
            st = self._staging[batch.shape] = _CudaStaging(batch.shape, self._device, self._layout)
        st.host_in.numpy()[...] = batch
        with torch.cuda.stream(self._stream):
            st.dev_in.copy_(st.host_in, non_blocking=True)
            if self._graphs:
                self._replay(st)
            else:
                st.dev_out = self._forward(st.dev_in)
            assert st.dev_out is not None
            st.host_out.copy_(st.dev_out, non_blocking=True)
        self._stream.synchronize()
        return st.host_out.numpy().copy()

    def _replay(self, st: _CudaStaging) -> None:
        """Capture the forward for this shape on first use (after a warm-up run), then replay."""
        if st.graph is None:
            assert self._stream is not None
            st.dev_out = self._forward(st.dev_in)  # warm-up: cuDNN setup and lazy init outside the capture
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: reader/writer threads keep copying on their own streams during the capture
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                st.dev_out = self._forward(st.dev_in)
            st.graph = graph
        st.graph.replay()

    def close(self) -> None:
        """Drop staging buffers and graphs (device memory returns to the caching allocator)."""
        self._staging.clear()
