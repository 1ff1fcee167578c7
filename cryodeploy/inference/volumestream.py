"""One tomogram file through a volume model with bounded memory: the host path and the device path.

Host path (:class:`HostVolumes`, any backend): the data block is read straight into one float32
array (:func:`~cryodeploy.io.rawvolume.read_volume_data`), normalized there in place, padded to
the stride (the unpadded array is dropped as soon as the padded one exists), tiled into a stitched
output, which is de-normalized in place and written slab by slab with the header statistics
accumulated on the way (:func:`~cryodeploy.io.rawvolume.write_raw_volume`). The input is freed
before the write. Peak host memory: two volumes of float32 (input and stitched output, each padded
to the stride) plus one batch of tiles and one write slab; :data:`HOST_VOLUMES_PEAK` (2.5) is the
bound tests/inference/test_volume_stream.py asserts (the whole-array path peaked near 4).

Device path (:class:`DeviceVolumes`, backends with a device-resident forward): the file's bytes
are read into one reusable pinned buffer, copied to the device as they are, and converted,
validated, normalized, padded, tiled, de-normalized and cast there; the header statistics are
accumulated on the device over slabs; the output comes back into the same pinned buffer and is
written as it is. Host memory: the pinned buffer (the larger of the input's bytes and the
output's).

Both give the voxels of :func:`~cryodeploy.inference.volumes.denoise_volume` on the same path
(same statistics, padding, tiles and batches: :func:`volume_engine`), bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import InputError
from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize
from cryodeploy.inference.batching import DeviceArrays, FrameTask, HostArrays, TiledEngine, auto_geometry
from cryodeploy.inference.frames import available_memory
from cryodeploy.inference.tiling import TilePlan
from cryodeploy.io.mrc import MIN_SIZE, SUPPORTED_MODES
from cryodeploy.io.rawmrc import read_data_into
from cryodeploy.io.rawvolume import read_volume_data, write_raw_volume
from cryodeploy.io.volumes import MIN_DEPTH, VolumeHeader, read_volume_header

if TYPE_CHECKING:
    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = ["HOST_VOLUMES_PEAK", "DeviceVolumes", "HostVolumes", "run_tiles", "volume_engine"]

#: peak host memory of the host path, in volumes of float32 (see the module docstring)
HOST_VOLUMES_PEAK = 2.5
#: device memory the device path needs, in volumes of float32 (input, normalized and padded input,
#: stitched output, de-normalized output, a cast copy)
DEVICE_VOLUMES_PEAK = 5


def volume_engine(shape: tuple[int, ...], backend: Backend, spec: ModelSpec, tile: int | str,
                  batch: int | str, arrays: HostArrays | None) -> TiledEngine:
    """The engine for one volume of ``shape``: tile and batch from the free device memory unless given,
    the batch no larger than the volume's tiles."""
    padded = tuple(n + -n % spec.stride for n in shape)
    t, b = auto_geometry(padded, spec, backend.device, None if tile == "auto" else int(tile),
                         None if batch == "auto" else int(batch))
    n_tiles = len(TilePlan.create(shape, t, spec.receptive_radius, spec.stride))
    return TiledEngine(backend, spec, t, min(b, n_tiles), arrays)  # no larger batch than the work


def run_tiles(engine: TiledEngine, image: Any, shape: tuple[int, ...]) -> Any:
    """The network's output (normalized, cropped to ``shape``) for one normalized, padded volume."""
    task = FrameTask(0, image, shape)
    done = engine.add(task) + engine.flush()
    task.image = None  # the input's memory goes as soon as the caller lets it go
    if done[0].error is not None:
        raise done[0].error
    return task.output()


def _size(header: VolumeHeader) -> str:
    nz, ny, nx = header.shape
    return f"{nx}x{ny}x{nz}"


def _check_fits(path: Path, header: VolumeHeader, need: int, available: int | None, where: str) -> None:
    if available is not None and need > available:
        raise InputError(
            f"{path}: a {_size(header)} volume needs about {need / 2**30:.1f} GiB of {where} to denoise, "
            f"{available / 2**30:.1f} GiB available"
        )


class HostVolumes:
    """Tomogram files on the host path (see the module docstring)."""

    def __init__(self, backend: Backend, spec: ModelSpec, tile: int | str = "auto", batch: int | str = "auto",
                 keep_normalized: bool = False) -> None:
        self.backend, self.spec, self.tile, self.batch = backend, spec, tile, batch
        self.keep_normalized = keep_normalized

    def denoise(self, src: Path, dst: Path, dtype: str, protect: tuple[Path, ...], label: str) -> None:
        """Denoise the volume ``src`` into ``dst`` (atomically), its header kept."""
        header = read_volume_header(src)
        voxels = int(np.prod(header.shape))
        _check_fits(src, header, int(voxels * 4 * HOST_VOLUMES_PEAK), available_memory(), "memory")
        data = read_volume_data(src, header)
        contract = self.spec.contract
        stats = norm_stats(data, contract.normalization)
        image = contract.pad(normalize(data, stats, out=data))
        del data  # the unpadded input, where padding made a new array
        engine = volume_engine(header.shape, self.backend, self.spec, self.tile, self.batch, None)
        out = run_tiles(engine, image, header.shape)
        del image
        if not self.keep_normalized:
            denormalize(out, stats, out=out)
        write_raw_volume(dst, out, header, dtype, protect, label)


