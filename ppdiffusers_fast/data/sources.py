"""Which training data ``--data_path`` holds, and the endless batch stream built from it.

Layouts, detected in this order (:func:`detect_layout`):
  * ``cache``: a latent cache folder (``cache_index.json``, written by ``data.cache.build_cache``): VAE latents
    and text embeddings, no encoders in memory (recommended for the real run);
  * ``latent_file``: a precomputed-latent ``.safetensors`` file, or a folder with ``latents.safetensors``
    (``training.batches.InMemoryLatentDataset``);
  * ``raw``: base64-line records listed in ``--file_list_path`` (``data.readers.Base64LineReader``: entries
    relative to the file list's folder, which must be ``--data_path``), encoded on the fly with the teacher
    folder's VAE and text encoders.
``--resolution``, ``--center_crop`` and ``--random_flip`` act on images, so only on raw records (latents keep
the size they were encoded at; the time shift follows each batch's token count).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ..methods.denoiser import FluxCondition
from ..training.batches import LoaderStream, flux_condition, latent_batch, latent_loader, load_latent_file

LAYOUTS = ("cache", "latent_file", "raw")


@dataclass
class TrainingData:
    stream: LoaderStream  # endless LatentBatch stream with a resumable position
    batches_per_epoch: int  # this rank's batches in one epoch
    unconditional: Optional[FluxCondition]  # the empty prompt (CFG teachers), if known
    encoders: Optional[tuple] = None  # (VaeLatentEncoder, FluxTextEncoder, vae) when raw records are encoded


def teacher_folders(path) -> Tuple[Path, Optional[Path]]:
    """``(transformer folder, FLUX folder or None)`` of ``--pretrained_teacher_model``.

    A full FLUX folder has ``transformer/`` (and the VAE, tokenizers and text encoders beside it); a bare
    transformer folder (``config.json`` + safetensors) has no FLUX folder.
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


def has_text_encoders(folder: Optional[Path]) -> bool:
    """True when the FLUX ``folder`` has both tokenizers and both text encoders."""
    return folder is not None and all((folder / sub / "config.json").is_file()
                                      for sub in ("text_encoder", "text_encoder_2")) and \
        (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir()


def has_vae(folder: Optional[Path]) -> bool:
    return folder is not None and (folder / "vae" / "config.json").is_file()


def load_text_encoder(folder: Path, max_sequence_length: int, dtype: str = "float32"):
    """``data.encoders.FluxTextEncoder`` from a FLUX folder's tokenizers and text encoders."""
    from ..pipelines.flux_folder import load_text_encoders, load_tokenizers
    from .encoders import FluxTextEncoder

    clip_tokenizer, t5_tokenizer = load_tokenizers(folder)
    clip_model, t5_model = load_text_encoders(folder, dtype)
    return FluxTextEncoder(clip_tokenizer, clip_model, t5_tokenizer, t5_model, max_sequence_length)


def unconditional_condition(text_encoder, latent_size) -> FluxCondition:
    """The empty prompt's condition (batch 1) for a ``(H, W)`` latent grid (CFG teachers)."""
    prompt_embeds, pooled = text_encoder([""])
    return flux_condition(prompt_embeds, pooled, *latent_size)


def detect_layout(data) -> str:
    """One of :data:`LAYOUTS` for ``data.data_path`` (``data``: the ``DataConfig`` section); checks the flags
    that only one layout reads. Reads no data."""
    if data.data_path is None:
        raise ValueError("--data_path is required")
    path = Path(data.data_path)
    if not path.exists():
        raise FileNotFoundError(f"--data_path {path} does not exist")
    if (path / "cache_index.json").is_file():
        layout = "cache"
    elif path.suffix == ".safetensors" or (path / "latents.safetensors").is_file():
        layout = "latent_file"
    else:
        layout = "raw"
    if layout != "raw" and (data.center_crop or data.random_flip):
        raise ValueError("--center_crop / --random_flip act on images before encoding; --data_path holds latents "
                         "that are already encoded (apply them when building the latent cache)")
    if layout == "raw":
        if data.file_list_path is None:
            raise ValueError(f"--data_path {data.data_path} is neither a latent cache (cache_index.json) nor a "
                             f"latent .safetensors file, so raw records need --file_list_path")
        if Path(data.file_list_path).resolve().parent != path.resolve():
            raise ValueError(f"raw records: --file_list_path entries are read relative to the file list's folder "
                             f"({Path(data.file_list_path).parent}), which must be --data_path ({data.data_path})")
    return layout


def _raw_data(data, seed: int, rank: int, world: int, flux_folder: Optional[Path]) -> TrainingData:
    from ..pipelines.flux_folder import load_vae
    from .datasets import build_image_caption_loader
    from .encoders import VaeLatentEncoder
    from .readers import Base64LineReader
    from .transforms import TrainTransform

    if not (has_text_encoders(flux_folder) and has_vae(flux_folder)):
        raise FileNotFoundError(f"encoding raw records needs a FLUX folder with vae/, tokenizers and text encoders "
                                f"as --pretrained_teacher_model (got {flux_folder})")
    transform = TrainTransform(data.resolution, random_crop=not data.center_crop, random_flip=data.random_flip,
                               seed=seed)
    loader = build_image_caption_loader(Base64LineReader(data.file_list_path), transform, data.train_batch_size,
                                        data.dataloader_num_workers, seed, world, rank)
    vae = load_vae(flux_folder)
    image_encoder = VaeLatentEncoder(vae)
    text_encoder = load_text_encoder(flux_folder, data.max_sequence_length)

    def encode(raw):
        prompt_embeds, pooled = text_encoder(raw["captions"])
        return latent_batch({"latents": image_encoder(raw["pixel_values"]), "prompt_embeds": prompt_embeds,
                             "pooled_prompt_embeds": pooled})

    return TrainingData(LoaderStream(loader, encode), len(loader), None, (image_encoder, text_encoder, vae))


def build_training_data(data, seed: int, rank: int, world: int, flux_folder: Optional[Path]) -> TrainingData:
    """The training stream for ``data.data_path`` (``data``: the ``DataConfig`` section; ``flux_folder``: the
    teacher's FLUX folder, needed to encode raw records)."""
    layout = detect_layout(data)
    if layout == "raw":
        return _raw_data(data, seed, rank, world, flux_folder)
    if layout == "cache":
        from .cache import CachedDataset

        dataset, unconditional = CachedDataset(str(data.data_path)), None
    else:
        dataset = load_latent_file(data.data_path)
        unconditional = dataset.unconditional_condition()
    loader = latent_loader(dataset, data.train_batch_size, rank, world, seed=seed,
                           num_workers=data.dataloader_num_workers)
    return TrainingData(LoaderStream(loader), len(loader), unconditional)
