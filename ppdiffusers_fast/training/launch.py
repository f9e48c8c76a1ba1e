"""From a ``TrainConfig`` to a trained LoRA: what ``examples/flux_lightning/train_flux_lightning_lora.py`` calls.

    config = config_from_args(argv)
    result = run_training(config)

Steps: start the process group (``paddle.distributed.launch``), resolve precision (bf16 on GPU, fp32 on
CPU), load the frozen teacher transformer (``--pretrained_teacher_model``: a FLUX folder with
``transformer/`` or a transformer folder), build the data stream, the method (``--method``; adapters
injected on the base), the trainer; train; export the student LoRA with its sampling metadata.

Training data (``--data_path``):
  * a latent cache folder (``cache_index.json``, written by ``data.cache.build_cache``): VAE latents and
    text embeddings, no encoders in memory (recommended for the real run);
  * a precomputed-latent ``.safetensors`` file (``training.batches.InMemoryLatentDataset``);
  * otherwise raw base64-line records listed in ``--file_list_path`` (``data.readers.Base64LineReader``:
    entries relative to the file list's folder, which must be ``--data_path``), encoded on the fly
    with the teacher folder's VAE and text encoders.
``--resolution``, ``--center_crop`` and ``--random_flip`` act on images, so only on raw records (latents keep
the size they were encoded at; the time shift follows each batch's token count).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import paddle

from ..methods.denoiser import FluxCondition, FluxDenoiser
from ..methods.registry import build_method
from ..models.lora import LoraConfig, resolve_target_modules
from ..models.weights import load_flux_transformer
from . import distributed as dist
from .batches import LoaderStream, latent_batch, latent_loader, load_latent_file
from .config import TrainConfig, config_to_dict
from .logging import Validator, latent_preview
from .optim import OptimizerSettings
from .precision import resolve_precision
from .rng import seed_everything
from .trainer import TrainResult, Trainer, TrainerSettings


@dataclass
class TrainingData:
    stream: LoaderStream  # endless LatentBatch stream with a resumable position
    batches_per_epoch: int  # this rank's batches in one epoch
    unconditional: Optional[FluxCondition]  # the empty prompt (CFG teachers), if known
    encoders: Optional[tuple] = None  # (VaeLatentEncoder or None, FluxTextEncoder, vae) when loaded


def teacher_folders(path) -> Tuple[Path, Optional[Path]]:
    """``(transformer folder, FLUX folder or None)`` of ``--pretrained_teacher_model``.

    A full FLUX folder has ``transformer/`` (and the VAE, tokenizers and text encoders beside it); a bare
    transformer folder (``config.json`` + safetensors) or file has no FLUX folder.
    """
    if path is None:
        raise ValueError("--pretrained_teacher_model is required (a FLUX folder in diffusers layout)")
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer", path
    if not path.exists() or (path.is_dir() and not (path / "config.json").is_file()):
        raise FileNotFoundError(f"--pretrained_teacher_model {path}: neither {path / 'transformer'} nor a "
                                f"transformer folder (no config.json); model-hub names are not downloaded")
    return path, None


def _has_text_encoders(folder: Optional[Path]) -> bool:
    return folder is not None and all((folder / sub / "config.json").is_file()
                                      for sub in ("text_encoder", "text_encoder_2")) and \
        (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir()


def _has_vae(folder: Optional[Path]) -> bool:
    return folder is not None and (folder / "vae" / "config.json").is_file()


def load_text_encoder(folder: Path, max_sequence_length: int, dtype: str = "float32"):
    """``data.encoders.FluxTextEncoder`` from a FLUX folder's tokenizers and text encoders."""
    from ..data.encoders import FluxTextEncoder
    from ..pipelines.flux_folder import load_text_encoders, load_tokenizers

    clip_tokenizer, t5_tokenizer = load_tokenizers(folder)
    clip_model, t5_model = load_text_encoders(folder, dtype)
    return FluxTextEncoder(clip_tokenizer, clip_model, t5_tokenizer, t5_model, max_sequence_length)


