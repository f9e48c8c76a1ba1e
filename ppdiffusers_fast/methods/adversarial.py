"""Adversarial learning on the frozen teacher's block features (ALGORITHMS.md, "Adversarial loss").

The discriminator is the frozen FLUX base (no LoRA adapter live; its parameters never take a gradient) as a
feature extractor, plus one trainable head per transformer block (``models.discriminator``):

    D(x_r, r) = heads(blocks(x_r, r, cond))         one [B, 1, h, w] logit map per block (57 for FLUX.1)

Both sides of the game are moved to the same level ``r`` with the exact forward kernel (independent noise):

    real_r = renoise(real, level, r, eps_1)          real: e.g. the consistency target (FLUX-Lightning) or data
    fake_r = renoise(fake, level, r, eps_2)          fake: the generator's sample, with graph for the generator
    L_D = hinge_d_loss(D(real_r), D(stopgrad(fake_r)))
    L_G = hinge_g_loss(D(fake_r))  (the reference's)  or  nonsaturating_g_loss(D(fake_r)) = -mean D(fake_r)

The fake sample goes through the backbone once: the generator loss uses the features with their graph, the
discriminator loss the same features detached, so the discriminator loss has no graph into the student and the
heads are the only parameters it reaches. The real sample is encoded under ``no_grad``.

The heads are their own parameter group ("discriminator") with their own AdamW (``--adv_lr`` 1e-5,
betas (0, 0.999), gradient clipping 1.0), given to the trainer by ``optimizer_overrides``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from .. import schedules
from ..config_fields import flag
from ..losses import hinge_d_loss, hinge_g_loss, nonsaturating_g_loss
from ..models.discriminator import FluxDiscriminatorHeads
from ..models.lora import freeze_base, use_adapters

__all__ = ["AdversarialConfig", "AdversarialOutput", "AdversarialLearning", "latent_grid_hw", "GENERATOR_LOSSES"]

GENERATOR_LOSSES = {"hinge": hinge_g_loss, "non_saturating": nonsaturating_g_loss}


@dataclass
class AdversarialConfig:
    adv_weight: float = flag(0.1, "weight of the generator's adversarial loss (0 turns adversarial learning off)")
    adv_lr: float = flag(1e-5, "learning rate of the discriminator heads (their own AdamW)")
    adv_beta1: float = flag(0.0, "AdamW beta1 of the discriminator heads")
    adv_beta2: float = flag(0.999, "AdamW beta2 of the discriminator heads")
    adv_max_grad_norm: float = flag(1.0, "gradient clipping of the discriminator heads (0 = off)")
    adv_loss_type: str = flag("hinge", "generator loss: hinge mean relu(1 - D(fake)) (the reference's) or "
                              "non_saturating -mean D(fake)", choices=sorted(GENERATOR_LOSSES))
    adv_head_channels: int = flag(256, "hidden channels of each discriminator head")
    adv_alternate: bool = flag(True, "alternate like the reference: the generator updates at even steps, the "
                               "discriminator at odd steps (28,652 steps = 14,326 updates of each); "
                               "--no_adv_alternate updates both at every step")

    def validate(self) -> None:
        if not self.adv_weight >= 0:
            raise ValueError(f"--adv_weight must be >= 0, got {self.adv_weight}")
        if not self.adv_lr > 0:
            raise ValueError(f"--adv_lr must be positive, got {self.adv_lr}")
        if self.adv_loss_type not in GENERATOR_LOSSES:
            raise ValueError(f"--adv_loss_type must be one of {sorted(GENERATOR_LOSSES)}, got {self.adv_loss_type!r}")
        if self.adv_head_channels < 1:
            raise ValueError(f"--adv_head_channels must be >= 1, got {self.adv_head_channels}")

    @property
    def enabled(self) -> bool:
        return self.adv_weight > 0


def latent_grid_hw(batch) -> Tuple[int, int]:
    """``(h, w)`` of the packed token grid of a ``LatentBatch`` (``h = H / 2``, ``w = W / 2``; not assumed square).

    Read from ``batch.latent_size`` when set, else from the image rotary ids ``(0, i, j)`` of the condition.
    """
    num_tokens = batch.latents.shape[1]
    height, width = batch.latent_size if batch.latent_size else (0, 0)
    if height and width:
        grid = (int(height) // 2, int(width) // 2)
    else:
        ids = batch.cond.img_ids
        ids = ids[0] if ids.ndim == 3 else ids
        grid = (int(paddle.max(ids[:, 1]).item()) + 1, int(paddle.max(ids[:, 2]).item()) + 1)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"the batch has {num_tokens} image tokens but its latent grid is {grid[0]}x{grid[1]}")
    return grid


@dataclass
class AdversarialOutput:
    """Losses of one adversarial evaluation (None when that side was not asked for).

    Attributes:
        generator: 0-d L_G (unweighted), with graph into the fake sample.
        discriminator: 0-d L_D, with graph into the heads only.
        fake_logits: per-head ``[B, 1, h, w]`` logits of the fake side (as the generator loss saw them, or
            detached as the discriminator saw them when only the discriminator was asked for).
        real_logits: per-head logits of the real side (discriminator only).
    """

    generator: Optional[paddle.Tensor]
    discriminator: Optional[paddle.Tensor]
    fake_logits: List[paddle.Tensor]
    real_logits: Optional[List[paddle.Tensor]] = None

    def metrics(self) -> Dict[str, float]:
        """Mean logit of each side (a discriminator that wins pushes real up and fake down)."""
        values = {"adv_fake_logit": _mean_logit(self.fake_logits)}
        if self.real_logits is not None:
            values["adv_real_logit"] = _mean_logit(self.real_logits)
        return values


def _mean_logit(logits: Sequence[paddle.Tensor]) -> float:
    """Mean over heads of each head's mean logit (one host read)."""
    with paddle.no_grad():
        return paddle.stack([paddle.mean(l.astype("float32")) for l in logits]).mean().item()


