"""DMD2: distribution matching + GAN for a few-step generator (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis"; ALGORITHMS.md, "Distribution matching").

The student LoRA is a K-step generator on the phase-edge levels ``t_0 = 1 > t_1 > ... > t_K = 0`` of the
batch's resolution (``schedules.phase_sigmas``), sampled exactly as the inference entry point samples it, by one
of two rules between its steps (``--dmd2_sampler``; written into the LoRA's sampling metadata):

- ``euler``: deterministic jumps ``x_{t_{k+1}} = x_{t_k} + (t_{k+1} - t_k) v``;
- ``renoise`` (DMD2, section 4.5): the clean prediction ``x0_hat_k = x_{t_k} - t_k v`` re-noised with fresh
  noise, ``x_{t_{k+1}} = (1 - t_{k+1}) x0_hat_k + t_{k+1} eps'``. If the generator's ``x0_hat_k`` follows the
  data distribution, its next input follows the forward process's marginal at ``t_{k+1}``, the input the base
  model was trained on; with Euler jumps the next input keeps the noise implied by ``x_{t_k}``.

One step:

1. draw a generator step ``k ~ U{0..K-1}`` (one per batch) and build its input ``x_{t_k}``: by backward
   simulation (DMD2, section 4.5: the student's own k first steps from pure noise by the sampling rule, no
   graph; default) or by noising the data (``--no_dmd2_backward_simulation``);
2. the student's clean sample ``x0_hat = x_{t_k} - t_k v_theta(x_{t_k}, t_k)`` (graph on generator steps);
3. generator: ``L_dmd(x0_hat)`` with the fake-score adapter + ``dmd2_gan_weight * L_G`` on the block heads;
4. fake score ("fake_score" adapter): ``mse(v_fake(x_s, s), eps - stopgrad(x0_hat))``, every step;
5. discriminator (heads): real = data, fake = ``stopgrad(x0_hat)``, both re-noised from 0 to ``r = sigma_j``,
   ``j ~ U{0..N-1}``, hinge loss, every step.

Two time-scale rule: the fake score and the heads update every step, the generator every
``--dmd_fake_score_updates`` steps (5 in DMD2), starting at step 0. With ``--dmd2_ema_decay`` an EMA of the
generator (``student_ema``, updated after each generator update) is what ``sample`` and ``export`` use.

Settings measured on the demo (docs/demo_ablation.md, "DMD2"; K = 4, 600 steps, FID vs the teacher's 50 steps):
``--dmd2_fake_score_per_step`` with ``--dmd_fake_score_rank`` at the model's width (13.9; one shared fake score
24.2: it learns a mixture of every step's samples, and the last step, judged against the blurrier early ones, came
out worse than the step before it), 5 fake-score updates per generator update, Euler jumps (``renoise`` 59.5), the
common lr for generator and fake score (a 3x lower generator lr 33.9, a 3.3x faster fake score 24.6), no EMA (45.2).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import paddle

from .. import schedules
from ..config_fields import flag
from ..models.lora import LoraConfig, adapter_parameters, inject_trainable_lora, use_adapters
from ..schedulers.samplers import SAMPLERS, few_step_sampler
from .adversarial import AdversarialConfig, AdversarialLearning, latent_grid_hw
from .base import (STUDENT, STUDENT_EMA, DistillationMethod, FewStepSchedule, LatentBatch, StepResult, StudentEMA,
                   export_student)
from .denoiser import FluxCondition, FluxDenoiser, check_unconditional, resolve_guidance_mode, student_condition
from .distribution_matching import DistributionMatching, DistributionMatchingConfig

__all__ = ["DMD2Config", "DMD2"]

LORA_FILE = "dmd2_lora.safetensors"


@dataclass
class DMD2Config:
    dmd2_gan_weight: float = flag(5e-3, "weight of the GAN generator loss next to the DMD loss (dmd2; 0 = no GAN)")
    dmd2_backward_simulation: bool = flag(True, "build the generator's input at step k by running its own first k "
                                          "steps from noise (DMD2); off: noise the training latents")
    dmd2_sampler: str = flag("euler", "rule between the generator's steps, in training and sampling: euler "
                             "(deterministic jumps) or renoise (its x0 prediction re-noised to the next level with "
                             "fresh noise, DMD2 section 4.5)", choices=list(SAMPLERS))
    dmd2_fake_score_per_step: bool = flag(False, "one fake-score adapter per generator step k, trained on and "
                                          "judging that step's samples only (K adapters)")
    dmd2_ema_decay: Optional[float] = flag(None, "decay (per generator update) of an EMA of the generator that is "
                                           "exported and sampled instead of the generator itself; None: no EMA")

    def validate(self) -> None:
        if not self.dmd2_gan_weight >= 0:
            raise ValueError(f"--dmd2_gan_weight must be >= 0, got {self.dmd2_gan_weight}")
        if self.dmd2_ema_decay is not None and not 0.0 < self.dmd2_ema_decay < 1.0:
            raise ValueError(f"--dmd2_ema_decay must lie in (0, 1), got {self.dmd2_ema_decay}")
        if self.dmd2_sampler not in SAMPLERS:
            raise ValueError(f"--dmd2_sampler must be one of {SAMPLERS}, got {self.dmd2_sampler!r}")


def _refuse_flux_lightning_settings(adversarial: AdversarialConfig, dmd: DistributionMatchingConfig) -> None:
    """FLUX-Lightning's weights and alternation have no meaning here: refuse them rather than ignore them."""
    adv_default, dmd_default = AdversarialConfig(), DistributionMatchingConfig()
    given = [flag for flag, value, default in (
        ("--adv_weight", adversarial.adv_weight, adv_default.adv_weight),
        ("--adv_alternate", adversarial.adv_alternate, adv_default.adv_alternate),
        ("--dmd_weight", dmd.dmd_weight, dmd_default.dmd_weight)) if value != default]
    if given:
        raise ValueError(f"dmd2 does not use {', '.join(given)} (flux_lightning settings): its generator loss is "
                         f"L_dmd + --dmd2_gan_weight * L_G, and the heads update at every step")


