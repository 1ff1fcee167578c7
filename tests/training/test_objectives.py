"""The PSNR-weighted MSE: its value, its gradient (that of the mean per-patch log error) and its cap."""

from __future__ import annotations

import torch

from cryodeploy.training.objectives import PSNR_WEIGHT_CAP, psnr_weighted_mse


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    target = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.1, 0.15, 0.2, 0.3], dtype=torch.float64).view(4, 1, 1, 1)  # errors ~1:2:4:9
    pred = (target + scale * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)).requires_grad_()
    return pred, target


def test_value_is_the_mean_mse_and_gradient_that_of_mean_log_error() -> None:
    pred, target = _pair()
    loss = psnr_weighted_mse(pred, target)
    own = ((pred.detach() - target) ** 2).mean(dim=(1, 2, 3))
    assert own.max() / own.min() < PSNR_WEIGHT_CAP  # no bound applies to this batch
    torch.testing.assert_close(loss.detach(), own.mean().float(), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss, pred)
    ref = pred.detach().clone().requires_grad_()
    log_err = ((ref - target) ** 2).mean(dim=(1, 2, 3)).log().mean()
    (ref_grad,) = torch.autograd.grad(log_err, ref)
    torch.testing.assert_close(grad.double(), own.mean() * ref_grad, rtol=1e-4,  # float32 inside
                               atol=1e-6 * float(ref_grad.abs().max()))
    # plain MSE pushes hardest on the worst patch; this loss on the best (its dB are as cheap to win)
    (mse_grad,) = torch.autograd.grad(torch.nn.functional.mse_loss(pred, target), pred)
    assert mse_grad.flatten(1).norm(dim=1).argmax() == 3 and grad.flatten(1).norm(dim=1).argmax() == 0


def test_a_perfect_patch_is_capped_not_infinite() -> None:
    pred, target = _pair()
    with torch.no_grad():
        pred[0] = target[0]
    loss = psnr_weighted_mse(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(grad[0].abs().max()) == 0.0  # no error there: nothing to push
    own = ((pred.detach() - target) ** 2).mean(dim=(1, 2, 3))
    weights = own.mean() / torch.maximum(own, own.mean() / PSNR_WEIGHT_CAP)
    torch.testing.assert_close(loss.detach().double(), (weights * own).mean(), rtol=1e-6, atol=0)
