"""The seeds' 3-layer CNN: 1->16->16->1 channels, 3x3 kernels, ReLU, zero 'same' padding."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN3"]


class CNN3(nn.Module):
    """conv1 (1->C) + ReLU, conv2 (C->C) + ReLU, conv3 (C->1); 2,625 parameters for C=16.

    Receptive radius 3 px, stride 1, so tiled inference with a 3-px halo equals the whole image.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch [N,1,H,W] to a denoised batch of the same shape."""
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.conv3(x)
