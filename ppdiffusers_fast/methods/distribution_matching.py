"""Distribution matching component (DMD / DMD2; ALGORITHMS.md, "Distribution matching").

On the generator's clean sample ``x0_hat`` ([B, L, C], with graph):

    j ~ U{1, ..., N - 1},  s = sigma_j                      (a level of the batch's solver grid)
    x_s     = (1 - s) x0_hat + s eps                         (from stopgrad(x0_hat); no graph)
    x0_real = x_s - s v_teacher(x_s, s)                      (no adapter live, guided as the teacher)
    x0_fake = x_s - s v_fake(x_s, s)                         (the fake score, no graph)
    L_dmd   = dmd_loss(x0_hat, x0_real, x0_fake)             (x0-space normaliser, losses.distribution_matching)

On a generated sample at a level ``l > 0`` (FLUX-Lightning's phase-end prediction ``x_e`` at ``sigma_{e_k}``,
``--dmd_placement phase_end``) the same matching holds between the marginals at ``l``: ``s > l`` is drawn from the
grid above ``l``, ``x_s = renoise(x_e, l, s, eps)`` (the exact kernel, ``schedules.renoise``), and both scores'
predictions are taken back to the sample's level by one Euler jump,
``x_l_real = x_s + (l - s) v_teacher``, ``x_l_fake = x_s + (l - s) v_fake``, so
``L_dmd = dmd_loss(x_e, x_l_real, x_l_fake)``; since ``x_l_fake - x_l_real = (s - l) / s (x0_fake - x0_real)``
the direction is the score difference at ``x_s`` (the KL gradient), normalised in the sample's own units. At
``l = 0`` this is the clean-sample loss above. If the generator's marginal at ``l`` equals the teacher's, the two
scores agree and the term vanishes: a student that follows the teacher's flow (PCM's optimum) is a stationary point.

Two fake scores (``--dmd_fake_score``):

- ``student``: the student adapter itself (FLUX-Lightning, seed 000): no extra parameters or optimizer;
- ``adapter``: a second LoRA adapter ``fake_score`` on the same frozen base (no second copy of the 12B model),
  trained on the generator's samples with the flow-matching loss ``mse(v_fake(x_s, s), eps - x0_hat)`` as its
  own parameter group ("fake_score"), with its own optimizer and ``--dmd_fake_score_updates`` updates per
  generator update (the two time-scale update rule of DMD2, Yin et al. 2024, section 4.1).
"""
from dataclasses import dataclass, replace
from typing import List, Optional

import paddle

from .. import schedules
from ..config_fields import flag
from ..losses import dmd_loss, flow_matching_loss
from ..models.lora import LoraConfig, adapter_parameters, inject_trainable_lora, use_adapters
from .denoiser import teacher_velocity

__all__ = ["DistributionMatchingConfig", "DMDOutput", "DistributionMatching", "FAKE_SCORE_ADAPTER", "FAKE_SCORES",
           "DMD_PLACEMENTS", "dmd_loss_at_level"]

FAKE_SCORE_ADAPTER = "fake_score"
FAKE_SCORES = ("auto", "student", "adapter")
DMD_PLACEMENTS = ("phase_end", "student_x0")


