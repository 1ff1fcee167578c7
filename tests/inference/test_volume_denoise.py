"""Volume models on tomograms: 3-D tiling equals the whole-volume forward, the API and the file runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy import Denoiser
from cryodeploy.backends import BackendOptions
from cryodeploy.backends.base import Backend
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.errors import ConfigError, InputError
from cryodeploy.imaging.contract import pad_to_stride
from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize
from cryodeploy.inference.batching import (
    CPU_BATCH,
    CPU_TILE_3D,
    activation_bytes_per_pixel,
    auto_geometry,
    cpu_volume_geometry,
    fit_geometry,
    largest_tensor_per_pixel,
)
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.inference.tiling import TilePlan, min_tile
from cryodeploy.inference.volumes import denoise_volume
from cryodeploy.io.volumes import VolumeHeader, read_volume, read_volume_header, write_volume
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint

SHAPE = (37, 50, 61)  # no side a multiple of the stride 4


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 2})
    model = build_model(spec).eval()
    return model, spec, save_checkpoint(tmp_path_factory.mktemp("v") / "unet3d.safetensors", model, spec)


@pytest.fixture
def volume(rng) -> np.ndarray:
    return (rng.standard_normal(SHAPE) * 20 + 300).astype(np.float32)


def _whole(model, vol: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(vol))[None, None])[0, 0].numpy()


@pytest.mark.parametrize(("shape", "tile", "radius", "stride"), [
    ((37, 50, 61), 56, 24, 4), ((20, 33, 17), 8, 3, 1), ((16, 16, 100), 40, 10, 2),
])
def test_3d_plan_partitions_the_volume_with_aligned_windows(shape, tile, radius, stride) -> None:
    plan = TilePlan.create(shape, tile, radius, stride)
    assert plan.padded_shape == tuple(n + -n % stride for n in shape) and len(plan.tile_shape) == 3
    owner = np.zeros(plan.padded_shape, np.int32)
    for t in plan.tiles:
        owner[t.valid] += 1
        for w, v, n, s in zip(t.window, t.valid, plan.padded_shape, plan.tile_shape, strict=True):
            assert w.start % stride == 0 and w.stop - w.start == s
            assert v.start == 0 or v.start - w.start >= plan.halo  # a halo where not a border
            assert v.stop == n or w.stop - v.stop >= plan.halo
    assert (owner == 1).all()


def test_tiled_volume_equals_whole_volume_forward(volume_model, volume) -> None:
    model, spec, _ = volume_model
    stats = norm_stats(volume, spec.normalization)
    ref = _whole(model, pad_to_stride(normalize(volume, stats), 4))[:37, :50, :61]
    with TorchBackend(model, BackendOptions()) as backend:
        for tile, batch, n in ((min_tile(spec.receptive_radius, spec.stride), 3, 4), (56, 2, 2), (64, 1, 1)):
            assert len(TilePlan.create(SHAPE, tile, spec.receptive_radius, spec.stride)) == n
            got = denoise_volume(volume, backend, spec, tile=tile, batch=batch, keep_normalized=True)
            assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        whole = denoise_volume(volume, backend, spec, tile=64, batch=1)
    np.testing.assert_allclose(whole, denormalize(ref, stats), rtol=0, atol=1e-3)


def test_device_path_equals_host_path_on_volumes(volume_model, volume) -> None:
    """The device frame path (torch tensors end to end; CPU tensors here, CUDA on a GPU) gives the host
    path's volume."""
    model, spec, _ = volume_model
    with TorchBackend(model, BackendOptions()) as backend:
        host = denoise_volume(volume, backend, spec, tile=56, batch=2, frame_path="host")
        device = denoise_volume(volume, backend, spec, tile=56, batch=2, frame_path="device")
    assert device.shape == SHAPE and device.dtype == np.float32
    assert np.abs(device - host).max() <= 1e-5 * np.abs(host).max()


class _Limited(Backend):
    """The real torch backend on a device that holds at most ``limit`` voxels per batch."""

    name = "limited"

    def __init__(self, inner: TorchBackend, limit: int) -> None:
        super().__init__(inner.options)
        self.inner, self.limit, self.calls = inner, limit, []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        if batch.size > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.run(batch)


