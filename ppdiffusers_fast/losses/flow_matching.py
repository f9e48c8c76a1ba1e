"""Flow-matching loss (rectified flow): the velocity of ``x_s = (1 - s) x0 + s eps`` is ``eps - x0``.

``L = mse(v_pred, eps - x0)`` (Lipman et al., "Flow matching for generative modeling", eq. 23 for the
linear path; Liu et al., "Flow straight and fast"). DMD2 trains its fake score with it on the
generator's samples (ALGORITHMS.md, "Distribution matching"). Computed in float32.
"""
import paddle

from ..schedules import velocity_from_x0_eps
from ._checks import check_same_shape

__all__ = ["flow_matching_loss"]


def flow_matching_loss(v_pred, x0, eps):
    """``mean((v_pred - (eps - x0))^2)`` over all elements.

    Args:
        v_pred: ``[B, ...]`` predicted velocity at ``x_s``.
        x0, eps: ``[B, ...]`` the clean sample and the noise that built ``x_s``.
    Returns:
        0-d float32 tensor.
    """
    check_same_shape(v_pred, x0, ("v_pred", "x0"))
    target = velocity_from_x0_eps(x0.astype("float32"), eps.astype("float32"))
    diff = v_pred.astype("float32") - target
    return paddle.mean(diff * diff)
