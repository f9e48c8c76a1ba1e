"""The demo teacher: the tiny FLUX model of the demo folder, sampled with Euler steps and true CFG.

Sampling (ALGORITHMS.md: Notation, Time shift) for ``B`` prompts at the demo resolution ``R``:

    x_1   = pack(noise [B, 16, R/f, R/f])          (one numpy PCG64 stream per seed, as FluxPipeline)
    sigmas = shift(linspace(1, 1/n, n); mu(L_img)) + [0]   (FLUX's default n-step levels)
    v     = v(x, s, "") + w * (v(x, s, prompt) - v(x, s, ""))   (schedules.classifier_free_guidance, one doubled batch)
    x_{s'} = x_s + (s' - s) v                       (schedulers.samplers.sample_euler)
    image = vae.decode(unpack(x_0) / scaling_factor + shift_factor)   in [-1, 1]   (pipelines.latents.decode_latents)

These are the steps ``FluxPipeline`` takes with ``negative_prompt=""`` and ``true_cfg_scale=w``; the folder loads
through the same loaders (``models/flux_folder.py``, ``models/weights.load_flux_transformer``).
"""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import paddle

from ppdiffusers_fast import schedules
from ppdiffusers_fast.models.weights import load_flux_transformer
from ppdiffusers_fast.models import flux_folder
from ppdiffusers_fast.pipelines.latents import decode_latents, latent_image_ids, pack_latents, seeded_noise, text_ids
from ppdiffusers_fast.pipelines.text_encoding import encode_prompts
from ppdiffusers_fast.schedulers.samplers import sample_euler
from .config import DEMO_CONFIG_NAME, DEMO_MODEL_DIR, all_prompts
from .flow_training import PromptTable

__all__ = ["euler_sigmas", "DemoTeacher", "read_demo_config"]


def euler_sigmas(num_steps: int, image_tokens: int) -> list:
    """FLUX's ``n``-step levels at ``image_tokens`` tokens: ``shift(linspace(1, 1/n, n); mu) + [0]`` (descending)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = schedules.resolution_mu(image_tokens)
    t = np.linspace(1.0, 1.0 / num_steps, num_steps)
    return [float(s) for s in schedules.time_shift(t, mu)] + [0.0]


def read_demo_config(folder: Union[str, Path] = DEMO_MODEL_DIR) -> dict:
    """The folder's ``demo_config.json`` (resolution, T5 length, guidance scale, stated metrics)."""
    path = Path(folder) / DEMO_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a demo model folder "
                                f"(run scripts/demo_train_teacher.py to build one)")
    return json.loads(path.read_text(encoding="utf-8"))


