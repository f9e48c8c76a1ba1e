"""Is the 4-step PCM student closer to the teacher's 50-step samples than the teacher's own 4 Euler steps?

A tiny FLUX teacher is first trained with the flow-matching loss on a synthetic latent distribution whose
flow is strongly curved: per prompt, ``x0 = base_p + alpha * r`` with ``r`` uniform in ``{-1, +1}`` for every
latent element (2^64 modes), so a few Euler steps average the modes. PCM (K = 4 phases, N = 50 grid steps,
LoRA student on the frozen teacher) is then trained with the library's trainer on samples of the same
distribution. From the same fixed noise, at the same time shift, we compare

    teacher 50 Euler steps (reference)  vs  teacher 4 Euler steps on the phase edges  vs  student 4 steps

by the mean squared distance to the reference.

    python scripts/benchmark_pcm_student.py                       # ~2 minutes on one CPU core
    python scripts/benchmark_pcm_student.py --teacher_steps 600 --pcm_steps 300 --json out.json
"""
import argparse
import json
import tempfile
import time

import numpy as np
import paddle

from ppdiffusers_fast import schedules
from ppdiffusers_fast.losses import flow_matching_loss
from ppdiffusers_fast.methods.denoiser import FluxDenoiser
from ppdiffusers_fast.methods.base import FewStepSchedule
from ppdiffusers_fast.methods.pcm import PCM
from ppdiffusers_fast.models.lora import LoraConfig
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
from ppdiffusers_fast.training.batches import (InMemoryLatentDataset, LoaderStream, flux_condition, latent_batch,
                                               latent_loader)
from ppdiffusers_fast.training.config import train_config
from ppdiffusers_fast.training.trainer import Trainer

LATENT = (4, 4, 4)  # [C, h, w]: 4 image tokens of 16 channels
TEXT_LEN, TEXT_DIM = 2, 32
STUDENT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                   "ff.net.2", "ff_context.net.2", "proj_mlp", "proj_out")


class CurvedLatents:
    """The synthetic data: 2 prompts, each a cloud of 2^64 modes ``base_p + alpha * {-1, +1}^64``."""

    def __init__(self, seed=0, alpha=1.0, num_prompts=2):
        rng = np.random.RandomState(seed)
        self.alpha, self.num_prompts = alpha, num_prompts
        self.base = 0.5 * rng.randn(num_prompts, *LATENT).astype("float32")
        self.prompt_embeds = rng.randn(num_prompts, TEXT_LEN, TEXT_DIM).astype("float32")
        self.pooled = rng.randn(num_prompts, TEXT_DIM).astype("float32")

    def sample(self, count, rng):
        prompt = rng.randint(0, self.num_prompts, count)
        signs = rng.choice([-1.0, 1.0], (count, *LATENT)).astype("float32")
        latents = self.base[prompt] + self.alpha * signs + 0.02 * rng.randn(count, *LATENT).astype("float32")
        return {"latents": latents, "prompt_embeds": self.prompt_embeds[prompt],
                "pooled_prompt_embeds": self.pooled[prompt]}


def build_teacher(seed=0):
    paddle.seed(seed)
    return FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                  guidance_embeds=True, axes_dims_rope=(4, 4, 8))


