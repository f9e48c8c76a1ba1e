"""Which training data ``--data_path`` holds, and the endless batch stream built from it.

Layouts, detected from what is on disk in this order (:func:`detect_path_layout`; :data:`LAYOUT_HELP` is what
the error for an unknown layout shows):
  * ``cache``: a latent cache folder (``cache_index.json``, written by ``scripts/build_latent_cache.py``): VAE
    latents and text embeddings, no encoders in memory (recommended for the real run);
  * ``latent_file``: a precomputed-latent ``.safetensors`` file, or a folder with ``latents.safetensors``
    (``training.batches.InMemoryLatentDataset``);
  * ``base64_lines``: the reference's records, files listed in ``--file_list_path`` (``data.readers.
    Base64LineReader``: entries relative to the file list's folder, which must be ``--data_path``);
  * ``tar_shards``: webdataset ``*.tar`` / ``*.tar.gz`` shards as ``scripts/download_laion_images.py``
    (img2dataset) writes them, streamed shard by shard (``data.datasets.TarShardStream``; exact mid-epoch
    resume);
  * ``image_folder``: images with a same-named ``.txt`` caption beside each (``data.readers.ImageFolderReader``).
The last three hold images and captions, encoded on the fly with the teacher folder's VAE and text encoders.
``--resolution``, ``--center_crop`` and ``--random_flip`` act on images, so only on those (latents keep the size
they were encoded at; the time shift follows each batch's token count).
"""
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ..methods.denoiser import FluxCondition
from ..training.batches import LoaderStream, flux_condition, latent_batch, latent_loader, load_latent_file

LAYOUTS = ("cache", "latent_file", "base64_lines", "tar_shards", "image_folder")
IMAGE_LAYOUTS = ("base64_lines", "tar_shards", "image_folder")  # encoded on the fly
LAYOUT_HELP = """\
  latent cache   DIR/cache_index.json + DIR/shard-00000.safetensors ... (scripts/build_latent_cache.py)
  latent file    FILE.safetensors (or DIR/latents.safetensors) with latents, prompt_embeds, pooled_prompt_embeds
  tar shards     DIR/00000.tar, DIR/00001.tar ... webdataset shards, each sample <key>.jpg|png|webp + <key>.txt
                 (or <key>.json with a "caption"), as scripts/download_laion_images.py writes them
  image folder   DIR/**/<name>.jpg|jpeg|png|webp|bmp with its caption in DIR/**/<name>.txt
  base64 lines   DIR/<data files> listed in --file_list_path DIR/filelist.txt, one record per line:
                 <id> TAB <caption dict or text> TAB <base64 image>"""


@dataclass
class TrainingData:
    stream: LoaderStream  # endless LatentBatch stream with a resumable position
    batches_per_epoch: Optional[int]  # this rank's batches in one epoch (None for streamed tar shards)
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


@dataclass(frozen=True)
class TeacherEncoders:
    """Where the teacher's VAE, tokenizers and text encoders come from, for encoding images and prompts.

    Either a FLUX folder (``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``), or
    the single files Black Forest Labs and ComfyUI ship (``vae_file`` = ``ae.safetensors``, ``clip_l_file``,
    ``t5_file``, fp8 included) with ``folder`` holding ``tokenizer/`` and ``tokenizer_2/`` (and the components'
    ``config.json`` files when present), as ``--vae_file --clip_l_file --t5_file`` with
    ``--pretrained_teacher_model`` give them. ``folder`` None: no encoders (latent data only).
    """
    folder: Optional[Path] = None
    vae_file: Optional[Path] = None
    clip_l_file: Optional[Path] = None
    t5_file: Optional[Path] = None

    @property
    def single_files(self) -> bool:
        return self.vae_file is not None

    def has_text_encoders(self) -> bool:
        return self.single_files or has_text_encoders(self.folder)

    def has_vae(self) -> bool:
        return self.single_files or has_vae(self.folder)

    def text_encoder(self, max_sequence_length: int, dtype: str = "float32"):
        """``data.encoders.FluxTextEncoder`` (CLIP pooled + T5 sequence)."""
        if not self.single_files:
            return load_text_encoder(self.folder, max_sequence_length, dtype)
        from ..models.flux_folder import load_single_file_text_encoders, load_tokenizers
        from .encoders import FluxTextEncoder

        clip_tokenizer, t5_tokenizer = load_tokenizers(self.folder)
        clip_model, t5_model = load_single_file_text_encoders(self.clip_l_file, self.t5_file, self.folder, dtype)
        return FluxTextEncoder(clip_tokenizer, clip_model, t5_tokenizer, t5_model, max_sequence_length)

    def vae(self):
        """The float32 ``AutoencoderKL``."""
        from ..models.flux_folder import load_single_file_vae, load_vae

        return load_single_file_vae(self.vae_file, self.folder) if self.single_files else load_vae(self.folder)

    def __str__(self) -> str:
        if self.single_files:
            return f"{self.vae_file}, {self.clip_l_file}, {self.t5_file} (tokenizers in {self.folder})"
        return str(self.folder)


