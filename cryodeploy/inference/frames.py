"""Where the runner's frames live between the file and the model: on the host (numpy, any backend)
or on the backend's device (torch tensors, for backends with a device-resident forward).

Both apply the model's :class:`~cryodeploy.imaging.contract.FrameContract`. The device path reads a
file's data block straight into a reusable pinned buffer (one per reader thread), copies the raw
bytes to the device, and validates, converts, normalizes and pads there; on the way out it
crops, de-normalizes, casts and computes the header statistics on the device, copies the result
into a pinned buffer (one per writer thread) and writes header + bytes
(:func:`~cryodeploy.io.rawmrc.write_raw_micrograph`). Each thread runs on its own CUDA stream and
waits for it before handing a tensor on, so no tensor is used or freed while another stream may
still work on it.

Binning and classical filters (``RunConfig.filters``) run where the frames are: numpy on the host
path (:class:`FilteredHostFrames`), torch on the device path
(:data:`~cryodeploy.imaging.device_filters.TORCH_OPS`). Movies (``RunConfig.movies``, summed
while read from disk) take the host path, and ``frame_path="device"`` is refused with them.
:func:`denoise_image` is the same pipeline for an in-memory array.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError, CryoDeployError, InputError
from cryodeploy.imaging.filters import FrameFilters
from cryodeploy.imaging.movies import MovieConfig, movie_micrograph
from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize
from cryodeploy.inference.batching import DeviceArrays, FrameTask, TiledEngine, auto_geometry
from cryodeploy.inference.tiling import TilePlan
from cryodeploy.io.mrc import (
    MIN_SIZE,
    SUPPORTED_MODES,
    MicrographHeader,
    check_output_finite,
    read_header,
    validate_array,
)
from cryodeploy.io.rawmrc import data_stats, read_data_into, write_raw_micrograph
from cryodeploy.io.writers import output_format

if TYPE_CHECKING:
    from cryodeploy.backends import Backend
    from cryodeploy.imaging.normalize import NormStats
    from cryodeploy.models import ModelSpec

__all__ = ["DeviceFrames", "FilteredHostFrames", "HostFrames", "Prepared", "denoise_image", "frames_for",
           "min_input_size", "uses_device_path"]

#: (normalized padded image, frame shape, statistics) of one frame
Prepared = tuple[Any, tuple[int, ...], "NormStats"]


def uses_device_path(backend: Backend, frame_path: str) -> bool:
    """True if frames go through the backend's device: ``"device"``, or ``"auto"`` on CUDA for a
    backend with a device-resident forward."""
    if frame_path == "host":
        return False
    capable = backend.device_resident
    if frame_path == "device":
        if not capable:
            raise InputError(f"{backend.label}: no device-resident forward, use frame_path 'host'")
        return True
    return capable and backend.device.startswith("cuda")


#: peak host memory of the host path, in frames of float32 (normalized input + stitched output,
#: and a frame of slack for the queue); tested in tests/inference/test_frames.py
HOST_FRAMES_PEAK = 3


def available_memory() -> int | None:
    """Bytes of memory this process can still get (Linux MemAvailable, capped by a cgroup v2 limit)."""
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_fits(path: Path, header: MicrographHeader, need: int, available: int | None, where: str) -> None:
    """:class:`InputError` saying why, before any allocation, when ``need`` bytes exceed ``available``."""
    if available is not None and need > available:
        h, w = header.frame_shape
        raise InputError(
            f"{path}: a {w}x{h}x{header.n_frames} image needs about {need / 2**30:.1f} GiB of {where} "
            f"to denoise, {available / 2**30:.1f} GiB available"
        )


class HostFrames:
    """Frames as numpy arrays (the path every backend can take): the data block is read into one new
    array, normalized there in place, and the stitched output is de-normalized in place."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def read(self, path: Path, min_size: int) -> tuple[MicrographHeader, Iterator[Prepared]]:
        """The header and, one by one, each frame prepared for the network."""
        header, frames = self._frames(path, min_size)
        return header, (self._prepare(f) for f in frames)

    def planned(self, path: Path) -> tuple[tuple[int, int] | None, int]:
        """(frame shape, frame count) that :meth:`read` will give for ``path``, from its header alone;
        (None, 1) where the header cannot be read (the read then fails with the reason)."""
        try:
            header = read_header(path)
        except (CryoDeployError, OSError, ValueError):
            return None, 1
        return header.frame_shape, header.n_frames

    def _frames(self, path: Path, min_size: int) -> tuple[MicrographHeader, np.ndarray]:
        """The header and the validated float32 frames ``[n, h, w]`` (one array, the file's pixels)."""
        header = read_header(path)
        h, w = header.frame_shape
        if h < min_size or w < min_size:
            raise InputError(f"{path}: image is {w}x{h} pixels, expected at least {min_size}x{min_size}")
        frame_bytes = h * w * 4
        need = frame_bytes * (header.n_frames + HOST_FRAMES_PEAK)
        check_fits(path, header, need, available_memory(), "memory")
        raw = read_data_into(path, header, np.empty(header.n_frames * frame_bytes, np.uint8))
        data = raw if raw.dtype == np.float32 else raw.astype(np.float32)
        validate_array(data, path, min_size)
        return header, data.reshape(-1, h, w)

    def _prepare(self, frame: np.ndarray) -> Prepared:
        contract = self.spec.contract
        stats = norm_stats(frame, contract.normalization)
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        return contract.pad(normalize(frame, stats, out=frame)), shape, stats

    def write(
        self, path: Path, outputs: list[Any], stats: list[NormStats], header: MicrographHeader,
        dtype: str, fmt: str, keep_normalized: bool, protect: tuple[Path, ...], label: str,
    ) -> None:
        """De-normalize the outputs (normalized, cropped frames; changed in place); write them atomically."""
        pairs = zip(outputs, stats, strict=True)
        frames = outputs if keep_normalized else [denormalize(y, s, out=y) for y, s in pairs]
        data = np.stack(frames) if header.is_stack else frames[0]
        if fmt != "mrc":
            output_format(fmt).write(path, data, header, dtype, protect, label)
            return
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(data, dtype=np.float16 if dtype == "float16" else np.float32)
        head = data_stats(out)
        if not (np.isfinite(head[0]) and np.isfinite(head[1])):
            check_output_finite(out, data, path, dtype)
        write_raw_micrograph(path, out, head, header, protect, label)

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a numpy array (for previews)."""
        return np.asarray(x)

    def warm_up(self, engine: TiledEngine, shape: tuple[int, ...], buffers: int) -> float:
        """Pay the one-time costs of frames of ``shape`` before the files (here: the backend's, see
        :meth:`TiledEngine.warm_up`; ``buffers`` is for the device path); returns the seconds."""
        return engine.warm_up(shape)


class FilteredHostFrames(HostFrames):
    """Host frames with the options that run on the host only: movies summed when read
    (:mod:`cryodeploy.imaging.movies`), binning and filters before the network and filters after it
    (:class:`~cryodeploy.imaging.filters.FrameFilters`); the output header follows the binning."""

    def __init__(self, spec: ModelSpec, filters: FrameFilters, movies: MovieConfig | None) -> None:
        super().__init__(spec)
        self.filters, self.movies = filters, movies

    def planned(self, path: Path) -> tuple[tuple[int, int] | None, int]:
        """As :meth:`HostFrames.planned`, after binning (movie and filter); a movie is one frame (its sum)."""
        try:
            if self.movies is not None and path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    h, w = tif.pages[0].shape[-2:]
                shape: tuple[int, int] | None = (int(h), int(w))
                n = 1
            else:
                shape, n = super().planned(path)
                n = 1 if self.movies is not None else n
        except (OSError, ValueError, IndexError):
            return None, 1
        for b in (self.movies.bin if self.movies is not None else 1, self.filters.bin):
            shape = None if shape is None else (shape[0] // b, shape[1] // b)
        return shape, n

    def read(self, path: Path, min_size: int) -> tuple[MicrographHeader, Iterator[Prepared]]:
        """The output's header and each frame binned (and filtered, ``at == "before"``), prepared."""
        if self.movies is not None:
            mic = movie_micrograph(path, self.movies, min_size)
            source, frames = mic.header, mic.data.reshape(-1, *mic.header.frame_shape)
        else:
            source, frames = self._frames(path, min_size)
        header = self.filters.header(source)
        h, w = header.frame_shape
        if min(h, w) < min_size:
            raise InputError(f"{path}: binned to {w}x{h}, smaller than the model's {min_size} px minimum")
        return header, (self._prepare(self.filters.before(f, source)) for f in frames)

    def write(
        self, path: Path, outputs: list[Any], stats: list[NormStats], header: MicrographHeader,
        dtype: str, fmt: str, keep_normalized: bool, protect: tuple[Path, ...], label: str,
    ) -> None:
        """As :meth:`HostFrames.write`, the de-normalized frames filtered first if ``at == "after"``."""
        if self.filters.filters_after:
            if not keep_normalized:
                outputs = [denormalize(y, s, out=y) for y, s in zip(outputs, stats, strict=True)]
            outputs = [self.filters.after(y, header) for y in outputs]
            keep_normalized = True  # in their final scale now: written as they are
        super().write(path, outputs, stats, header, dtype, fmt, keep_normalized, protect, label)


