"""Previews show input | output under one contrast: the same intensity is the same grey in both halves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryodeploy.io.preview import write_preview


def _halves(path: Path, width: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(path) as im:
        px = np.asarray(im)
    gap = max(2, width // 64)
    assert px.shape == (px.shape[0], 2 * width + gap) and px.dtype == np.uint8
    return px[:, :width], px[:, width + gap:]


def test_same_intensity_same_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    before = rng.normal(10.0, 2.0, (256, 256)).astype(np.float32)
    after = before.copy()
    after[:, 128:] = 10.0 + 0.1 * (before[:, 128:] - 10.0)  # right side: a strong "denoiser" (std / 10)
    left, right = _halves(write_preview(tmp_path / "p.png", before, after), 256)
    np.testing.assert_array_equal(left[:, :128], right[:, :128])  # unchanged pixels: identical greys
    lo, hi = np.percentile(before, [1, 99])
    expect = np.round(np.clip((after - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.abs(right.astype(int) - expect).max() <= 1  # the output drawn on the input's scale
    # the flattened half stays a narrow band of mid-greys instead of being stretched to black..white
    assert np.ptp(right[:, 128:]) < 0.25 * np.ptp(left[:, 128:])
    assert np.ptp(left) == 255 and abs(float(right[:, 128:].mean()) - 127.5) < 3


def test_downsampled_halves_share_the_input_percentiles(tmp_path: Path) -> None:
    before = np.tile(np.linspace(0.0, 1.0, 1024, dtype=np.float32), (1024, 1))  # 2x2 blocks -> 512 px
    after = 0.5 * before + 0.25  # half the contrast: must look it
    left, right = _halves(write_preview(tmp_path / "p.png", before, after), 512)
    assert left[:, 5].max() == 0 and left[:, -5].min() == 255
    assert 120 <= int(right[0, 256]) <= 135
    assert 55 <= int(right[0, 0]) <= 70 and 185 <= int(right[0, -1]) <= 200