def generator_diagnostics(x0_hat, x0, out) -> Dict[str, float]:
    """Logged scalars of one generator update: the spread of the generator's samples against the data's
    (``x0_hat_std / data_std``, per-element std over the batch), and the size of the DMD direction,
    ``mean|x0_fake - x0_real|`` (the score gap before normalisation) relative to ``mean|x0_hat - x0_real|``."""
    x0_hat = x0_hat.detach().astype("float32")
    gap = paddle.mean(paddle.abs(out.x0_fake - out.x0_real))
    scale = paddle.mean(paddle.abs(x0_hat - out.x0_real))
    return {"x0_hat_std": float(x0_hat.std()), "data_std": float(x0.std()), "x0_hat_mean": float(x0_hat.mean()),
            "dmd_gap": float(gap), "dmd_gap_relative": float(gap / (scale + 1e-8))}


class DMD2(DistillationMethod):
    """DMD2 distillation of a FLUX teacher into a K-step LoRA generator with a LoRA fake score.

    Args:
        denoiser: ``FluxDenoiser`` around the frozen base.
        lora_config: shape of the student and fake-score adapters.
        schedule: the few-step schedule every method shares (``num_euler_timesteps`` N for the level grid,
            ``multiphase`` K generator steps, ``guidance_scale`` of the teacher).
        dmd: distribution matching settings; its fake score must be the adapter.
        adversarial: heads settings (``adv_lr``, ``adv_head_channels``, ``adv_loss_type``; the weight is
            ``DMD2Config.dmd2_gan_weight``).
        teacher_guidance: ``auto|embedded|cfg``; unconditional: the empty prompt (CFG teachers).
    """

    def __init__(self, denoiser: FluxDenoiser, lora_config: LoraConfig, schedule: FewStepSchedule,
                 dmd: DistributionMatchingConfig, adversarial: AdversarialConfig, config: DMD2Config,
                 teacher_guidance: str = "auto", unconditional: Optional[FluxCondition] = None):
        super().__init__()
        for part in (schedule, config, adversarial, dmd):
            part.validate()
        _refuse_flux_lightning_settings(adversarial, dmd)
        dmd = dmd.with_default_fake_score("adapter")
        if not dmd.trains_fake_score:
            raise ValueError("dmd2 trains its own fake score: use --dmd_fake_score adapter (the student as fake "
                             "score is the FLUX-Lightning variant, --method flux_lightning)")
        if not dmd.use_dmd_loss:
            raise ValueError("dmd2 is distribution matching: --no_use_dmd_loss does not apply")
        self.denoiser = denoiser
        self.schedule = schedule
        self.config = config
        self.guidance_mode = resolve_guidance_mode(denoiser, teacher_guidance)
        check_unconditional(self.guidance_mode, schedule.guidance_scale, unconditional)
        self.unconditional = unconditional
        inject_trainable_lora(denoiser.transformer, lora_config, STUDENT)
        self.ema = None if config.dmd2_ema_decay is None else StudentEMA(denoiser.transformer, lora_config,
                                                                         config.dmd2_ema_decay)
        self.dmd_config = dmd
        self.dmd = DistributionMatching(denoiser, dmd, STUDENT, schedule.guidance_scale, self.guidance_mode,
                                        unconditional, lora_config,
                                        schedule.multiphase if config.dmd2_fake_score_per_step else 1)
        self.adversarial = None
        if config.dmd2_gan_weight > 0:
            self.adversarial = AdversarialLearning(denoiser, adversarial)

    # ------------------------------------------------------------------ trainer interface
    def parameter_groups(self) -> Dict[str, List[paddle.Tensor]]:
        groups = {"generator": adapter_parameters(self.denoiser.transformer, STUDENT),
                  "fake_score": self.dmd.trainable_parameters()}
        if self.adversarial is not None:
            groups["discriminator"] = self.adversarial.trainable_parameters()
        return groups

    def update_schedule(self, step: int) -> List[str]:
        """Fake score and heads every step; the generator at steps 0, n, 2n, ... (n = --dmd_fake_score_updates)."""
        groups = ["generator"] if step % self.dmd_config.dmd_fake_score_updates == 0 else []
        groups.append("fake_score")
        if self.adversarial is not None:
            groups.append("discriminator")
        return groups

    def extra_checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        if self.ema is None:
            return {}
        names = self.structured_names()
        return {names[id(p)]: p for p in self.ema.parameters()}

    def after_update(self, step: int, updated_groups) -> None:
        if self.ema is not None and "generator" in updated_groups:
            self.ema.update()

    @property
    def exported_adapter(self) -> str:
        """The adapter sampled and exported: the generator's EMA when kept, else the generator."""
        return STUDENT if self.ema is None else STUDENT_EMA

    def group_hyperparameters(self) -> Dict[str, dict]:
        overrides = {}
        if self.dmd.optimizer_overrides():
            overrides["fake_score"] = self.dmd.optimizer_overrides()
        if self.adversarial is not None:
            overrides["discriminator"] = self.adversarial.optimizer_overrides()
        return overrides

    # ------------------------------------------------------------------ the generator
    def student_condition(self, cond: FluxCondition) -> FluxCondition:
        """The student sees the teacher's guidance scale when the base has a guidance embedding."""
        return student_condition(cond, self.guidance_mode, self.schedule.guidance_scale)

    def generator_levels(self, num_image_tokens: int) -> paddle.Tensor:
        """``[K + 1]`` levels ``1 -> 0`` of the K-step generator at the shift of ``num_image_tokens``."""
        return self.schedule.sampling_sigmas(num_image_tokens)

    def _student_velocity(self, x, sigma, cond: FluxCondition, adapter: str = STUDENT):
        """``(v [B, L, C] float32, sigma [B])`` of the student (or ``adapter``) at level ``sigma`` (float or
        ``[B]``)."""
        level = sigma if isinstance(sigma, paddle.Tensor) else paddle.full([x.shape[0]], sigma, dtype="float32")
        with use_adapters(self.denoiser.transformer, adapter):
            return self.denoiser(x, level, cond).astype("float32"), level

    def sampler(self):
        """The generator's sampling loop (``--dmd2_sampler``), with fresh ``paddle.randn`` noise for re-noising."""
        return few_step_sampler({"sampler": self.config.dmd2_sampler},
                                lambda i, shape: paddle.randn(shape, dtype="float32"))

    def generator_input(self, x0, k: int, levels: List[float], cond: FluxCondition):
        """``x_{t_k}`` ([B, L, C], no graph): the student's k first steps from pure noise by its sampling rule,
        or the data noised to ``t_k``."""
        noise = paddle.randn(x0.shape, dtype="float32")
        if not self.config.dmd2_backward_simulation:
            return schedules.add_noise(x0, noise, levels[k])
        if k == 0:
            return noise
        with paddle.no_grad():
            return self.sampler()(lambda x, s: self._student_velocity(x, s, cond)[0], noise, levels[:k + 1])

    def train_step(self, batch: LatentBatch, step: int) -> List[StepResult]:
        groups = self.update_schedule(step)
        generator = "generator" in groups
        x0 = batch.latents.astype("float32")
        bsz, num_tokens = x0.shape[0], x0.shape[1]
        levels = [float(v) for v in self.generator_levels(num_tokens).numpy()]
        k = int(paddle.randint(0, self.schedule.multiphase, [1]).item())
        student_cond = self.student_condition(batch.cond)
        x_k = self.generator_input(x0, k, levels, student_cond)
        with paddle.set_grad_enabled(generator):
            velocity, level = self._student_velocity(x_k, levels[k], student_cond)
            x0_hat = schedules.x0_from_velocity(x_k, level, velocity)
        grid = self.schedule.solver_grid(num_tokens)
        fake_index = k if self.config.dmd2_fake_score_per_step else 0

        results: List[StepResult] = []
        losses: Dict[str, paddle.Tensor] = {}
        metrics = {"generator_step_index": float(k)}
        if generator:
            out = self.dmd.generator_loss(x0_hat, batch.cond, student_cond, self.dmd.draw_levels(grid, bsz),
                                          fake_index=fake_index)
            losses["dmd"] = out.loss
            metrics.update(generator_diagnostics(x0_hat, x0, out))
        fake_loss = self.dmd.fake_score_loss(x0_hat, student_cond, self.dmd.draw_levels(grid, bsz),
                                             fake_index=fake_index)
        results.append(StepResult({"fake_score": fake_loss}, "fake_score"))
        if self.adversarial is not None:
            r = paddle.gather(grid, schedules.draw_grid_index(0, self.schedule.num_euler_timesteps - 1, bsz))
            adv = self.adversarial.losses(x0, x0_hat, 0.0, r, student_cond, latent_grid_hw(batch),
                                          generator=generator, discriminator=True)
            metrics.update(adv.metrics())
            results.append(StepResult({"adv_d": adv.discriminator}, "discriminator"))
            if generator:
                losses["adv_g"] = self.config.dmd2_gan_weight * adv.generator
                metrics["adv_g_unweighted"] = adv.generator.item()
        if generator:
            results.insert(0, StepResult(losses, "generator", metrics))
        else:
            results[0].metrics.update(metrics)
        return results

    # ------------------------------------------------------------------ sampling and export
    @paddle.no_grad()
    def sample(self, noise, cond: FluxCondition, sigmas=None):
        """K-step student sample from ``noise [B, L, C]``, as the inference entry point samples it."""
        sigmas = self.generator_levels(noise.shape[1]) if sigmas is None else sigmas
        student_cond = self.student_condition(cond)
        return self.sampler()(lambda x, s: self._student_velocity(x, s, student_cond, self.exported_adapter)[0],
                              noise, sigmas)

    def sampling_metadata(self) -> dict:
        """Settings the inference entry point needs: the K phase edges and the rule between them (``sampler``)."""
        return {**self.schedule.sampling_metadata(), "sampler": self.config.dmd2_sampler}

    def export(self, output_dir: str) -> Optional[str]:
        """Write the student LoRA (its EMA with ``--dmd2_ema_decay``) with its sampling metadata to
        ``output_dir/dmd2_lora.safetensors``."""
        return export_student(self.denoiser.transformer, output_dir, LORA_FILE, self.sampling_metadata(),
                              self.exported_adapter)