class DemoTeacher:
    """Transformer + VAE + the prompt table of the demo; samples digits by label or by prompt."""

    def __init__(self, transformer, vae, prompts: PromptTable, resolution: int, guidance_scale: float,
                 text_encoders=None, tokenizers=None, max_sequence_length: int = 8):
        self.transformer = transformer
        self.vae = vae
        self.prompts = prompts
        self.resolution = int(resolution)
        self.guidance_scale = float(guidance_scale)
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.max_sequence_length = int(max_sequence_length)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_size = self.resolution // self.vae_scale_factor
        self.image_tokens = (self.latent_size // 2) ** 2
        self.img_ids = latent_image_ids(self.latent_size, self.latent_size)
        self.txt_ids = text_ids(prompts.sequence.shape[1])

    @classmethod
    def from_folder(cls, folder: Union[str, Path] = DEMO_MODEL_DIR) -> "DemoTeacher":
        """Load the demo folder (PyTorch-layout safetensors, as FluxPipeline does) and encode the prompt table."""
        folder = flux_folder.check_flux_folder(folder)
        demo = read_demo_config(folder)
        tokenizers = flux_folder.load_tokenizers(folder)
        text_encoders = flux_folder.load_text_encoders(folder)
        prompts = encode_prompt_table(tokenizers, text_encoders, demo["max_sequence_length"])
        return cls(load_flux_transformer(folder / "transformer"), flux_folder.load_vae(folder), prompts,
                   demo["resolution"], demo["guidance_scale"], text_encoders, tokenizers, demo["max_sequence_length"])

    # ------------------------------------------------------------------------------------------ velocity
    def guided_velocity(self, x: paddle.Tensor, sigma: paddle.Tensor, prompt_index: np.ndarray,
                        guidance_scale: Optional[float] = None) -> paddle.Tensor:
        """``v_u + w (v_c - v_u)`` for packed ``x`` ``[B, L, 64]`` at levels ``sigma`` ``[B]``; ``w = 1``: conditional only."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        batch = x.shape[0]
        if w == 1.0:
            sequence, pooled = self.prompts.take(prompt_index)
            return self.transformer(x, sequence, pooled, sigma, self.img_ids, self.txt_ids, None, return_dict=False)[0]
        empty = np.full([batch], len(self.prompts.pooled) - 1)
        sequence, pooled = self.prompts.take(np.concatenate([np.asarray(prompt_index), empty]))
        both = self.transformer(paddle.concat([x, x]), sequence, pooled, paddle.concat([sigma, sigma]), self.img_ids,
                                self.txt_ids, None, return_dict=False)[0]
        v_cond, v_uncond = both[:batch], both[batch:]
        return schedules.classifier_free_guidance(v_uncond, v_cond, w)

    # ------------------------------------------------------------------------------------------ sampling
    def initial_noise(self, seeds: Sequence[int]) -> paddle.Tensor:
        """Packed start noise ``[B, L_img, 64]`` (the same draws as ``FluxPipeline(seed=...)``)."""
        channels = self.transformer.config.in_channels // 4
        return pack_latents(seeded_noise(list(seeds), [channels, self.latent_size, self.latent_size]))

    def sample_latents(self, labels: Sequence[int], seeds: Sequence[int], num_steps: int,
                       guidance_scale: Optional[float] = None, sigmas=None) -> paddle.Tensor:
        """Euler sampling from the seeds' noise: packed latents ``[B, L_img, 64]`` at level 0."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(seeds):
            raise ValueError(f"got {len(labels)} labels and {len(seeds)} seeds")
        levels = euler_sigmas(num_steps, self.image_tokens) if sigmas is None else sigmas
        with paddle.no_grad():
            return sample_euler(lambda x, s: self.guided_velocity(x, s, labels, guidance_scale),
                                self.initial_noise(seeds), levels)

    def decode(self, packed: paddle.Tensor) -> np.ndarray:
        """Packed latents -> images ``[B, 3, R, R]`` float32 in [-1, 1]."""
        return decode_latents(self.vae, packed, self.latent_size, self.latent_size).clip(-1, 1).numpy()

    def generate(self, labels: Sequence[int], seeds: Sequence[int], num_steps: int = 50,
                 guidance_scale: Optional[float] = None, batch_size: int = 50) -> np.ndarray:
        """Images ``[B, 3, R, R]`` in [-1, 1] of the digits ``labels`` (one seed each), in batches."""
        labels, seeds = list(labels), list(seeds)
        out = []
        for start in range(0, len(labels), batch_size):
            packed = self.sample_latents(labels[start:start + batch_size], seeds[start:start + batch_size],
                                         num_steps, guidance_scale)
            out.append(self.decode(packed))
        return np.concatenate(out)


def encode_prompt_table(tokenizers, text_encoders, max_sequence_length: int) -> PromptTable:
    """Embeddings of ``all_prompts()`` (10 digits, then the empty prompt) with FluxPipeline's text encoding."""
    embeddings = encode_prompts(list(all_prompts()), tokenizers[0], text_encoders[0], tokenizers[1], text_encoders[1],
                                max_sequence_length)
    return PromptTable(sequence=embeddings.sequence, pooled=embeddings.pooled)
