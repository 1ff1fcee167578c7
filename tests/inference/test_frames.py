"""The device frame path (torch tensors end to end; run here on CPU tensors, the same code as on CUDA)
equals the host path: outputs, header statistics, headers, errors, and byte-valid MRC files."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.errors import InputError
from cryodeploy.inference.frames import DeviceFrames, HostFrames, frames_for, uses_device_path
from cryodeploy.inference.runner import RunConfig, denoise_files, denoise_image
from cryodeploy.io.mrc import read_header, read_micrograph
from cryodeploy.models.checkpoint import load_checkpoint
from tests.inference.test_runner import write_mrc
from tests.mrc_cases import pixels

#: device vs host outputs: both run the same forward on the same tiles; the contract's float32
#: maps agree to a few ulps (tests/imaging/test_device.py), so outputs agree to 1e-5 of their range
REL = 1e-5


@pytest.fixture(scope="module")
def cnn3(cnn3_checkpoint):
    model, spec = load_checkpoint(cnn3_checkpoint)
    with TorchBackend(model, BackendOptions()) as b:
        yield b, spec


def _both(paths, tmp_path, backend, spec, **options):
    out = {}
    for path in ("host", "device"):
        cfg = RunConfig(quiet=True, tile=64, batch=3, frame_path=path, **options)  # type: ignore[arg-type]
        summary = denoise_files(paths, tmp_path / path, backend, spec, cfg)
        assert summary.ok, summary.line()
        out[path] = tmp_path / path
    return out["host"], out["device"]


def _close(a: np.ndarray, b: np.ndarray, rel: float = REL) -> None:
    span = float(np.abs(a).max())
    assert a.shape == b.shape and a.dtype == b.dtype
    assert float(np.abs(a.astype(np.float64) - b).max()) <= rel * span


def _header_stats_are_the_datas(path: Path, rel: float) -> None:
    with mrcfile.open(path, permissive=False) as mrc:  # permissive=False: a byte-level validity check
        d, h = mrc.data, mrc.header
        assert (float(h.dmin), float(h.dmax)) == (float(d.min()), float(d.max()))
        assert float(h.dmean) == pytest.approx(float(d.mean(dtype=np.float64)), rel=rel, abs=1e-6)
        assert float(h.rms) == pytest.approx(float(d.std(dtype=np.float64)), rel=rel)


@pytest.mark.parametrize("mode", [0, 1, 2, 6, 12])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_path_equals_host_path(tmp_path, rng, cnn3, mode, dtype) -> None:
    backend, spec = cnn3
    data = pixels(rng, mode, (3, 70, 90))
    src = write_mrc(tmp_path / "in" / "s.mrcs", data, stack=True, ext=bytes(range(256)))
    single = write_mrc(tmp_path / "in" / "one.mrc", data[1])
    host, dev = _both([src, single], tmp_path, backend, spec, output_dtype=dtype)
    for name in ("s.mrcs", "one.mrc"):
        a, b = read_micrograph(host / name), read_micrograph(dev / name)
        assert a.header == b.header and b.header.mode == (12 if dtype == "float16" else 2)
        _close(a.data, b.data, REL if dtype == "float32" else 1e-3)  # float16: 1 ulp of the range
        _header_stats_are_the_datas(dev / name, 1e-6)
        assert (dev / name).stat().st_size == (host / name).stat().st_size


def test_device_path_keep_normalized_preview_and_stride(tmp_path, rng, cnn3, unet_checkpoint) -> None:
    backend, spec = cnn3
    image = (rng.standard_normal((150, 203)) * 40 + 800).astype(np.float32)
    src = write_mrc(tmp_path / "in" / "m.mrc", image)
    host, dev = _both([src], tmp_path / "c", backend, spec, keep_normalized=True, preview=True)
    _close(read_micrograph(host / "m.mrc").data, read_micrograph(dev / "m.mrc").data)
    assert (dev / "m.png").read_bytes() == (host / "m.png").read_bytes()
    model, uspec = load_checkpoint(unet_checkpoint)
    with TorchBackend(model, BackendOptions()) as ub:  # stride 4: reflect padding on the device
        host, dev = _both([src], tmp_path / "u", ub, uspec)
        _close(read_micrograph(host / "m.mrc").data, read_micrograph(dev / "m.mrc").data)
        image = read_micrograph(src).data
        a = denoise_image(image, ub, uspec, tile=64, batch=2, frame_path="host")
        b = denoise_image(image, ub, uspec, tile=64, batch=2, frame_path="device")
        _close(a, b)
        _close(a, read_micrograph(host / "m.mrc").data)


def test_device_path_reports_bad_inputs_like_the_host_path(tmp_path, rng, cnn3) -> None:
    backend, spec = cnn3
    folder = tmp_path / "in"
    nan = (rng.standard_normal((64, 64)) + 5).astype(np.float32)
    nan[3, 4] = np.nan
    paths = [
        write_mrc(folder / "nan.mrc", nan),
        write_mrc(folder / "flat.mrc", np.full((64, 64), 3.0, np.float32)),
        write_mrc(folder / "small.mrc", np.arange(20 * 20, dtype=np.float32).reshape(20, 20)),
        write_mrc(folder / "ok.mrc", (rng.standard_normal((64, 64)) + 5).astype(np.float32)),
    ]
    cut = write_mrc(folder / "cut.mrc", (rng.standard_normal((64, 64)) + 5).astype(np.float32))
    with open(cut, "r+b") as fh:
        fh.truncate(cut.stat().st_size - 10)
    paths.append(cut)
    results = {}
    for path in ("host", "device"):
        cfg = RunConfig(quiet=True, frame_path=path)  # type: ignore[arg-type]
        summary = denoise_files(paths, tmp_path / path, backend, spec, cfg)
        results[path] = [(Path(f.input).name, f.status, f.error) for f in summary.files]
    assert results["device"] == results["host"]
    assert [s for _, s, _ in results["device"]] == ["failed"] * 3 + ["done", "failed"]


@pytest.mark.parametrize("threads", [1, 3])
def test_io_threads_write_the_same_bytes(tmp_path, rng, cnn3, threads) -> None:
    backend, spec = cnn3
    images = [(rng.standard_normal((64, 80)) * 9 + 50).astype(np.float32) for _ in range(7)]
    paths = [write_mrc(tmp_path / "in" / f"m{i}.mrc", im) for i, im in enumerate(images)]
    one = RunConfig(quiet=True, io_threads=1, frame_path="device")
    ref = denoise_files(paths, tmp_path / "ref", backend, spec, one)
    got = denoise_files(paths, tmp_path / "got", backend, spec,
                        RunConfig(quiet=True, io_threads=threads, frame_path="device", queue_depth=1))
    assert ref.ok and got.ok and got.count("done") == 7
    for p in paths:
        assert (tmp_path / "got" / p.name).read_bytes() == (tmp_path / "ref" / p.name).read_bytes()
        assert read_header(tmp_path / "got" / p.name).shape == (64, 80)


def test_which_path_the_runner_takes(cnn3) -> None:
    backend, spec = cnn3
    assert not uses_device_path(backend, "auto")  # CPU: numpy + ONNX-style host path stays the default
    assert uses_device_path(backend, "device") and not uses_device_path(backend, "host")
    assert type(frames_for(backend, spec, "device")) is DeviceFrames
    assert type(frames_for(backend, spec, "auto")) is HostFrames
    from cryodeploy.verify.bench import IdentityBackend

    with pytest.raises(InputError, match="identity/cpu/fp32: no device-resident forward"):
        uses_device_path(IdentityBackend(BackendOptions()), "device")


def _huge_sparse_mrc(path: Path, side: int) -> Path:
    """A valid float32 MRC header for a ``side``^2 image and a sparse data block (no disk used)."""
    write_mrc(path, np.arange(40 * 40, dtype=np.float32).reshape(40, 40))
    with open(path, "r+b") as fh:
        for offset in (0, 4, 28, 32):  # nx, ny, mx, my
            fh.seek(offset)
            fh.write(int(side).to_bytes(4, "little"))
        fh.truncate(1024 + side * side * 4)
    return path


@pytest.mark.parametrize("frame_path", ["host", "device"])
def test_an_input_larger_than_memory_is_refused_before_allocation(tmp_path, rng, cnn3, frame_path) -> None:
    backend, spec = cnn3
    big = _huge_sparse_mrc(tmp_path / "in" / "huge.mrc", 300_000)  # 335 GiB of float32
    ok = write_mrc(tmp_path / "in" / "ok.mrc", (rng.standard_normal((64, 64)) + 5).astype(np.float32))
    cfg = RunConfig(quiet=True, frame_path=frame_path)  # type: ignore[arg-type]
    summary = denoise_files([big, ok], tmp_path / "out", backend, spec, cfg)
    status = {Path(f.input).name: (f.status, f.error or "") for f in summary.files}
    assert status["ok.mrc"][0] == "done" and status["huge.mrc"][0] == "failed"
    assert re_match(rf"{big}: a 300000x300000x1 image needs about \d+\.\d GiB of memory to denoise, "
                    r"\d+\.\d GiB available", status["huge.mrc"][1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.mrc"]


def re_match(pattern: str, text: str) -> bool:
    import re

    return re.fullmatch(pattern, text) is not None


def test_host_path_peak_memory_is_a_small_multiple_of_one_frame(tmp_path, rng, cnn3) -> None:
    """A 4096^2 float32 file: the host path holds the normalized input and the stitched output
    (2 frames) plus tiles; the bound asserted is 2.5 frames (the old path peaked near 6)."""
    import tracemalloc

    from cryodeploy.inference.frames import HOST_FRAMES_PEAK

    backend, spec = cnn3
    side = 4096
    src = write_mrc(tmp_path / "in" / "big.mrc", rng.standard_normal((side, side), dtype=np.float32))
    frame = side * side * 4
    cfg = RunConfig(quiet=True, frame_path="host", io_threads=1)
    tracemalloc.start()
    try:
        assert denoise_files([src], tmp_path / "out", backend, spec, cfg).ok
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak {peak / frame:.2f} frames")
    assert peak <= 2.5 * frame <= HOST_FRAMES_PEAK * frame
    out = read_micrograph(tmp_path / "out" / "big.mrc")
    _header_stats_are_the_datas(tmp_path / "out" / "big.mrc", 1e-6)
    assert out.data.shape == (side, side)


def test_filters_run_on_either_path_and_movies_take_the_host_path(cnn3) -> None:
    """Binning and filters run where the frames are (numpy on the host, torch on the device); movies
    are summed while read from disk, on the host: frame_path 'device' is refused with them."""
    from cryodeploy.errors import ConfigError
    from cryodeploy.imaging.filters import FrameFilters
    from cryodeploy.imaging.movies import MovieConfig
    from cryodeploy.inference.frames import FilteredHostFrames

    backend, spec = cnn3
    for filters in (FrameFilters(bin=2), FrameFilters(gaussian=1.0, at="after")):
        assert type(frames_for(backend, spec, "host", filters, None)) is FilteredHostFrames
        device = frames_for(backend, spec, "device", filters, None)
        assert type(device) is DeviceFrames and device.filters is not None
        assert RunConfig(frame_path="device", filters=filters).filters is filters
    assert frames_for(backend, spec, "device", FrameFilters(), None).filters is None  # inactive filters
    movies = MovieConfig()
    assert type(frames_for(backend, spec, "auto", FrameFilters(bin=2), movies)) is FilteredHostFrames
    refused = "frame_path 'device': movies are summed on the host frame path"
    with pytest.raises(ConfigError, match=refused):
        frames_for(backend, spec, "device", FrameFilters(), movies)
    with pytest.raises(ConfigError, match=refused):
        RunConfig(frame_path="device", movies=movies)


@pytest.mark.parametrize("options", [
    dict(bin=2, lowpass=8.0, at="after"), dict(bin=3, gaussian=1.5, at="before"), dict(lowpass=6.6)])
def test_device_path_filters_equal_the_host_paths(tmp_path, rng, cnn3, options) -> None:
    """--bin 2 --lowpass 8 --filter-at after (and others) on the device path: the host path's output
    within 1e-5 of its range, with the same header (binned shape, pixel size, statistics)."""
    from cryodeploy.imaging.filters import FrameFilters
    from cryodeploy.io.mrc import MicrographHeader, write_micrograph

    backend, spec = cnn3
    image = (rng.standard_normal((2, 130, 161)) * 10 + 50).astype(np.float32)
    header = MicrographHeader(shape=image.shape, mode=2, voxel_size=(1.1, 1.1, 1.1), origin=(0, 0, 0))
    src = write_micrograph(tmp_path / "m.mrcs", image, header)
    host, device = _both([src], tmp_path, backend, spec, filters=FrameFilters(**options))
    a, b = read_micrograph(host / "m.mrcs"), read_micrograph(device / "m.mrcs")
    f = options.get("bin", 1)
    assert a.data.shape == (2, 130 // f, 161 // f)
    _close(a.data, b.data)
    assert a.header.shape == b.header.shape and a.header.voxel_size == b.header.voxel_size
    assert a.header.voxel_size[0] == pytest.approx(1.1 * 161 / (161 // f))
    _header_stats_are_the_datas(device / "m.mrcs", 1e-6)


def test_ensemble_on_the_device_path_equals_the_host_path(tmp_path, rng, cnn3, unet_checkpoint) -> None:
    """An ensemble of torch members averages on the device (float64 accumulation, as on the host);
    with a member that has no device-resident forward the ensemble has none either."""
    from cryodeploy.backends.ensemble import EnsembleBackend
    from cryodeploy.verify.bench import IdentityBackend

    backend, _ = cnn3
    model, uspec = load_checkpoint(unet_checkpoint)
    image = (rng.standard_normal((90, 130)) * 25 + 400).astype(np.float32)
    src = write_mrc(tmp_path / "in" / "m.mrc", image)
    with TorchBackend(model, BackendOptions()) as ub:
        ens = EnsembleBackend([backend, ub])
        assert ens.device_resident and uses_device_path(ens, "device") and not uses_device_path(ens, "auto")
        host, dev = _both([src], tmp_path, ens, uspec)
        a = read_micrograph(host / "m.mrc").data
        _close(a, read_micrograph(dev / "m.mrc").data)
        _close(a, denoise_image(image, ens, uspec, tile=64, batch=3, frame_path="device"))
        members = [denoise_image(image, b, uspec, tile=64, batch=3, frame_path="host") for b in (backend, ub)]
        assert np.abs(members[0] - members[1]).max() > 1e-2 * image.std()  # the mean is a real test
        _close(a, ((members[0].astype(np.float64) + members[1]) / 2).astype(np.float32))
        mixed = EnsembleBackend([backend, IdentityBackend(BackendOptions())])
        assert not mixed.device_resident
        with pytest.raises(InputError, match=r"ensemble\[.*\]: no device-resident forward"):
            uses_device_path(mixed, "device")


def test_device_path_writes_other_formats_like_the_host_path(tmp_path, rng, cnn3) -> None:
    tifffile = pytest.importorskip("tifffile")
    backend, spec = cnn3
    image = (rng.standard_normal((80, 96)) * 30 + 200).astype(np.float32)
    src = write_mrc(tmp_path / "in" / "m.mrc", image)
    host, dev = _both([src], tmp_path / "tif", backend, spec, output_format="tiff")
    _close(tifffile.imread(host / "m.tif"), tifffile.imread(dev / "m.tif"))
    host, dev = _both([src], tmp_path / "png", backend, spec, output_format="png")
    assert (dev / "m.png").read_bytes() == (host / "m.png").read_bytes()


def test_planned_frames_come_from_the_header_as_read_gives_them(tmp_path, rng, cnn3) -> None:
    """What the runner bounds the batch by: each input's frame shape and count, from its header alone,
    after movie and filter binning; an unreadable file counts as one unknown frame."""
    import tifffile

    from cryodeploy.imaging.filters import FrameFilters
    from cryodeploy.imaging.movies import MovieConfig
    from cryodeploy.inference.frames import FilteredHostFrames

    _, spec = cnn3
    stack = write_mrc(tmp_path / "s.mrcs", rng.standard_normal((3, 70, 90)).astype(np.float32))
    movie = tmp_path / "m.tif"
    tifffile.imwrite(movie, rng.standard_normal((4, 80, 120)).astype(np.float32), photometric="minisblack")
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"\0" * 100)
    host, binned = HostFrames(spec), FilteredHostFrames(spec, FrameFilters(bin=2), None)
    movies = FilteredHostFrames(spec, FrameFilters(bin=2), MovieConfig(bin=2))
    assert [host.planned(p) for p in (stack, bad)] == [((70, 90), 3), (None, 1)]
    assert binned.planned(stack) == ((35, 45), 3)
    assert [movies.planned(p) for p in (movie, stack, bad)] == [((20, 30), 1), ((17, 22), 1), (None, 1)]
    header, frames = movies.read(movie, 16)
    assert header.frame_shape == (20, 30) and len(list(frames)) == 1


def test_device_warm_up_runs_the_frame_path_and_hands_its_buffers_to_the_threads(tmp_path, rng, cnn3) -> None:
    """The GPU warm-up (here on CPU tensors: the same code) runs a synthetic frame through the whole
    device path and leaves one buffer per reader and writer, which the threads then take; outputs
    are the bytes of a run without it."""
    from cryodeploy.inference.batching import DeviceArrays, TiledEngine
    from cryodeploy.inference.runner import _run_in

    backend, spec = cnn3
    images = [(rng.standard_normal((64, 80)) * 9 + 50).astype(np.float32) for _ in range(3)]
    paths = [write_mrc(tmp_path / "in" / f"m{i}.mrc", im) for i, im in enumerate(images)]
    cfg = RunConfig(quiet=True, io_threads=2, frame_path="device")
    ref = denoise_files(paths, tmp_path / "ref", backend, spec, cfg)
    io = DeviceFrames(spec, "cpu")
    engine = TiledEngine(backend, spec, "auto", "auto", DeviceArrays("cpu"))
    calls: list[tuple[int, ...]] = []
    original = backend.run_device
    backend.run_device = lambda x: calls.append(tuple(x.shape)) or original(x)  # type: ignore[method-assign]
    try:
        seconds = io.warm_up(engine, (64, 80), 4)
    finally:
        backend.run_device = original  # type: ignore[method-assign]
    assert seconds > 0 and calls  # the forward ran
    assert [b.numel() for b in io._spare] == [64 * 80 * 4] * 4
    pairs = [(p, tmp_path / "got" / p.name) for p in paths]
    (tmp_path / "got").mkdir()
    got = _run_in(pairs, [tmp_path / "got"], engine, io, spec, cfg)
    assert ref.ok and got.ok and got.count("done") == 3
    assert len(io._spare) < 4  # the reader and writer threads took warmed buffers instead of new ones
    for p in paths:
        assert (tmp_path / "got" / p.name).read_bytes() == (tmp_path / "ref" / p.name).read_bytes()