def has_text_encoders(folder: Optional[Path]) -> bool:
    """True when the FLUX ``folder`` has both tokenizers and both text encoders."""
    return folder is not None and all((folder / sub / "config.json").is_file()
                                      for sub in ("text_encoder", "text_encoder_2")) and \
        (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir()


def has_vae(folder: Optional[Path]) -> bool:
    return folder is not None and (folder / "vae" / "config.json").is_file()


def load_text_encoder(folder: Path, max_sequence_length: int, dtype: str = "float32"):
    """``data.encoders.FluxTextEncoder`` from a FLUX folder's tokenizers and text encoders."""
    from ..models.flux_folder import load_text_encoders, load_tokenizers
    from .encoders import FluxTextEncoder

    clip_tokenizer, t5_tokenizer = load_tokenizers(folder)
    clip_model, t5_model = load_text_encoders(folder, dtype)
    return FluxTextEncoder(clip_tokenizer, clip_model, t5_tokenizer, t5_model, max_sequence_length)


def unconditional_condition(text_encoder, latent_size) -> FluxCondition:
    """The empty prompt's condition (batch 1) for a ``(H, W)`` latent grid (CFG teachers)."""
    prompt_embeds, pooled = text_encoder([""])
    return flux_condition(prompt_embeds, pooled, *latent_size)


def _listing(path: Path) -> str:
    names = sorted(os.listdir(path))[:8] if path.is_dir() else [path.name]
    return ", ".join(names) if names else "nothing"


def _has_images(folder: Path) -> bool:
    from .readers import IMAGE_EXTENSIONS

    for _, _, names in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in names):
            return True
    return False


def detect_path_layout(data_path, file_list_path=None) -> str:
    """One of :data:`LAYOUTS` for what is at ``data_path``; raises naming the path and listing every layout.

    Reads file names, and the file list when one is given; no data.
    """
    if data_path is None:
        raise ValueError("--data_path is required")
    path = Path(data_path)
    if not path.exists():
        raise FileNotFoundError(f"--data_path {path} does not exist")
    if file_list_path is not None:
        if Path(file_list_path).resolve().parent != path.resolve():
            raise ValueError(f"base64 lines: --file_list_path entries are read relative to the file list's folder "
                             f"({Path(file_list_path).parent}), which must be --data_path ({data_path})")
        if not Path(file_list_path).is_file():
            raise FileNotFoundError(f"--file_list_path {file_list_path} does not exist")
        listed = [line.strip() for line in Path(file_list_path).read_text(encoding="utf-8").splitlines()]
        if any(name.endswith(".parquet") for name in listed):
            raise ValueError(f"--file_list_path {file_list_path} lists parquet files: that is LAION metadata (image "
                             f"URLs) from scripts/filter_laion_aesv2.py, not images. Download the images first: "
                             f"python scripts/download_laion_images.py --input {path} --output_dir <shards>, then "
                             f"train with --data_path <shards> and no --file_list_path")
        return "base64_lines"
    if (path / "cache_index.json").is_file():
        return "cache"
    if path.suffix == ".safetensors" or (path / "latents.safetensors").is_file():
        return "latent_file"
    if path.is_file() and path.name.endswith((".tar", ".tar.gz")):
        return "tar_shards"
    if path.is_dir():
        if glob.glob(str(path / "*.tar")) or glob.glob(str(path / "*.tar.gz")):
            return "tar_shards"
        if _has_images(path):
            return "image_folder"
    hint = ""
    if path.is_dir() and glob.glob(str(path / "*.parquet")):
        hint = (f"\n{path} holds parquet files: if they are LAION metadata (image URLs), download the images with "
                f"python scripts/download_laion_images.py --input {path} --output_dir <shards> and train on <shards>.")
    raise ValueError(f"--data_path {path} holds none of the training-data layouts (found: {_listing(path)}). "
                     f"The layouts:\n{LAYOUT_HELP}{hint}")


