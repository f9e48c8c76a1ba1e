"""Phased Consistency Distillation (PCM; Wang et al. 2024, "Phased Consistency Model"), K = 1 is LCM.

ALGORITHMS.md, "Solver grid and phases". With the solver grid ``sigma_i = shift(i / N; mu)`` and phase
edges ``e_0 = 0 < e_1 < ... < e_K = N``, one step on clean latents ``x0`` ([B, L, C] packed tokens):

1. draw a grid index ``i`` uniformly in 1..N per sample (``schedules.draw_grid_index``); its phase ``k`` has
   ``e_k < i <= e_{k+1}``;
2. ``x_i = (1 - sigma_i) x0 + sigma_i eps``;
3. student (adapter "student" live): ``f_theta(x_i, sigma_i) = x_i + (sigma_{e_k} - sigma_i) v_theta(x_i, sigma_i)``
   (the Euler consistency function that jumps to the phase's lower edge);
4. teacher (no adapter live, guided): Euler from ``sigma_i`` to ``sigma_{i-1}`` in ``num_teacher_steps``
   equal sub-steps, giving ``x_{i-1}``;
5. target (stop-gradient): ``f_{theta^-}(x_{i-1}, sigma_{i-1})`` with ``theta^-`` the student itself or its
   EMA adapter ("student_ema", ``--ema_decay``); at the boundary ``i - 1 = e_k`` the target is ``x_{i-1}``;
6. loss ``consistency_loss(f_theta, target)`` (pseudo-Huber with c = 0.001, or L2).

Sampling with K steps: Euler jumps between consecutive phase edges, ``1 -> ... -> 0``, at the shift
of the sampled resolution (``schedules.phase_sigmas``). ``mu`` is derived from each batch's number of
image tokens, so training and sampling use the same shift policy at every resolution.

:meth:`PCM.consistency_pair` returns a :class:`ConsistencyPair`: besides the prediction and its target, what
they were built from (``x_i``, ``sigma_i``, the phase edges, the student velocity), so that composed methods
(FLUX-Lightning) read the student's clean sample ``x_i - sigma_i v_theta`` from the same forward pass.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import paddle

from .. import schedules
from ..config_fields import flag
from ..losses import consistency_loss
from ..models.lora import LoraConfig, adapter_parameters, inject_trainable_lora, use_adapters
from ..schedulers.samplers import sample_euler
from .base import (STUDENT, STUDENT_EMA, DistillationMethod, FewStepSchedule, LatentBatch, StepResult, StudentEMA,
                   export_student)
from .denoiser import (FluxCondition, FluxDenoiser, check_unconditional, resolve_guidance_mode, student_condition,
                       teacher_velocity)

EMA_TARGET = STUDENT_EMA
LORA_FILE = "pcm_lora.safetensors"


@dataclass
class PCMConfig:
    """PCM's own settings; the grid N, the phases K and the guidance are the shared :class:`FewStepSchedule`."""

    loss_type: str = flag("huber", "consistency loss: huber (pseudo-Huber) or l2", choices=["huber", "l2"])
    huber_c: float = flag(0.001, "pseudo-Huber constant c")
    num_teacher_steps: int = flag(1, "teacher Euler sub-steps per grid step sigma_i -> sigma_{i-1}")
    ema_decay: Optional[float] = flag(None, "EMA decay of the target adapter; None = stop-gradient student")
    apply_cfg_solver: bool = flag(True, "CFG teachers: guide the teacher's solver step (False: conditional only)")

    def validate(self) -> None:
        if self.loss_type not in ("huber", "l2"):
            raise ValueError(f"--loss_type must be huber or l2, got {self.loss_type!r}")
        if not self.huber_c > 0:
            raise ValueError(f"--huber_c must be positive, got {self.huber_c}")
        if self.num_teacher_steps < 1:
            raise ValueError(f"--num_teacher_steps must be >= 1, got {self.num_teacher_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must lie in (0, 1), got {self.ema_decay}")


