"""Phased Consistency Distillation (PCM; Wang et al. 2024, "Phased Consistency Model"), K = 1 is LCM.

ALGORITHMS.md, "Solver grid and phases". With the solver grid ``sigma_i = shift(i / N; mu)`` and phase
edges ``e_0 = 0 < e_1 < ... < e_K = N``, one step on clean latents ``x0`` ([B, L, C] packed tokens):

1. draw a grid index ``i`` uniformly in 1..N per sample; its phase ``k`` has ``e_k < i <= e_{k+1}``;
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
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import paddle

from .. import schedules
from ..losses import consistency_loss
from ..models.lora import LoraConfig, adapter_parameters, inject_lora, use_adapters
from ..models.lora_io import save_lora
from ..schedulers.samplers import sample_euler
from .base import DistillationMethod, StepResult
from .denoiser import FluxCondition, FluxDenoiser, resolve_guidance_mode, teacher_velocity

STUDENT = "student"
EMA_TARGET = "student_ema"


def _f(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PCMConfig:
    loss_type: str = _f("huber", "consistency loss: huber (pseudo-Huber) or l2", choices=["huber", "l2"])
    huber_c: float = _f(0.001, "pseudo-Huber constant c")
    num_euler_timesteps: int = _f(100, "N, solver grid steps")
    multiphase: int = _f(4, "K, number of phases (= sampling steps); 1 is LCM")
    guidance_scale: float = _f(3.5, "teacher guidance (embedded scale for FLUX.1-dev, CFG weight otherwise)")
    num_teacher_steps: int = _f(1, "teacher Euler sub-steps per grid step sigma_i -> sigma_{i-1}")
    ema_decay: Optional[float] = _f(None, "EMA decay of the target adapter; None = stop-gradient student")
    apply_cfg_solver: bool = _f(True, "CFG teachers: guide the teacher's solver step (False: conditional only)")

    def validate(self) -> None:
        if self.loss_type not in ("huber", "l2"):
            raise ValueError(f"--loss_type must be huber or l2, got {self.loss_type!r}")
        if not self.huber_c > 0:
            raise ValueError(f"--huber_c must be positive, got {self.huber_c}")
        if not 1 <= self.multiphase <= self.num_euler_timesteps:
            raise ValueError(f"--multiphase {self.multiphase} must lie in 1..--num_euler_timesteps "
                             f"({self.num_euler_timesteps})")
        if self.num_teacher_steps < 1:
            raise ValueError(f"--num_teacher_steps must be >= 1, got {self.num_teacher_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must lie in (0, 1), got {self.ema_decay}")


@dataclass
class LatentBatch:
    """One training batch: clean packed latents and their text condition.

    Attributes:
        latents: ``[B, L, C]`` packed VAE latents (shifted and scaled), the data ``x0``.
        cond: :class:`FluxCondition` (guidance is set by the method).
        latent_size: ``(H, W)`` of the unpacked latent grid (for decoding previews).
    """

    latents: paddle.Tensor
    cond: FluxCondition
    latent_size: tuple = (0, 0)


class PCM(DistillationMethod):
    """PCM / LCM distillation of a FLUX teacher into a LoRA student on the same frozen base."""

    def __init__(self, denoiser: FluxDenoiser, config: PCMConfig, lora_config: LoraConfig,
                 teacher_guidance: str = "auto", unconditional: Optional[FluxCondition] = None):
        super().__init__()
        config.validate()
        self.denoiser = denoiser
        self.config = config
        self.guidance_mode = resolve_guidance_mode(denoiser, teacher_guidance)
        if (self.guidance_mode == "cfg" and config.apply_cfg_solver and config.guidance_scale != 1.0
                and unconditional is None):
            raise ValueError("a CFG teacher (no guidance embedding) needs the unconditional embedding "
                             "of the empty prompt")
        if self.guidance_mode == "embedded" and not config.apply_cfg_solver:
            raise ValueError("--not_apply_cfg_solver applies to CFG teachers only; an embedded-guidance "
                             "teacher always takes --guidance_scale as input")
        self.unconditional = unconditional
        self.edges = schedules.phase_edge_indices(config.num_euler_timesteps, config.multiphase)
        transformer = denoiser.transformer
        inject_lora(transformer, lora_config, STUDENT)
        for param in adapter_parameters(transformer, STUDENT):
            param.stop_gradient = False
        if config.ema_decay is not None:
            inject_lora(transformer, lora_config, EMA_TARGET)
            with paddle.no_grad():
                for ema, student in zip(self._ema_parameters(), adapter_parameters(transformer, STUDENT)):
                    ema.set_value(student)
                    ema.stop_gradient = True

    # ------------------------------------------------------------------ trainer interface
    def parameter_groups(self) -> Dict[str, List[paddle.Tensor]]:
        return {"generator": adapter_parameters(self.denoiser.transformer, STUDENT)}

    def update_schedule(self, step: int) -> List[str]:
        return ["generator"]

    def extra_checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        if self.config.ema_decay is None:
            return {}
        names = self.structured_names()
        return {names[id(p)]: p for p in self._ema_parameters()}

    def _ema_parameters(self):
        return adapter_parameters(self.denoiser.transformer, EMA_TARGET)

    @paddle.no_grad()
    def after_update(self, step, updated_groups) -> None:
        if self.config.ema_decay is None or "generator" not in updated_groups:
            return
        decay = self.config.ema_decay
        for ema, student in zip(self._ema_parameters(), adapter_parameters(self.denoiser.transformer, STUDENT)):
            ema.set_value(decay * ema + (1.0 - decay) * student.astype(ema.dtype))

    # ------------------------------------------------------------------ the PCM step
    def student_condition(self, cond: FluxCondition) -> FluxCondition:
        """The student sees the teacher's guidance scale when the base has a guidance embedding."""
        return cond.with_guidance(self.config.guidance_scale) if self.guidance_mode == "embedded" else cond

    def grid(self, num_image_tokens: int) -> paddle.Tensor:
        """Solver grid ``[N + 1]`` (ascending) at the shift of ``num_image_tokens``."""
        return schedules.solver_grid(self.config.num_euler_timesteps, schedules.resolution_mu(num_image_tokens))

    @paddle.no_grad()
    def teacher_solve(self, x, sigma_from, sigma_to, cond: FluxCondition):
        """Guided teacher Euler from ``sigma_from`` to ``sigma_to`` ([B] each) in ``num_teacher_steps`` sub-steps."""
        steps = self.config.num_teacher_steps
        scale = self.config.guidance_scale
        if self.guidance_mode == "cfg" and not self.config.apply_cfg_solver:
            scale = 1.0
        for j in range(steps):
            s = sigma_from + (sigma_to - sigma_from) * (j / steps)
            s_next = sigma_from + (sigma_to - sigma_from) * ((j + 1) / steps)
            v = teacher_velocity(self.denoiser, x, s, cond, scale, self.guidance_mode, self.unconditional)
            x = schedules.euler_step(x, s, s_next, v.astype(x.dtype))
        return x

    def consistency_pair(self, x0, noise, index, cond: FluxCondition):
        """Student prediction and stop-gradient target for given grid indices and noise.

        Args:
            x0: ``[B, L, C]`` clean latents; noise: ``[B, L, C]``; index: ``[B]`` int64 grid indices in 1..N.
        Returns:
            ``(prediction [B, L, C] with graph, target [B, L, C] detached, at_boundary [B] bool)``.
        """
        x0 = x0.astype("float32")
        grid = self.grid(x0.shape[1])
        lower, _ = schedules.phase_bounds(index, self.edges)
        sigma = paddle.gather(grid, index)
        sigma_prev = paddle.gather(grid, index - 1)
        sigma_edge = paddle.gather(grid, lower)
        x_t = schedules.add_noise(x0, noise.astype("float32"), sigma)
        student_cond = self.student_condition(cond)

        with use_adapters(self.denoiser.transformer, STUDENT):
            v_student = self.denoiser(x_t, sigma, student_cond)
        prediction = schedules.euler_step(x_t, sigma, sigma_edge, v_student.astype("float32"))

        with paddle.no_grad():
            x_prev = self.teacher_solve(x_t, sigma, sigma_prev, cond)
            target_adapter = EMA_TARGET if self.config.ema_decay is not None else STUDENT
            with use_adapters(self.denoiser.transformer, target_adapter):
                v_target = self.denoiser(x_prev, sigma_prev, student_cond)
            target = schedules.euler_step(x_prev, sigma_prev, sigma_edge, v_target.astype("float32"))
            at_boundary = index - 1 == lower
            target = paddle.where(at_boundary.reshape([-1, 1, 1]), x_prev, target)
        return prediction, target.detach(), at_boundary

    def train_step(self, batch: LatentBatch, step: int) -> StepResult:
        """Draw grid indices (uniform in 1..N) and noise, return the consistency loss of the batch."""
        bsz = batch.latents.shape[0]
        index = paddle.randint(1, self.config.num_euler_timesteps + 1, [bsz], dtype="int64")
        noise = paddle.randn(batch.latents.shape, dtype="float32")
        prediction, target, at_boundary = self.consistency_pair(batch.latents, noise, index, batch.cond)
        loss = consistency_loss(prediction, target, self.config.loss_type, self.config.huber_c)
        return StepResult(losses={"pcm": loss}, group="generator",
                          metrics={"boundary_fraction": at_boundary.astype("float32").mean().item()})

    # ------------------------------------------------------------------ sampling and export
    def sampling_sigmas(self, num_image_tokens: int) -> paddle.Tensor:
        """The K-step sampler's sigmas ``[K + 1]`` (1 -> 0) at the shift of ``num_image_tokens``."""
        mu = schedules.resolution_mu(num_image_tokens)
        return schedules.phase_sigmas(self.config.multiphase, self.config.num_euler_timesteps, mu)

    @paddle.no_grad()
    def sample(self, noise, cond: FluxCondition, adapter: Optional[str] = STUDENT, sigmas=None):
        """Few-step sample from ``noise [B, L, C]`` (student by default; ``adapter=None`` is the teacher).

        The teacher is guided as in training; ``sigmas`` defaults to the phase edges (K steps).
        """
        sigmas = self.sampling_sigmas(noise.shape[1]) if sigmas is None else sigmas
        if adapter is None:
            def velocity(x, s):
                return teacher_velocity(self.denoiser, x, s, cond, self.config.guidance_scale, self.guidance_mode,
                                        self.unconditional)
            return sample_euler(velocity, noise, sigmas)
        student_cond = self.student_condition(cond)

        def velocity(x, s):
            with use_adapters(self.denoiser.transformer, adapter):
                return self.denoiser(x, s, student_cond)
        return sample_euler(velocity, noise, sigmas)

    def sampling_metadata(self) -> dict:
        """Settings the inference entry point needs to sample with the student."""
        return {"num_inference_steps": self.config.multiphase, "multiphase": self.config.multiphase,
                "num_euler_timesteps": self.config.num_euler_timesteps,
                "guidance_scale": self.config.guidance_scale, "lora_scale": 1.0}

    def export(self, output_dir: str) -> Optional[str]:
        """Write the student LoRA with its sampling metadata to ``output_dir/pcm_lora.safetensors``."""
        path = os.path.join(output_dir, "pcm_lora.safetensors")
        save_lora(self.denoiser.transformer, STUDENT, path, sampling=self.sampling_metadata())
        return path
