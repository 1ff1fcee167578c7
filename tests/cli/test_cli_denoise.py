"""``cryodeploy denoise`` through click's CliRunner, on real MRC and STAR files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.files import JSON_MAX_BYTES
from cryodeploy.inference.jobs import LAUNCHERS
from cryodeploy.io.mrc import read_header, read_micrograph, write_micrograph


@pytest.fixture(autouse=True)
def _no_shard_env(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", *(v for pair in LAUNCHERS for v in pair)):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def inputs(tmp_path, rng) -> list[Path]:
    (tmp_path / "in").mkdir()
    return [write_micrograph(tmp_path / "in" / f"m{i}.mrc", rng.standard_normal((70, 90)) * 9 + 30)
            for i in range(3)]


def denoise(checkpoint: Path, *args: str):
    return CliRunner().invoke(
        cli, ["denoise", *args, "--model", str(checkpoint), "--backend", "torch", "--device", "cpu", "-q"]
    )


def test_help_lists_the_options() -> None:
    res = CliRunner().invoke(cli, ["denoise", "--help"])
    assert res.exit_code == 0
    for option in ("--tile", "--batch", "--output-dtype", "--skip-existing", "--overwrite", "--shard",
                   "--summary", "--preview", "--keep-normalized", "--suffix", "--precision"):
        assert option in res.output


def test_denoise_folder_writes_outputs_and_summary_line(cnn3_checkpoint, inputs, tmp_path) -> None:
    res = denoise(cnn3_checkpoint, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--tile", "48",
                  "--output-dtype", "float16", "--summary", str(tmp_path / "s.json"))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("denoised 3, skipped 0, failed 0 in ")
    assert res.stdout.rstrip().endswith("MB/s) with torch/cpu/fp32")
    assert sorted(os.listdir(tmp_path / "out")) == ["m0.mrc", "m1.mrc", "m2.mrc"]
    assert read_header(tmp_path / "out" / "m1.mrc").mode == 12
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["tile"] == 48 and [f["status"] for f in record["files"]] == ["done"] * 3


def test_failed_input_gives_exit_1_and_a_line(cnn3_checkpoint, inputs, tmp_path) -> None:
    bad = tmp_path / "in" / "bad.mrc"
    bad.write_bytes(b"\0" * 100)
    res = denoise(cnn3_checkpoint, str(tmp_path / "in" / "*.mrc"), "-o", str(tmp_path / "out"))
    assert res.exit_code == 1
    assert f"failed: {bad}: " in res.stderr and "Traceback" not in res.output
    assert "denoised 3, skipped 0, failed 1" in res.stdout


def test_existing_outputs_and_skip_existing(cnn3_checkpoint, inputs, tmp_path) -> None:
    args = [str(p) for p in inputs] + ["-o", str(tmp_path / "out")]
    assert denoise(cnn3_checkpoint, *args).exit_code == 0
    res = denoise(cnn3_checkpoint, *args)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"error: {tmp_path / 'out' / 'm0.mrc'}: output exists (and 2 more)")
    res = denoise(cnn3_checkpoint, *args, "--skip-existing")
    assert res.exit_code == 0 and "denoised 0, skipped 3, failed 0" in res.stdout
    res = denoise(cnn3_checkpoint, *args, "--skip-existing", "--overwrite")
    assert res.exit_code == 2 and "contradict" in res.stderr


def test_star_file_with_relative_paths_and_shards(cnn3_checkpoint, inputs, tmp_path, monkeypatch) -> None:
    star = tmp_path / "CtfFind" / "job003" / "micrographs_ctf.star"
    star.parent.mkdir(parents=True)
    table = pd.DataFrame({"rlnMicrographName": [f"in/{p.name}" for p in inputs], "rlnOpticsGroup": 1})
    starfile.write({"micrographs": table}, star)
    monkeypatch.chdir(tmp_path / "CtfFind")  # not the project folder: paths resolve against star's parents
    names = []
    for shard in ("0/2", "1/2"):
        res = denoise(cnn3_checkpoint, str(star), "-o", str(tmp_path / "out"), "--shard", shard,
                      "--skip-existing", "--suffix", "_dn", "--preview")
        assert res.exit_code == 0, res.output
        names.append(res.stdout.split(",")[0])
    assert names == ["denoised 2", "denoised 1"]
    assert sorted(os.listdir(tmp_path / "out")) == ["m0_dn.mrc", "m0_dn.png", "m1_dn.mrc", "m1_dn.png",
                                                    "m2_dn.mrc", "m2_dn.png"]
    data = read_micrograph(tmp_path / "out" / "m2_dn.mrc").data
    assert data.shape == (70, 90) and abs(float(data.mean()) - 30) < 15


def test_bad_option_values(cnn3_checkpoint, inputs, tmp_path) -> None:
    res = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "o"), "--tile", "big")
    assert res.exit_code == 2 and "'big': expected 'auto' or an integer" in res.output
    res = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "o"), "--tile", "4")
    assert res.exit_code == 2 and "tile 4 is too small" in res.stderr
    res = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "o"), "--shard", "2/2")
    assert res.exit_code == 2 and "0 <= index < count" in res.stderr
    res = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "o"), "--io-threads", "0")
    assert res.exit_code == 2 and "Invalid value for '--io-threads'" in res.output
    res = denoise(cnn3_checkpoint, str(tmp_path / "nothing*.mrc"), "-o", str(tmp_path / "o"))
    assert res.exit_code == 1 and "pattern matches no files" in res.stderr
    res = CliRunner().invoke(cli, ["denoise", str(inputs[0]), "-o", str(tmp_path / "o"), "--model",
                                   str(tmp_path / "missing.safetensors"), "-q"])
    assert res.exit_code == 1 and "no such model file" in res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert np.isfinite(read_micrograph(inputs[0]).data).all()


def test_formats_name_outputs_by_format_and_keep_values(cnn3_checkpoint, inputs, tmp_path) -> None:
    import tifffile
    from PIL import Image

    from cryodeploy.io.images import to_8bit

    assert denoise(cnn3_checkpoint, *map(str, inputs), "-o", str(tmp_path / "mrc")).exit_code == 0
    res = denoise(cnn3_checkpoint, *map(str, inputs), "-o", str(tmp_path / "tif"), "--format", "tiff",
                  "--suffix", "_den")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "tif").iterdir()) == ["m0_den.tif", "m1_den.tif", "m2_den.tif"]
    for src in inputs:
        ref = read_micrograph(tmp_path / "mrc" / src.name).data
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "tif" / f"{src.stem}_den.tif"), ref)
    res = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "png"), "--format", "png")
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(tmp_path / "png" / "m0.png"))
    assert np.array_equal(png, to_8bit(read_micrograph(tmp_path / "mrc" / "m0.mrc").data))
    clash = denoise(cnn3_checkpoint, str(inputs[0]), "-o", str(tmp_path / "p2"), "--format", "png",
                    "--preview")
    assert clash.exit_code == 2 and "preview and output format png" in clash.output
    assert not (tmp_path / "p2").exists()


def test_explicit_batch_is_clamped_to_the_work_before_allocation(cnn3_checkpoint, tmp_path, rng) -> None:
    import tracemalloc

    (tmp_path / "in").mkdir()
    src = write_micrograph(tmp_path / "in" / "one.mrc", rng.standard_normal((96, 96)) * 9 + 30)
    res = denoise(cnn3_checkpoint, str(src), "-o", str(tmp_path / "auto"), "--tile", "auto",
                  "--batch", "auto")
    assert res.exit_code == 0, res.output  # first: imports and caches are not counted below
    tracemalloc.start()
    res = denoise(cnn3_checkpoint, str(src), "-o", str(tmp_path / "big"), "--tile", "1024", "--batch", "1024",
                  "--summary", str(tmp_path / "big.json"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.exit_code == 0, res.output
    # unclamped, the zero-filled input batch alone is 1024 x 96 x 96 float32 = 37.7 MB (peak 38.7 MB);
    # clamped, the peak (16.8 MB) is the bounded read of the checkpoint's JSON (files.JSON_MAX_BYTES)
    assert peak < JSON_MAX_BYTES + 4 * 2**20, peak
    record = json.loads((tmp_path / "big.json").read_text())
    assert (record["tile"], record["batch"]) == (96, 1)
    big, auto = (read_micrograph(tmp_path / d / "one.mrc").data for d in ("big", "auto"))
    np.testing.assert_allclose(big, auto, rtol=0, atol=1e-6)


def test_batch_is_clamped_to_all_planned_tiles_an_unreadable_file_counting_one(
    cnn3_checkpoint, inputs, tmp_path
) -> None:
    (tmp_path / "in" / "bad.mrc").write_bytes(b"\0" * 100)
    res = denoise(cnn3_checkpoint, str(tmp_path / "in" / "*.mrc"), "-o", str(tmp_path / "out"),
                  "--tile", "1024", "--batch", "1024", "--summary", str(tmp_path / "s.json"))
    assert res.exit_code == 1 and f"failed: {tmp_path / 'in' / 'bad.mrc'}: " in res.stderr
    record = json.loads((tmp_path / "s.json").read_text())
    assert (record["tile"], record["batch"], record["done"]) == (90, 4, 3)  # 3 files of 70x90, one tile each


def test_io_threads_write_the_same_bytes(cnn3_checkpoint, inputs, tmp_path) -> None:
    for n in ("1", "4"):
        res = denoise(cnn3_checkpoint, str(tmp_path / "in"), "-o", str(tmp_path / n), "--io-threads", n)
        assert res.exit_code == 0, res.output
    for p in inputs:
        assert (tmp_path / "1" / p.name).read_bytes() == (tmp_path / "4" / p.name).read_bytes()


def test_compile_opts_in_to_torch_compile_with_the_same_result(cnn3_checkpoint, inputs, tmp_path,
                                                               monkeypatch) -> None:
    """``--compile`` reaches the torch backend (the model runs through torch.compile, its kernels
    cached under CRYODEPLOY_CACHE) and gives eager's output to float32 rounding."""
    import torch

    monkeypatch.setenv("CRYODEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled: list[object] = []
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or original(m, **kw))
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        res = denoise(cnn3_checkpoint, str(tmp_path / "in"), "-o", str(tmp_path / name), *extra)
        assert res.exit_code == 0, res.output
    assert compiled == [{"dynamic": False}]
    assert (tmp_path / "cache" / "inductor").is_dir()
    for p in inputs:
        a = read_micrograph(tmp_path / "eager" / p.name).data
        b = read_micrograph(tmp_path / "compiled" / p.name).data
        assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(a).max())
