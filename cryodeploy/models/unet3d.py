"""A small 3-D U-Net for tomograms: :class:`~cryodeploy.models.unet.UNet` with 3x3x3 convolutions,
2x2x2 max-pooling and nearest upsampling (cryoCARE's and Topaz-Denoise's 3-D U-Nets in spirit)."""

from __future__ import annotations

from cryodeploy.models.unet import UNet, unet_receptive_radius

__all__ = ["UNet3D", "unet_receptive_radius"]


class UNet3D(UNet):
    """:class:`UNet` on volumes [N,1,D,H,W] (sides multiples of 2**depth; the tiler pads to that). The
    receptive radius is the 2-D U-Net's along every axis (:func:`unet_receptive_radius`)."""

    def __init__(self, base_channels: int = 16, depth: int = 2) -> None:
        super().__init__(base_channels, depth, dims=3)