class DeviceVolumes(HostVolumes):
    """Tomogram files on the device path (see the module docstring); one pinned buffer, reused."""

    def __init__(self, backend: Backend, spec: ModelSpec, tile: int | str = "auto", batch: int | str = "auto",
                 keep_normalized: bool = False) -> None:
        import torch

        from cryodeploy.imaging.device import DeviceFrameContract

        super().__init__(backend, spec, tile, batch, keep_normalized)
        self._torch = torch
        self.device = torch.device(backend.device)
        self._cuda = self.device.type == "cuda"
        self.contract = DeviceFrameContract(spec.contract)
        self._buffer = torch.empty(0, dtype=torch.uint8)
        #: the torch dtype each MRC mode's bytes are copied as (uint16 as int16, corrected after)
        self._modes = {0: torch.int8, 1: torch.int16, 2: torch.float32, 6: torch.int16, 12: torch.float16}

    def _pinned(self, nbytes: int) -> Any:
        if self._buffer.numel() < nbytes:
            self._buffer = self._torch.empty(0, dtype=self._torch.uint8)  # free the old one first
            self._buffer = self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=self._cuda)
        return self._buffer[:nbytes]

    def _free_device(self) -> int | None:
        if not self._cuda:
            return None
        torch = self._torch
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(torch.cuda.mem_get_info(self.device)[0]) + cached  # torch's cache is free to us

    def _upload(self, src: Path, header: VolumeHeader) -> Any:
        """The file's voxels as a float32 tensor on the device, validated there."""
        from cryodeploy.imaging.device import validate_volume_tensor

        torch = self._torch
        nbytes = int(np.prod(header.shape)) * np.dtype(SUPPORTED_MODES[header.mode]).itemsize
        buf = self._pinned(nbytes)
        raw = read_data_into(src, header, buf.numpy())
        if np.shares_memory(raw, buf.numpy()):
            dev = buf.to(self.device, non_blocking=True)
        else:  # a big-endian file, byte-swapped on the host
            dev = torch.from_numpy(raw.reshape(-1).view(np.uint8)).to(self.device)
        dev = dev.view(self._modes[header.mode])
        volume = dev.to(torch.float32).reshape(header.shape)
        del dev
        if header.mode == 6:  # uint16 copied as int16
            volume = torch.where(volume < 0, volume + 65536.0, volume)
        validate_volume_tensor(volume, src, MIN_SIZE, MIN_DEPTH)  # waits for the copy: the buffer is free
        return volume

    def denoise(self, src: Path, dst: Path, dtype: str, protect: tuple[Path, ...], label: str) -> None:
        """Denoise the volume ``src`` into ``dst`` (atomically) on the device, its header kept."""
        from cryodeploy.imaging.device import volume_header_stats

        torch = self._torch
        header = read_volume_header(src)
        voxels = int(np.prod(header.shape))
        out_bytes = voxels * (2 if dtype == "float16" else 4)
        in_bytes = voxels * np.dtype(SUPPORTED_MODES[header.mode]).itemsize
        host_need = max(in_bytes, out_bytes) - self._buffer.numel()
        _check_fits(src, header, host_need, available_memory(), "memory")  # the pinned buffer
        _check_fits(src, header, voxels * 4 * DEVICE_VOLUMES_PEAK, self._free_device(), "device memory")
        volume = self._upload(src, header)
        p = self.contract.prepare(volume)
        del volume
        engine = volume_engine(header.shape, self.backend, self.spec, self.tile, self.batch,
                               DeviceArrays(self.backend.device))
        out, stats = run_tiles(engine, p.image, p.shape), p.stats
        del p
        data32 = self.contract.finish(out, stats, keep_normalized=self.keep_normalized)
        del out
        tdtype = torch.float16 if dtype == "float16" else torch.float32
        data = data32.to(tdtype).contiguous()
        head = volume_header_stats(data, dst, dtype, data32)
        del data32
        host = self._pinned(out_bytes).view(tdtype).view(header.shape)
        host.copy_(data, non_blocking=True)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        del data
        write_raw_volume(dst, host.numpy(), header, dtype, protect, label, stats=head)
