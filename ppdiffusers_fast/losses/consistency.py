"""Consistency losses (PCM / LCM): pseudo-Huber and L2 between a prediction and its stop-gradient target.

ALGORITHMS.md, "Solver grid and phases": loss ``sqrt((pred - target)^2 + c^2) - c``, mean over all
elements, ``c = 0.001`` by default (Song & Dhariwal, "Improved techniques for training consistency
models", eq. 8); ``l2`` is the mean squared error. Computed in float32.
"""
import paddle

from ._checks import check_same_shape

__all__ = ["pseudo_huber_loss", "l2_loss", "consistency_loss", "LOSS_TYPES"]

LOSS_TYPES = ("huber", "l2")


def pseudo_huber_loss(pred, target, huber_c=0.001):
    """``mean(sqrt((pred - target)^2 + c^2) - c)`` over all elements of ``[B, ...]`` tensors; a 0-d float32 tensor."""
    check_same_shape(pred, target, ("pred", "target"))
    if not huber_c > 0:
        raise ValueError(f"huber_c must be positive, got {huber_c}")
    diff = pred.astype("float32") - target.astype("float32")
    return paddle.mean(paddle.sqrt(diff * diff + huber_c * huber_c) - huber_c)


def l2_loss(pred, target):
    """``mean((pred - target)^2)`` over all elements of ``[B, ...]`` tensors; a 0-d float32 tensor."""
    check_same_shape(pred, target, ("pred", "target"))
    diff = pred.astype("float32") - target.astype("float32")
    return paddle.mean(diff * diff)


def consistency_loss(pred, target, loss_type="huber", huber_c=0.001):
    """Consistency loss between ``pred`` and ``target`` (the caller detaches the target).

    Args:
        pred, target: ``[B, ...]`` tensors of the same shape.
        loss_type: ``"huber"`` (pseudo-Huber with constant ``huber_c``) or ``"l2"``.
    Returns:
        0-d float32 tensor.
    """
    if loss_type == "huber":
        return pseudo_huber_loss(pred, target, huber_c)
    if loss_type == "l2":
        return l2_loss(pred, target)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
