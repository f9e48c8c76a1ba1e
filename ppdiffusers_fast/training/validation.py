"""Validation samples during training: fixed prompts, fixed noise, the method's few-step sampler.

:func:`build_validator` makes the :class:`Validator` of ``--validation_steps`` from the run's config and data:
the prompts of ``--validation_prompt`` when the teacher folder has text encoders (else the first batch's own
prompts), and a VAE decode when it has a VAE (else :func:`latent_preview`).
"""
from typing import Callable, List, Optional

import numpy as np
import paddle

from ..data.sources import TeacherEncoders, TrainingData
from ..methods.denoiser import FluxCondition
from .batches import flux_condition


def latent_preview(tokens: paddle.Tensor, latent_size) -> List[np.ndarray]:
    """A quick RGB view of packed latents without a VAE: the first 3 latent channels, min-max scaled.

    Args:
        tokens: ``[B, L, 4C]`` packed latents; latent_size: ``(H, W)`` of the latent grid.
    Returns:
        B arrays ``[H, W, 3]`` uint8.
    """
    from ..pipelines.latents import unpack_latents

    latents = unpack_latents(tokens.astype("float32"), *latent_size).numpy()
    images = []
    for latent in latents:
        rgb = np.repeat(latent[:1], 3, axis=0) if latent.shape[0] < 3 else latent[:3]
        low, high = rgb.min(), rgb.max()
        rgb = (rgb - low) / max(high - low, 1e-8)
        images.append((rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return images


class Validator:
    """Samples fixed prompts from fixed noise with the method's few-step sampler.

    Args:
        cond: the fixed prompts' ``FluxCondition`` (batch P).
        noise: ``[P, L, C]`` fixed start noise.
        decode: ``(tokens [n, L, C]) -> list of [H, W, 3] uint8`` (VAE decode, or :func:`latent_preview`).
        batch_size: samples per sampler call (``--sample_batch_size``).
    """

    def __init__(self, cond, noise: paddle.Tensor, decode: Callable[[paddle.Tensor], List[np.ndarray]],
                 batch_size: int = 4):
        self.cond, self.noise, self.decode, self.batch_size = cond, noise, decode, max(1, int(batch_size))

    def __call__(self, method) -> List[np.ndarray]:
        was_training = method.training
        method.eval()
        images: List[np.ndarray] = []
        try:
            for start in range(0, self.noise.shape[0], self.batch_size):
                end = min(start + self.batch_size, self.noise.shape[0])
                images += self.decode(method.sample(self.noise[start:end], self.cond.select(start, end)))
        finally:
            if was_training:
                method.train()
        return images


def vae_decoder(vae, latent_h: int, latent_w: int) -> Callable[[paddle.Tensor], List[np.ndarray]]:
    """``tokens [B, L, C] -> B images [H, W, 3] uint8`` through ``vae`` (undoing its scaling and shift)."""
    from ..pipelines.latents import decode_latents

    def decode(tokens):
        images = decode_latents(vae, tokens, latent_h, latent_w)
        images = ((images.clip(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
        return [image.transpose(1, 2, 0) for image in images]

    return decode


def build_validator(config, data: TrainingData, encoders: TeacherEncoders) -> Optional[Validator]:
    """Fixed prompts and noise for ``--validation_steps`` (``config``: the ``TrainConfig``); None when off."""
    if not config.run.validation_steps:
        return None
    probe = data.stream.peek()  # one batch for the latent size and, without text encoders, the prompts
    latent_h, latent_w = probe.latent_size
    count = max(1, config.run.num_validation_images)
    text_encoder = data.encoders[1] if data.encoders else None
    vae = data.encoders[2] if data.encoders else None
    if text_encoder is None and encoders.has_text_encoders():
        text_encoder = encoders.text_encoder(config.data.max_sequence_length)
    if text_encoder is not None:
        prompts = [p.strip() for p in config.run.validation_prompt.split("|") if p.strip()]
        prompts = [p for p in prompts for _ in range(count)]
        cond = flux_condition(*text_encoder(prompts), latent_h, latent_w)
    else:  # latent-only data: the first batch's own prompts
        take = min(count, probe.latents.shape[0])
        cond = FluxCondition(probe.cond.prompt_embeds[:take], probe.cond.pooled[:take], probe.cond.txt_ids,
                             probe.cond.img_ids)
    generator = np.random.RandomState(config.run.seed or 0)
    noise = paddle.to_tensor(generator.randn(cond.batch_size, *probe.latents.shape[1:]).astype("float32"))
    if vae is None and encoders.has_vae():
        vae = encoders.vae()
    decode = (lambda tokens: latent_preview(tokens, (latent_h, latent_w))) if vae is None else \
        vae_decoder(vae, latent_h, latent_w)
    return Validator(cond, noise, decode, config.run.sample_batch_size)