@dataclass
class ConsistencyPair:
    """One PCM evaluation at grid indices ``i``: the student's phase-end prediction, its target, and their inputs.

    Attributes:
        prediction: ``[B, L, C]`` ``f_theta(x_i, sigma_i) = x_i + (sigma_{e_k} - sigma_i) v_theta`` (with graph).
        target: ``[B, L, C]`` the stop-gradient target (detached).
        at_boundary: ``[B]`` bool, ``i - 1 = e_k`` (the target is the teacher's step itself).
        index, lower, upper: ``[B]`` int64 grid index ``i`` and its phase edges ``e_k``, ``e_{k+1}``.
        grid: ``[N + 1]`` ascending solver grid of the batch's resolution.
        sigma, sigma_edge: ``[B]`` levels ``sigma_i`` and ``sigma_{e_k}``.
        x_t: ``[B, L, C]`` float32 noised input ``x_i``.
        student_velocity: ``[B, L, C]`` float32 ``v_theta(x_i, sigma_i)`` (with graph).
    """

    prediction: paddle.Tensor
    target: paddle.Tensor
    at_boundary: paddle.Tensor
    index: paddle.Tensor
    lower: paddle.Tensor
    upper: paddle.Tensor
    grid: paddle.Tensor
    sigma: paddle.Tensor
    sigma_edge: paddle.Tensor
    x_t: paddle.Tensor
    student_velocity: paddle.Tensor

    @property
    def student_x0(self) -> paddle.Tensor:
        """``[B, L, C]`` the student's clean sample ``x_i - sigma_i v_theta`` (same forward pass, with graph);
        in phase 0 (``sigma_{e_0} = 0``) it equals ``prediction``."""
        return schedules.x0_from_velocity(self.x_t, self.sigma, self.student_velocity)

    def boundary_fraction(self) -> float:
        """Fraction of the batch whose target is the teacher's step itself (one host read)."""
        return self.at_boundary.astype("float32").mean().item()


