"""FLUX-Lightning (seed 000; ALGORITHMS.md, "FLUX-Lightning"): PCM + adversarial + DMD + reflow, composed.

One generator step on clean latents ``x0`` ([B, L, C]) with grid index ``i`` in phase ``k`` (edges
``e_k < i <= e_{k+1}``), all parts reading the same PCM pair (``pcm.ConsistencyPair``):

    x_e, target = PCM.consistency_pair(x0, eps, i)             student's phase-end prediction, its target
    L_pcm    = consistency_loss(x_e, target)
    L_G      = adversarial generator loss: real = target, fake = x_e, both re-noised from sigma_{e_k}
               to r = sigma_j, j ~ U{e_k .. e_{k+1} - 1} (exact kernel, independent noise)
    L_dmd    = DMD (fake score = the student or an adapter), placed by ``--dmd_placement``:
               phase_end:  on x_e at its level sigma_{e_k}, re-noised with the exact kernel to s > sigma_{e_k}
                           (the reference's placement; PCM's optimum is a stationary point of this term)
               student_x0: on the clean estimate x0_hat = x_i - sigma_i v_theta(x_i, sigma_i) of the same forward
                           pass (``ConsistencyPair.student_x0``); for k >= 1 PCM's optimum is not stationary
               (for phase 0 both are x_e itself)
    L_reflow = reflow of stopgrad(x_e) from r' in (sigma_{e_k}, sigma_{e_{k+1}}] back to sigma_{e_k}

    generator loss = L_pcm + adv_weight L_G + dmd_weight L_dmd + reflow_loss_weight L_reflow
    discriminator loss = L_D (heads only; the student prediction enters detached, or under no_grad on
                               steps without a generator update)

Each part is switchable (``--adv_weight 0``, ``--no_use_dmd_loss``, ``--no_apply_reflow_loss``); with all three
off this is PCM. Defaults are the reference run's weights (0.1, 0.01, 0.01). The update schedule is explicit
(:meth:`FluxLightning.update_schedule`): by default the generator and the discriminator update at every step;
``--adv_alternate`` gives the reference's alternation; a trained fake score updates every step and the generator
every ``--dmd_fake_score_updates`` steps.
"""
from typing import Dict, List, Optional

import paddle

from .. import schedules
from ..models.lora import adapter_parameters
from .adversarial import AdversarialConfig, AdversarialLearning, latent_grid_hw
from .base import STUDENT, DistillationMethod, LatentBatch, StepResult, export_student
from .distribution_matching import DistributionMatching, DistributionMatchingConfig
from .pcm import PCM
from .reflow import Reflow, ReflowConfig

__all__ = ["FluxLightning"]

LORA_FILE = "flux_lightning_lora.safetensors"


