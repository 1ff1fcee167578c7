"""A small 3-D U-Net for tomograms: :class:`~cryodeploy.models.unet.UNet` with 3x3x3 convolutions,
2x2x2 max-pooling and nearest upsampling (cryoCARE's and Topaz-Denoise's 3-D U-Nets in spirit)."""

from __future__ import annotations

import torch
from torch import nn

from cryodeploy.models.unet import unet_receptive_radius

__all__ = ["UNet3D", "unet_receptive_radius"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


class UNet3D(nn.Module):
    """Encoder of ``depth`` levels with ``base_channels`` doubling per level; residual output.

    Input D, H and W must be multiples of 2**depth (the tiler pads to that). The receptive radius
    is the 2-D U-Net's along every axis (:func:`unet_receptive_radius`).
    """

    def __init__(self, base_channels: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.depth = depth
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_block(1 if i == 0 else chans[i - 1], chans[i]) for i in range(depth)])
        self.pool = nn.MaxPool3d(2)
        self.mid = _block(chans[depth - 1], chans[depth])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.ModuleList([_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))])
        self.out = nn.Conv3d(chans[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [N,1,D,H,W] (sides multiples of 2**depth) to the same shape: input + learned residual."""
        skips = []
        h = x
        for enc in self.enc:
            h = enc(h)
            skips.append(h)
            h = self.pool(h)
        h = self.mid(h)
        for dec, skip in zip(self.dec, reversed(skips), strict=True):
            h = dec(torch.cat([self.up(h), skip], dim=1))
        return x + self.out(h)