def test_out_of_memory_halves_batch_then_tile_on_volumes(rng) -> None:
    volume = rng.standard_normal((24, 32, 72)).astype(np.float32)
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 1})  # radius 10: a 24^3 tile is valid
    with TorchBackend(build_model(spec), BackendOptions()) as backend:
        ref = denoise_volume(volume, backend, spec, tile=64, batch=1)
        limited = _Limited(backend, limit=24 * 32 * 48 - 1)
        got = denoise_volume(volume, limited, spec, tile=48, batch=2)  # 2 tiles of 24x32x48
    assert limited.calls[:3] == [(2, 1, 24, 32, 48), (1, 1, 24, 32, 48), (1, 1, 24, 24, 24)]
    assert set(limited.calls[4:]) == {(1, 1, 24, 24, 24)}
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_auto_geometry_fits_volume_tiles_to_free_memory(volume_model) -> None:
    """Half the free memory holds one batch's activations (218.5 bytes per voxel for base 4, depth 2),
    and no layer tensor exceeds 2^31 - 1 elements (the full-resolution concatenation: 12 per voxel)."""
    _, spec, _ = volume_model
    assert activation_bytes_per_pixel(spec) == 218.5 and largest_tensor_per_pixel(spec) == 12
    assert fit_geometry((256, 1024, 1024), spec, free_bytes=8 << 30) == (256, 1)  # 256^3: 3.7 GB of 4.3
    # the whole tomogram would fit 70 GiB (58.7 GB) but its concatenation holds 3.2e9 elements
    assert fit_geometry((256, 1024, 1024), spec, free_bytes=140 << 30) == (512, 1)
    assert fit_geometry((40, 52, 64), spec, free_bytes=8 << 30) == (64, 8)


def test_cpu_auto_volume_tile_leaves_a_centre_of_half_the_tile() -> None:
    """unet3d depth 1 and 2 (halos 10 and 24) keep 128^3 and batch 2, so their outputs are those of
    before; depth 3 (halo 56: a 16-voxel centre in 128, 29241 tiles of a 256x1024x1024 tomogram)
    gets 224 (162 tiles), depth 4 (halo 112: 128 was refused) 256, depth 5 its minimum 480; batch 1."""
    want = {1: (CPU_TILE_3D, CPU_BATCH), 2: (CPU_TILE_3D, CPU_BATCH), 3: (224, 1), 4: (256, 1), 5: (480, 1)}
    specs = {d: ModelSpec("unet3d", params={"base_channels": 2, "depth": d}) for d in want}
    assert {d: cpu_volume_geometry(s) for d, s in specs.items()} == want
    assert (CPU_TILE_3D, CPU_BATCH) == (128, 2)
    tomogram, deep = (256, 1024, 1024), specs[3]
    assert auto_geometry(tomogram, deep, "cpu", None, None) == (224, 1)
    assert auto_geometry(tomogram, deep, "cpu", 128, None) == (128, 2)  # a given tile: the batch of before
    assert auto_geometry(tomogram, deep, "cpu", None, 3) == (224, 3)
    assert [len(TilePlan.create(tomogram, t, deep.receptive_radius, deep.stride)) for t in (128, 224)] == [
        29241, 162]


@pytest.mark.parametrize(("depth", "shape", "tiles"), [(3, (16, 240, 32), 2), (4, (16, 136, 40), 1)])
def test_deep_unet3d_auto_on_the_cpu_equals_the_whole_volume_forward(tmp_path, rng, depth, shape,
                                                                     tiles) -> None:
    """Depth 3 in two 224-voxel tiles, depth 4 (refused with 128 before) in one 256 tile: the
    whole-volume forward; the host path of the file runner gives denoise_volume's voxels bit for bit."""
    torch.manual_seed(depth)
    spec = ModelSpec("unet3d", params={"base_channels": 2, "depth": depth})
    model = build_model(spec).eval()
    vol = (rng.standard_normal(shape) * 20 + 300).astype(np.float32)
    tile = cpu_volume_geometry(spec)[0]
    assert len(TilePlan.create(shape, tile, spec.receptive_radius, spec.stride)) == tiles
    stats = norm_stats(vol, spec.normalization)
    ref = _whole(model, pad_to_stride(normalize(vol, stats), spec.stride))[tuple(slice(0, n) for n in shape)]
    with TorchBackend(model, BackendOptions()) as backend:
        got = denoise_volume(vol, backend, spec, keep_normalized=True)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        write_volume(tmp_path / "t.mrc", vol)
        cfg = RunConfig(quiet=True, frame_path="host")
        assert denoise_files([tmp_path / "t.mrc"], tmp_path / "out", backend, spec, cfg).ok
        np.testing.assert_array_equal(read_volume(tmp_path / "out" / "t.mrc").data,
                                      denoise_volume(vol, backend, spec))


