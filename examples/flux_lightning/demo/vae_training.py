"""Training of the demo VAE and the statistics that give its FLUX ``shift_factor`` / ``scaling_factor``.

Loss per batch of images ``x`` (``[B, 3, R, R]`` in [-1, 1]) with posterior ``N(mu, sigma^2)`` over the latent
``[B, 16, R/f, R/f]``, ``z = mu + sigma * eps``:

    L = mean (decode(z) - x)^2 + kl_weight * mean 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2)

(the KL of the posterior to ``N(0, I)``, averaged per latent element). FLUX normalises latents as
``(z - shift_factor) * scaling_factor``; here ``shift_factor`` is the mean and ``1 / scaling_factor`` the
standard deviation of the posterior means over the training images, so the transformer sees unit-scale
latents.
"""
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle
from tqdm.auto import tqdm

__all__ = ["vae_loss", "train_vae", "encode_posterior", "latent_statistics", "cosine_lr"]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``peak / 20`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def vae_loss(vae, images: paddle.Tensor, kl_weight: float) -> Tuple[paddle.Tensor, Dict[str, float]]:
    """Reconstruction + weighted KL of one batch (formula in the module docstring)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample()
    reconstruction = vae.decode(z).sample
    mse = paddle.mean((reconstruction - images) ** 2)
    kl = 0.5 * paddle.mean(posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar)
    loss = mse + kl_weight * kl
    return loss, {"mse": mse.item(), "kl": kl.item()}


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, learning_rate: float, kl_weight: float,
              seed: int, log: Optional[Callable[[str], None]] = None, log_every: int = 50) -> List[Dict[str, float]]:
    """AdamW on random batches of ``images`` ``[N, 3, R, R]``; returns the per-step losses."""
    rng = np.random.default_rng(seed)
    optimizer = paddle.optimizer.AdamW(learning_rate=learning_rate, parameters=vae.parameters(), weight_decay=0.0)
    vae.train()
    history = []
    bar = tqdm(range(steps), desc="VAE", dynamic_ncols=True)
    for step in bar:
        optimizer.set_lr(cosine_lr(step, steps, learning_rate, warmup=min(20, steps)))
        batch = paddle.to_tensor(images[rng.integers(0, len(images), batch_size)])
        loss, parts = vae_loss(vae, batch, kl_weight)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        history.append(parts)
        bar.set_postfix(mse=f"{parts['mse']:.4f}", kl=f"{parts['kl']:.3f}", refresh=False)
        if log is not None and (step + 1) % log_every == 0:
            recent = history[-log_every:]
            log(f"vae step {step + 1}/{steps}: mse {np.mean([h['mse'] for h in recent]):.5f} "
                f"kl {np.mean([h['kl'] for h in recent]):.4f}")
    vae.eval()
    return history


def encode_posterior(vae, images: np.ndarray, batch_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """Posterior means and standard deviations ``[N, 16, R/f, R/f]`` of ``images``."""
    means, stds = [], []
    with paddle.no_grad():
        for start in range(0, len(images), batch_size):
            posterior = vae.encode(paddle.to_tensor(images[start:start + batch_size])).latent_dist
            means.append(posterior.mean.numpy())
            stds.append(posterior.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def latent_statistics(means: np.ndarray) -> Tuple[float, float]:
    """``(shift_factor, scaling_factor)`` = (mean, 1 / std) of all posterior-mean elements."""
    shift = float(np.mean(means, dtype=np.float64))
    std = float(np.std(means, dtype=np.float64))
    if not std > 0:
        raise ValueError(f"latents have standard deviation {std}; the VAE collapsed")
    return shift, 1.0 / std
