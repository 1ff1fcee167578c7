"""Growing a trained U-Net: the wider or deeper model computes what the smaller one did, and trains."""

from __future__ import annotations

import pytest
import torch

from cryodeploy.models.unet import UNet, deepen_unet, unet_receptive_radius, widen_unet


def _trained(base: int, depth: int, dims: int = 2) -> UNet:
    torch.manual_seed(3)
    net = UNet(base, depth, dims)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)  # every weight and bias matters, unlike a fresh init's small biases
    return net


@pytest.mark.parametrize(("base", "wide", "depth"), [(4, 6, 2), (4, 8, 3), (5, 5, 1)])
def test_widened_unet_computes_the_same(base: int, wide: int, depth: int) -> None:
    net = _trained(base, depth)
    grown = widen_unet(net, wide)
    assert grown.enc[0][0].out_channels == wide and grown.depth == depth
    assert sum(p.numel() for p in grown.parameters()) >= sum(p.numel() for p in net.parameters())
    x = torch.randn(3, 1, 8 * 2**depth, 8 * 2**depth, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = net(x), grown(x)
    # the same sums, with zero terms added: equal up to the order of float additions
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_new_channels_learn() -> None:
    """One gradient step moves the output: the weights that lead out of the new channels get a
    gradient (they start at zero, so the new channels are otherwise unused)."""
    net = _trained(4, 2)
    grown = widen_unet(net, 6)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    loss = grown(x).square().mean()
    loss.backward()
    grad = grown.dec[-1][0].weight.grad
    assert grad is not None
    # level 0's decoder reads [12 upsampled (8 old, 4 new), 6 skip (4 old, 2 new)]: its old outputs'
    # weights from the new channels are zero, their gradients are not
    new_inputs = [8, 9, 10, 11, 16, 17]
    assert torch.count_nonzero(grown.dec[-1][0].weight[:4, new_inputs]) == 0
    assert float(grad[:4, new_inputs].abs().min()) > 0.0


def test_narrowing_is_refused() -> None:
    with pytest.raises(ValueError, match="below the model's 6"):
        widen_unet(UNet(6, 2), 4)


def test_capped_channels() -> None:
    """max_channels caps the doubling; 0 leaves it uncapped."""
    convs = lambda net: [m.out_channels for m in (*(b[0] for b in net.enc), net.mid[0])]  # noqa: E731
    assert convs(UNet(16, 5, max_channels=256)) == [16, 32, 64, 128, 256, 256]
    assert convs(UNet(16, 5)) == [16, 32, 64, 128, 256, 512]
    assert convs(UNet(4, 2, max_channels=4)) == [4, 4, 4]


@pytest.mark.parametrize(("base", "depth", "dims", "cap"), [(4, 2, 2, 0), (4, 3, 2, 32), (3, 1, 2, 6),
                                                             (2, 1, 3, 0)])
def test_deepened_unet_computes_the_same(base: int, depth: int, dims: int, cap: int) -> None:
    net = _trained(base, depth, dims)
    deep = deepen_unet(net, cap)
    assert deep.depth == depth + 1
    assert deep.mid[0].out_channels == (min(base * 2 ** (depth + 1), cap) if cap else base * 2 ** (depth + 1))
    assert unet_receptive_radius(depth + 1) > 2 * unet_receptive_radius(depth) - 1
    side = 4 * 2 ** (depth + 1)
    x = torch.randn(2, 1, *([side] * dims), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = net(x), deep(x)
    # x is carried through the new level as (LeakyReLU(x), LeakyReLU(-x)) and read back: rounding only
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in net.parameters())


def test_new_level_learns() -> None:
    """One gradient step reaches the new bottleneck: the zero weights that read it get a gradient."""
    deep = deepen_unet(_trained(4, 2))
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    deep(x).square().mean().backward()
    reads = deep.dec[0][0]
    grad = reads.weight.grad
    assert grad is not None
    up = deep.mid[0].out_channels  # the new level's decoder reads [up (new, zero weights), skip]
    assert torch.count_nonzero(reads.weight[:, :up]) == 0
    assert float(grad[:, :up].abs().max()) > 0.0


def test_deepening_is_refused_where_it_cannot_be_exact() -> None:
    with pytest.raises(ValueError, match="max_channels 8 is below the bottleneck's 16"):
        deepen_unet(UNet(4, 2), 8)
    with pytest.raises(ValueError, match="bottleneck has 8 channels, not twice its input's 8"):
        deepen_unet(UNet(4, 2, max_channels=8))
    with pytest.raises(ValueError, match="capped"):
        widen_unet(UNet(4, 2, max_channels=8), 6)
