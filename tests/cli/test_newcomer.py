"""The rough edges a newcomer hit on a first run of the README (issue 21, item 8), one test each."""

from __future__ import annotations

import re
from pathlib import Path

import click
import mrcfile
import numpy as np
from click.testing import CliRunner

from cryodeploy.backends.registry import BACKENDS
from cryodeploy.cli import COMMANDS, cli
from cryodeploy.imaging.synth import SynthConfig, synth_micrographs
from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.training.config import TrainConfig


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_fp16_training_on_the_cpu_is_refused_before_any_work(tmp_path: Path) -> None:
    res = run("train", str(tmp_path), "-o", str(tmp_path / "run"), "--precision", "fp16", "--device", "cpu")
    assert res.exit_code == 2
    assert res.output.startswith("error: precision fp16 on device cpu is too slow") and "fp32" in res.output
    assert not (tmp_path / "run").exists()
    assert TrainConfig(precision="bf16", device="cpu").precision == "bf16"  # bf16 on cpu stays allowed


def test_synth_refuses_an_existing_dataset_without_overwrite(tmp_path: Path) -> None:
    assert run("synth", str(tmp_path / "d"), "-n", "2", "--size", "64", "64", "-q").exit_code == 0
    res = run("synth", str(tmp_path / "d"), "-n", "1", "--size", "96", "96", "-q")
    assert res.exit_code == 1 and "already holds a dataset" in res.output and "--overwrite" in res.output
    assert read_micrograph(tmp_path / "d" / "clean" / "synth_0001.mrc").data.shape == (64, 64)  # untouched
    ok = run("synth", str(tmp_path / "d"), "-n", "1", "--size", "96", "96", "-q", "--overwrite")
    assert ok.exit_code == 0, ok.output
    for sub in ("clean", "noisy", "noisy2"):  # one dataset, not a mix of two sizes
        files = sorted((tmp_path / "d" / sub).glob("*.mrc"))
        assert [f.name for f in files] == ["synth_0000.mrc"]
        assert read_micrograph(files[0]).data.shape == (96, 96)