class DeviceFrames(HostFrames):
    """Frames as float32 tensors on ``device`` (see the module docstring), binned and filtered there
    with ``filters`` (the output header follows the binning)."""

    def __init__(self, spec: ModelSpec, device: str, filters: FrameFilters | None = None) -> None:
        import torch

        from cryodeploy.imaging.device import DeviceFrameContract
        from cryodeploy.imaging.device_filters import TORCH_OPS

        super().__init__(spec)
        self.filters = filters if filters is not None and filters.active else None
        self._ops = TORCH_OPS
        self._torch = torch
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.contract = DeviceFrameContract(spec.contract)
        self._local = threading.local()
        self._spare: list[Any] = []  # pinned buffers made by warm_up, taken by the threads' first use
        self._spare_lock = threading.Lock()
        #: the torch dtype each MRC mode's bytes are copied as (uint16 as int16, corrected after)
        self._modes = {0: torch.int8, 1: torch.int16, 2: torch.float32, 6: torch.int16, 12: torch.float16}

    def _thread_state(self) -> Any:
        loc = self._local
        if not hasattr(loc, "stream"):
            loc.stream = self._torch.cuda.Stream(self.device) if self._cuda else None
            loc.buffer = self._torch.empty(0, dtype=self._torch.uint8)
        return loc

    def _buffer(self, nbytes: int) -> Any:
        loc = self._thread_state()
        if loc.buffer.numel() < nbytes:
            loc.buffer = None  # free the old one first
            with self._spare_lock:
                fits = [i for i, b in enumerate(self._spare) if b.numel() >= nbytes]
                loc.buffer = self._spare.pop(fits[0]) if fits else None
            if loc.buffer is None:
                loc.buffer = self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=self._cuda)
        return loc.buffer

    def warm_up(self, engine: TiledEngine, shape: tuple[int, ...], buffers: int) -> float:
        """One synthetic frame of ``shape`` through the whole device path (statistics, normalization,
        tiles and forward, de-normalization, the float32 and float16 casts and header statistics, the
        copy out) and ``buffers`` pinned host buffers of its float32 size made for the reader and
        writer threads, so the files pay none of it (kernels load on first use, pinning memory
        takes milliseconds per megabyte); returns the seconds. A failure is left to the files."""
        torch = self._torch
        t0 = time.perf_counter()
        gen = torch.Generator(self.device).manual_seed(0)
        frame = torch.rand(shape, generator=gen, device=self.device)
        with self._on_stream():
            p = self.contract.prepare(frame)
        self._sync()
        task = FrameTask(None, p.image, p.shape)
        engine.add(task)
        engine.flush()
        engine.arrays.sync()
        if task.error is not None:
            return time.perf_counter() - t0
        for dtype in ("float32", "float16"):  # both casts; this thread's buffer is then float32-sized
            self._to_host([task.output()], [p.stats], False, dtype, False, "warm-up")
        loc = self._thread_state()
        spares = [loc.buffer, *(torch.empty(frame.numel() * 4, dtype=torch.uint8, pin_memory=self._cuda)
                                for _ in range(buffers - 1))]
        loc.buffer = torch.empty(0, dtype=torch.uint8)  # this thread writes no files: the buffer goes on
        with self._spare_lock:
            self._spare.extend(spares)
        return time.perf_counter() - t0

    def _on_stream(self) -> Any:
        import contextlib

        stream = self._thread_state().stream
        return self._torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        stream = self._thread_state().stream
        if stream is not None:
            stream.synchronize()

    def read(self, path: Path, min_size: int) -> tuple[MicrographHeader, Iterator[Prepared]]:
        """Header checks on the host; pixels straight from the file into pinned memory, then the device."""
        from cryodeploy.imaging.device import validate_frames

        torch = self._torch
        header = read_header(path)
        h, w = header.frame_shape
        if h < min_size or w < min_size:
            raise InputError(f"{path}: image is {w}x{h} pixels, expected at least {min_size}x{min_size}")
        nbytes = header.n_frames * h * w * np.dtype(SUPPORTED_MODES[header.mode]).itemsize
        check_fits(path, header, nbytes, available_memory(), "memory")  # the pinned buffer
        need = h * w * 4 * (header.n_frames + HOST_FRAMES_PEAK)
        if self._cuda:
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            free = int(torch.cuda.mem_get_info(self.device)[0]) + cached  # torch's cache is free to us
            check_fits(path, header, need, free, "device memory")
        else:
            check_fits(path, header, need + nbytes, available_memory(), "memory")
        buf = self._buffer(nbytes)
        raw = read_data_into(path, header, buf.numpy())
        with self._on_stream():
            if np.shares_memory(raw, buf.numpy()):
                dev = buf[:nbytes].to(self.device, non_blocking=True).view(self._modes[header.mode])
            else:  # a big-endian file, byte-swapped on the host
                dev = torch.from_numpy(raw.reshape(-1).view(np.uint8)).to(self.device).view(
                    self._modes[header.mode])
            frames = dev.to(torch.float32).reshape(header.n_frames, h, w)
            if header.mode == 6:  # uint16 copied as int16
                frames = torch.where(frames < 0, frames + 65536.0, frames)
            validate_frames(frames, path)  # waits for the copy: the pinned buffer is free again
        if self.filters is None:
            return header, self._prepared(frames, header)
        out = self.filters.header(header)
        oh, ow = out.frame_shape
        if min(oh, ow) < min_size:
            raise InputError(f"{path}: binned to {ow}x{oh}, smaller than the model's {min_size} px minimum")
        return out, self._prepared(frames, header)

    def _prepared(self, frames: Any, source: MicrographHeader) -> Iterator[Prepared]:
        for frame in frames:
            with self._on_stream():
                if self.filters is not None:
                    frame = self.filters.before(frame, source, self._ops)
                p = self.contract.prepare(frame)
            self._sync()
            yield p.image, p.shape, p.stats

    def write(
        self, path: Path, outputs: list[Any], stats: list[NormStats], header: MicrographHeader,
        dtype: str, fmt: str, keep_normalized: bool, protect: tuple[Path, ...], label: str,
    ) -> None:
        """De-normalize, cast and take the header statistics on the device; write header + bytes."""
        if self.filters is not None and self.filters.filters_after:
            with self._on_stream():
                finished = (self.contract.finish(y, s, keep_normalized=keep_normalized)
                            for y, s in zip(outputs, stats, strict=True))
                outputs = [self.filters.after(y, header, self._ops) for y in finished]
            keep_normalized = True  # in their final scale now: written as they are
        if fmt != "mrc":  # other formats take numpy arrays
            arrays = [self.to_numpy(y) for y in outputs]
            super().write(path, arrays, stats, header, dtype, fmt, keep_normalized, protect, label)
            return
        host, head = self._to_host(outputs, stats, header.is_stack, dtype, keep_normalized, path)
        write_raw_micrograph(path, host, head, header, protect, label)

    def _to_host(self, outputs: list[Any], stats: list[NormStats], stack: bool, dtype: str,
                 keep_normalized: bool, path: object) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The outputs de-normalized, stacked (``stack``) and cast to ``dtype`` on the device, with their
        header statistics; copied into this thread's pinned buffer (valid until its next use)."""
        from cryodeploy.imaging.device import header_stats

        torch = self._torch
        tdtype = torch.float16 if dtype == "float16" else torch.float32
        with self._on_stream():
            frames = [self.contract.finish(y, s, keep_normalized=keep_normalized)
                      for y, s in zip(outputs, stats, strict=True)]
            data32 = torch.stack(frames) if stack else frames[0]
            data = data32.to(tdtype)
            head = header_stats(data, path, dtype, data32)
            del frames, data32
            buf = self._buffer(data.numel() * data.element_size())
            host = buf[: data.numel() * data.element_size()].view(tdtype).view(data.shape)
            host.copy_(data, non_blocking=True)
        self._sync()
        return host.numpy(), head

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` copied to the host."""
        return np.asarray(x.detach().cpu().numpy())


def frames_for(
    backend: Backend, spec: ModelSpec, frame_path: str, filters: FrameFilters | None = None,
    movies: MovieConfig | None = None,
) -> HostFrames:
    """The frame path the runner takes with ``backend`` (see :func:`uses_device_path`), binning and
    filtering with ``filters`` there; the host path (:class:`FilteredHostFrames`) for ``movies``."""
    if movies is not None:
        if frame_path == "device":
            raise ConfigError("frame_path 'device': movies are summed on the host frame path")
        return FilteredHostFrames(spec, filters or FrameFilters(), movies)
    if uses_device_path(backend, frame_path):
        return DeviceFrames(spec, backend.device, filters)
    return FilteredHostFrames(spec, filters, None) if filters and filters.active else HostFrames(spec)


def min_input_size(spec: ModelSpec) -> int:
    """Smallest accepted image side for a model: 32 px, or two strides if larger (an image smaller than
    the receptive field runs as one tile, equal to the whole-image forward)."""
    return max(MIN_SIZE, 2 * spec.stride)


def _int_or_none(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def denoise_image(
    image: np.ndarray,
    backend: Backend,
    spec: ModelSpec,
    tile: int | str = "auto",
    batch: int | str = "auto",
    keep_normalized: bool = False,
    frame_path: str = "auto",
) -> np.ndarray:
    """Denoise a 2-D image (or a 3-D stack, frames first) in memory; same shape, input's scale.

    Each frame is normalized as the model was trained, run tile by tile and de-normalized
    (unless ``keep_normalized``). On the device path (``frame_path``, see
    :func:`~cryodeploy.inference.frames.uses_device_path`) the array is copied to the device once,
    everything runs there, and the result is copied back once.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise InputError(f"array: found shape {arr.shape}, expected a 2-D image or a 3-D stack")
    h, w = arr.shape[-2:]
    if h < min_input_size(spec) or w < min_input_size(spec):
        validate_array(arr, "array", min_input_size(spec))  # the size message
    on_device = uses_device_path(backend, frame_path)
    if on_device:
        import torch

        from cryodeploy.imaging.device import DeviceFrameContract, validate_frames

        with warnings.catch_warnings():  # a read-only array: only read, never written
            warnings.simplefilter("ignore", UserWarning)
            frames: Any = torch.from_numpy(np.ascontiguousarray(arr)).to(backend.device).reshape(-1, h, w)
        validate_frames(frames, "array")
        contract: Any = DeviceFrameContract(spec.contract)
    else:
        validate_array(arr, "array", min_input_size(spec))
        frames, contract = arr.reshape(-1, h, w), spec.contract
    padded = (h + -h % spec.stride, w + -w % spec.stride)
    t, b = auto_geometry(padded, spec, backend.device, _int_or_none(tile), _int_or_none(batch))
    n_tiles = len(TilePlan.create((h, w), t, spec.receptive_radius, spec.stride)) * len(frames)
    arrays = DeviceArrays(backend.device) if on_device else None
    engine = TiledEngine(backend, spec, t, min(b, n_tiles), arrays)  # no larger batch than the work
    stats, finished = [], []
    for i, frame in enumerate(frames):
        p = contract.prepare(frame)
        stats.append(p.stats)
        finished += engine.add(FrameTask(i, p.image, p.shape))
    finished += engine.flush()
    out: Any = torch.empty_like(frames) if on_device else np.empty_like(frames)
    for task in finished:
        if task.error is not None:
            raise task.error
        out[task.key] = contract.finish(task.output(), stats[task.key], keep_normalized=keep_normalized)
    host: np.ndarray = out.cpu().numpy() if on_device else out
    return host.reshape(arr.shape)
