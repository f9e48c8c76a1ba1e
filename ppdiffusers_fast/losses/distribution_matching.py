"""Distribution matching loss (DMD / DMD2) in x0 space (ALGORITHMS.md, "Distribution matching").

On a generated sample ``x0_hat`` re-noised to ``x_s``, the teacher ("real" score) and the fake score give
``x0_real = x_s - s v_teacher`` and ``x0_fake = x_s - s v_fake``. The KL gradient direction is

    g = (x0_fake - x0_real) / mean|x0_hat - x0_real|     (per sample, over all non-batch dims)

(Yin et al., "One-step diffusion with distribution matching distillation", eq. 7-8; the normaliser is
computed from x0 predictions only, so units are consistent), and the loss
``0.5 * mse(x0_hat, stopgrad(x0_hat - g))`` has gradient ``g / numel`` with respect to ``x0_hat``
(value ``0.5 * mean(g^2)``). ``g`` carries no gradient: ``x0_real`` and ``x0_fake`` are detached here.

The normaliser is floored at ``eps`` (1e-8 by default): it is zero only when the teacher reproduces
``x0_hat`` exactly, where the direction would otherwise be 0/0. Computed in float32.
"""
import paddle

from ._checks import check_same_shape

__all__ = ["dmd_direction", "dmd_loss"]


def dmd_direction(x0_hat, x0_real, x0_fake, eps=1e-8):
    """Normalised DMD gradient direction ``g`` (``[B, ...]`` float32, no gradient)."""
    check_same_shape(x0_hat, x0_real, ("x0_hat", "x0_real"))
    check_same_shape(x0_hat, x0_fake, ("x0_hat", "x0_fake"))
    if len(x0_hat.shape) < 2:
        raise ValueError(f"x0_hat must be [B, ...] with at least one non-batch dim, got {list(x0_hat.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    x0_hat = x0_hat.detach().astype("float32")
    x0_real = x0_real.detach().astype("float32")
    x0_fake = x0_fake.detach().astype("float32")
    non_batch_axes = list(range(1, len(x0_hat.shape)))
    normaliser = paddle.mean(paddle.abs(x0_hat - x0_real), axis=non_batch_axes, keepdim=True)
    return (x0_fake - x0_real) / paddle.clip(normaliser, min=eps)


def dmd_loss(x0_hat, x0_real, x0_fake, eps=1e-8):
    """``0.5 * mean((x0_hat - stopgrad(x0_hat - g))^2)``; gradient flows only into ``x0_hat``.

    Args:
        x0_hat: ``[B, ...]`` the generator's sample (with graph).
        x0_real, x0_fake: ``[B, ...]`` x0 predictions of the teacher and the fake score at ``x_s``.
        eps: floor of the per-sample normaliser.
    Returns:
        0-d float32 tensor.
    """
    direction = dmd_direction(x0_hat, x0_real, x0_fake, eps)
    x0_hat_f32 = x0_hat.astype("float32")
    target = (x0_hat_f32.detach() - direction).detach()
    diff = x0_hat_f32 - target
    return 0.5 * paddle.mean(diff * diff)
