"""Tomogram files streamed with bounded memory (inference/volumestream.py): the whole-array
implementation's outputs, byte for byte, on the host and the device path; the peak memory bound."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from cryodeploy._version import __version__
from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.imaging.contract import pad_to_stride
from cryodeploy.imaging.normalize import denormalize, norm_stats, normalize
from cryodeploy.imaging.simulate.tomogram import simulate_tomogram
from cryodeploy.imaging.simulate.tomoscene import TomoConfig
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.inference.volumes import denoise_volume
from cryodeploy.inference.volumestream import HOST_VOLUMES_PEAK
from cryodeploy.io.volumes import VolumeHeader, read_volume, write_volume
from cryodeploy.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 2})  # radius 24, stride 4
    return build_model(spec).eval(), spec


@pytest.fixture(scope="module")
def tomograms(tmp_path_factory) -> list[Path]:
    """Two synthetic tomograms (synth --volume's simulator, fixed seed): a float32 .mrc whose sides
    are no multiple of the stride, with voxel size, origin, start indices, extended header and labels;
    and an int16 .rec (counts)."""
    folder = tmp_path_factory.mktemp("tomos")
    a = simulate_tomogram(TomoConfig(shape=(37, 50, 61), seed=3, particles=8, vesicles=1), 0).even.numpy()
    head = VolumeHeader((37, 50, 61), 2, (8.0, 8.0, 9.0), (1.0, 2.0, 3.0), (4, 5, 6), 1, "volume", b"CCP4",
                        bytes(range(96)), ("tilt series 7",))
    b = simulate_tomogram(TomoConfig(shape=(32, 64, 64), seed=3, particles=8, tilt_range_deg=90.0), 1).even
    first = write_volume(folder / "t0.mrc", a, head)
    second = folder / "t1.rec"
    import mrcfile

    with mrcfile.new(second) as mrc:
        mrc.set_data(b.numpy().astype(np.int16))
        mrc.set_volume()
    return [first, second]


def _whole_array_output(src: Path, dst: Path, backend, spec, frame_path: str, dtype: str) -> None:
    """The implementation before streaming: read whole (mrcfile), denoise the array, write with mrcfile."""
    volume = read_volume(src)
    out = denoise_volume(volume.data, backend, spec, 56, 3, False, frame_path, where=str(src))
    write_volume(dst, out, volume.header, dtype, (src,), f"cryodeploy {__version__} denoise (unet3d)")


_DMEAN, _RMS = 84, 216  # header offsets of the statistics taken in float32 by mrcfile, float64 here


@pytest.mark.parametrize("frame_path", ["host", "device"])
def test_streamed_outputs_equal_the_whole_array_implementation(tmp_path, model, tomograms,
                                                               frame_path) -> None:
    """Voxels, extended header and every header field byte for byte; dmean and rms within 2 float32 ulps
    (mrcfile accumulates them in float32). Measured on main's code too: the same voxels, bit for bit."""
    net, spec = model
    with TorchBackend(net, BackendOptions()) as backend:
        for dtype in ("float32", "float16"):
            got = tmp_path / f"got_{dtype}"
            cfg = RunConfig(tile=56, batch=3, quiet=True, frame_path=frame_path, output_dtype=dtype)  # type: ignore[arg-type]
            assert denoise_files(tomograms, got, backend, spec, cfg).ok
            for src in tomograms:
                want = tmp_path / f"want_{dtype}_{src.name}"
                _whole_array_output(src, want, backend, spec, frame_path, dtype)
                a, b = want.read_bytes(), (got / src.name).read_bytes()
                assert len(a) == len(b)
                differ = sorted({i // 4 * 4 for i in range(len(a)) if a[i] != b[i]})
                assert set(differ) <= {_DMEAN, _RMS}, differ
                for at in (_DMEAN, _RMS):
                    x, y = struct.unpack_from("<f", a, at)[0], struct.unpack_from("<f", b, at)[0]
                    assert abs(x - y) <= 2 * np.spacing(np.float32(x)), (at, x, y)


def test_streamed_output_equals_the_whole_volume_forward(tmp_path, model, tomograms) -> None:
    net, spec = model
    src = tomograms[0]
    data = read_volume(src).data
    stats = norm_stats(data, spec.normalization)
    with torch.no_grad():
        padded = torch.from_numpy(pad_to_stride(normalize(data, stats), 4))[None, None]
        ref = denormalize(net(padded)[0, 0].numpy()[:37, :50, :61], stats)
    with TorchBackend(net, BackendOptions()) as backend:
        assert denoise_files([src], tmp_path, backend, spec, RunConfig(tile=56, quiet=True)).ok
    got = read_volume(tmp_path / src.name).data
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_host_path_peak_memory_is_bounded_by_two_and_a_half_volumes(tmp_path, rng) -> None:
    """A 509x510x62 float32 tomogram (64 MB): the host path holds the normalized input and the stitched
    output (each padded to the stride: 64x512x512) plus a batch of tiles and a write slab. Traced
    (numpy and Python allocations; torch's own CPU allocator, the network's activations, is not seen):
    asserted <= 2.5 volumes; main's whole-array implementation measured 4.08 in the same way, this
    one 2.07."""
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 2, "depth": 1})
    shape = (62, 510, 509)
    src = write_volume(tmp_path / "big.mrc", rng.standard_normal(shape, dtype=np.float32))
    volume = int(np.prod(shape)) * 4
    with TorchBackend(build_model(spec).eval(), BackendOptions()) as backend:
        cfg = RunConfig(tile=128, batch=1, quiet=True, frame_path="host")
        tracemalloc.start()
        try:
            assert denoise_files([src], tmp_path / "out", backend, spec, cfg).ok
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(f"peak {peak / volume:.2f} volumes")
    assert peak <= HOST_VOLUMES_PEAK * volume
    out = read_volume(tmp_path / "out" / "big.mrc")
    assert out.data.shape == shape and np.isfinite(out.data).all()


def test_a_volume_larger_than_memory_fails_alone_before_allocation(tmp_path, model, tomograms) -> None:
    net, spec = model
    big = tmp_path / "huge.mrc"
    write_volume(big, np.arange(16 * 32 * 32, dtype=np.float32).reshape(16, 32, 32))
    with open(big, "r+b") as fh:  # 8192^3 float32 (2 TiB), a sparse data block
        for offset in (0, 4, 8, 28, 32, 36):  # nx, ny, nz, mx, my, mz
            fh.seek(offset)
            fh.write((8192).to_bytes(4, "little"))
        fh.truncate(1024 + 8192**3 * 4)
    import re

    with TorchBackend(net, BackendOptions()) as backend:
        for frame_path in ("host", "device"):
            cfg = RunConfig(tile=56, quiet=True, frame_path=frame_path)  # type: ignore[arg-type]
            summary = denoise_files([big, tomograms[1]], tmp_path / frame_path, backend, spec, cfg)
            assert [f.status for f in summary.files] == ["failed", "done"]
            assert re.fullmatch(rf"{big}: a 8192x8192x8192 volume needs about \d+\.\d GiB of memory to "
                                r"denoise, \d+\.\d GiB available", summary.files[0].error or "")
            assert sorted(p.name for p in (tmp_path / frame_path).iterdir()) == ["t1.rec"]


def test_bad_voxels_fail_the_file_alone_with_the_readers_message(tmp_path, model, tomograms) -> None:
    net, spec = model
    data = read_volume(tomograms[1]).data
    data[5, 3, 2] = np.nan
    bad = tmp_path / "nan.mrc"
    import warnings

    import mrcfile

    with warnings.catch_warnings(), mrcfile.new(bad) as mrc:  # write_volume refuses NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mrc.set_data(data)
        mrc.set_volume()
    flat = write_volume(tmp_path / "flat.mrc", np.full((16, 32, 32), 3.0, np.float32))
    with TorchBackend(net, BackendOptions()) as backend:
        for frame_path in ("host", "device"):
            cfg = RunConfig(tile=56, quiet=True, frame_path=frame_path)  # type: ignore[arg-type]
            summary = denoise_files([bad, flat, tomograms[1]], tmp_path / frame_path, backend, spec, cfg)
            assert {Path(f.input).name: (f.status, f.error) for f in summary.files} == {
                "nan.mrc": ("failed",
                            f"{bad}: found 1 NaN/Inf values (first in section 5), expected finite voxels"),
                "flat.mrc": ("failed", f"{flat}: volume is constant (3), expected non-zero variance"),
                "t1.rec": ("done", None),
            }
            assert sorted(p.name for p in (tmp_path / frame_path).iterdir()) == ["t1.rec"]