class FluxLightning(DistillationMethod):
    """PCM composed with optional adversarial, distribution matching and reflow parts.

    Args:
        pcm: the :class:`PCM` method (owns the denoiser, the student adapter, the teacher and its guidance).
        adversarial, dmd, reflow: configs of the parts (None: the part is off).
        lora_config: shape of the fake-score adapter (``--dmd_fake_score adapter``).
    """

    def __init__(self, pcm: PCM, adversarial: Optional[AdversarialConfig] = None,
                 dmd: Optional[DistributionMatchingConfig] = None, reflow: Optional[ReflowConfig] = None,
                 lora_config=None):
        super().__init__()
        for part in (adversarial, dmd, reflow):
            if part is not None:
                part.validate()  # a switched-off part's flags are still checked
        self.pcm = pcm
        denoiser = pcm.denoiser
        self.adv_config = adversarial if adversarial is not None and adversarial.enabled else None
        self.adversarial = AdversarialLearning(denoiser, self.adv_config) if self.adv_config else None
        self.dmd_config = dmd.with_default_fake_score("student") if dmd is not None and dmd.use_dmd_loss else None
        self.dmd = None
        if self.dmd_config is not None:
            self.dmd = DistributionMatching(denoiser, self.dmd_config, STUDENT, pcm.schedule.guidance_scale,
                                            pcm.guidance_mode, pcm.unconditional, lora_config)
        self.reflow_config = reflow if reflow is not None and reflow.apply_reflow_loss else None
        self.reflow = None
        if self.reflow_config is not None:
            self.reflow = Reflow(denoiser, STUDENT, pcm.config.loss_type, pcm.config.huber_c)
        self.trains_fake_score = self.dmd is not None and self.dmd_config.trains_fake_score
        interval = self.dmd_config.dmd_fake_score_updates if self.trains_fake_score else 1
        if self.adv_config is not None and self.adv_config.adv_alternate:
            interval = max(interval, 2)
        self.generator_interval = interval

    # ------------------------------------------------------------------ trainer interface
    def parameter_groups(self) -> Dict[str, List[paddle.Tensor]]:
        groups = {"generator": adapter_parameters(self.pcm.denoiser.transformer, STUDENT)}
        if self.adversarial is not None:
            groups["discriminator"] = self.adversarial.trainable_parameters()
        if self.trains_fake_score:
            groups["fake_score"] = self.dmd.trainable_parameters()
        return groups

    def update_schedule(self, step: int) -> List[str]:
        """Generator at steps ``0, n, 2n, ...`` (``n = generator_interval``); discriminator every step (or only
        between generator steps with ``--adv_alternate``); fake score every step."""
        generator_step = step % self.generator_interval == 0
        groups = ["generator"] if generator_step else []
        if self.adversarial is not None and not (self.adv_config.adv_alternate and generator_step):
            groups.append("discriminator")
        if self.trains_fake_score:
            groups.append("fake_score")
        return groups

    def group_hyperparameters(self) -> Dict[str, dict]:
        overrides = {}
        if self.adversarial is not None:
            overrides["discriminator"] = self.adversarial.optimizer_overrides()
        if self.trains_fake_score and self.dmd.optimizer_overrides():
            overrides["fake_score"] = self.dmd.optimizer_overrides()
        return overrides

    def extra_checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        names = self.structured_names()
        return {names[id(t)]: t for t in self.pcm.extra_checkpoint_tensors().values()}

    def after_update(self, step: int, updated_groups) -> None:
        self.pcm.after_update(step, updated_groups)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: LatentBatch, step: int) -> List[StepResult]:
        groups = self.update_schedule(step)
        generator = "generator" in groups
        discriminator = "discriminator" in groups
        bsz = batch.latents.shape[0]
        pcm = self.pcm
        with paddle.set_grad_enabled(generator):
            pair = pcm.draw_consistency_pair(batch)
        grid, sigma_edge = pair.grid, pair.sigma_edge
        student_cond = pcm.student_condition(batch.cond)

        results: List[StepResult] = []
        losses: Dict[str, paddle.Tensor] = {}
        metrics = {"boundary_fraction": pair.boundary_fraction()}
        if generator:
            losses["pcm"] = pcm.pair_loss(pair)

        if self.adversarial is not None:  # every step of its schedule updates the generator or the heads
            r = paddle.gather(grid, schedules.draw_grid_index(pair.lower, pair.upper - 1, bsz))
            adv = self.adversarial.losses(pair.target, pair.prediction, sigma_edge, r, student_cond,
                                          latent_grid_hw(batch), generator=generator, discriminator=discriminator)
            metrics.update(adv.metrics())
            if generator:
                losses["adv_g"] = self.adv_config.adv_weight * adv.generator
                metrics["adv_g_unweighted"] = adv.generator.item()
            if discriminator:
                results.append(StepResult({"adv_d": adv.discriminator}, "discriminator"))

        if self.dmd is not None and (generator or self.trains_fake_score):
            x0_hat = pair.student_x0
            if generator and self.dmd_config.dmd_placement == "phase_end":
                out = self.dmd.generator_loss(pair.prediction, batch.cond, student_cond,
                                              self.dmd.draw_levels_above(grid, pair.lower), level=sigma_edge)
            elif generator:
                out = self.dmd.generator_loss(x0_hat, batch.cond, student_cond, self.dmd.draw_levels(grid, bsz))
            if generator:
                losses["dmd"] = self.dmd_config.dmd_weight * out.loss
                metrics["dmd_unweighted"] = out.loss.item()
            if self.trains_fake_score:
                fake_loss = self.dmd.fake_score_loss(x0_hat, student_cond, self.dmd.draw_levels(grid, bsz))
                results.append(StepResult({"fake_score": fake_loss}, "fake_score"))

        if self.reflow is not None and generator:
            out = self.reflow.loss(pair.prediction, sigma_edge, grid, pair.lower, pair.upper, student_cond)
            losses["reflow"] = self.reflow_config.reflow_loss_weight * out.loss
            metrics["reflow_unweighted"] = out.loss.item()

        if generator:
            results.insert(0, StepResult(losses, "generator", metrics))
        elif results:
            results[0].metrics.update(metrics)
        return results

    # ------------------------------------------------------------------ sampling and export
    def sample(self, noise, cond, adapter: Optional[str] = STUDENT, sigmas=None):
        """Few-step sample with the student (K Euler jumps between phase edges); see :meth:`PCM.sample`."""
        return self.pcm.sample(noise, cond, adapter=adapter, sigmas=sigmas)

    def sampling_metadata(self) -> dict:
        return self.pcm.sampling_metadata()

    def export(self, output_dir: str) -> Optional[str]:
        """Write the student LoRA with its sampling metadata to ``output_dir/flux_lightning_lora.safetensors``."""
        return export_student(self.pcm.denoiser.transformer, output_dir, LORA_FILE, self.sampling_metadata())