class PCM(DistillationMethod):
    """PCM / LCM distillation of a FLUX teacher into a LoRA student on the same frozen base."""

    def __init__(self, denoiser: FluxDenoiser, lora_config: LoraConfig, schedule: FewStepSchedule,
                 config: Optional[PCMConfig] = None, teacher_guidance: str = "auto",
                 unconditional: Optional[FluxCondition] = None):
        super().__init__()
        config = PCMConfig() if config is None else config
        if not isinstance(schedule, FewStepSchedule) or not isinstance(config, PCMConfig):
            raise TypeError(f"PCM takes (denoiser, LoraConfig, FewStepSchedule, PCMConfig), got a "
                            f"{type(schedule).__name__} schedule and a {type(config).__name__} config")
        schedule.validate()
        config.validate()
        self.denoiser = denoiser
        self.schedule = schedule
        self.config = config
        self.guidance_mode = resolve_guidance_mode(denoiser, teacher_guidance)
        if config.apply_cfg_solver:
            check_unconditional(self.guidance_mode, schedule.guidance_scale, unconditional)
        if self.guidance_mode == "embedded" and not config.apply_cfg_solver:
            raise ValueError("--not_apply_cfg_solver applies to CFG teachers only; an embedded-guidance "
                             "teacher always takes --guidance_scale as input")
        self.unconditional = unconditional
        self.edges = schedules.phase_edge_indices(schedule.num_euler_timesteps, schedule.multiphase)
        transformer = denoiser.transformer
        inject_trainable_lora(transformer, lora_config, STUDENT)
        self.ema = None if config.ema_decay is None else StudentEMA(transformer, lora_config, config.ema_decay)

    # ------------------------------------------------------------------ trainer interface
    def parameter_groups(self) -> Dict[str, List[paddle.Tensor]]:
        return {"generator": adapter_parameters(self.denoiser.transformer, STUDENT)}

    def update_schedule(self, step: int) -> List[str]:
        return ["generator"]

    def extra_checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        if self.config.ema_decay is None:
            return {}
        names = self.structured_names()
        return {names[id(p)]: p for p in self.ema.parameters()}

    def after_update(self, step, updated_groups) -> None:
        if self.ema is not None and "generator" in updated_groups:
            self.ema.update()

    # ------------------------------------------------------------------ the PCM step
    def student_condition(self, cond: FluxCondition) -> FluxCondition:
        """The student sees the teacher's guidance scale when the base has a guidance embedding."""
        return student_condition(cond, self.guidance_mode, self.schedule.guidance_scale)

    def grid(self, num_image_tokens: int) -> paddle.Tensor:
        """Solver grid ``[N + 1]`` (ascending) at the shift of ``num_image_tokens``."""
        return self.schedule.solver_grid(num_image_tokens)

    @paddle.no_grad()
    def teacher_solve(self, x, sigma_from, sigma_to, cond: FluxCondition):
        """Guided teacher Euler from ``sigma_from`` to ``sigma_to`` ([B] each) in ``num_teacher_steps`` equal
        sub-steps (``sample_euler`` with one level grid per sample)."""
        steps = self.config.num_teacher_steps
        scale = self.schedule.guidance_scale
        if self.guidance_mode == "cfg" and not self.config.apply_cfg_solver:
            scale = 1.0
        levels = paddle.stack([sigma_from + (sigma_to - sigma_from) * (j / steps) for j in range(steps + 1)])

        def velocity(x_s, s):
            return teacher_velocity(self.denoiser, x_s, s, cond, scale, self.guidance_mode, self.unconditional)
        return sample_euler(velocity, x, levels)  # levels [steps + 1, B]: one grid per sample

    def consistency_pair(self, x0, noise, index, cond: FluxCondition) -> ConsistencyPair:
        """Student prediction and stop-gradient target for given grid indices and noise.

        Args:
            x0: ``[B, L, C]`` clean latents; noise: ``[B, L, C]``; index: ``[B]`` int64 grid indices in 1..N.
        Returns:
            :class:`ConsistencyPair` (prediction with graph, target detached, and what they were built from).
        """
        x0 = x0.astype("float32")
        grid = self.grid(x0.shape[1])
        lower, upper = schedules.phase_bounds(index, self.edges)
        sigma = paddle.gather(grid, index)
        sigma_prev = paddle.gather(grid, index - 1)
        sigma_edge = paddle.gather(grid, lower)
        x_t = schedules.add_noise(x0, noise.astype("float32"), sigma)
        student_cond = self.student_condition(cond)

        with use_adapters(self.denoiser.transformer, STUDENT):
            v_student = self.denoiser(x_t, sigma, student_cond).astype("float32")
        prediction = schedules.euler_step(x_t, sigma, sigma_edge, v_student)

        with paddle.no_grad():
            x_prev = self.teacher_solve(x_t, sigma, sigma_prev, cond)
            target_adapter = EMA_TARGET if self.config.ema_decay is not None else STUDENT
            with use_adapters(self.denoiser.transformer, target_adapter):
                v_target = self.denoiser(x_prev, sigma_prev, student_cond)
            target = schedules.euler_step(x_prev, sigma_prev, sigma_edge, v_target.astype("float32"))
            at_boundary = index - 1 == lower
            target = paddle.where(at_boundary.reshape([-1, 1, 1]), x_prev, target)
        return ConsistencyPair(prediction, target.detach(), at_boundary, index, lower, upper, grid, sigma, sigma_edge,
                               x_t, v_student)

    def draw_consistency_pair(self, batch: LatentBatch) -> ConsistencyPair:
        """:meth:`consistency_pair` at grid indices drawn uniformly in 1..N and fresh noise."""
        index = schedules.draw_grid_index(1, self.schedule.num_euler_timesteps, batch.latents.shape[0])
        noise = paddle.randn(batch.latents.shape, dtype="float32")
        return self.consistency_pair(batch.latents, noise, index, batch.cond)

    def pair_loss(self, pair: ConsistencyPair) -> paddle.Tensor:
        """0-d ``consistency_loss(prediction, target)`` with the configured loss (pseudo-Huber or L2)."""
        return consistency_loss(pair.prediction, pair.target, self.config.loss_type, self.config.huber_c)

    def train_step(self, batch: LatentBatch, step: int) -> StepResult:
        """Draw grid indices (uniform in 1..N) and noise, return the consistency loss of the batch."""
        pair = self.draw_consistency_pair(batch)
        return StepResult(losses={"pcm": self.pair_loss(pair)}, group="generator",
                          metrics={"boundary_fraction": pair.boundary_fraction()})

    # ------------------------------------------------------------------ sampling and export
    def sampling_sigmas(self, num_image_tokens: int) -> paddle.Tensor:
        """The K-step sampler's sigmas ``[K + 1]`` (1 -> 0) at the shift of ``num_image_tokens``."""
        return self.schedule.sampling_sigmas(num_image_tokens)

    @paddle.no_grad()
    def sample(self, noise, cond: FluxCondition, adapter: Optional[str] = STUDENT, sigmas=None):
        """Few-step sample from ``noise [B, L, C]`` (student by default; ``adapter=None`` is the teacher).

        The teacher is guided as in training; ``sigmas`` defaults to the phase edges (K steps).
        """
        sigmas = self.sampling_sigmas(noise.shape[1]) if sigmas is None else sigmas
        if adapter is None:
            def velocity(x, s):
                return teacher_velocity(self.denoiser, x, s, cond, self.schedule.guidance_scale, self.guidance_mode,
                                        self.unconditional)
            return sample_euler(velocity, noise, sigmas)
        student_cond = self.student_condition(cond)

        def velocity(x, s):
            with use_adapters(self.denoiser.transformer, adapter):
                return self.denoiser(x, s, student_cond)
        return sample_euler(velocity, noise, sigmas)

    def sampling_metadata(self) -> dict:
        """Settings the inference entry point needs to sample with the student."""
        return self.schedule.sampling_metadata()

    def export(self, output_dir: str) -> Optional[str]:
        """Write the student LoRA with its sampling metadata to ``output_dir/pcm_lora.safetensors``."""
        return export_student(self.denoiser.transformer, output_dir, LORA_FILE, self.sampling_metadata())