def test_export_raw_weights_without_onnx_output(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    res = run("export", str(cnn3_checkpoint), "--raw", str(tmp_path / "raw"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "raw" / "layers.json").is_file() and sorted(tmp_path.iterdir()) == [tmp_path / "raw"]
    assert run("export", str(cnn3_checkpoint)).exit_code == 2  # neither -o nor --raw: a usage error


def test_evaluate_error_names_the_file_and_leaves_no_folder(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    synth_micrographs(tmp_path / "d", SynthConfig(count=2, size=(64, 64), seed=1))
    bad = tmp_path / "d" / "clean" / "synth_0001.mrc"
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated
    res = run("evaluate", "-m", str(cnn3_checkpoint), "--pairs", str(tmp_path / "d" / "noisy"),
              str(tmp_path / "d" / "clean"), "-o", str(tmp_path / "report" / "a"), "--device", "cpu", "-q")
    assert res.exit_code == 1
    assert res.output.startswith(f"error: {bad}: truncated file"), res.output
    assert not (tmp_path / "report").exists()


def test_denoise_and_preprocess_leave_no_folder_when_every_input_failed(
    cnn3_checkpoint: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an MRC file at all" * 100)
    res = run("denoise", str(bad), "-o", str(tmp_path / "out"), "--model", str(cnn3_checkpoint),
              "--backend", "torch", "--device", "cpu", "-q")
    assert res.exit_code == 1 and "denoised 0, skipped 0, failed 1" in res.output
    assert not (tmp_path / "out").exists()
    res = run("preprocess", str(bad), "-o", str(tmp_path / "store"), "--patch", "32", "-q")
    assert res.exit_code == 1 and str(bad) in res.output
    assert not (tmp_path / "store").exists()
    (tmp_path / "kept").mkdir()  # a folder that existed before stays
    run("denoise", str(bad), "-o", str(tmp_path / "kept"), "--model", str(cnn3_checkpoint), "--device", "cpu")
    assert (tmp_path / "kept").is_dir()


def test_parity_fails_when_a_requested_backend_did_not_run(cnn3_checkpoint: Path) -> None:
    res = run("parity", str(cnn3_checkpoint), "--synth", "1", "--size", "64", "64", "--backends",
              "torch,fused", "--threads", "1", "--device", "cpu", "-q")
    assert res.exit_code == 1, res.output
    assert "parity: FAIL" in res.output and "fused: requested but did not run (fused: CUDA only" in res.output


def test_install_hints_survive_the_rich_tables(cnn3_checkpoint: Path) -> None:
    from rich.console import Console

    from cryodeploy.verify.parity import ParityReport, VariantResult, render

    hint = "onnxruntime: not installed (pip install 'cryodeploy[ort]')"
    report = ParityReport("m", "0", "cpu", [], False, "skipped",
                          [VariantResult("ort", "fp32", "ort/cpu/fp32", "unavailable", hint)], [], {})
    console = Console(width=200, record=True)
    for item in render(report):
        console.print(item)
    assert "pip install 'cryodeploy[ort]')" in console.export_text()


def test_unknown_subcommand_gets_a_suggestion() -> None:
    res = run("denoize", "x")
    assert res.exit_code == 2 and "Did you mean 'denoise'?" in res.output
    assert "Did you mean" not in run("zzzzqq").output and run("zzzzqq").exit_code == 2


def test_every_option_of_every_command_has_help() -> None:
    ctx = click.Context(cli)
    missing = [(name, p.opts) for name in COMMANDS for p in cli.get_command(ctx, name).params  # type: ignore[union-attr]
               if isinstance(p, click.Option) and not p.help]
    assert missing == []
    assert "required, except with --adopt" in " ".join(run("preprocess", "--help").output.split())
    backend_help = " ".join(run("denoise", "--help").output.split())
    assert all(f"{name} (" in backend_help for name in BACKENDS), backend_help


def test_progress_prints_one_final_line_when_not_on_a_terminal(tmp_path: Path) -> None:
    res = run("synth", str(tmp_path / "d"), "-n", "3", "--size", "64", "64")
    assert res.exit_code == 0
    assert re.search(r"^synth: 3/3 in \d+\.\d s$", res.stderr, re.M), res.stderr


def test_denoise_progress_counts_files(
    cnn3_checkpoint: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    src = write_micrograph(tmp_path / "a.mrc", rng.standard_normal((64, 64)))
    res = run("denoise", str(src), "-o", str(tmp_path / "o"), "--model", str(cnn3_checkpoint), "--device",
              "cpu")
    assert re.search(r"^denoise: 1/1 in \d+\.\d s done=1 skipped=0 failed=0$", res.stderr, re.M), res.stderr


def test_bench_defaults_are_sized_for_the_device() -> None:
    out = " ".join(run("bench", "--help").output.split())
    assert "4096 on cuda, 1024 on cpu" in out and "20 on cuda, 3 on cpu" in out


def test_mrcs_is_a_stack_whatever_its_space_group(tmp_path: Path) -> None:
    stack = np.arange(3 * 40 * 40, dtype=np.float32).reshape(3, 40, 40)
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(stack)  # mrcfile's default: space group 1, a volume
    assert int(mrcfile.open(tmp_path / "s.mrcs").header.ispg) == 1
    mic = read_micrograph(tmp_path / "s.mrcs")
    assert mic.header.is_stack and mic.header.n_frames == 3 and np.array_equal(mic.data, stack)
    (tmp_path / "s.mrcs").rename(tmp_path / "v.mrc")  # the same bytes named .mrc stay a volume, refused
    res = run("denoise", str(tmp_path / "v.mrc"), "-o", str(tmp_path / "o"), "--device", "cpu", "-q")
    assert "3-D volume" in res.output


def _readme_commands() -> list[list[str]]:
    import shlex

    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #")[0] for line in block.splitlines() if line.startswith("cryodeploy ")]
    return [shlex.split(line)[1:] for line in lines]


def test_readme_examples_parse_and_use_only_folders_made_before(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [c[0] for c in commands] == ["synth", "preprocess", "train", "evaluate", "evaluate", "evaluate",
                                        "export", "denoise", "parity", "bench", "info"]
    made: set[str] = set()
    for args in commands:
        ctx = cli.make_context("cryodeploy", list(args), resilient_parsing=False)
        sub = cli.get_command(ctx, args[0])
        assert sub is not None
        made |= {args[args.index("-o") + 1]} if "-o" in args else set()
        made |= {args[1], "demo/noisy", "demo/clean"} if args[0] == "synth" else set()
        for folder in made:
            Path(folder).mkdir(parents=True, exist_ok=True)
        sub.make_context(args[0], args[1:])  # raises on an unknown option or a bad value
        for word in args[1:]:  # every input folder (demo/..., store, run) was written by an earlier line
            top = word.strip("'").split("/")[0]
            if top in {"demo", "store", "run", "mics"}:
                assert top in made, (args, top)
