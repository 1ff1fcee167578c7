"""Training objectives: supervised / Noise2Noise pairs, and Neighbor2Neighbor for unpaired data.

``supervised`` and ``noise2noise`` are the same loss, the MSE between ``f(input)`` and the
store's target (images, or volumes for volume models); they differ in what the target is (a
clean image or an independent noisy draw of the same one), which Noise2Noise (Lehtinen et al.
2018) shows trains the same denoiser in expectation.

``neighbor2neighbor`` (Huang et al., CVPR 2021) needs only noisy images. Each image ``y`` is
cut into 2x2 cells; in every cell a random pair of *adjacent* pixels (one of the 8 ordered
horizontal/vertical pairs) is drawn and the two pixels go to ``g1(y)`` and ``g2(y)``, two
half-size images with nearly the same signal and independent noise. The loss is::

    |f(g1) - g2|^2  +  gamma * |f(g1) - g2 - (g1(f(y)) - g2(f(y)))|^2,   gamma = 2

where ``f(y)`` is the network on the full image under ``no_grad``, sub-sampled with the same
cells. The regulariser makes the full-resolution ``f`` consistent with the half-resolution one.
Images are cropped so the half-size images stay a multiple of the model's stride (U-Net).
The paper's code ramps gamma up over the epochs; we use the constant 2 the brief asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["GAMMA", "METHODS", "PAIRS", "Objective", "crop_to_multiple", "make_objective", "neighbor_pairs",
           "subsample"]

METHODS = ("supervised", "noise2noise", "neighbor2neighbor")
GAMMA = 2.0
# Positions in a 2x2 cell, as pixel_unshuffle orders them: 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1).
PAIRS = ((0, 1), (0, 2), (1, 3), (2, 3), (1, 0), (2, 0), (3, 1), (3, 2))

#: (model, raw module, inputs, targets or None, generator, (rank, world)) -> scalar float32 loss
Objective = Callable[["torch.nn.Module", "torch.nn.Module", "torch.Tensor", "torch.Tensor | None",
                      "torch.Generator", tuple[int, int]], "torch.Tensor"]


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """The leading crop of ``x`` [N, C, H, W] ([N, C, D, H, W]) whose sides are multiples of ``multiple``."""
    sides = tuple(n // multiple * multiple for n in x.shape[2:])
    if sides == tuple(x.shape[2:]):
        return x
    crop: tuple[slice, ...] = (slice(None), slice(None), *(slice(0, n) for n in sides))
    return x[crop]


def neighbor_pairs(x: torch.Tensor, generator: torch.Generator,
                   shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cell positions (idx1, idx2) [N,1,H/2,W/2] of an adjacent pixel pair in every 2x2 cell.

    ``shard`` (rank, world): ``x`` is slice ``rank`` of a global batch of ``N * world`` images; the
    draw is made for the global batch and sliced, so it does not depend on the number of ranks.
    """
    import torch

    n, _, h, w = x.shape
    rank, world = shard
    k = torch.randint(0, 8, (n * world, 1, h // 2, w // 2), generator=generator,
                      device=x.device)[rank * n:(rank + 1) * n]
    # PAIRS[k] computed arithmetically: a device constant would cost a host sync per step
    j = k % 4
    first, second = (j >= 2) * (j - 1), torch.clamp(j + 1, max=3)
    swap = k >= 4
    return torch.where(swap, second, first), torch.where(swap, first, second)


def subsample(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick one pixel per 2x2 cell of single-channel ``x`` [N,1,H,W] at cell positions ``idx``."""
    import torch

    cells = torch.nn.functional.pixel_unshuffle(x, 2)  # [N, 4, H/2, W/2]
    return torch.gather(cells, 1, idx)


def _paired(model: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None,
            generator: torch.Generator, shard: tuple[int, int], stride: int) -> torch.Tensor:
    import torch

    assert t is not None
    x, t = crop_to_multiple(x, stride), crop_to_multiple(t, stride)
    return torch.nn.functional.mse_loss(model(x).float(), t.float())


def _neighbor2neighbor(model: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None,
                       generator: torch.Generator, shard: tuple[int, int], stride: int) -> torch.Tensor:
    import torch

    y = crop_to_multiple(x, 2 * stride)
    idx1, idx2 = neighbor_pairs(y, generator, shard)
    g1, g2 = subsample(y, idx1), subsample(y, idx2)
    with torch.no_grad():
        fy = net(y).float()
        target_gap = subsample(fy, idx1) - subsample(fy, idx2)
    diff = model(g1).float() - g2.float()
    return torch.mean(diff**2) + GAMMA * torch.mean((diff - target_gap) ** 2)


def make_objective(method: str, stride: int, ndim: int = 2) -> Objective:
    """The loss function of ``method`` for a model of total ``stride`` on ``ndim``-D patches
    (supervised and Noise2Noise: any; Neighbor2Neighbor: images only)."""
    from functools import partial

    from cryodeploy.errors import ConfigError

    if method == "neighbor2neighbor" and ndim != 2:
        raise ConfigError("--method neighbor2neighbor sub-samples 2x2 pixel cells of images; train volume "
                          "models with supervised or noise2noise (even/odd tomograms)")
    fn = _neighbor2neighbor if method == "neighbor2neighbor" else _paired
    return partial(fn, stride=stride)