def train_teacher(denoiser, data, steps, batch_size=64, learning_rate=3e-3, guidance=3.5, seed=1):
    """Flow matching ``mse(v(x_s, s), eps - x0)`` with shifted uniform levels and a cosine learning rate."""
    rng = np.random.RandomState(seed)
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, steps)
    optimizer = paddle.optimizer.AdamW(schedule, parameters=denoiser.parameters(), weight_decay=0.0)
    mu = schedules.resolution_mu((LATENT[1] // 2) * (LATENT[2] // 2))
    denoiser.train()
    loss = None
    for _ in range(steps):
        batch = latent_batch(data.sample(batch_size, rng))
        s = schedules.time_shift(paddle.rand([batch_size]).clip(1e-3, 1 - 1e-3), mu)
        eps = paddle.randn(batch.latents.shape)
        v = denoiser(schedules.add_noise(batch.latents, eps, s), s, batch.cond.with_guidance(guidance))
        loss = flow_matching_loss(v, batch.latents, eps)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
    denoiser.eval()
    return loss.item()


def distances(method, data, num_samples=256, seed=2):
    """Mean squared distance to the teacher's 50-step samples: teacher 4 Euler steps and student 4 steps."""
    prompt = np.arange(num_samples) % data.num_prompts
    cond = flux_condition(data.prompt_embeds[prompt], data.pooled[prompt], LATENT[1], LATENT[2])
    tokens = (LATENT[1] // 2) * (LATENT[2] // 2)
    noise = paddle.to_tensor(np.random.RandomState(seed).randn(num_samples, tokens, 4 * LATENT[0]).astype("float32"))
    mu = schedules.resolution_mu(tokens)
    method.eval()
    with paddle.no_grad():
        reference = method.sample(noise, cond, adapter=None, sigmas=schedules.time_shift(np.linspace(1, 0, 51), mu))
        teacher_4 = method.sample(noise, cond, adapter=None, sigmas=method.sampling_sigmas(tokens))
        student_4 = method.sample(noise, cond)
    method.train()

    def msd(a, b):
        return float(((a - b) ** 2).mean())

    return {"teacher_4_step_msd": msd(teacher_4, reference), "student_4_step_msd": msd(student_4, reference),
            "reference_mean_square": float((reference ** 2).mean())}


def run(teacher_steps=1500, pcm_steps=1000, pcm_batch=32, pcm_lr=1e-3, dataset_size=8192, seed=0):
    started = time.perf_counter()
    data = CurvedLatents(seed)
    denoiser = FluxDenoiser(build_teacher(seed))
    teacher_loss = train_teacher(denoiser, data, teacher_steps)
    teacher_seconds = time.perf_counter() - started
    method = PCM(denoiser, LoraConfig(rank=8, alpha=8.0, target_modules=STUDENT_TARGETS),
                 FewStepSchedule(num_euler_timesteps=50, multiphase=4, guidance_scale=3.5))
    before = distances(method, data)
    dataset = InMemoryLatentDataset(data.sample(dataset_size, np.random.RandomState(seed + 7)))
    with tempfile.TemporaryDirectory() as out:
        settings = train_config(output_dir=out, max_train_steps=pcm_steps, checkpointing_steps=10**9,
                                report_to="none", seed=seed, train_batch_size=pcm_batch, learning_rate=pcm_lr,
                                adam_weight_decay=0.0, lr_scheduler="cosine", lr_warmup_steps=0,
                                max_grad_norm=1.0, mixed_precision="no", resume_from_checkpoint=None)
        trainer = Trainer(method, LoaderStream(latent_loader(dataset, pcm_batch, seed=seed)), settings)
        trainer.train()
    after = distances(method, data)
    return {"teacher_steps": teacher_steps, "teacher_flow_matching_loss": teacher_loss,
            "pcm_steps": pcm_steps, "pcm_batch": pcm_batch, "pcm_final_loss": trainer.history[-1]["loss/pcm"],
            "student_4_step_msd_before_training": before["student_4_step_msd"], **after,
            "student_over_teacher": after["student_4_step_msd"] / after["teacher_4_step_msd"],
            "teacher_seconds": teacher_seconds, "total_seconds": time.perf_counter() - started}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_steps", type=int, default=1500)
    parser.add_argument("--pcm_steps", type=int, default=1000)
    parser.add_argument("--pcm_batch", type=int, default=32)
    parser.add_argument("--pcm_lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = run(args.teacher_steps, args.pcm_steps, args.pcm_batch, args.pcm_lr, seed=args.seed)
    for key, value in result.items():
        print(f"{key:>36}: {value:.6g}" if isinstance(value, float) else f"{key:>36}: {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