@dataclass
class DistributionMatchingConfig:
    use_dmd_loss: bool = flag(True, "add the distribution matching loss to the generator (flux_lightning)")
    dmd_weight: float = flag(0.01, "weight of the distribution matching loss in the generator loss (flux_lightning)")
    dmd_fake_score: str = flag("auto", "fake score: the student adapter itself (FLUX-Lightning) or a second LoRA "
                               "adapter trained with the flow-matching loss (DMD2); auto: the method's own "
                               "(student for flux_lightning, adapter for dmd2)", choices=list(FAKE_SCORES))
    dmd_fake_score_updates: int = flag(5, "fake-score updates per generator update (with --dmd_fake_score adapter)")
    dmd_fake_score_lr: Optional[float] = flag(None, "learning rate of the fake-score adapter (None: --learning_rate)")
    dmd_fake_score_rank: Optional[int] = flag(None, "LoRA rank of the fake-score adapter (None: --lora_rank); its "
                                              "scale alpha / rank stays --lora_alpha / --lora_rank")
    dmd_guidance_scale: Optional[float] = flag(None, "teacher guidance of the real score (None: --guidance_scale)")
    dmd_placement: str = flag("student_x0", "flux_lightning: where DMD acts: phase_end (the student's phase-end "
                              "prediction at its level, re-noised with the exact kernel, as the reference) or "
                              "student_x0 (x_i - sigma_i v, the student's clean estimate)", choices=list(DMD_PLACEMENTS))

    def validate(self) -> None:
        if self.dmd_fake_score not in FAKE_SCORES:
            raise ValueError(f"--dmd_fake_score must be one of {FAKE_SCORES}, got {self.dmd_fake_score!r}")
        if not self.dmd_weight >= 0:
            raise ValueError(f"--dmd_weight must be >= 0, got {self.dmd_weight}")
        if self.dmd_fake_score_updates < 1:
            raise ValueError(f"--dmd_fake_score_updates must be >= 1, got {self.dmd_fake_score_updates}")
        if self.dmd_fake_score_lr is not None and not self.dmd_fake_score_lr > 0:
            raise ValueError(f"--dmd_fake_score_lr must be positive, got {self.dmd_fake_score_lr}")
        if self.dmd_fake_score_rank is not None and not self.dmd_fake_score_rank >= 1:
            raise ValueError(f"--dmd_fake_score_rank must be a positive integer, got {self.dmd_fake_score_rank}")
        if self.dmd_placement not in DMD_PLACEMENTS:
            raise ValueError(f"--dmd_placement must be one of {DMD_PLACEMENTS}, got {self.dmd_placement!r}")
        if self.dmd_placement == "phase_end" and self.dmd_fake_score == "adapter":
            raise ValueError("--dmd_placement phase_end needs --dmd_fake_score student: the adapter fake score is "
                             "trained on clean samples (flow matching), not on phase-end samples at a level")

    def with_default_fake_score(self, fake_score: str) -> "DistributionMatchingConfig":
        """This config with ``dmd_fake_score="auto"`` resolved to the method's ``fake_score``."""
        return replace(self, dmd_fake_score=fake_score) if self.dmd_fake_score == "auto" else self

    @property
    def trains_fake_score(self) -> bool:
        if self.dmd_fake_score == "auto":
            raise ValueError("dmd_fake_score 'auto' is resolved by the method (with_default_fake_score)")
        return self.dmd_fake_score == "adapter"


def dmd_loss_at_level(x_gen, x_s, s, level, v_real, v_fake):
    """``L_dmd`` of samples ``x_gen`` at ``level`` from the two velocities at their re-noised ``x_s`` (level ``s``).

    ``x_real = x_s + (level - s) v_real``, ``x_fake = x_s + (level - s) v_fake`` (one Euler jump back to the
    sample's level; at ``level = 0`` these are the x0 predictions), ``loss = dmd_loss(x_gen, x_real, x_fake)``.

    Args:
        x_gen: ``[B, ...]`` with graph; x_s, v_real, v_fake: ``[B, ...]``; s, level: float or ``[B]``.
    Returns:
        ``(loss 0-d float32, x_real, x_fake)`` (the last two detached).
    """
    x_real = schedules.euler_step(x_s, s, level, v_real.astype("float32")).detach()
    x_fake = schedules.euler_step(x_s, s, level, v_fake.astype("float32")).detach()
    return dmd_loss(x_gen, x_real, x_fake), x_real, x_fake


