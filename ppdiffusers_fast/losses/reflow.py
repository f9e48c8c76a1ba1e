"""Reflow (self-consistency) loss inside a phase (ALGORITHMS.md, "Reflow loss").

Take the student's phase-end prediction ``x_e`` at the phase's lower edge level ``sigma_e`` (stop-gradient),
re-noise it with the exact kernel to a level ``r`` inside the phase, let the student jump from ``r``
back to the edge, and penalise the difference:

    x_r  = renoise(x_e, sigma_e, r, eps')                 (exact kernel, schedules.renoise)
    pred = x_r + (sigma_e - r) * v_theta(x_r, r)           (the jump starts at r, the level used)
    L    = huber(pred, stopgrad(x_e))

(FLUX-Lightning, seed 000; "Self-Corrected Flow Distillation".)
"""
from ..schedules import euler_step, renoise
from .consistency import consistency_loss

__all__ = ["reflow_start", "reflow_jump", "reflow_loss"]


def reflow_start(x_end, edge_sigma, r, noise):
    """The re-noised start ``x_r`` of the jump (``[B, ...]``), from the detached phase-end ``x_end`` at ``edge_sigma``.

    Args:
        x_end: ``[B, ...]`` phase-end prediction at level ``edge_sigma`` (float or ``[B]``).
        r: float or ``[B]`` level inside the phase, ``r >= edge_sigma``.
        noise: ``[B, ...]`` fresh standard normal noise.
    """
    return renoise(x_end.detach(), edge_sigma, r, noise)


def reflow_jump(x_r, r, edge_sigma, velocity):
    """The student's jump from ``r`` to the phase edge: ``x_r + (edge_sigma - r) * v`` (``[B, ...]``)."""
    return euler_step(x_r, r, edge_sigma, velocity)


def reflow_loss(jump_pred, x_end, loss_type="huber", huber_c=0.001):
    """``consistency_loss(jump_pred, stopgrad(x_end))``; 0-d float32 tensor.

    Args:
        jump_pred: ``[B, ...]`` result of :func:`reflow_jump` (with graph).
        x_end: ``[B, ...]`` the phase-end prediction the jump must return to (detached here).
        loss_type: ``"huber"`` or ``"l2"``; huber_c: pseudo-Huber constant.
    """
    return consistency_loss(jump_pred, x_end.detach(), loss_type=loss_type, huber_c=huber_c)
