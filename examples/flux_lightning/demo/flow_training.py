"""Rectified-flow training of the demo's FLUX transformer on cached VAE latents.

One step on a batch of ``B`` training images (ALGORITHMS.md, Notation; FLUX's training recipe):

    z      = mu + sigma * n,  n ~ N(0, I)                  (a posterior sample of the cached VAE encoding)
    x0     = pack((z - shift_factor) * scaling_factor)     [B, L_img, 64]
    s      = shift(sigmoid(u); mu_res),  u ~ N(0, std^2)   (logit-normal, FLUX's resolution shift)
    x_s    = (1 - s) x0 + s eps,  eps ~ N(0, I)
    L      = mean (v_theta(x_s, s, c) - (eps - x0))^2      (losses.flow_matching_loss)

The prompt ``c`` is the image's digit prompt, replaced by the empty prompt with probability
``caption_dropout`` so that the same network also gives the unconditional velocity of classifier-free
guidance. All randomness comes from one numpy generator (fixed seed). The weights kept are an exponential
moving average (EMA) of the trained ones.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle
from tqdm.auto import tqdm

from ppdiffusers_fast import schedules
from ppdiffusers_fast.losses.flow_matching import flow_matching_loss
from ppdiffusers_fast.pipelines.latents import latent_image_ids, pack_latents, text_ids
from .vae_training import cosine_lr

__all__ = ["PromptTable", "CachedLatents", "ExponentialMovingAverage", "sample_training_levels",
           "train_transformer"]


@dataclass
class PromptTable:
    """Text conditions of the fixed prompt list (``config.all_prompts()``: digits 0-9, then the empty prompt).

    sequence: ``[P, L_txt, joint_attention_dim]`` T5 states; pooled: ``[P, pooled_projection_dim]`` CLIP.
    """

    sequence: paddle.Tensor
    pooled: paddle.Tensor

    def take(self, indices: np.ndarray):
        """``(sequence [B, L_txt, D], pooled [B, Dp])`` of prompt ``indices`` ``[B]``."""
        index = paddle.to_tensor(np.asarray(indices, dtype=np.int64))
        return paddle.gather(self.sequence, index), paddle.gather(self.pooled, index)


@dataclass
class CachedLatents:
    """VAE posteriors of the training images: means and stds ``[N, C, h, w]``, labels ``[N]``, FLUX factors."""

    means: np.ndarray
    stds: np.ndarray
    labels: np.ndarray
    shift_factor: float
    scaling_factor: float

    def sample(self, indices: np.ndarray, rng: np.random.Generator) -> paddle.Tensor:
        """Normalised, packed posterior samples ``[B, (h/2)(w/2), 4C]`` of images ``indices``."""
        noise = rng.standard_normal(self.means[indices].shape).astype(np.float32)
        z = self.means[indices] + self.stds[indices] * noise
        normalised = (z - self.shift_factor) * self.scaling_factor
        return pack_latents(paddle.to_tensor(normalised.astype(np.float32)))


def sample_training_levels(batch: int, rng: np.random.Generator, mu: float, std: float = 1.0) -> np.ndarray:
    """``s = shift(sigmoid(u); mu)``, ``u ~ N(0, std^2)``: float32 ``[B]`` in (0, 1)."""
    u = rng.standard_normal(batch) * std
    t = 1.0 / (1.0 + np.exp(-u))
    return np.asarray(schedules.time_shift(t, mu), dtype=np.float32)


class ExponentialMovingAverage:
    """``ema <- d * ema + (1 - d) * theta`` after each step, with ``d = min(decay, (1 + k) / (10 + k))``."""

    def __init__(self, model: paddle.nn.Layer, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @paddle.no_grad()
    def update(self, model: paddle.nn.Layer) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].set_value(d * self.shadow[name] + (1.0 - d) * p.detach())

    @paddle.no_grad()
    def copy_to(self, model: paddle.nn.Layer) -> None:
        for name, p in model.named_parameters():
            p.set_value(self.shadow[name])


def train_transformer(model, latents: CachedLatents, prompts: PromptTable, steps: int, batch_size: int,
                      learning_rate: float, warmup_steps: int, caption_dropout: float, mu: float,
                      logit_normal_std: float, ema_decay: float, seed: int, empty_prompt_index: int = 10,
                      log: Optional[Callable[[str], None]] = None, log_every: int = 50) -> List[Dict[str, float]]:
    """Train ``model`` with the rectified-flow loss; leaves the EMA weights in ``model``; returns the losses."""
    rng = np.random.default_rng(seed)
    latent_h, latent_w = latents.means.shape[2], latents.means.shape[3]
    img_ids = latent_image_ids(latent_h, latent_w)
    txt_ids = text_ids(prompts.sequence.shape[1])
    optimizer = paddle.optimizer.AdamW(learning_rate=learning_rate, parameters=model.parameters(),
                                       weight_decay=0.0, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    ema = ExponentialMovingAverage(model, ema_decay)
    model.train()
    history: List[Dict[str, float]] = []
    bar = tqdm(range(steps), desc="transformer", dynamic_ncols=True)
    for step in bar:
        optimizer.set_lr(cosine_lr(step, steps, learning_rate, warmup_steps))
        indices = rng.integers(0, len(latents.labels), batch_size)
        x0 = latents.sample(indices, rng)
        prompt_index = np.where(rng.random(batch_size) < caption_dropout, empty_prompt_index, latents.labels[indices])
        sequence, pooled = prompts.take(prompt_index)
        s = sample_training_levels(batch_size, rng, mu, logit_normal_std)
        eps = paddle.to_tensor(rng.standard_normal(x0.shape).astype(np.float32))
        s_tensor = paddle.to_tensor(s)
        x_s = schedules.add_noise(x0, eps, s_tensor)
        velocity = model(x_s, sequence, pooled, s_tensor, img_ids, txt_ids, None, return_dict=False)[0]
        loss = flow_matching_loss(velocity, x0, eps)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        ema.update(model)
        history.append({"loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        if log is not None and (step + 1) % log_every == 0:
            log(f"transformer step {step + 1}/{steps}: flow-matching loss "
                f"{np.mean([h['loss'] for h in history[-log_every:]]):.4f}")
    ema.copy_to(model)
    model.eval()
    return history
