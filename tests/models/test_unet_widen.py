"""Growing a trained U-Net: the wider model computes exactly what the narrow one did, and trains."""

from __future__ import annotations

import pytest
import torch

from cryodeploy.models.unet import UNet, widen_unet


def _trained(base: int, depth: int) -> UNet:
    torch.manual_seed(3)
    net = UNet(base, depth)
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
