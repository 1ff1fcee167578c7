"""A small U-Net in the spirit of Topaz-Denoise's unet-small (max-pool down, nearest up, skips), for
images (2-D) or volumes (3-D: :class:`~cryodeploy.models.unet3d.UNet3D`)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet", "deepen_unet", "unet_channels", "unet_receptive_radius", "widen_unet"]


_CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL: dict[int, type[nn.Module]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _block(cin: int, cout: int, dims: int) -> nn.Sequential:
    conv = _CONV[dims]
    return nn.Sequential(
        conv(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.1),
        conv(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


def unet_receptive_radius(depth: int) -> int:
    """Receptive radius of :class:`UNet` of ``depth`` levels (two 3x3 convs per level and side).

    At level l (0 = full resolution) each 3x3 conv adds 2**l pixels, each 2x2 pool adds 2**l;
    the decoder mirrors the encoder and the output conv adds 1.
    """
    r = 0
    for level in range(depth):
        r += 2 * 2**level + 2**level  # two convs + the pool into level+1
    r += 2 * 2**depth  # bottleneck convs
    for level in reversed(range(depth)):
        r += 2 * 2**level  # decoder convs
    return r + 1


def unet_channels(base_channels: int, level: int, max_channels: int = 0) -> int:
    """Channels of :class:`UNet` level ``level`` (0 = full resolution; ``depth`` = the bottleneck)."""
    wide = base_channels * 2**level
    return min(wide, max_channels) if max_channels > 0 else wide


class UNet(nn.Module):
    """Encoder of ``depth`` levels with ``base_channels`` doubling per level (up to ``max_channels``
    when that is > 0); residual output.

    Input H and W must be multiples of 2**depth (the tiler pads to that). Under 2 M parameters
    for base_channels <= 32, depth <= 3. ``dims``: 2 for images [N,1,H,W], 3 for volumes [N,1,D,H,W]
    (the same layers and weight names, with 3x3x3 convolutions and 2x2x2 pooling).
    """

    def __init__(self, base_channels: int = 32, depth: int = 3, dims: int = 2, max_channels: int = 0) -> None:
        super().__init__()
        self.depth = depth
        chans = [unet_channels(base_channels, i, max_channels) for i in range(depth + 1)]
        ins = [1, *chans[:depth - 1]]
        self.enc = nn.ModuleList([_block(ins[i], chans[i], dims) for i in range(depth)])
        self.pool = _POOL[dims](2)
        self.mid = _block(chans[depth - 1], chans[depth], dims)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.ModuleList([_block(chans[i + 1] + chans[i], chans[i], dims)
                                  for i in reversed(range(depth))])
        self.out = _CONV[dims](chans[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [N,1,H,W] (or [N,1,D,H,W]; sides multiples of 2**depth) to the same shape: input +
        learned residual."""
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


def _convs(net: nn.Module) -> list[nn.Conv2d | nn.Conv3d]:
    """``net``'s convolutions in order (a UNet's: encoder levels, bottleneck, decoder levels, output)."""
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]


