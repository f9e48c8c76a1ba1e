"""Reflow (self-consistency) component of FLUX-Lightning (ALGORITHMS.md, "Reflow loss").

Inside phase ``k`` (grid indices ``e_k < e_{k+1}``, levels ``sigma_e = sigma_{e_k}``), the student's phase-end
prediction ``x_e`` (stop-gradient) is moved back up to a level ``r`` drawn inside the phase with the exact
forward kernel, and the student must jump from ``r`` back to the phase's lower edge and land on ``x_e``:

    j   ~ U{e_k + 1, ..., e_{k+1}},  r = sigma_j                     (a level strictly above the edge)
    x_r = renoise(x_e, sigma_e, r, eps')                              (exact kernel, schedules.renoise)
    L   = huber(x_r + (sigma_e - r) * v_theta(x_r, r), stopgrad(x_e))  (the jump starts at r, the level used)

(Seed article 000, "reflow loss"; Dao et al., "Self-Corrected Flow Distillation".) The lower edge itself is
never drawn: the jump would have zero length and the loss would be zero by construction. The upper edge is
drawn, so the top phase also learns the jump from pure noise (``r = 1``), the first step of sampling.

The losses are the pure functions of ``losses.reflow``; this module only chooses the level, runs the student
and reports what it used, so a test can rebuild the value by hand.
"""
from dataclasses import dataclass
from typing import Optional

import paddle

from .. import schedules
from ..config_fields import flag
from ..losses import reflow_jump, reflow_loss, reflow_start
from ..models.lora import use_adapters

__all__ = ["ReflowConfig", "ReflowOutput", "Reflow"]


@dataclass
class ReflowConfig:
    apply_reflow_loss: bool = flag(True, "add the reflow (self-consistency) loss to the generator (flux_lightning)")
    reflow_loss_weight: float = flag(0.01, "weight of the reflow loss in the generator loss")

    def validate(self) -> None:
        if not self.reflow_loss_weight >= 0:
            raise ValueError(f"--reflow_loss_weight must be >= 0, got {self.reflow_loss_weight}")


@dataclass
class ReflowOutput:
    """What one reflow loss used (for logging and for tests).

    Attributes:
        loss: 0-d float32 tensor (unweighted).
        index: ``[B]`` grid index of ``r``; r: ``[B]`` the level the jump started from.
        x_r: ``[B, L, C]`` the re-noised start; jump: ``[B, L, C]`` the student's landing point (with graph).
    """

    loss: paddle.Tensor
    index: paddle.Tensor
    r: paddle.Tensor
    x_r: paddle.Tensor
    jump: paddle.Tensor


class Reflow:
    """The reflow loss of a student adapter on a ``FluxDenoiser`` (no trainable state of its own).

    Args:
        denoiser: the ``FluxDenoiser`` holding the student adapter (not owned: the method holds it).
        student_adapter: name of the student LoRA adapter.
        loss_type, huber_c: as the consistency loss (``"huber"`` with c = 0.001 by default, or ``"l2"``).
    """

    def __init__(self, denoiser, student_adapter: str, loss_type: str = "huber", huber_c: float = 0.001):
        self.denoiser = denoiser
        self.student_adapter = student_adapter
        self.loss_type = loss_type
        self.huber_c = huber_c

    def loss(self, x_end, edge_sigma, grid, lower, upper, cond, noise: Optional[paddle.Tensor] = None,
             index: Optional[paddle.Tensor] = None) -> ReflowOutput:
        """Reflow loss for phase-end predictions ``x_end``.

        Args:
            x_end: ``[B, L, C]`` the student's phase-end prediction at ``edge_sigma`` (detached here).
            edge_sigma: ``[B]`` level of each sample's phase lower edge (``grid[lower]``).
            grid: ``[N + 1]`` ascending solver grid of this batch's resolution.
            lower, upper: ``[B]`` int64 grid indices of each sample's phase edges.
            cond: the student's ``FluxCondition``.
            noise: ``[B, L, C]`` fresh noise ``eps'`` (drawn when None).
            index: ``[B]`` grid index of ``r`` (drawn in ``lower + 1 .. upper`` when None).
        """
        batch = x_end.shape[0]
        if index is None:
            index = schedules.draw_grid_index(lower + 1, upper, batch)
        r = paddle.gather(grid, index)
        if noise is None:
            noise = paddle.randn(x_end.shape, dtype="float32")
        x_r = reflow_start(x_end.astype("float32"), edge_sigma, r, noise)
        with use_adapters(self.denoiser.transformer, self.student_adapter):
            velocity = self.denoiser(x_r, r, cond)
        jump = reflow_jump(x_r, r, edge_sigma, velocity.astype("float32"))
        loss = reflow_loss(jump, x_end, self.loss_type, self.huber_c)
        return ReflowOutput(loss, index, r, x_r, jump)