def fake_score_lora(student: LoraConfig, rank: Optional[int]) -> LoraConfig:
    """The fake-score adapter's shape: the student's, with ``rank`` (if given) at the same scale alpha / rank."""
    if rank is None or rank == student.rank:
        return student
    return replace(student, rank=int(rank), alpha=student.alpha * rank / student.rank)


@dataclass
class DMDOutput:
    """One distribution matching evaluation.

    Attributes:
        loss: 0-d unweighted ``L_dmd`` (graph into ``x0_hat`` only).
        s: ``[B]`` levels used; x_s: ``[B, L, C]``; x0_real, x0_fake: ``[B, L, C]`` (no graph).
    """

    loss: paddle.Tensor
    s: paddle.Tensor
    x_s: paddle.Tensor
    x0_real: paddle.Tensor
    x0_fake: paddle.Tensor


class DistributionMatching:
    """DMD generator loss and, for ``dmd_fake_score="adapter"``, the fake score's own loss.

    Args:
        denoiser: the ``FluxDenoiser`` (not owned: the method holds it).
        config: :class:`DistributionMatchingConfig`.
        student_adapter: the student's adapter name (the fake score when ``dmd_fake_score="student"``).
        guidance_scale: the teacher's guidance (``config.dmd_guidance_scale`` overrides it for the real score).
        guidance_mode: ``"embedded"`` or ``"cfg"`` (``denoiser.resolve_guidance_mode``).
        unconditional: the empty prompt's condition (CFG teachers).
        lora_config: shape of the fake-score adapter (required for ``dmd_fake_score="adapter"``).
        fake_scores: number of fake-score adapters (``adapter`` only): DMD2's per-step fake scores, one for the
            samples of each generator step (``fake_score``, ``fake_score_1``, ...; index ``k`` in the losses).
    """

    def __init__(self, denoiser, config: DistributionMatchingConfig, student_adapter: str, guidance_scale: float,
                 guidance_mode: str, unconditional=None, lora_config: Optional[LoraConfig] = None,
                 fake_scores: int = 1):
        config.validate()
        if config.dmd_fake_score == "auto":
            raise ValueError("resolve dmd_fake_score 'auto' first (DistributionMatchingConfig.with_default_fake_score)")
        self.denoiser = denoiser
        self.config = config
        self.student_adapter = student_adapter
        self.real_guidance_scale = guidance_scale if config.dmd_guidance_scale is None else config.dmd_guidance_scale
        self.guidance_mode = guidance_mode
        self.unconditional = unconditional
        if fake_scores < 1 or (fake_scores > 1 and not config.trains_fake_score):
            raise ValueError(f"{fake_scores} fake scores: more than one needs --dmd_fake_score adapter")
        self.fake_scores = fake_scores
        if config.trains_fake_score:
            if lora_config is None:
                raise ValueError("--dmd_fake_score adapter needs a LoraConfig for the fake-score adapter")
            for index in range(fake_scores):
                inject_trainable_lora(denoiser.transformer,
                                      fake_score_lora(lora_config, config.dmd_fake_score_rank),
                                      self.fake_score_adapter(index))

    def fake_score_adapter(self, index: int = 0) -> str:
        """Adapter name of fake score ``index`` (the student's own adapter for ``--dmd_fake_score student``)."""
        if not 0 <= index < self.fake_scores:
            raise ValueError(f"fake score {index} of {self.fake_scores}")
        if not self.config.trains_fake_score:
            return self.student_adapter
        return FAKE_SCORE_ADAPTER if index == 0 else f"{FAKE_SCORE_ADAPTER}_{index}"

    def trainable_parameters(self) -> List[paddle.Tensor]:
        """The fake-score adapters' parameters (the "fake_score" group); empty for the student fake score."""
        if not self.config.trains_fake_score:
            return []
        return [p for index in range(self.fake_scores)
                for p in adapter_parameters(self.denoiser.transformer, self.fake_score_adapter(index))]

    def optimizer_overrides(self) -> dict:
        lr = self.config.dmd_fake_score_lr
        return {} if lr is None else {"learning_rate": lr}

    @staticmethod
    def draw_levels(grid: paddle.Tensor, batch_size: int) -> paddle.Tensor:
        """``[B]`` levels ``sigma_j``, ``j ~ U{1..N-1}`` (both scores are degenerate at 0 and 1; all of [0, 1]
        if N = 1)."""
        n = grid.shape[0] - 1
        low, high = (1, n - 1) if n > 1 else (0, n)
        return paddle.gather(grid, schedules.draw_grid_index(low, high, batch_size))

    @staticmethod
    def draw_levels_above(grid: paddle.Tensor, lower: paddle.Tensor) -> paddle.Tensor:
        """``[B]`` levels ``sigma_j``, ``j ~ U{lower + 1 .. N - 1}`` per sample (above a sample at grid index
        ``lower`` [B]; ``j = N - 1`` when nothing lies between)."""
        n = grid.shape[0] - 1
        low = paddle.clip(lower.astype("int64") + 1, max=max(n - 1, 0))
        return paddle.gather(grid, schedules.draw_grid_index(low, max(n - 1, 0), lower.shape[0]))

    def generator_loss(self, x_gen, cond, fake_cond, s, noise: Optional[paddle.Tensor] = None,
                       level=None, fake_index: int = 0) -> DMDOutput:
        """``L_dmd`` on the generator's samples (clean, or at ``level``; see the module docstring).

        Args:
            x_gen: ``[B, L, C]`` generated samples (with graph), clean unless ``level`` is given.
            cond: the batch's condition for the teacher (guidance added by the teacher).
            fake_cond: the condition the fake score sees (the student's, with embedded guidance if any).
            s: ``[B]`` levels (:meth:`draw_levels`, or :meth:`draw_levels_above` for a noisy sample), ``s >= level``.
            noise: ``[B, L, C]`` (drawn when None).
            level: ``[B]`` (or float) level of ``x_gen``; None: 0 (clean).
            fake_index: which fake score judges these samples.
        Returns:
            :class:`DMDOutput` whose ``x0_real`` / ``x0_fake`` are the predictions taken to ``level``.
        """
        if noise is None:
            noise = paddle.randn(x_gen.shape, dtype="float32")
        with paddle.no_grad():
            sample = x_gen.detach().astype("float32")
            if level is None:
                level = 0.0
                x_s = schedules.add_noise(sample, noise, s)
            else:
                x_s = schedules.renoise(sample, level, s, noise)
            v_real = teacher_velocity(self.denoiser, x_s, s, cond, self.real_guidance_scale, self.guidance_mode,
                                      self.unconditional)
            with use_adapters(self.denoiser.transformer, self.fake_score_adapter(fake_index)):
                v_fake = self.denoiser(x_s, s, fake_cond)
        loss, x_real, x_fake = dmd_loss_at_level(x_gen, x_s, s, level, v_real, v_fake)
        return DMDOutput(loss, s, x_s, x_real, x_fake)

    def fake_score_loss(self, x0_hat, fake_cond, s, noise: Optional[paddle.Tensor] = None,
                        fake_index: int = 0) -> paddle.Tensor:
        """Flow-matching loss of fake-score adapter ``fake_index`` on ``stopgrad(x0_hat)`` at levels ``s`` (0-d
        float32)."""
        if not self.config.trains_fake_score:
            raise RuntimeError("the student is the fake score (--dmd_fake_score student): it has no loss of its own")
        x0 = x0_hat.detach().astype("float32")
        if noise is None:
            noise = paddle.randn(x0.shape, dtype="float32")
        x_s = schedules.add_noise(x0, noise, s)
        with use_adapters(self.denoiser.transformer, self.fake_score_adapter(fake_index)):
            v_fake = self.denoiser(x_s, s, fake_cond)
        return flow_matching_loss(v_fake, x0, noise)