def widen_unet(net: UNet, base_channels: int) -> UNet:
    """A :class:`UNet` of ``base_channels`` (>= ``net``'s, same depth and dims) that computes exactly
    what ``net`` does: its old channels keep their weights and read only old channels, the new
    channels start from a fresh initialization and are read by nothing until training moves the
    (zero) weights that lead out of them. Lets a trained model grow in capacity without starting over."""
    old_convs = _convs(net)
    old_base = old_convs[0].out_channels
    if base_channels < old_base:
        raise ValueError(f"widen_unet: base_channels {base_channels} is below the model's {old_base}")
    if net.mid[0].out_channels != unet_channels(old_base, net.depth):
        raise ValueError("widen_unet: the model's channels are capped (max_channels)")
    wide = UNet(base_channels, net.depth, old_convs[0].weight.dim() - 2)
    old_ch = [unet_channels(old_base, i) for i in range(net.depth + 1)]
    new_ch = [unet_channels(base_channels, i) for i in range(net.depth + 1)]
    # where each conv's old input channels sit among its new ones, in _convs order
    ins: list[list[int]] = [[0]]
    for level in range(net.depth + 1):  # encoder levels, then the bottleneck
        ins += [] if level == 0 else [list(range(old_ch[level - 1]))]
        ins += [list(range(old_ch[level]))]
    for level in reversed(range(net.depth)):  # decoder input: [upsampled level + 1, skip of level]
        ins += [list(range(old_ch[level + 1])) + [new_ch[level + 1] + j for j in range(old_ch[level])]]
        ins += [list(range(old_ch[level]))]
    ins += [list(range(old_ch[0]))]
    with torch.no_grad():
        for new, old, cols in zip(_convs(wide), old_convs, ins, strict=True):
            n = old.out_channels
            new.weight[:n] = 0.0
            new.weight[:n, cols] = old.weight
            if new.bias is not None and old.bias is not None:
                new.bias[:n] = old.bias
    return wide


def _bias(conv: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
    if conv.bias is None:
        raise ValueError("deepen_unet: a convolution without bias")
    return conv.bias


def _slope(net: UNet) -> float:
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    return float(acts[0].negative_slope)


def deepen_unet(net: UNet, max_channels: int = 0) -> UNet:
    """A :class:`UNet` one level deeper than ``net`` (2-D or 3-D, uncapped so far; the new bottleneck
    has ``max_channels`` channels at most when that is > 0) that computes what ``net`` does, up to
    rounding: the old bottleneck moves up to the new level's decoder; the new encoder level passes
    its input through as the pair (LeakyReLU(x), LeakyReLU(-x)), from which the moved bottleneck
    reads x back exactly; the new bottleneck starts fresh and is read by nothing until training moves
    the (zero) weights that lead out of it. Doubles the receptive field without starting over."""
    convs = _convs(net)
    dims = convs[0].weight.dim() - 2
    depth = net.depth
    base = convs[0].out_channels
    last_enc, mid = _convs(net.enc[-1]), _convs(net.mid)
    c, bottleneck = last_enc[0].out_channels, mid[0].out_channels
    if bottleneck != 2 * c:
        raise ValueError(f"deepen_unet: the bottleneck has {bottleneck} channels, not twice its input's {c}")
    if 0 < max_channels < bottleneck:
        raise ValueError(f"deepen_unet: max_channels {max_channels} is below the bottleneck's {bottleneck}")
    deep = UNet(base, depth + 1, dims, max_channels)
    new_level, new_dec = _convs(deep.enc[depth]), _convs(deep.dec[0])
    up = _convs(deep.mid)[0].out_channels  # channels the new level's decoder reads from below
    s = _slope(net)
    centre: tuple[slice | int, ...] = (slice(None), slice(None), *([1] * dims))
    with torch.no_grad():
        for new_mod, old_mod in [*zip(deep.enc[:depth], net.enc, strict=True),
                                 *zip(deep.dec[1:], net.dec, strict=True), (deep.out, net.out)]:
            new_mod.load_state_dict(old_mod.state_dict())
        eye = torch.eye(c)
        half = torch.cat([eye, -eye], 1) / (1 + s)  # x = (LeakyReLU(x) - LeakyReLU(-x)) / (1 + slope)
        for conv, kernel in zip(new_level, (torch.cat([eye, -eye]), torch.cat([half, -half])), strict=True):
            conv.weight.zero_()
            conv.weight[centre] = kernel  # both convs output [x, -x]
            _bias(conv).zero_()
        new_dec[0].weight.zero_()
        new_dec[0].weight[:, up:up + c] = mid[0].weight / (1 + s)
        new_dec[0].weight[:, up + c:] = -mid[0].weight / (1 + s)
        _bias(new_dec[0]).copy_(_bias(mid[0]))
        new_dec[1].load_state_dict(mid[1].state_dict())
    return deep