def detect_layout(data) -> str:
    """:func:`detect_path_layout` for the ``DataConfig`` section, and a check of the flags only images use."""
    layout = detect_path_layout(data.data_path, data.file_list_path)
    if layout not in IMAGE_LAYOUTS and (data.center_crop or data.random_flip):
        raise ValueError("--center_crop / --random_flip act on images before encoding; --data_path holds latents "
                         "that are already encoded (apply them when building the latent cache)")
    return layout


def image_reader(data_path, file_list_path=None, layout=None):
    """An indexed reader (``len``, ``read(index)``) over an image layout: what the latent cache builder reads."""
    from .readers import Base64LineReader, ImageFolderReader
    from .tar_shards import TarShardReader

    layout = layout or detect_path_layout(data_path, file_list_path)
    if layout == "base64_lines":
        return Base64LineReader(file_list_path)
    if layout == "tar_shards":
        return TarShardReader(data_path)
    if layout == "image_folder":
        return ImageFolderReader(data_path)
    raise ValueError(f"--data_path {data_path} holds a {layout.replace('_', ' ')}, which is already encoded; "
                     f"an image layout is needed here")


def image_loader(data, layout: str, seed: int, rank: int, world: int, max_bad_fraction=0.05, min_records=100):
    """The raw-image loader of an image layout, resumable: tar shards are streamed (``TarShardStream``), the
    other layouts read by index (``build_image_caption_loader``). Batches: ``{"pixel_values", "captions", ...}``."""
    from .bad_records import BadRecordCounter
    from .datasets import RobustDataLoader, TarShardStream, build_image_caption_loader
    from .tar_shards import TarShardReader
    from .transforms import TrainTransform

    transform = TrainTransform(data.resolution, random_crop=not data.center_crop, random_flip=data.random_flip,
                               seed=seed)
    if layout == "tar_shards":
        stream = TarShardStream(TarShardReader(data.data_path, build_index=False), transform, num_replicas=world,
                                rank=rank, seed=seed)
        if len(stream.reader.shards) < world:
            raise ValueError(f"--data_path {data.data_path} has {len(stream.reader.shards)} tar shard(s) for {world} "
                             f"processes: every process streams whole shards, so give at least one shard each")
        counter = BadRecordCounter(max_bad_fraction=max_bad_fraction, min_records=min_records)
        return RobustDataLoader(stream, counter=counter, batch_size=data.train_batch_size,
                                num_workers=data.dataloader_num_workers)
    return build_image_caption_loader(image_reader(data.data_path, data.file_list_path, layout), transform,
                                      data.train_batch_size, data.dataloader_num_workers, seed, world, rank,
                                      max_bad_fraction=max_bad_fraction, min_records=min_records)


def _image_data(data, layout: str, seed: int, rank: int, world: int, encoders: TeacherEncoders) -> TrainingData:
    from .encoders import VaeLatentEncoder

    if not (encoders.has_text_encoders() and encoders.has_vae()):
        raise FileNotFoundError(f"encoding images on the fly needs the teacher's VAE and text encoders: a FLUX folder "
                                f"with vae/, tokenizers and text encoders as --pretrained_teacher_model, or "
                                f"--vae_file --clip_l_file --t5_file (got {encoders})")
    loader = image_loader(data, layout, seed, rank, world)
    vae = encoders.vae()
    image_encoder = VaeLatentEncoder(vae)
    text_encoder = encoders.text_encoder(data.max_sequence_length)

    def encode(raw):
        prompt_embeds, pooled = text_encoder(raw["captions"])
        return latent_batch({"latents": image_encoder(raw["pixel_values"]), "prompt_embeds": prompt_embeds,
                             "pooled_prompt_embeds": pooled})

    batches_per_epoch = None if layout == "tar_shards" else len(loader)  # a stream's length is not known
    return TrainingData(LoaderStream(loader, encode), batches_per_epoch, None, (image_encoder, text_encoder, vae))


def build_training_data(data, seed: int, rank: int, world: int, encoders: TeacherEncoders) -> TrainingData:
    """The training stream for ``data.data_path`` (``data``: the ``DataConfig`` section; ``encoders``: the
    teacher's VAE and text encoders, needed to encode images)."""
    layout = detect_layout(data)
    if layout in IMAGE_LAYOUTS:
        return _image_data(data, layout, seed, rank, world, encoders)
    if layout == "cache":
        from .cache import CachedDataset

        dataset, unconditional = CachedDataset(str(data.data_path)), None
    else:
        dataset = load_latent_file(data.data_path)
        unconditional = dataset.unconditional_condition()
    loader = latent_loader(dataset, data.train_batch_size, rank, world, seed=seed,
                           num_workers=data.dataloader_num_workers)
    return TrainingData(LoaderStream(loader), len(loader), unconditional)
