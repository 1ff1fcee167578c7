"""Batched tiled inference: frames go in, tiles of several frames share a batch, denoised frames
come out. Picks the tile and batch size for ``"auto"`` and halves them on out-of-memory errors.
A frame is a 2-D image or, for a volume model, a 3-D volume (tiles ``[N, 1, D, H, W]``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import CryoDeployError, first_line
from cryodeploy.imaging.contract import stride_padding
from cryodeploy.inference.tiling import TilePlan, halo_for, min_tile

if TYPE_CHECKING:
    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = [
    "CPU_BATCH",
    "CPU_TILE",
    "CPU_TILE_3D",
    "CPU_TILE_3D_MAX",
    "INDEX_LIMIT",
    "DeviceArrays",
    "FrameTask",
    "HostArrays",
    "TiledEngine",
    "activation_bytes_per_pixel",
    "auto_geometry",
    "cpu_volume_geometry",
    "error_text",
    "fit_geometry",
    "is_out_of_memory",
    "largest_tensor_per_pixel",
]

log = logging.getLogger(__name__)

#: ``"auto"`` on the CPU: a fixed tile and batch (speed there hardly depends on them); volumes: 128^3
#: where the model's halo leaves such a tile at least half its side (see :func:`cpu_volume_geometry`)
CPU_TILE = 1024
CPU_TILE_3D = 128
CPU_BATCH = 2
#: the largest ``"auto"`` volume tile on the CPU, unless the model needs more (its minimum tile)
CPU_TILE_3D_MAX = 256
#: share of the free device memory ``"auto"`` plans to use (the rest: workspaces, fragmentation)
_MEMORY_SHARE = 0.5
_MAX_AUTO_BATCH = 8
#: pixels per batch that keep a GPU busy; more only delays the writer (whole 4096^2 frames: batch 1)
_BATCH_PIXELS = 4096 * 4096
#: ONNX Runtime says "Failed to allocate memory" from its arena and "std::bad_alloc" from a kernel
_OOM_MESSAGES = ("out of memory", "failed to allocate memory", "can't allocate memory", "bad_alloc")


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError, numpy's MemoryError and allocation failures of ONNX Runtime /
    TensorRT."""
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return any(m in text for m in _OOM_MESSAGES)


def _release_device_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


#: most elements of one tensor a batch may give a layer (32-bit index math of cuDNN and of PyTorch's
#: CUDA kernels; a 3-D U-Net's full-resolution concatenation reaches it at 256 x 512 x 512 voxels)
INDEX_LIMIT = 2**31 - 1
_ACTIVATIONS: dict[str, tuple[float, int]] = {}


def _activations(spec: ModelSpec) -> tuple[float, int]:
    key = json.dumps([spec.architecture, spec.params], sort_keys=True, default=str)
    if key not in _ACTIVATIONS:
        _ACTIVATIONS[key] = _trace_activations(spec)
    return _ACTIVATIONS[key]


def activation_bytes_per_pixel(spec: ModelSpec) -> float:
    """Upper bound of fp32 activation bytes per input pixel (voxel): every layer output kept, traced on
    'meta' (once per architecture and parameters in a process)."""
    return _activations(spec)[0]


def largest_tensor_per_pixel(spec: ModelSpec) -> int:
    """Elements per input pixel (voxel) of the largest tensor a layer takes or gives (e.g. the U-Net's
    full-resolution concatenation: 3 x base channels)."""
    return _activations(spec)[1]


