"""FLUX.1 text-to-image pipeline (rectified flow, Euler sampling), with few-step LoRA students.

Steps of :meth:`FluxPipeline.__call__` (B = prompts x images per prompt):

1. check every argument (sizes must be multiples of 16, i.e. 2 x the VAE's 8x downsampling) before any model runs;
2. text: CLIP pooled embedding ``[B, 768]`` and T5 states ``[B, L_txt, 4096]`` (``text_encoding.py``);
3. noise ``[B, 16, H/8, W/8]`` from one seed per image, packed 2x2 into ``[B, (H/16)(W/16), 64]`` tokens with ids
   ``(0, row, col)`` (``latents.py``);
4. noise levels: a distilled LoRA's phase edges at this resolution (``few_step_sigmas``), or FLUX's default
   ``linspace(1, 1/n, n)`` shifted by ``mu(image tokens)`` (``FlowMatchEulerDiscreteScheduler``);
5. Euler steps ``x <- x + (s' - s) v`` (``schedulers.samplers.sample_euler`` over the scheduler's sigmas),
   ``v = transformer(x, s, text, guidance)``; with a negative prompt and ``true_cfg_scale > 1`` also
   ``v = v_neg + w (v - v_neg)`` (``schedules.classifier_free_guidance``); a LoRA whose metadata names
   ``"sampler": "renoise"`` (a DMD2 student) instead re-noises each step's clean prediction ``x - s v`` to the next
   level with fresh noise (``sample_x0_renoise``; per image drawn from ``(seed, step + 1)``, ``seeded_step_noise``);
6. unpack, ``z / scaling_factor + shift_factor``, VAE decode (``latents.decode_latents``), ``[-1, 1] -> [0, 1]``.

The transformer call can be replaced by a compiled one (``set_transformer_runner``, see ``inference/compile.py``).
"""
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import paddle

from .. import schedules
from ..models import lora as lora_lib
from ..models import lora_io
from ..models.weights import load_flux_transformer
from ..models import flux_folder
from ..schedulers.samplers import few_step_sampler, few_step_sigmas
from ..schedulers.scheduling_flow_match_euler import FlowMatchEulerDiscreteScheduler
from .latents import (decode_latents, latent_image_ids, pack_latents, resolve_seeds, seeded_noise, seeded_step_noise,
                      text_ids)
from .text_encoding import PromptEmbeddings, encode_prompts, repeat_per_image

__all__ = ["FluxPipeline", "FluxPipelineOutput", "LoadedLora", "pair_lora_scales"]

DEFAULT_STEPS = 28  # FLUX.1-dev without a distilled LoRA
DEFAULT_GUIDANCE = 3.5
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class FluxPipelineOutput:
    """images: list of PIL images, ``[B, H, W, 3]`` float32 in [0, 1] (np) or packed latents (latent);
    seeds: the seed of each image (None when latents were given); sigmas: the noise levels used."""

    images: Union[list, np.ndarray, paddle.Tensor]
    seeds: Optional[List[int]] = None
    sigmas: List[float] = field(default_factory=list)


@dataclass
class LoadedLora:
    """A LoRA applied to the pipeline's transformer: adapter name, file, detected style, scale, sampling settings."""

    name: str
    path: Path
    style: str
    scale: float
    sampling: dict


def pair_lora_scales(paths: Sequence, scales: Optional[Sequence[float]]) -> List[Optional[float]]:
    """One scale per LoRA file from ``scales``: None (each file's default), one value for all, or one per file."""
    paths, scales = list(paths), (None if scales is None else list(scales))
    if not scales:
        return [None] * len(paths)
    if len(scales) == 1:
        return [float(scales[0])] * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"got {len(scales)} LoRA scales for {len(paths)} LoRA files: give one scale per file "
                         f"(in the order of the files) or one scale for all")
    return [float(s) for s in scales]