class AdversarialLearning(nn.Layer):
    """Discriminator heads on a frozen FLUX backbone, and the two hinge losses.

    Args:
        denoiser: ``FluxDenoiser`` whose base is the backbone (not a sub-layer here: the method owns it).
        config: :class:`AdversarialConfig`.
    """

    def __init__(self, denoiser, config: AdversarialConfig):
        super().__init__()
        config.validate()
        self.config = config
        self._denoiser = (denoiser,)  # a tuple keeps the shared base out of this layer's parameters
        freeze_base(denoiser.transformer)
        self.heads = FluxDiscriminatorHeads.for_transformer(denoiser.transformer, config.adv_head_channels)
        self.generator_loss_fn = GENERATOR_LOSSES[config.adv_loss_type]

    @property
    def denoiser(self):
        return self._denoiser[0]

    def trainable_parameters(self) -> List[paddle.Tensor]:
        """The heads' parameters: the "discriminator" group."""
        return list(self.heads.parameters())

    def optimizer_overrides(self) -> dict:
        """Settings of the heads' own AdamW (keys of ``training.optim.OptimizerSettings``)."""
        c = self.config
        return {"learning_rate": c.adv_lr, "beta1": c.adv_beta1, "beta2": c.adv_beta2,
                "max_grad_norm": c.adv_max_grad_norm}

    # ------------------------------------------------------------------ the discriminator
    def backbone_features(self, x_r, r, cond) -> List[paddle.Tensor]:
        """Block features of the frozen base (no adapter live): one ``[B, h*w, inner_dim]`` map per block."""
        with use_adapters(self.denoiser.transformer):
            _, features = self.denoiser(x_r, r, cond, return_block_features=True)
        return features

    def logits(self, x_r, r, cond, grid_hw) -> List[paddle.Tensor]:
        """``D(x_r, r)``: per-head ``[B, 1, h, w]`` logits of samples ``x_r [B, h*w, C]`` at levels ``r [B]``."""
        return self.heads(self.backbone_features(x_r, r, cond), grid_hw)

    def losses(self, real, fake, level, r, cond, grid_hw, *, generator: bool = True, discriminator: bool = True,
               real_noise: Optional[paddle.Tensor] = None,
               fake_noise: Optional[paddle.Tensor] = None) -> AdversarialOutput:
        """The generator and/or discriminator loss for one batch.

        Args:
            real: ``[B, L, C]`` real samples at ``level`` (detached here).
            fake: ``[B, L, C]`` the generator's samples at ``level`` (with graph when ``generator``).
            level: float or ``[B]``, the noise level of ``real`` and ``fake`` (0 for clean samples).
            r: ``[B]`` levels ``>= level`` both sides are re-noised to (exact kernel, independent noise).
            cond: ``FluxCondition`` for the backbone (the guidance the student sees).
            grid_hw: ``(h, w)`` packed latent grid, ``h * w = L``.
            generator, discriminator: which losses to compute.
            real_noise, fake_noise: ``[B, L, C]`` the re-noising noise (drawn when None).
        """
        if not (generator or discriminator):
            raise ValueError("ask for the generator loss, the discriminator loss or both")
        if fake_noise is None:
            fake_noise = paddle.randn(fake.shape, dtype="float32")
        fake_in = fake.astype("float32") if generator else fake.detach().astype("float32")
        fake_r = schedules.renoise(fake_in, level, r, fake_noise)
        if generator:
            fake_features = self.backbone_features(fake_r, r, cond)
        else:
            with paddle.no_grad():
                fake_features = self.backbone_features(fake_r, r, cond)

        generator_loss = discriminator_loss = real_logits = None
        fake_logits = None
        if generator:
            fake_logits = self.heads(fake_features, grid_hw)
            generator_loss = self.generator_loss_fn(fake_logits)
        if discriminator:
            if real_noise is None:
                real_noise = paddle.randn(real.shape, dtype="float32")
            with paddle.no_grad():
                real_r = schedules.renoise(real.detach().astype("float32"), level, r, real_noise)
                real_features = self.backbone_features(real_r, r, cond)
            real_logits = self.heads(real_features, grid_hw)
            detached_fake_logits = self.heads([f.detach() for f in fake_features], grid_hw)
            discriminator_loss = hinge_d_loss(real_logits, detached_fake_logits)
            if fake_logits is None:
                fake_logits = detached_fake_logits
        return AdversarialOutput(generator_loss, discriminator_loss, fake_logits, real_logits)
