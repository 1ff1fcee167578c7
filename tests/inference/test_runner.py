"""The file pipeline: outputs, headers, stacks, bad inputs, existing outputs, path safety, sharding,
claims, memory bound, out-of-memory back-off — on real MRC files and a real torch backend."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryodeploy.backends import Backend, BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.errors import ConfigError, InputError, OutputError
from cryodeploy.files import TEMP_PREFIX
from cryodeploy.imaging.contract import pad_to_stride
from cryodeploy.imaging.normalize import norm_stats, normalize
from cryodeploy.inference.batching import (
    CPU_BATCH,
    CPU_TILE,
    activation_bytes_per_pixel,
    auto_geometry,
    fit_geometry,
    is_out_of_memory,
)
from cryodeploy.inference.claims import try_claim
from cryodeploy.inference.jobs import parse_shard, resolve_shard
from cryodeploy.inference.runner import RunConfig, denoise_files, denoise_image, denoise_pairs
from cryodeploy.io.mrc import read_header, read_micrograph
from cryodeploy.models.checkpoint import load_checkpoint


def write_mrc(path: Path, data: np.ndarray, stack: bool = False, ext: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore")
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        if ext:
            mrc.set_extended_header(np.frombuffer(ext, dtype="V1"))
            mrc.header.exttyp = b"FEI2"
        mrc.voxel_size = (1.06, 1.06, 1.0)
        mrc.header.origin = (12.5, -3.0, 0.0)
        mrc.header.nxstart, mrc.header.nystart = 4, 5
        mrc.add_label("collected on a Krios")
    return path


def micrographs(folder: Path, rng: np.random.Generator, n: int, shape: tuple[int, int] = (96, 128)
                ) -> list[Path]:
    """``n`` float32 micrographs mic_000.mrc ... in ``folder``."""
    return [write_mrc(folder / f"mic_{i:03d}.mrc", (rng.standard_normal(shape) * 40 + 800).astype(np.float32))
            for i in range(n)]


@pytest.fixture(scope="module")
def model_spec(cnn3_checkpoint):
    return load_checkpoint(cnn3_checkpoint)


@pytest.fixture
def backend(model_spec):
    with TorchBackend(model_spec[0], BackendOptions()) as b:
        yield b


def run(paths, outdir, backend, spec, **options):
    return denoise_files(paths, outdir, backend, spec, RunConfig(quiet=True, tile=64, batch=3, **options))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_keep_header_and_input_scale(tmp_path, rng, model_spec, backend) -> None:
    model, spec = model_spec
    data = (rng.standard_normal((150, 200)) * 300 + 20000).clip(0, 65535).astype(np.uint16)
    src = write_mrc(tmp_path / "in" / "epu.mrc", data, ext=bytes(range(256)) * 4)
    before = sha(src)
    summary = run([src], tmp_path / "out", backend, spec)
    assert summary.ok and summary.count("done") == 1
    out = tmp_path / "out" / "epu.mrc"
    h_in, h_out = read_header(src), read_header(out)
    assert h_out.mode == 2 and h_out.shape == h_in.shape == (150, 200)
    for field in ("voxel_size", "origin", "nstart", "ispg", "exttyp", "extended_header"):
        assert getattr(h_out, field) == getattr(h_in, field), field
    assert h_out.labels[: len(h_in.labels)] == h_in.labels and "collected on a Krios" in h_in.labels
    assert h_out.labels[-1].startswith("cryodeploy")
    assert sha(src) == before
    x = data.astype(np.float32)
    stats = norm_stats(x, spec.normalization)
    with torch.no_grad():
        y = model(torch.from_numpy(normalize(x, stats))[None, None])[0, 0].numpy()
    expected = y * np.float32(stats.scale) + np.float32(stats.center)
    got = read_micrograph(out).data
    assert abs(float(got.mean()) - float(x.mean())) < 0.5 * float(x.std())  # back in the input's scale
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * stats.scale * 10)


def test_stack_is_denoised_frame_by_frame_and_float16(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    stack = (rng.standard_normal((3, 80, 100)) * [[[1.0]], [[5.0]], [[50.0]]] + 100).astype(np.float32)
    src = write_mrc(tmp_path / "s.mrcs", stack, stack=True)
    run([src], tmp_path / "o32", backend, spec)
    run([src], tmp_path / "o16", backend, spec, output_dtype="float16")
    out32, out16 = read_micrograph(tmp_path / "o32" / "s.mrcs"), read_micrograph(tmp_path / "o16" / "s.mrcs")
    assert out32.header.is_stack and out32.data.shape == (3, 80, 100) and out16.header.mode == 12
    for i in range(3):
        alone = denoise_image(stack[i], backend, spec, tile=64, batch=3)
        np.testing.assert_allclose(out32.data[i], alone, rtol=0, atol=1e-5 * float(np.abs(alone).max()))
        np.testing.assert_allclose(out16.data[i], alone, rtol=2e-3, atol=1e-3)


def test_bad_inputs_are_reported_and_skipped(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    good = micrographs(tmp_path / "in", rng, 3)
    truncated = tmp_path / "in" / "truncated.mrc"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    text = tmp_path / "in" / "notes.mrc"
    text.write_text("not an MRC file\n" * 100)
    constant = write_mrc(tmp_path / "in" / "constant.mrc", np.full((64, 64), 7, np.float32))
    tiny = write_mrc(tmp_path / "in" / "tiny.mrc", rng.standard_normal((20, 20)).astype(np.float32))
    nan = rng.standard_normal((64, 64)).astype(np.float32)
    nan[3, 4] = np.nan
    nan_file = write_mrc(tmp_path / "in" / "nan.mrc", nan)
    bad = [truncated, text, constant, tiny, nan_file, tmp_path / "in" / "missing.mrc"]
    summary = run(good + bad, tmp_path / "out", backend, spec, summary=tmp_path / "summary.json")
    assert not summary.ok and summary.count("done") == 3 and summary.count("failed") == len(bad)
    record = json.loads((tmp_path / "summary.json").read_text())
    by_input = {Path(f["input"]).name: f for f in record["files"]}
    for p in bad:
        entry = by_input[p.name]
        assert entry["status"] == "failed" and str(p) in entry["error"] and "\n" not in entry["error"]
        assert not (tmp_path / "out" / p.name).exists()
    assert "expected at least 32x32" in by_input["tiny.mrc"]["error"]
    assert "constant" in by_input["constant.mrc"]["error"] and "NaN" in by_input["nan.mrc"]["error"]
    assert all(by_input[p.name]["status"] == "done" and by_input[p.name]["seconds"] > 0 for p in good)
    assert record["done"] == 3 and record["failed"] == 6
    assert sorted(os.listdir(tmp_path / "out")) == [p.name for p in good]


def test_existing_outputs_error_skip_or_overwrite(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    paths = micrographs(tmp_path / "in", rng, 2)
    out = tmp_path / "out"
    run(paths, out, backend, spec)
    first = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir())]
    with pytest.raises(OutputError, match=r"mic_000.mrc: output exists \(and 1 more\); use --skip-existing"):
        run(paths, out, backend, spec)
    skipped = run(paths, out, backend, spec, skip_existing=True)
    assert skipped.count("skipped") == 2 and skipped.files[0].error == "output exists"
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir())] == first
    redone = run(paths, out, backend, spec, overwrite=True)
    assert redone.count("done") == 2
    assert [p.stat().st_ino for p in sorted(out.iterdir())] != [f[0] for f in first]
    with pytest.raises(OutputError, match="would replace its input"):
        run(paths, tmp_path / "in", backend, spec, overwrite=True)


def test_output_paths_never_escape_outdir(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    a = micrographs(tmp_path / "proj" / "Movies", rng, 1)[0]
    dotted = tmp_path / "proj" / "sub" / ".." / "Movies" / a.name  # a STAR entry with ".."
    absolute = a.resolve()
    out = tmp_path / "proj" / "out"
    summary = run([dotted], out, backend, spec, suffix="_den")
    assert summary.ok and os.listdir(out) == ["mic_000_den.mrc"]
    with pytest.raises(OutputError, match="would both write"):
        run([dotted, write_mrc(tmp_path / "other" / a.name, read_micrograph(a).data)], out, backend, spec,
            suffix="_x")
    with pytest.raises(OutputError, match=r"MIC_000.mrc and .*mic_000.mrc would both write"):
        upper = write_mrc(tmp_path / "other" / "MIC_000.mrc", read_micrograph(a).data)
        run([absolute, upper], out, backend, spec, suffix="_y")
    twin = write_mrc(tmp_path / "proj" / "Movies" / "mic_000.mrcs", read_micrograph(a).data)
    assert run([a, twin], tmp_path / "o2", backend, spec).ok  # distinct outputs ...
    with pytest.raises(OutputError, match=r"mic_000\.png"):  # ... but one preview name
        run([a, twin], tmp_path / "o3", backend, spec, preview=True)
    sneaky = write_mrc(tmp_path / "in" / (TEMP_PREFIX + "x.mrc"), read_micrograph(a).data)
    with pytest.raises(OutputError, match="safe output name"):
        run([sneaky], tmp_path / "o4", backend, spec)
    with pytest.raises(ConfigError, match="path separators"):
        RunConfig(suffix="/../../etc")
    assert sorted(os.listdir(tmp_path / "proj")) == ["Movies", "out", "sub"]


def test_pairs_write_each_output_where_named(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    a, b = micrographs(tmp_path / "J3", rng, 2)
    c = write_mrc(tmp_path / "J9" / a.name, read_micrograph(b).data)
    out = tmp_path / "out"
    pairs = [(a, out / "J3" / a.name), (b, out / "J3" / b.name), (c, out / "J9" / "deep" / c.name)]
    config = RunConfig(quiet=True, tile=64, batch=3, preview=True)
    summary = denoise_pairs(pairs, backend, spec, config)
    assert summary.count("done") == 3 and [f.output for f in summary.files] == [str(o) for _, o in pairs]
    for src, dst in pairs:  # one name in two folders: both written, previews included
        expected = denoise_image(read_micrograph(src).data, backend, spec, tile=64, batch=3)
        np.testing.assert_array_equal(read_micrograph(dst).data, expected)
        assert dst.with_suffix(".png").is_file()
    with pytest.raises(OutputError, match=r"output exists \(and 2 more\)"):
        denoise_pairs(pairs, backend, spec, config)
    skipped = denoise_pairs(pairs, backend, spec, RunConfig(quiet=True, skip_existing=True))
    assert skipped.count("skipped") == 3
    with pytest.raises(OutputError, match=r"mic_000.mrc and .*mic_001.mrc would both write .*new/x.mrc"):
        denoise_pairs([(a, out / "new" / "X.mrc"), (b, out / "new" / "x.mrc")], backend, spec, config)
    with pytest.raises(OutputError, match="would replace its input"):
        denoise_pairs([(a, a)], backend, spec, RunConfig(quiet=True, overwrite=True))
    assert not (out / "new").exists()  # planning errors come before any work, and leave no new folder


def test_shards_cover_every_file_once(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    paths = micrographs(tmp_path / "in", rng, 7)
    done = []
    for i in range(2):
        s = run(list(reversed(paths)), tmp_path / "out", backend, spec, shard=f"{i}/2", skip_existing=True)
        assert s.shard == (i, 2) and s.count("skipped") == 0
        done += [Path(f.input).name for f in s.files if f.status == "done"]
    assert sorted(done) == [p.name for p in paths]
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_STEP": "2",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_shard(None, slurm) == (2, 3)
    assert resolve_shard((0, 2), {"RANK": "1", "WORLD_SIZE": "4"}) == (0, 2)
    assert resolve_shard(None, {}) == (0, 1)
    assert resolve_shard(None, {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}) == (2, 3)
    assert resolve_shard(None, {"PMI_RANK": "5", "PMI_SIZE": "8"}) == (5, 8)
    srun = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}
    assert resolve_shard(None, srun) == (3, 4)
    assert resolve_shard(None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # batch script, no srun
    assert resolve_shard(None, {**srun, **slurm}) == (2 * 4 + 3, 3 * 4)  # srun inside an array task
    assert resolve_shard(None, {**srun, "RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)  # torchrun first
    with pytest.raises(ConfigError, match="PMI_RANK/PMI_SIZE: found index 8 of 8"):
        resolve_shard(None, {"PMI_RANK": "8", "PMI_SIZE": "8"})
    with pytest.raises(ConfigError, match="RANK/WORLD_SIZE"):
        resolve_shard(None, {"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="expected 'i/n'"):
        parse_shard("1-2")


def test_claimed_outputs_and_stale_temps(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    paths = micrographs(tmp_path / "in", rng, 3)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{TEMP_PREFIX}mic_000.mrc.1a2b3c"  # left by a killed run
    stale_png = out / f"{TEMP_PREFIX}mic_000.png.4d5e6f"
    busy = out / f"{TEMP_PREFIX}mic_001.mrc.778899"  # being written by a live process
    for p in (stale, stale_png, busy):
        p.write_bytes(b"partial")
    (out / ".cryodeploy-claim-mic_000.mrc").write_text("999999\n")  # a dead run's claim, no lock
    held = try_claim(out / "mic_001.mrc")
    assert held is not None and try_claim(out / "mic_001.mrc") is None
    try:
        summary = run(paths, out, backend, spec)
        assert [f.status for f in summary.files] == ["done", "skipped", "done"]
        assert summary.files[1].error == f"being written by another process (PID {os.getpid()})"
        assert not stale.exists() and not stale_png.exists() and busy.exists()
    finally:
        held.release()
    assert sorted(os.listdir(out)) == [busy.name, "mic_000.mrc", "mic_002.mrc"]
    run(paths, out, backend, spec, skip_existing=True)
    assert sorted(os.listdir(out)) == ["mic_000.mrc", "mic_001.mrc", "mic_002.mrc"]


def _peak(paths, outdir, backend, spec) -> int:
    tracemalloc.start()
    try:
        assert denoise_files(paths, outdir, backend, spec, RunConfig(quiet=True, queue_depth=2)).ok
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_queue_depth_not_file_count(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    # 512^2 images, so one image (1 MB) dwarfs both the per-file bookkeeping every run keeps for
    # its summary (~10 kB a file) and the ~1.5 MB jitter of tracemalloc's peak inside the full
    # suite (128^2 and 256^2 images were flaky against this bound)
    paths = micrographs(tmp_path / "in", rng, 48, shape=(512, 512))
    _peak(paths[:2], tmp_path / "warm", backend, spec)
    # 16 files fill every reader, queue and writer slot (2 readers, 2 writers since the device frame
    # path), so the comparison measures growth with the file count, not a pipeline that never filled
    few, many = _peak(paths[:16], tmp_path / "a", backend, spec), _peak(paths, tmp_path / "b", backend, spec)
    one_file = 512 * 512 * 4
    print(f"traced peak: 16 files {few / 1e6:.2f} MB, 48 files {many / 1e6:.2f} MB",
          f"({one_file / 1e6:.3f} MB/file)")
    assert many < few + 6 * one_file  # unbounded buffering would add 32 files (x several arrays)


class _LimitedTorch(Backend):
    """The real torch backend on a device that holds at most ``limit`` pixels per batch."""

    name = "limited"

    def __init__(self, inner: TorchBackend, limit: int, message: str | None = None) -> None:
        super().__init__(inner.options)
        self.inner, self.limit, self.message = inner, limit, message
        self.calls: list[tuple[int, ...]] = []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        if batch.size > self.limit:
            if self.message:
                raise RuntimeError(self.message)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.run(batch)


def test_out_of_memory_halves_batch_then_tile(rng, model_spec, backend) -> None:
    _, spec = model_spec
    image = (rng.standard_normal((256, 256)) * 10 + 50).astype(np.float32)
    reference = denoise_image(image, backend, spec, tile=256, batch=1)
    limited = _LimitedTorch(backend, limit=2 * 64 * 64)
    got = denoise_image(image, limited, spec, tile=128, batch=4)
    assert limited.calls[:3] == [(4, 1, 128, 128), (2, 1, 128, 128), (1, 1, 128, 128)]
    assert limited.calls[-1] == (1, 1, 64, 64)
    assert np.abs(got - reference).max() <= 1e-6 * np.abs(reference).max()
    ort_like = _LimitedTorch(backend, limit=64 * 64, message="Failed to allocate memory for requested buffer")
    np.testing.assert_allclose(denoise_image(image, ort_like, spec, tile=128, batch=2), reference, atol=1e-3)
    broken = _LimitedTorch(backend, limit=0, message="cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    with pytest.raises(RuntimeError, match="CUDNN_STATUS"):
        denoise_image(image, broken, spec, tile=128, batch=2)
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and not is_out_of_memory(ValueError("shape"))


def test_backend_failure_fails_the_files_and_continues(tmp_path, rng, model_spec, backend) -> None:
    _, spec = model_spec
    small = micrographs(tmp_path / "in", rng, 2, shape=(64, 64))
    large = write_mrc(tmp_path / "in" / "large.mrc", rng.standard_normal((200, 200)).astype(np.float32))
    broken = _LimitedTorch(backend, limit=64 * 64, message="cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    config = RunConfig(quiet=True, tile=256, batch=1)
    summary = denoise_files([*small, large], tmp_path / "out", broken, spec, config)
    status = {Path(f.input).name: (f.status, f.error or "") for f in summary.files}
    assert status["mic_000.mrc"][0] == status["mic_001.mrc"][0] == "done"
    assert status["large.mrc"][0] == "failed"
    assert "large.mrc: limited/cpu/fp32: RuntimeError: cuDNN" in status["large.mrc"][1]


def test_preview_and_keep_normalized(tmp_path, rng, model_spec, backend) -> None:
    model, spec = model_spec
    src = micrographs(tmp_path / "in", rng, 1, shape=(600, 300))[0]
    run([src], tmp_path / "out", backend, spec, preview=True, keep_normalized=True)
    from PIL import Image

    with Image.open(tmp_path / "out" / "mic_000.png") as im:
        assert im.mode == "L" and im.size == (150 + 2 + 150, 300)  # halved to fit 512, 2 px gap
    x = read_micrograph(src).data
    with torch.no_grad():
        x_norm = normalize(x, norm_stats(x, spec.normalization))
        ref = model(torch.from_numpy(x_norm)[None, None])[0, 0].numpy()
    assert np.abs(read_micrograph(tmp_path / "out" / "mic_000.mrc").data - ref).max() <= 1e-6


def test_preview_is_the_written_output_in_input_contrast(tmp_path, rng, model_spec, backend) -> None:
    """Without --keep-normalized the output is de-normalized (in place) before it is written: the
    preview's right half must still be that written output, mapped by the input's percentiles."""
    from PIL import Image

    from cryodeploy.io.preview import downsample

    _, spec = model_spec
    src = micrographs(tmp_path / "in", rng, 1, shape=(256, 320))[0]
    run([src], tmp_path / "out", backend, spec, preview=True)
    with Image.open(tmp_path / "out" / "mic_000.png") as im:
        panel = np.asarray(im, dtype=np.float64)
    x, y = read_micrograph(src).data, read_micrograph(tmp_path / "out" / "mic_000.mrc").data
    lo, hi = np.percentile(downsample(x), [1, 99])
    expected = np.clip((downsample(y) - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(panel[:, -expected.shape[1]:] - expected).max() <= 1.0


def test_unet_image_not_multiple_of_stride(unet_checkpoint, rng) -> None:
    model, spec = load_checkpoint(unet_checkpoint)
    image = (rng.standard_normal((150, 203)) * 5 + 10).astype(np.float32)
    with TorchBackend(model, BackendOptions()) as b:
        got = denoise_image(image, b, spec, tile=64, batch=8, keep_normalized=True)
    padded = pad_to_stride(normalize(image, norm_stats(image, spec.normalization)), spec.stride)
    with torch.no_grad():
        whole = model(torch.from_numpy(padded)[None, None])[0, 0, :150, :203].numpy()
    assert got.shape == image.shape and np.abs(got - whole).max() / whole.std() < 1e-3


def test_auto_geometry_and_config_validation(model_spec) -> None:
    _, spec = model_spec
    assert auto_geometry((4096, 4096), spec, "cpu", None, None) == (CPU_TILE, CPU_BATCH)
    assert auto_geometry((4096, 4096), spec, "cpu", 512, None) == (512, CPU_BATCH)
    bpp = activation_bytes_per_pixel(spec)
    assert 4 * 33 <= bpp <= 4 * 80  # CNN3: 16+16 (conv) +16+16 (relu) +1 channels, fp32
    gib = 2**30
    assert fit_geometry((4096, 4096), spec, 70 * gib) == (4096, 1)  # H100: whole micrographs
    assert fit_geometry((1024, 1024), spec, 70 * gib) == (1024, 8)
    assert fit_geometry((4096, 4096), spec, 2 * gib) == (2048, 1)  # 1 GiB budget: 2048^2 x bpp fits
    assert fit_geometry((5760, 4092), spec, 70 * gib, tile=1000) == (1000, 8)
    for bad in ({"tile": 0}, {"tile": "big"}, {"batch": -1}, {"output_dtype": "int8"},
                {"skip_existing": True, "overwrite": True}, {"shard": (2, 2)}, {"queue_depth": 0},
                {"pull": True, "shard": "0/2"}, {"pull": True, "overwrite": True}):
        with pytest.raises(ConfigError):
            RunConfig(**bad)
    assert RunConfig(pull=True).skip_existing
    with pytest.raises(ConfigError, match="unknown run options"):
        RunConfig.from_options(tiles=3)
    with pytest.raises(InputError, match="array: found shape"):
        denoise_image(np.zeros(5), None, spec)  # type: ignore[arg-type]