def _trace_activations(spec: ModelSpec) -> tuple[float, int]:
    import torch

    from cryodeploy.models import build_model

    with torch.device("meta"):
        model = build_model(spec)
    total = largest = 0

    def count(_m: Any, inputs: Any, out: Any) -> None:
        nonlocal total, largest
        total += out.numel() * 4 if isinstance(out, torch.Tensor) else 0
        for t in (*inputs, out):
            largest = max(largest, t.numel() if isinstance(t, torch.Tensor) else 0)

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    side = 8 * spec.stride
    pixels = side**spec.ndim
    with torch.no_grad():
        model(torch.empty(1, 1, *(side,) * spec.ndim, device="meta"))
    for h in hooks:
        h.remove()
    return (total + 8 * pixels) / pixels, -(-largest // pixels)


def _free_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (via torch), or None where it cannot be asked."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except (ImportError, RuntimeError):
        return None


def cpu_volume_geometry(spec: ModelSpec) -> tuple[int, int]:
    """The ``"auto"`` volume tile and batch on the CPU: :data:`CPU_TILE_3D` and :data:`CPU_BATCH` where
    the tile's centre (its side less two halos) is at least half the side; else (a deep U-Net: unet3d
    depth 3 has a 56-voxel halo, a 16-voxel centre in 128) the side of four halos, at most
    :data:`CPU_TILE_3D_MAX` but never below the model's minimum tile, one tile a batch (memory)."""
    halo = halo_for(spec.receptive_radius, spec.stride)
    if 4 * halo <= CPU_TILE_3D:
        return CPU_TILE_3D, CPU_BATCH
    return max(min(4 * halo, CPU_TILE_3D_MAX), min_tile(spec.receptive_radius, spec.stride)), 1


def auto_geometry(
    shape: tuple[int, ...], spec: ModelSpec, device: str, tile: int | None, batch: int | None
) -> tuple[int, int]:
    """Tile and batch for frames of padded ``shape``: the largest that fit half the free device memory.

    On the CPU (or where free memory is unknown) a fixed :data:`CPU_TILE` and :data:`CPU_BATCH`; volumes:
    :func:`cpu_volume_geometry` (its batch only with its tile; a given tile keeps :data:`CPU_BATCH`).
    """
    free = _free_bytes(device) if device.startswith("cuda") else None
    if free is None:
        if len(shape) == 2:
            return tile or CPU_TILE, batch or CPU_BATCH
        auto_tile, auto_batch = cpu_volume_geometry(spec)
        return tile or auto_tile, batch or (CPU_BATCH if tile else auto_batch)
    tile, batch = fit_geometry(shape, spec, free, tile, batch)
    log.info("auto geometry on %s (%.1f GiB free): tile %d, batch %d", device, free / 2**30, tile, batch)
    return tile, batch


def _pixels(shape: tuple[int, ...], tile: int) -> int:
    """Pixels (voxels) of one tile of side ``tile`` in a frame of ``shape``."""
    return math.prod(min(tile, n) for n in shape)


def fit_geometry(
    shape: tuple[int, ...],
    spec: ModelSpec,
    free_bytes: int,
    tile: int | None = None,
    batch: int | None = None,
) -> tuple[int, int]:
    """The largest tile (whole frame if possible, else halved) and batch whose activations fit in
    half of ``free_bytes`` and whose largest layer tensor stays within :data:`INDEX_LIMIT` elements;
    a batch holds at most a 4096^2 frame's worth of pixels (or voxels)."""
    budget = free_bytes * _MEMORY_SHARE
    bpp = activation_bytes_per_pixel(spec)
    most = INDEX_LIMIT // largest_tensor_per_pixel(spec)  # pixels of one batch
    if tile is None:
        floor = min_tile(spec.receptive_radius, spec.stride)
        tile = max(*shape, floor)  # a tile larger than the frame is one tile of the frame's size
        while tile > floor and (_pixels(shape, tile) * bpp > budget or _pixels(shape, tile) > most):
            tile = max(floor, tile // 2)
    if batch is None:
        pixels = _pixels(shape, tile)
        batch = int(max(1, min(_MAX_AUTO_BATCH, _BATCH_PIXELS // pixels, budget // (pixels * bpp),
                               most // pixels)))
    return tile, batch


class HostArrays:
    """Tiles and stitched frames as numpy arrays; batches through :meth:`Backend.run`."""

    def empty(self, shape: tuple[int, ...]) -> Any:
        """A new float32 array."""
        return np.empty(shape, np.float32)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """A new float32 array of zeros."""
        return np.zeros(shape, np.float32)

    def run(self, backend: Backend, batch: Any) -> Any:
        """The backend on one batch."""
        return backend.run(batch)

    def sync(self) -> None:
        """Wait until results can be handed to another thread (numpy: nothing to wait for)."""


class DeviceArrays(HostArrays):
    """Tiles and frames as torch tensors on ``device``; batches through :meth:`Backend.run_device`."""

    def __init__(self, device: str) -> None:
        import torch

        self._torch, self._device = torch, torch.device(device)

    def empty(self, shape: tuple[int, ...]) -> Any:
        """A new float32 tensor on the device."""
        return self._torch.empty(shape, dtype=self._torch.float32, device=self._device)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """A new float32 tensor of zeros on the device."""
        return self._torch.zeros(shape, dtype=self._torch.float32, device=self._device)

    def run(self, backend: Backend, batch: Any) -> Any:
        """The backend's device-resident forward on one batch."""
        return backend.run_device(batch)

    def sync(self) -> None:
        """Wait for this thread's stream: results are complete before another thread uses (or frees) them."""
        if self._device.type == "cuda":
            self._torch.cuda.current_stream(self._device).synchronize()


@dataclass(eq=False)
class FrameTask:
    """One frame (2-D image or 3-D volume): normalized and padded to the model stride (numpy or a
    device tensor); ``output()`` once done."""

    key: Any
    image: Any
    shape: tuple[int, ...]
    plan: TilePlan | None = None
    out: Any = None
    remaining: int = 0
    error: BaseException | None = None

    def output(self) -> Any:
        """The denoised frame (normalized units), cropped to :attr:`shape`."""
        assert self.plan is not None and self.out is not None
        return self.plan.crop(self.out)


class TiledEngine:
    """Feeds frames' tiles to a backend in batches (several frames per batch) and stitches results.

    ``add`` and ``flush`` return the frames that finished, successfully or with ``error`` set.
    An out-of-memory error halves the batch, then the tile, and retries instead of failing.
    ``arrays``: numpy on the host (default) or :class:`DeviceArrays` for frames on the device.
    :meth:`limit_to` bounds tile and batch by the work known in advance.
    """

    def __init__(
        self, backend: Backend, spec: ModelSpec, tile: int | str = "auto", batch: int | str = "auto",
        arrays: HostArrays | None = None,
    ) -> None:
        self.backend = backend
        self.arrays = arrays or HostArrays()
        self.radius, self.stride = spec.receptive_radius, spec.stride
        self._spec = spec
        self.tile: int | None = None if tile == "auto" else int(tile)
        self.batch: int | None = None if batch == "auto" else int(batch)
        if self.tile is not None:
            TilePlan.create((self.tile,), self.tile, self.radius, self.stride)  # rejects too small
        self._pending: list[tuple[FrameTask, int]] = []
        self._buffer = self.arrays.empty((0, 1, 0, 0))
        self._work: list[tuple[tuple[int, ...] | None, int]] | None = None

    def warm_up(self, shape: tuple[int, ...]) -> float:
        """Run one frame of zeros of ``shape`` through the backend, as a real frame of that shape would
        go (same tiles, same batch), so one-time costs (kernel loading, cuDNN plans, compilation for
        these shapes) are paid before the files; returns its seconds. A failure is left to the files."""
        t0 = time.perf_counter()
        padded = tuple(n + p for n, p in zip(shape, stride_padding(shape, self.stride), strict=True))
        self.add(FrameTask(None, self.arrays.zeros(padded), shape))
        self.flush()
        self.arrays.sync()
        return time.perf_counter() - t0

    def limit_to(self, work: list[tuple[tuple[int, ...] | None, int]]) -> None:
        """Bound the geometry by the frames to come, ``(frame shape, count)`` each (shape None: unknown,
        each counted as one tile): the tile by their largest stride-padded side, the batch by their
        total tiles (as :func:`~cryodeploy.inference.frames.denoise_image` does), so a partial batch
        is never zero-filled beyond the work. Applied once the geometry is known."""
        self._work = work
        if self.tile is not None and self.batch is not None:
            self._fit()

    def _fit(self) -> None:
        assert self.tile is not None and self.batch is not None and self._work is not None
        work, self._work = self._work, None
        sides = [max(s) + -max(s) % self.stride for s, _ in work if s is not None]
        if sides:
            self.tile = max(min_tile(self.radius, self.stride), min(self.tile, max(sides)))
        tiles = sum(n * (len(TilePlan.create(s, self.tile, self.radius, self.stride)) if s else 1)
                    for s, n in work)
        self.batch = max(1, min(self.batch, tiles))

    def add(self, frame: FrameTask) -> list[FrameTask]:
        """Queue all tiles of ``frame``; run every full batch."""
        if self.tile is None or self.batch is None:
            self.tile, self.batch = auto_geometry(
                frame.image.shape, self._spec, self.backend.device, self.tile, self.batch
            )
            if self._work is not None:
                self._fit()
        self._plan(frame)
        assert frame.plan is not None
        done: list[FrameTask] = []
        if self._pending and self._pending[0][0].plan.tile_shape != frame.plan.tile_shape:  # type: ignore[union-attr]
            done += self._drain(final=True)
        self._pending += [(frame, i) for i in range(len(frame.plan))]
        return done + self._drain(final=False)

    def flush(self) -> list[FrameTask]:
        """Run what is queued, partial batch included."""
        return self._drain(final=True)

    def _plan(self, frame: FrameTask) -> None:
        assert self.tile is not None
        frame.plan = TilePlan.create(frame.shape, self.tile, self.radius, self.stride)
        frame.out, frame.remaining = None, len(frame.plan)

    def _drain(self, final: bool) -> list[FrameTask]:
        done: list[FrameTask] = []
        while self._pending and self.batch and (final or len(self._pending) >= self.batch):
            chunk = self._pending[: self.batch]
            try:
                for frame, _ in chunk:  # allocated here, so that running out of memory fails the frames
                    if frame.out is None:
                        frame.out = self.arrays.empty(frame.plan.padded_shape)  # type: ignore[union-attr]
                outputs = self._forward(chunk)
            except Exception as err:  # backends raise library-specific types; OOM is told by class/message
                if is_out_of_memory(err) and self._back_off(chunk):
                    continue
                done += self._fail(chunk, err)
                continue
            del self._pending[: len(chunk)]
            for (frame, i), result in zip(chunk, outputs, strict=True):
                assert frame.plan is not None
                frame.plan.stitch(frame.out, i, result[0])
                frame.remaining -= 1
                if frame.remaining == 0:
                    done.append(frame)
        if done:
            self.arrays.sync()
        return done

    def _forward(self, chunk: list[tuple[FrameTask, int]]) -> Any:
        """Run one batch; a partial batch is zero-filled to the full batch size, because results
        must not depend on how many tiles happened to be left (CPU kernels differ for N=1)."""
        plan = chunk[0][0].plan
        assert plan is not None and self.batch is not None
        if self._buffer.shape[0] < self.batch or tuple(self._buffer.shape[2:]) != plan.tile_shape:
            self._buffer = self.arrays.empty((self.batch, 1, *plan.tile_shape))
        buf = self._buffer[: self.batch]
        for k, (frame, i) in enumerate(chunk):
            assert frame.plan is not None
            buf[k, 0] = frame.plan.extract(frame.image, i)
        buf[len(chunk):] = 0.0
        return self.arrays.run(self.backend, buf)[: len(chunk)]

    def _back_off(self, chunk: list[tuple[FrameTask, int]]) -> bool:
        """Halve the batch (or, at batch 1, the tile and re-plan queued frames); False if at the minimum."""
        _release_device_cache()
        assert self.batch is not None
        if self.batch > 1:  # the failed batch was padded to self.batch
            self.batch //= 2
            log.warning("%s: out of memory; batch reduced to %d", self.backend.label, self.batch)
            return True
        plan = chunk[0][0].plan
        assert plan is not None and self.tile is not None
        tile = min(self.tile, max(plan.tile_shape)) // 2 // self.stride * self.stride
        if tile < min_tile(self.radius, self.stride):
            return False
        self.tile = tile
        log.warning("%s: out of memory; tile reduced to %d", self.backend.label, tile)
        frames = list(dict.fromkeys(f for f, _ in self._pending))
        self._pending = []
        for frame in frames:
            self._plan(frame)
            assert frame.plan is not None
            self._pending += [(frame, i) for i in range(len(frame.plan))]
        return True

    def _fail(self, chunk: list[tuple[FrameTask, int]], err: Exception) -> list[FrameTask]:
        failed = list(dict.fromkeys(f for f, _ in chunk))
        for frame in failed:
            frame.error = err
        self._pending = [(f, i) for f, i in self._pending if f.error is None]
        return failed


def error_text(err: BaseException, label: str) -> str:
    """One line for a summary: library errors as they are, anything else with its type and ``label``."""
    if isinstance(err, CryoDeployError):
        return str(err)
    first = first_line(err)
    return f"{label}: {type(err).__name__}: {first}"