def _raw_data(config: TrainConfig, rank: int, world: int, flux_folder: Optional[Path]) -> TrainingData:
    from ..data.datasets import build_image_caption_loader
    from ..data.encoders import VaeLatentEncoder
    from ..data.readers import Base64LineReader
    from ..data.transforms import TrainTransform
    from ..pipelines.flux_folder import load_vae

    data = config.data
    if data.file_list_path is None:
        raise ValueError(f"--data_path {data.data_path} is neither a latent cache (cache_index.json) nor a "
                         f"latent .safetensors file, so raw records need --file_list_path")
    if Path(data.file_list_path).resolve().parent != Path(data.data_path).resolve():
        raise ValueError(f"raw records: --file_list_path entries are read relative to the file list's folder "
                         f"({Path(data.file_list_path).parent}), which must be --data_path ({data.data_path})")
    if not (_has_text_encoders(flux_folder) and _has_vae(flux_folder)):
        raise FileNotFoundError(f"encoding raw records needs a FLUX folder with vae/, tokenizers and text encoders "
                                f"as --pretrained_teacher_model (got {config.model.pretrained_teacher_model})")
    transform = TrainTransform(data.resolution, random_crop=not data.center_crop, random_flip=data.random_flip,
                               seed=config.run.seed or 0)
    loader = build_image_caption_loader(Base64LineReader(data.file_list_path), transform, data.train_batch_size,
                                        data.dataloader_num_workers, config.run.seed or 0, world, rank)
    vae = load_vae(flux_folder)
    image_encoder = VaeLatentEncoder(vae)
    text_encoder = load_text_encoder(flux_folder, data.max_sequence_length)

    def encode(raw):
        prompt_embeds, pooled = text_encoder(raw["captions"])
        return latent_batch({"latents": image_encoder(raw["pixel_values"]), "prompt_embeds": prompt_embeds,
                             "pooled_prompt_embeds": pooled})

    return TrainingData(LoaderStream(loader, encode), len(loader), None, (image_encoder, text_encoder, vae))


def build_training_data(config: TrainConfig, rank: int, world: int, flux_folder: Optional[Path]) -> TrainingData:
    """The training stream for ``--data_path`` (see the module docstring for the three layouts)."""
    data = config.data
    if data.data_path is None:
        raise ValueError("--data_path is required")
    path = Path(data.data_path)
    if not path.exists():
        raise FileNotFoundError(f"--data_path {path} does not exist")
    encoded = (path / "cache_index.json").is_file() or path.suffix == ".safetensors" or \
        (path / "latents.safetensors").is_file()
    if encoded and (data.center_crop or data.random_flip):
        raise ValueError("--center_crop / --random_flip act on images before encoding; --data_path holds latents "
                         "that are already encoded (apply them when building the latent cache)")
    if (path / "cache_index.json").is_file():
        from ..data.cache import CachedDataset

        dataset, unconditional = CachedDataset(str(path)), None
    elif path.suffix == ".safetensors" or (path / "latents.safetensors").is_file():
        dataset = load_latent_file(path)
        unconditional = dataset.unconditional_condition()
    else:
        return _raw_data(config, rank, world, flux_folder)
    loader = latent_loader(dataset, data.train_batch_size, rank, world, seed=config.run.seed or 0,
                           num_workers=data.dataloader_num_workers)
    return TrainingData(LoaderStream(loader), len(loader), unconditional)


def _unconditional_from_encoder(text_encoder, latent_size) -> FluxCondition:
    from .batches import flux_condition

    prompt_embeds, pooled = text_encoder([""])
    return flux_condition(prompt_embeds, pooled, *latent_size)


def build_validator(config: TrainConfig, data: TrainingData, flux_folder: Optional[Path]) -> Optional[Validator]:
    """Fixed prompts and noise for ``--validation_steps`` (latent previews when there is no VAE)."""
    if not config.run.validation_steps:
        return None
    probe = data.stream.peek()  # one batch for the latent size and, without text encoders, the prompts
    latent_h, latent_w = probe.latent_size
    count = max(1, config.run.num_validation_images)
    text_encoder = data.encoders[1] if data.encoders else None
    vae = data.encoders[2] if data.encoders else None
    if text_encoder is None and _has_text_encoders(flux_folder):
        text_encoder = load_text_encoder(flux_folder, config.data.max_sequence_length)
    if text_encoder is not None:
        prompts = [p.strip() for p in config.run.validation_prompt.split("|") if p.strip()]
        prompts = [p for p in prompts for _ in range(count)]
        from .batches import flux_condition

        cond = flux_condition(*text_encoder(prompts), latent_h, latent_w)
    else:  # latent-only data: the first batch's own prompts
        take = min(count, probe.latents.shape[0])
        cond = FluxCondition(probe.cond.prompt_embeds[:take], probe.cond.pooled[:take], probe.cond.txt_ids,
                             probe.cond.img_ids)
    generator = np.random.RandomState(config.run.seed or 0)
    noise = paddle.to_tensor(generator.randn(cond.batch_size, *probe.latents.shape[1:]).astype("float32"))
    if vae is None and _has_vae(flux_folder):
        from ..pipelines.flux_folder import load_vae

        vae = load_vae(flux_folder)
    decode = (lambda tokens: latent_preview(tokens, (latent_h, latent_w))) if vae is None else \
        _vae_decoder(vae, latent_h, latent_w)
    return Validator(cond, noise, decode, config.run.sample_batch_size)


