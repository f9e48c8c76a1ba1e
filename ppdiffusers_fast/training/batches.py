"""Method-ready batches (``methods.base.LatentBatch``) from the data pipeline, endlessly and resumably.

Batches of encoded samples, as the latent cache (``data.cache``) and the on-the-fly encoders give them::

    {"latents": [B, 16, h, w], "prompt_embeds": [B, T, D], "pooled_prompt_embeds": [B, P], ...}

become ``LatentBatch`` (2x2-packed tokens ``[B, (h/2)(w/2), 64]``, image and text rotary ids) through
:func:`latent_batch`. :class:`LoaderStream` walks a resumable loader (``data.datasets.RobustDataLoader``
with a ``ResumableDistributedBatchSampler``) epoch after epoch; its ``state_dict()`` is the loader's
position, which the trainer saves per rank in every checkpoint.

:class:`InMemoryLatentDataset` holds a small precomputed-latent set in memory (one safetensors file with
``latents``, ``prompt_embeds``, ``pooled_prompt_embeds`` and optionally the empty prompt's
``uncond_prompt_embeds`` / ``uncond_pooled_prompt_embeds`` for CFG teachers), item for item like
``data.cache.CachedDataset``.
"""
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import paddle

from ..data.cache import collate_cached
from ..data.datasets import RobustDataLoader
from ..data.sampler import ResumableDistributedBatchSampler
from ..methods.denoiser import FluxCondition
from ..methods.base import LatentBatch
from ..models.safetensors_io import load_file
from ..pipelines.latents import latent_image_ids, pack_latents

REQUIRED_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds")
UNCOND_KEYS = ("uncond_prompt_embeds", "uncond_pooled_prompt_embeds")


def _tensor(value) -> paddle.Tensor:
    return value.astype("float32") if isinstance(value, paddle.Tensor) else paddle.to_tensor(
        np.asarray(value, dtype=np.float32))


def flux_condition(prompt_embeds, pooled_prompt_embeds, latent_height: int, latent_width: int) -> FluxCondition:
    """``FluxCondition`` for prompt embeddings ``[B, T, D]``, ``[B, P]`` and a latent grid ``h x w``."""
    prompt = _tensor(prompt_embeds)
    return FluxCondition(prompt, _tensor(pooled_prompt_embeds), paddle.zeros([prompt.shape[1], 3]),
                         latent_image_ids(latent_height, latent_width))


def latent_batch(batch: Dict[str, object]) -> LatentBatch:
    """``{"latents" [B, C, h, w], "prompt_embeds", "pooled_prompt_embeds", ...}`` -> ``LatentBatch``."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing} (has {sorted(batch)})")
    latents = _tensor(batch["latents"])
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {list(latents.shape)}")
    height, width = latents.shape[2], latents.shape[3]
    cond = flux_condition(batch["prompt_embeds"], batch["pooled_prompt_embeds"], height, width)
    return LatentBatch(pack_latents(latents), cond, (height, width))


class InMemoryLatentDataset(paddle.io.Dataset):
    """Items ``{"latents": [C, h, w], "prompt_embeds": [T, D], "pooled_prompt_embeds": [P], "index": i}``."""

    def __init__(self, arrays: Dict[str, np.ndarray], source: str = "arrays"):
        super().__init__()
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise KeyError(f"{source}: latent dataset lacks {missing} (has {sorted(arrays)})")
        sizes = {k: len(arrays[k]) for k in REQUIRED_KEYS}
        if len(set(sizes.values())) != 1 or not sizes["latents"]:
            raise ValueError(f"{source}: arrays must have the same non-zero length, got {sizes}")
        shape = list(np.shape(arrays["latents"]))
        if len(shape) != 4 or shape[2] % 2 or shape[3] % 2:
            raise ValueError(f"{source}: latents must be [N, C, h, w] with even h and w, got {shape}")
        self.arrays = {k: np.asarray(arrays[k], dtype=np.float32) for k in REQUIRED_KEYS}
        self.unconditional = None
        if all(k in arrays for k in UNCOND_KEYS):
            self.unconditional = {k: np.asarray(arrays[k], dtype=np.float32) for k in UNCOND_KEYS}

    def __len__(self) -> int:
        return len(self.arrays["latents"])

    def __getitem__(self, index: int) -> Dict[str, object]:
        item = {k: v[index] for k, v in self.arrays.items()}
        item["index"] = int(index)
        return item

    @property
    def latent_size(self):
        return tuple(self.arrays["latents"].shape[2:])

    def unconditional_condition(self) -> Optional[FluxCondition]:
        """The empty prompt as a batch-1 ``FluxCondition`` (None when the file has none)."""
        if self.unconditional is None:
            return None
        return flux_condition(self.unconditional["uncond_prompt_embeds"],
                              self.unconditional["uncond_pooled_prompt_embeds"], *self.latent_size)


def load_latent_file(path) -> InMemoryLatentDataset:
    """Read a precomputed-latent safetensors file (or ``<folder>/latents.safetensors``)."""
    path = Path(path)
    file = path / "latents.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no precomputed latents at {file} (a safetensors file with "
                                f"{', '.join(REQUIRED_KEYS)})")
    return InMemoryLatentDataset(load_file(file), source=str(file))


def latent_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  num_workers: int = 0, shuffle: bool = True) -> RobustDataLoader:
    """A resumable loader of encoded samples (in-memory or ``CachedDataset``), grouped by latent size."""
    group_ids = dataset.group_ids() if hasattr(dataset, "group_ids") else None
    sampler = ResumableDistributedBatchSampler(len(dataset), batch_size, world_size, rank, shuffle=shuffle,
                                               seed=seed, drop_last=False, group_ids=group_ids)
    return RobustDataLoader(dataset, sampler, num_workers=num_workers, collate_fn=collate_cached)


class LoaderStream:
    """Endless ``to_batch(raw)`` over a resumable loader, one epoch after another.

    Args:
        loader: iterable over one epoch per ``iter()``, with ``state_dict()`` / ``set_state_dict()``.
        to_batch: raw batch -> method-ready batch (default :func:`latent_batch`; the on-the-fly path
            encodes pixels and captions first).
    """

    def __init__(self, loader, to_batch: Callable = latent_batch):
        self.loader, self.to_batch = loader, to_batch
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return self.to_batch(next(self._iterator))
            except StopIteration:
                self._iterator = None
        raise RuntimeError("the data loader yields no batches (empty data set or shard)")

    def peek(self):
        """The next batch, without moving the position."""
        state = self.state_dict()
        batch = next(self)
        self.set_state_dict(state)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def set_state_dict(self, state: dict) -> None:
        self.loader.set_state_dict(state)
        self._iterator = None
