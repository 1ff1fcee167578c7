"""Training objectives: supervised / Noise2Noise pairs, and Neighbor2Neighbor for unpaired data.

``supervised`` and ``noise2noise`` are the same loss, the MSE between ``f(input)`` and the
store's target (images, or volumes for volume models); they differ in what the target is (a
clean image or an independent noisy draw of the same one), which Noise2Noise (Lehtinen et al.
2018) shows trains the same denoiser in expectation.

``neighbor2neighbor`` (Huang et al., CVPR 2021) needs only noisy images (or single tomograms).
Each image ``y`` is cut into cells of 2 pixels a side (2x2 for images, 2x2x2 for volumes); in
every cell a random pair of *adjacent* pixels (sharing a side: one of the 8 ordered pairs of a
2x2 cell, of the 24 of a 2x2x2 cell) is drawn and the two go to ``g1(y)`` and ``g2(y)``, two
half-size images with nearly the same signal and independent noise. The loss is::

    |f(g1) - g2|^2  +  gamma * |f(g1) - g2 - (g1(f(y)) - g2(f(y)))|^2,   gamma = 2

where ``f(y)`` is the network on the full image under ``no_grad``, sub-sampled with the same
cells. The regulariser makes the full-resolution ``f`` consistent with the half-resolution one.
Images are cropped so the half-size images stay a multiple of the model's stride (U-Net).
The paper's code ramps gamma up over the epochs; we use the constant 2 the brief asks for.
A cell's positions are numbered as ``pixel_unshuffle`` orders a 2x2 cell, row-major over its
axes (position ``sum(bit_a * 2**(ndim-1-a))``); the pairs are :func:`cell_pairs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["GAMMA", "METHODS", "PAIRS", "PSNR_WEIGHT_CAP", "Objective", "cell_pairs", "cells",
           "crop_to_multiple", "make_objective", "neighbor_pairs", "psnr_weighted_mse", "subsample"]

METHODS = ("supervised", "noise2noise", "neighbor2neighbor")
GAMMA = 2.0
#: :func:`psnr_weighted_mse`: no patch weighs more than this many times the batch's mean MSE over its own
PSNR_WEIGHT_CAP = 20.0


def cell_pairs(ndim: int) -> tuple[tuple[int, int], ...]:
    """The ordered pairs of adjacent positions in a cell of 2 pixels a side in ``ndim`` axes: the
    unordered ones (positions differing in one bit) sorted, then the same pairs swapped."""
    edges = sorted((p, p | 1 << b) for p in range(2**ndim) for b in range(ndim) if not p >> b & 1)
    return (*edges, *((q, p) for p, q in edges))


#: Positions in a 2x2 cell, as pixel_unshuffle orders them: 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1).
PAIRS = cell_pairs(2)

#: (model, raw module, inputs, targets or None, a generator for the batch or one per image,
#: (rank, world)) -> scalar float32 loss
Objective = Callable[["torch.nn.Module", "torch.nn.Module", "torch.Tensor", "torch.Tensor | None",
                      "torch.Generator | Sequence[torch.Generator]", tuple[int, int]], "torch.Tensor"]


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """The leading crop of ``x`` [N, C, H, W] ([N, C, D, H, W]) whose sides are multiples of ``multiple``."""
    sides = tuple(n // multiple * multiple for n in x.shape[2:])
    if sides == tuple(x.shape[2:]):
        return x
    crop: tuple[slice, ...] = (slice(None), slice(None), *(slice(0, n) for n in sides))
    return x[crop]


def neighbor_pairs(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator],
                   shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cell positions (idx1, idx2) [N, 1, H/2, W/2] ([N, 1, D/2, H/2, W/2] for volumes) of an
    adjacent pixel pair (:func:`cell_pairs`) in every cell of ``x`` [N, 1, H, W] ([N, 1, D, H, W]).

    ``shard`` (rank, world): ``x`` is slice ``rank`` of a global batch of ``N * world`` images; the
    draw is made for the global batch and sliced, so it does not depend on the number of ranks.
    With one generator per image (a sequence), each image's cells are drawn from its own generator:
    the draw does not depend on which other images share the batch (``shard`` is then unused).
    """
    import torch

    n, ndim = x.shape[0], x.dim() - 2
    rank, world = shard
    pairs = cell_pairs(ndim)
    half = tuple(s // 2 for s in x.shape[2:])
    if isinstance(generator, torch.Generator):
        k = torch.randint(0, len(pairs), (n * world, 1, *half), generator=generator,
                          device=x.device)[rank * n:(rank + 1) * n]
    else:
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images")
        k = torch.cat([torch.randint(0, len(pairs), (1, 1, *half), generator=g, device=x.device)
                       for g in generator])
    # pairs[k] as a sum of indicator terms: a table on the device would cost a host sync per step
    first, second = torch.zeros_like(k), torch.zeros_like(k)
    for i, (p, q) in enumerate(pairs):
        hit = k == i
        first += hit * p
        second += hit * q
    return first, second


def cells(x: torch.Tensor) -> torch.Tensor:
    """Single-channel ``x`` [N, 1, *S] cut into cells of 2 pixels a side: [N, 2**ndim, *S/2], the
    positions of a cell along dim 1 in :func:`cell_pairs`' order (``pixel_unshuffle(x, 2)`` in 2-D)."""
    n, ndim = x.shape[0], x.dim() - 2
    half = [s // 2 for s in x.shape[2:]]
    split = x.reshape(n, *(v for h in half for v in (h, 2)))  # [N, h0, 2, h1, 2, ...]
    order = (0, *(2 + 2 * a for a in range(ndim)), *(1 + 2 * a for a in range(ndim)))
    return split.permute(order).reshape(n, 2**ndim, *half)


def subsample(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick one pixel per cell of single-channel ``x`` [N,1,H,W] ([N,1,D,H,W]) at cell positions ``idx``."""
    import torch

    return torch.gather(cells(x), 1, idx)


def _paired(model: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None,
            generator: torch.Generator | Sequence[torch.Generator], shard: tuple[int, int],
            stride: int) -> torch.Tensor:
    import torch

    assert t is not None
    x, t = crop_to_multiple(x, stride), crop_to_multiple(t, stride)
    return torch.nn.functional.mse_loss(model(x).float(), t.float())


def _neighbor2neighbor(model: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None,
                       generator: torch.Generator | Sequence[torch.Generator], shard: tuple[int, int],
            stride: int) -> torch.Tensor:
    import torch

    y = crop_to_multiple(x, 2 * stride)
    idx1, idx2 = neighbor_pairs(y, generator, shard)
    g1, g2 = subsample(y, idx1), subsample(y, idx2)
    with torch.no_grad():
        fy = net(y).float()
        target_gap = subsample(fy, idx1) - subsample(fy, idx2)
    diff = model(g1).float() - g2.float()
    return torch.mean(diff**2) + GAMMA * torch.mean((diff - target_gap) ** 2)


def psnr_weighted_mse(pred: torch.Tensor, target: torch.Tensor, cap: float = PSNR_WEIGHT_CAP) -> torch.Tensor:
    """MSE whose gradient is that of the batch's mean per-patch PSNR (times the mean MSE).

    Plain MSE weighs each patch by its own error, so patches whose normalized error is small (low
    dose, where the clean signal is a small part of the normalized image; empty ice) barely train,
    while PSNR, the per-image quality measure, counts every image alike. Each patch's squared error is
    weighted by ``mean MSE / own MSE`` (constant in the gradient, the own MSE bounded below by
    ``mean / cap``), the gradient of ``mean MSE * mean(log own MSE)``; the value is the mean MSE
    where no bound applies. ``pred``, ``target``: [N, C, ...].
    """
    import torch

    dims = tuple(range(1, pred.dim()))
    own = ((pred.float() - target.float()) ** 2).mean(dim=dims)
    with torch.no_grad():
        mean = own.mean()
        weight = mean / torch.maximum(own, mean / cap).clamp_min(torch.finfo(torch.float32).tiny)
    return (weight * own).mean()


def make_objective(method: str, stride: int, ndim: int = 2) -> Objective:
    """The loss function of ``method`` for a model of total ``stride`` on ``ndim``-D patches
    (images or volumes; Neighbor2Neighbor sub-samples cells of 2 pixels a side in ``ndim`` axes)."""
    from functools import partial

    fn = _neighbor2neighbor if method == "neighbor2neighbor" else _paired
    return partial(fn, stride=stride)
