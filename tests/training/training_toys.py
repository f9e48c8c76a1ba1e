"""Small networks, methods and batch streams shared by the training tests (not a test module)."""
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn

from ppdiffusers_fast.methods.base import DistillationMethod, StepResult
from ppdiffusers_fast.methods.denoiser import FluxDenoiser
from ppdiffusers_fast.methods.base import FewStepSchedule
from ppdiffusers_fast.methods.pcm import PCM, PCMConfig
from ppdiffusers_fast.training.batches import InMemoryLatentDataset, LoaderStream, latent_loader

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/ (tiny_models), also in subprocess scripts
import tiny_models  # noqa: E402

# one single block, and no LoRA on proj_out
TINY_LORA = tiny_models.tiny_lora([t for t in tiny_models.TINY_LORA_TARGETS if t != "proj_out"])


def tiny_flux(seed=0, guidance_embeds=True):
    return tiny_models.tiny_flux(seed, guidance_embeds, num_single_layers=1)


def tiny_latent_arrays(num_samples=8, latent_hw=(4, 4), text_len=6, seed=0):
    """Random latents [N, 4, H, W] (packed to 16 channels), prompt embeddings [N, 6, 32], pooled [N, 32]."""
    rng = np.random.RandomState(seed)
    return {"latents": rng.randn(num_samples, 4, *latent_hw).astype("float32"),
            "prompt_embeds": rng.randn(num_samples, text_len, 32).astype("float32"),
            "pooled_prompt_embeds": rng.randn(num_samples, 32).astype("float32")}


def tiny_pcm(seed=0, ema_decay=None, multiphase=2, num_euler_timesteps=8, lora=TINY_LORA, **pcm_kwargs):
    """PCM on a fresh tiny FLUX (same seed -> same base and same initial adapter)."""
    transformer = tiny_flux(seed)
    denoiser = FluxDenoiser(transformer)
    schedule = FewStepSchedule(num_euler_timesteps=num_euler_timesteps, multiphase=multiphase)
    return PCM(denoiser, lora, schedule, PCMConfig(ema_decay=ema_decay, **pcm_kwargs))


def latent_stream(num_samples=8, batch_size=2, rank=0, world_size=1, seed=0):
    """The real data path: in-memory latents -> resumable distributed sampler -> loader -> LatentBatch."""
    dataset = InMemoryLatentDataset(tiny_latent_arrays(num_samples, seed=seed))
    return LoaderStream(latent_loader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed))


class TwoGroupToy(DistillationMethod):
    """A generator and a critic with their own groups; the generator's loss flows through the critic.

    Schedule: the critic updates every step, the generator every second step (0, 2, 4, ...).
    batch: ``{"x": [B, 3], "y": [B, 2]}`` numpy arrays.
    """

    def __init__(self, nan_at_step=None):
        super().__init__()
        self.generator = nn.Linear(3, 2)
        self.critic = nn.Linear(2, 1)
        self.nan_at_step = nan_at_step
        self.updates = []

    def parameter_groups(self):
        return {"generator": list(self.generator.parameters()), "critic": list(self.critic.parameters())}

    def update_schedule(self, step):
        return ["generator", "critic"] if step % 2 == 0 else ["critic"]

    def group_hyperparameters(self):
        return {"critic": {"learning_rate": 0.05, "beta1": 0.0}}

    def train_step(self, batch, step):
        x, y = paddle.to_tensor(batch["x"]), paddle.to_tensor(batch["y"])
        fake = self.generator(x)
        critic_loss = (self.critic(fake.detach()) ** 2).mean() + ((self.critic(y) - 1) ** 2).mean()
        results = [StepResult({"critic": critic_loss}, "critic")]
        if step % 2 == 0:
            gen_loss = ((self.critic(fake) - 1) ** 2).mean() + ((fake - y) ** 2).mean()
            if self.nan_at_step == step:
                gen_loss = gen_loss * float("nan")
            results.append(StepResult({"generator": gen_loss}, "generator"))
        return results

    def after_update(self, step, updated_groups):
        self.updates.append((step, tuple(updated_groups)))


def toy_arrays(num_samples=16, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(num_samples, 3).astype("float32")
    return [{"x": x[i], "y": (x[i, :2] * 0.5 + 0.2).astype("float32")} for i in range(num_samples)]


def stack_dicts(samples):
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class DictStream:
    """Batches of ``batch_size`` consecutive samples (cycling), stacked; resumable by position."""

    def __init__(self, samples, batch_size):
        self.samples, self.batch_size, self.position = samples, batch_size, 0

    def __next__(self):
        batch = [self.samples[(self.position + i) % len(self.samples)] for i in range(self.batch_size)]
        self.position += self.batch_size
        return stack_dicts(batch)

    def state_dict(self):
        return {"position": self.position}

    def set_state_dict(self, state):
        self.position = state["position"]