def test_denoiser_takes_volumes_and_refuses_the_wrong_dimensionality(volume_model, volume, cnn3_checkpoint,
                                                                    tmp_path) -> None:
    model, spec, path = volume_model
    with Denoiser.load(path, device="cpu") as d:
        got = d(volume, tile=56, batch=2)
        assert got.shape == SHAPE and got.dtype == np.float32
        with TorchBackend(model, BackendOptions()) as backend:
            want = denoise_volume(volume, backend, spec, tile=56, batch=2)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()  # CPU kernels: not bitwise
        with pytest.raises(InputError, match=r"found 2-D data, but unet3d is a volume model"):
            d(volume[0])
    write_volume(tmp_path / "tomo.mrc", volume)
    with Denoiser.load(cnn3_checkpoint, device="cpu") as d2:
        assert d2(volume[:, :32, :32]).shape == (37, 32, 32)  # an image model: a 3-D array is a stack
        summary = d2.denoise_files([tmp_path / "tomo.mrc"], tmp_path / "out", quiet=True)
        assert "tomo.mrc: found a 3-D volume (61x50x37, space group 1)" in (summary.files[0].error or "")
        with pytest.raises(InputError, match="cnn3 is a 2-D image model"):
            denoise_volume(volume, d2.backend, d2.spec)


def test_denoise_files_on_mrc_volumes_keeps_geometry_skips_existing(tmp_path, volume_model, volume) -> None:
    model, spec, _ = volume_model
    src = tmp_path / "in"
    src.mkdir()
    write_volume(src / "a.rec", volume, VolumeHeader(SHAPE, 2, (4.0, 4.0, 5.0), (10.0, 20.0, 30.0)))
    write_volume(src / "b.mrc", volume[::-1])
    (src / "c.mrc").write_bytes(b"not an mrc file")
    out = tmp_path / "out"
    with TorchBackend(model, BackendOptions()) as backend:
        summary = denoise_files(sorted(src.iterdir()), out, backend, spec, RunConfig(tile=56, quiet=True))
        assert [f.status for f in summary.files] == ["done", "done", "failed"]
        assert "c.mrc: not a readable MRC file" in (summary.files[2].error or "")
        done = read_volume(out / "a.rec")
        data, head = done.data, done.header
        assert (head.voxel_size, head.origin) == ((4.0, 4.0, 5.0), (10.0, 20.0, 30.0))
        assert head.labels[-1].startswith("cryodeploy ") and head.labels[-1].endswith(" denoise (unet3d)")
        want = denoise_volume(volume, backend, spec, tile=56)
        assert np.abs(data - want).max() <= 1e-6 * np.abs(want).max()
        again = denoise_files(sorted(src.iterdir()), out, backend, spec,
                              RunConfig(tile=56, quiet=True, skip_existing=True, shard=(0, 2)))
        assert [(f.input.split("/")[-1], f.status) for f in again.files] == [("a.rec", "skipped"),
                                                                             ("c.mrc", "failed")]
        with pytest.raises(ConfigError, match="output format tiff: not supported for volumes"):
            denoise_files([src / "a.rec"], tmp_path / "o2", backend, spec, RunConfig(output_format="tiff"))
        half = denoise_files([src / "a.rec"], tmp_path / "o3", backend, spec,
                             RunConfig(tile=56, quiet=True, output_dtype="float16", suffix="_h"))
        assert half.ok and read_volume_header(tmp_path / "o3" / "a_h.rec").mode == 12  # MRC float16
        assert np.abs(read_volume(tmp_path / "o3" / "a_h.rec").data - data).max() <= 2e-3 * np.abs(data).max()
    assert sorted(p.name for p in out.iterdir()) == ["a.rec", "b.mrc"]  # no temporary or claim files left