def _vae_decoder(vae, latent_h, latent_w):
    from ..pipelines.latents import unpack_latents

    @paddle.no_grad()
    def decode(tokens):
        latents = unpack_latents(tokens.astype("float32"), latent_h, latent_w)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents.astype(vae.dtype)).sample.astype("float32")
        images = ((images.clip(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
        return [image.transpose(1, 2, 0) for image in images]

    return decode


def _reserve_gpu_memory(gib: int) -> None:
    """``--pre_alloc_memory``: let the allocator take ``gib`` GiB up front (as the reference does)."""
    if gib <= 0:
        return
    if paddle.get_device() == "cpu":
        raise ValueError("--pre_alloc_memory reserves GPU memory; it has no meaning on CPU")
    block = paddle.empty([int(gib * 1024 ** 3)], dtype="uint8")
    del block


def trainer_settings(config: TrainConfig, batches_per_epoch: int, world: int) -> TrainerSettings:
    optim, run, data = config.optim, config.run, config.data
    max_steps = optim.max_train_steps
    if max_steps is None:
        max_steps = optim.num_train_epochs * math.ceil(batches_per_epoch / optim.gradient_accumulation_steps)
    learning_rate = optim.learning_rate
    if optim.scale_lr:
        learning_rate *= optim.gradient_accumulation_steps * data.train_batch_size * world
    optimizer = OptimizerSettings(
        learning_rate=learning_rate, beta1=optim.adam_beta1, beta2=optim.adam_beta2,
        weight_decay=optim.adam_weight_decay, epsilon=optim.adam_epsilon, max_grad_norm=optim.max_grad_norm,
        lr_scheduler=optim.lr_scheduler, lr_warmup_steps=optim.lr_warmup_steps, lr_num_cycles=optim.lr_num_cycles,
        lr_power=optim.lr_power, total_steps=max_steps)
    return TrainerSettings(
        output_dir=run.output_dir, max_train_steps=max_steps,
        gradient_accumulation_steps=optim.gradient_accumulation_steps, checkpointing_steps=run.checkpointing_steps,
        checkpoints_total_limit=run.checkpoints_total_limit, resume_from_checkpoint=run.resume_from_checkpoint,
        seed=run.seed, validation_steps=run.validation_steps, logging_dir=run.logging_dir, report_to=run.report_to,
        run_name=run.tracker_project_name, mixed_precision=config.model.mixed_precision,
        fp16_opt_level=config.model.fp16_opt_level, micro_batch_size=data.train_batch_size, optimizer=optimizer,
        config=config_to_dict(config))


def run_training(config: TrainConfig) -> TrainResult:
    """Train ``config.run.method`` and export the student LoRA to ``--output_dir`` (rank 0)."""
    dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    if config.run.seed is not None:
        seed_everything(config.run.seed + rank)
    precision = resolve_precision(config.model.mixed_precision, config.model.fp16_opt_level)
    _reserve_gpu_memory(config.run.pre_alloc_memory)
    transformer_folder, flux_folder = teacher_folders(config.model.pretrained_teacher_model)
    data = build_training_data(config, rank, world, flux_folder)

    transformer = load_flux_transformer(transformer_folder, dtype=precision.weight_dtype)
    denoiser = FluxDenoiser(transformer)
    if config.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    unconditional = data.unconditional
    needs_uncond = not denoiser.has_guidance_embedding and config.model.teacher_guidance != "embedded"
    if needs_uncond and unconditional is None and _has_text_encoders(flux_folder):
        probe = data.stream.peek()
        encoder = data.encoders[1] if data.encoders else load_text_encoder(flux_folder,
                                                                          config.data.max_sequence_length)
        unconditional = _unconditional_from_encoder(encoder, probe.latent_size)
    targets = resolve_target_modules(config.model.lora_target_modules)
    lora = LoraConfig(rank=config.model.lora_rank, alpha=config.model.lora_alpha, dropout=config.model.lora_dropout,
                      target_modules=targets)
    method = build_method(config.run.method, denoiser, lora, config, config.model.teacher_guidance, unconditional)
    settings = trainer_settings(config, data.batches_per_epoch, world)
    validator = build_validator(config, data, flux_folder)
    result = Trainer(method, data.stream, settings, validator).train()
    if rank == 0:
        exported = method.export(config.run.output_dir)
        if exported:
            print(f"student LoRA written to {exported}")
    dist.barrier()
    return result
