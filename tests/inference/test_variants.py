"""The default CUDA variant: the fastest correct one (selection logic; measurement on the CPU)."""

from __future__ import annotations

import pytest

from cryodeploy.backends.sources import load_source
from cryodeploy.inference.variants import (
    CANDIDATES,
    FP32_RTOL,
    Trial,
    choose_variant,
    default_variant,
    measure_variants,
)


def _t(label: str, precision: str, ms: float | None, rel: float | None, gate: bool | None = None) -> Trial:
    return Trial(label, "torch", precision, (), ms, rel, None if gate is None else 0.05, gate)


def test_the_fastest_correct_variant_wins() -> None:
    ref = _t("eager fp32", "fp32", 10.0, 0.0)
    trials = [ref, _t("graphs fp32", "fp32", 8.0, 0.0), _t("fp16", "fp16", 4.0, 1e-3, True),
              _t("compile fp16", "fp16", 2.0, 1e-3, True)]
    assert choose_variant(trials).label == "compile fp16"


@pytest.mark.parametrize("bad", [
    _t("fast fp16, gate failed", "fp16", 1.0, 1e-3, False),
    _t("fast fp16, off by 5 %", "fp16", 1.0, 5e-2, True),
    _t("fast fp32, not equal", "fp32", 1.0, 10 * FP32_RTOL),
    _t("could not run", "fp16", None, None),
])
def test_an_incorrect_variant_is_never_chosen(bad: Trial) -> None:
    ref, graphs = _t("eager fp32", "fp32", 10.0, 0.0), _t("graphs fp32", "fp32", 8.0, FP32_RTOL)
    assert choose_variant([ref, bad, graphs]).label == "graphs fp32"
    assert choose_variant([ref, bad]).label == "eager fp32"


def test_measure_on_the_cpu_and_the_cpu_default(cnn3_checkpoint) -> None:
    source = load_source(cnn3_checkpoint)
    picked = tuple(c for c in CANDIDATES if c[0] in ("eager fp32", "eager fp16", "CUDA graphs fp16"))
    trials = measure_variants(source, "cpu", size=64, repeats=2, calibration=1, candidates=picked)
    by = {t.label: t for t in trials}
    assert by["eager fp32"].rel_err == 0.0 and by["eager fp32"].correct
    assert by["CUDA graphs fp16"].ms is None and "CUDA" in by["CUDA graphs fp16"].note
    fp16 = by["eager fp16"]
    assert fp16.ms is not None and fp16.rel_err is not None and 0 < fp16.rel_err < 2e-2
    assert fp16.drop_db is not None and abs(fp16.drop_db) < 0.1 and fp16.gate_passed
    assert choose_variant(trials).label in ("eager fp32", "eager fp16")
    assert default_variant(source, "cpu").precision == "fp32"  # the CPU keeps eager fp32


def test_auto_precision_without_a_gpu_leaves_the_error_to_the_backend(cnn3_checkpoint) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert default_variant(load_source(cnn3_checkpoint), "cuda").precision == "fp32"