def _as_prompt_list(prompt, name: str) -> List[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


class FluxPipeline:
    """FLUX text-to-image. Build with :meth:`from_pretrained` (a local FLUX.1-dev-layout folder)."""

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.loras: Dict[str, LoadedLora] = {}  # in loading order; all live together
        self.lora_sampling: dict = {}  # from the one LoRA whose metadata carries sampling settings
        self.lora_fused = False
        self._runner = None
        self._progress_disabled = False

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], dtype: str = "float32") -> "FluxPipeline":
        """Load every component of a FLUX.1-dev-layout folder from its PyTorch safetensors.

        A missing sub-folder or file is reported by name before anything is loaded. The transformer and text
        encoders take ``dtype`` ("float32" or "bfloat16"); the VAE stays in float32.
        """
        cls._check_dtype(dtype)
        folder = flux_folder.check_flux_folder(folder)
        tokenizer, tokenizer_2 = flux_folder.load_tokenizers(folder)
        text_encoder, text_encoder_2 = flux_folder.load_text_encoders(folder, dtype)
        return cls(transformer=load_flux_transformer(folder / "transformer", dtype=dtype),
                   vae=flux_folder.load_vae(folder, "float32"), text_encoder=text_encoder,
                   text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                   scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux_folder.read_scheduler_config(folder)))

    @classmethod
    def from_single_files(cls, transformer: Union[str, Path], vae: Union[str, Path], clip_l: Union[str, Path],
                          t5: Union[str, Path], tokenizers: Union[str, Path], dtype: str = "float32") -> "FluxPipeline":
        """Assemble the pipeline from single files as Black Forest Labs and ComfyUI ship them.

        ``transformer``: ``flux1-dev.safetensors`` (or schnell, or a ComfyUI ``model.diffusion_model.``-prefixed
        file, fp8 included); ``vae``: ``ae.safetensors``; ``clip_l``: ``clip_l.safetensors``; ``t5``:
        ``t5xxl_fp16.safetensors``; ``tokenizers``: a folder with ``tokenizer/`` and ``tokenizer_2/`` (FLUX.1-dev's
        repository layout; its configs and scheduler are used when present). See
        ``models/flux_folder.load_single_file_components``.
        """
        cls._check_dtype(dtype)
        components = flux_folder.load_single_file_components(transformer, vae, clip_l, t5, tokenizers, dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.pop("scheduler_config"))
        return cls(scheduler=scheduler, **components)

    @staticmethod
    def _check_dtype(dtype: str) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if dtype == "bfloat16" and not paddle.get_device().startswith("gpu"):
            raise ValueError(f"dtype='bfloat16' needs a GPU (Paddle's CPU kernels of add / matmul have no bfloat16; "
                             f"current device: {paddle.get_device()}); use dtype='float32' on CPU")

    @property
    def dtype(self) -> str:
        return str(self.transformer.x_embedder.weight.dtype).replace("paddle.", "")

    def load_lora(self, path: Union[str, Path], scale: Optional[float] = None,
                  adapter_name: Optional[str] = None) -> dict:
        """Add a LoRA to the transformer (ours, diffusers / PEFT, kohya or ComfyUI format), live with the others.

        Several LoRAs (e.g. a few-step student and style LoRAs) stay live together, each at its own scale:
        ``W x + sum_a scale_a (alpha_a / r_a) A_a B_a x``. A file with sampling settings (our student files)
        makes them the defaults of ``__call__`` (steps and phase-edge sigmas at the requested resolution, guidance
        scale); two files with different settings are an error naming both. The file is read once and checked
        against the model before any weight changes.

        Args:
            scale: multiplier of this LoRA's update; default the file's ``lora_scale`` metadata, else 1.0.
            adapter_name: the adapter's name; default the file name (made an identifier), ``_2``... when taken.
        Returns:
            the file's sampling metadata (empty for files without it).
        """
        if self.lora_fused:
            raise RuntimeError("the loaded LoRAs are already fused into the transformer; load every LoRA before "
                               "calling fuse_lora()")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        lora_file = lora_io.read_lora_file(path)
        sampling, source = lora_io.combine_sampling(
            [(lora.path, lora.sampling) for lora in self.loras.values()] + [(lora_file.path, lora_file.sampling)])
        name = adapter_name or self._free_adapter_name(lora_file.path)
        if name in self.loras:
            raise ValueError(f"a LoRA named '{name}' is already loaded (from {self.loras[name].path})")
        lora_io.install_lora_file(self.transformer, lora_file, name)
        lora_scale = float(scale if scale is not None else lora_file.sampling.get("lora_scale", 1.0))
        self.loras[name] = LoadedLora(name, lora_file.path, lora_file.style, lora_scale, dict(lora_file.sampling))
        self.lora_sampling = sampling
        lora_lib.set_adapter_scale(self.transformer, name, lora_scale)
        lora_lib.set_live_adapters(self.transformer, *self.loras)
        return dict(lora_file.sampling)

    def load_loras(self, paths: Sequence[Union[str, Path]], scales: Optional[Sequence[float]] = None) -> List[dict]:
        """:meth:`load_lora` for each file; ``scales``: None, one for all, or one per file (in file order)."""
        return [self.load_lora(path, scale=scale) for path, scale in zip(paths, pair_lora_scales(paths, scales))]

    def _free_adapter_name(self, path: Path) -> str:
        base = re.sub(r"\W", "_", path.stem) or "lora"
        base = base if re.match(r"[A-Za-z_]", base) else f"lora_{base}"
        taken = set(self.loras) | set(lora_lib.adapter_names(self.transformer))
        name, index = base, 2
        while name in taken:
            name, index = f"{base}_{index}", index + 1
        return name

    def fuse_lora(self) -> None:
        """Fold every loaded LoRA (each at its scale) into the transformer weights; needed before compiling.

        Exact: each weight gets the float32 sum of the adapters' deltas, added once.
        """
        if not self.loras or self.lora_fused:
            return
        lora_lib.merge_adapters(self.transformer, {name: lora.scale for name, lora in self.loras.items()})
        self.lora_fused = True

    def set_transformer_runner(self, runner) -> None:
        """Use ``runner`` (called like the transformer, e.g. a ``CompiledTransformer``) in the sampling loop;
        None restores the dygraph transformer."""
        self._runner = runner

    @property
    def transformer_runner(self):
        """The callable used for the transformer in the sampling loop (the dygraph model unless replaced)."""
        return self._runner if self._runner is not None else self.transformer

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self._progress_disabled = bool(disable)

    # ------------------------------------------------------------------------------------------------ pieces
    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int = 512) -> PromptEmbeddings:
        """CLIP pooled ``[B, 768]`` and T5 ``[B, L_txt, 4096]`` embeddings in the transformer's dtype."""
        return encode_prompts(prompts, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                              max_sequence_length, self.dtype)

    def check_inputs(self, prompts, negative_prompts, height, width, num_images_per_prompt, num_inference_steps,
                     output_type, true_cfg_scale, latents, max_sequence_length) -> None:
        """Raise ValueError on any bad argument (called before any model runs)."""
        multiple = 2 * self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value % multiple:
                lower, upper = (value // multiple) * multiple or multiple, (value // multiple + 1) * multiple
                raise ValueError(f"{name}={value} is not a multiple of {multiple}: FLUX packs 2x2 latent pixels and "
                                 f"the VAE downsamples by {self.vae_scale_factor}; use e.g. {lower} or {upper}")
        if negative_prompts is not None and len(negative_prompts) not in (1, len(prompts)):
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        if not isinstance(num_images_per_prompt, numbers.Integral) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, numbers.Integral)
                                                or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if true_cfg_scale < 1.0:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        if not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
        if latents is not None:
            batch = len(prompts) * num_images_per_prompt
            rows, cols = height // multiple, width // multiple
            channels = self.transformer.config.in_channels
            packed, unpacked = [batch, rows * cols, channels], [batch, channels // 4, 2 * rows, 2 * cols]
            if list(latents.shape) not in (packed, unpacked):
                raise ValueError(f"latents must be {packed} (packed) or {unpacked}, got {list(latents.shape)}")

    def noise_levels(self, num_inference_steps: Optional[int], sigmas, height: int, width: int) -> int:
        """Set the scheduler's levels; returns the number of steps.

        Priority: explicit ``sigmas`` (shifted levels, descending to 0); the LoRA's phase edges when
        ``num_inference_steps`` is None or equals the LoRA's; FLUX's shifted ``linspace(1, 1/n, n)``.
        """
        sampling = self.lora_sampling
        if sigmas is not None:
            self.scheduler.set_shifted_sigmas(sigmas)
        elif sampling.get("multiphase") and num_inference_steps in (None, sampling.get("num_inference_steps")):
            self.scheduler.set_shifted_sigmas(few_step_sigmas(sampling, height, width, self.vae_scale_factor))
        else:
            steps = num_inference_steps or sampling.get("num_inference_steps") or DEFAULT_STEPS
            seq_len = (height // (2 * self.vae_scale_factor)) * (width // (2 * self.vae_scale_factor))
            self.scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps),
                                         mu=self.scheduler.mu_for(seq_len))
        self.scheduler.set_begin_index(0)
        return int(self.scheduler.num_inference_steps)

    def _velocity(self, latents, embeddings: PromptEmbeddings, timestep, guidance, img_ids, txt_ids):
        return self.transformer_runner(latents, embeddings.sequence, embeddings.pooled, timestep, img_ids, txt_ids,
                                       guidance, return_dict=False)[0]

    def decode(self, packed: paddle.Tensor, height: int, width: int) -> np.ndarray:
        """Packed latents -> images ``[B, H, W, 3]`` float32 in [0, 1]."""
        images = decode_latents(self.vae, packed, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return (images / 2 + 0.5).clip(0, 1).transpose([0, 2, 3, 1]).numpy()

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[None, str, Sequence[str]] = None,
                 true_cfg_scale: float = 1.0, height: int = 1024, width: int = 1024,
                 num_inference_steps: Optional[int] = None, sigmas=None, guidance_scale: Optional[float] = None,
                 num_images_per_prompt: int = 1, seed: Union[None, int, Sequence[int]] = None,
                 latents: Optional[paddle.Tensor] = None, max_sequence_length: int = 512,
                 output_type: str = "pil", callback=None) -> FluxPipelineOutput:
        """Generate ``len(prompts) * num_images_per_prompt`` images (prompt-major order).

        Args:
            num_inference_steps: default the LoRA's (with its phase-edge sigmas), else 28.
            sigmas: explicit noise levels (already shifted), descending, e.g. from ``few_step_sigmas``.
            guidance_scale: embedded guidance (guidance-distilled FLUX); default the LoRA's, else 3.5.
            true_cfg_scale: > 1 with a negative prompt runs classifier-free guidance (two passes per step).
            seed: int (image i gets ``seed + i``), one int per image, or None (random).
            latents: initial noise, packed ``[B, L_img, 64]`` or ``[B, 16, H/8, W/8]``; overrides ``seed``.
            callback: ``callback(step_index, sigma, latents)`` after each step.
        """
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_prompt_list(negative_prompt, "negative_prompt")
        self.check_inputs(prompts, negatives, height, width, num_images_per_prompt, num_inference_steps,
                          output_type, true_cfg_scale, latents, max_sequence_length)
        if guidance_scale is None:
            guidance_scale = float(self.lora_sampling.get("guidance_scale", DEFAULT_GUIDANCE))
        batch = len(prompts) * num_images_per_prompt
        do_true_cfg = true_cfg_scale > 1.0 and negatives is not None
        self.noise_levels(num_inference_steps, sigmas, height, width)

        embeddings = repeat_per_image(self.encode_prompt(prompts, max_sequence_length), num_images_per_prompt)
        negative = None
        if do_true_cfg:
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            negative = repeat_per_image(self.encode_prompt(negatives, max_sequence_length), num_images_per_prompt)

        latent_h, latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = self.transformer.config.in_channels // 4
        seeds = None
        if latents is None:
            seeds = resolve_seeds(seed, batch)
            latents = pack_latents(seeded_noise(seeds, [channels, latent_h, latent_w], "float32"))
        elif latents.ndim == 4:
            latents = pack_latents(latents)
        latents = latents.astype(self.dtype)
        img_ids = latent_image_ids(latent_h, latent_w)
        txt_ids = text_ids(embeddings.sequence.shape[1])
        guidance = (paddle.full([batch], guidance_scale, dtype="float32")
                    if self.transformer.config.guidance_embeds else None)

        def velocity_fn(x, sigma):
            velocity = self._velocity(x, embeddings, sigma, guidance, img_ids, txt_ids)
            if do_true_cfg:
                v_neg = self._velocity(x, negative, sigma, guidance, img_ids, txt_ids)
                velocity = schedules.classifier_free_guidance(v_neg, velocity, true_cfg_scale)
            return velocity

        step_callback = None if callback is None else (lambda info: callback(info["i"], info["sigma_next"], info["x"]))
        def step_noise(i, shape):  # fresh noise of a re-noising student, reproducible from the seeds
            if seeds is None:
                return paddle.randn(shape, dtype="float32")
            return pack_latents(seeded_step_noise(seeds, i, [channels, latent_h, latent_w]))

        sampler = few_step_sampler(self.lora_sampling, step_noise)
        with paddle.no_grad():
            latents = sampler(velocity_fn, latents, self.scheduler.sigmas, callback=step_callback,
                              progress=not self._progress_disabled)

        used_sigmas = self.scheduler.sigmas.numpy().tolist()
        if output_type == "latent":
            return FluxPipelineOutput(images=latents, seeds=seeds, sigmas=used_sigmas)
        images = self.decode(latents, height, width)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]
        return FluxPipelineOutput(images=images, seeds=seeds, sigmas=used_sigmas)
