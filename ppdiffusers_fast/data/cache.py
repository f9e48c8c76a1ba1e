"""A disk cache of VAE latents and T5 / CLIP text embeddings, so training needs no encoders in memory.

Layout of a cache folder::

    cache_index.json           {"format", "version", "num_samples", "dtype", "prompt_embeds_shape",
                                "pooled_prompt_embeds_shape", "shards": [{"file", "num_samples",
                                "latent_shape"}], "bad_records": {...}, "metadata": {...}}
    shard-00000.safetensors    latents [N, 16, h, w], prompt_embeds [N, T, D],
                               pooled_prompt_embeds [N, P], indices [N] (record index in the source)

A shard holds one latent size (aspect-ratio buckets start a new shard). :class:`CachedDataset`
returns the same keys as the on-the-fly path (:func:`encode_batch`), so a trainer takes either:

    {"latents": [B, 16, h, w], "prompt_embeds": [B, T, D], "pooled_prompt_embeds": [B, P], "indices": [B]}
"""
import json
import os

import numpy as np
import paddle
from ..models.safetensors_io import open_file, save_file

from .datasets import BAD_KEY, RobustDataLoader, _count

CACHE_INDEX = "cache_index.json"
CACHE_FORMAT = "ppdiffusers_fast.latent_cache"
CACHE_VERSION = 1
TENSOR_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


def _numpy(value):
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def encode_batch(batch, encode_image, encode_text):
    """On-the-fly conditioning of an image batch.

    Args:
        batch: ``{"pixel_values": [B, 3, H, W], "captions": [B], "indices": [B]}``.
        encode_image: ``pixel_values -> latents [B, 16, H/8, W/8]`` (e.g. ``VaeLatentEncoder``).
        encode_text: ``captions -> (prompt_embeds [B, T, D], pooled_prompt_embeds [B, P])``.
    Returns:
        ``{"latents", "prompt_embeds", "pooled_prompt_embeds", "indices"}``.
    """
    with paddle.no_grad():
        latents = encode_image(batch["pixel_values"])
        prompt_embeds, pooled_prompt_embeds = encode_text(batch["captions"])
    return {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
            "indices": batch["indices"]}


class ShardWriter:
    """Collects encoded samples and writes them as ``<prefix>-NNNNN.safetensors`` shards (atomically).

    ``shards`` lists the written files with their sample counts and latent shape, as the index stores them.
    """

    def __init__(self, output_dir, samples_per_shard, dtype, prefix="shard", shards=None):
        self.output_dir, self.samples_per_shard, self.dtype = output_dir, samples_per_shard, np.dtype(dtype)
        self.prefix = prefix
        self.shards, self.pending = list(shards or []), []
        self.text_shapes = None

    def add(self, encoded):
        arrays = {key: _numpy(encoded[key]) for key in TENSOR_KEYS}
        indices = _numpy(encoded["indices"]).astype(np.int64)
        text_shapes = (list(arrays["prompt_embeds"].shape[1:]), list(arrays["pooled_prompt_embeds"].shape[1:]))
        if self.text_shapes is None:
            self.text_shapes = text_shapes
        elif text_shapes != self.text_shapes:
            raise ValueError(f"text embedding shapes changed from {self.text_shapes} to {text_shapes}")
        for row in range(len(indices)):
            latent = arrays["latents"][row]
            if self.pending and (latent.shape != self.pending[0]["latents"].shape
                                 or len(self.pending) >= self.samples_per_shard):
                self.flush()
            sample = {key: arrays[key][row] for key in TENSOR_KEYS}
            sample["indices"] = indices[row]
            self.pending.append(sample)

    def flush(self):
        if not self.pending:
            return
        tensors = {key: np.stack([s[key] for s in self.pending]).astype(self.dtype) for key in TENSOR_KEYS}
        tensors["indices"] = np.array([s["indices"] for s in self.pending], dtype=np.int64)
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        path = os.path.join(self.output_dir, name)
        save_file(tensors, path)  # atomic
        self.shards.append({"file": name, "num_samples": len(self.pending),
                            "latent_shape": list(tensors["latents"].shape[1:])})
        self.pending = []


def every_record_once(dataset, batch_size, counter=None, num_workers=0, group_ids=None):
    """A :class:`RobustDataLoader` visiting each record of ``dataset`` once: the batches to build a
    cache from.

    Records go in index order; with ``group_ids`` (aspect-ratio bucket per record, e.g.
    ``buckets.assign(sizes)``) batches are formed group by group so that their images stack, and
    records of a negative group are left out. A group's last batch may be smaller.
    """
    if group_ids is None:
        group_ids = np.zeros(len(dataset), dtype=np.int64)
    group_ids = np.asarray(group_ids)
    batches = []
    for group in np.unique(group_ids[group_ids >= 0]):
        members = np.flatnonzero(group_ids == group)
        batches += [members[i:i + batch_size].tolist() for i in range(0, len(members), batch_size)]
    return RobustDataLoader(dataset, batches, counter, num_workers=num_workers)


def build_cache(batches, encode_image, encode_text, output_dir, samples_per_shard=256, dtype="float32",
                metadata=None, bad_record_summary=None):
    """Encode every batch and write the cache (see the module docstring); returns the index dict.

    Args:
        batches: iterable of image batches, normally :func:`every_record_once` over an
            ``ImageCaptionDataset``; bad records were already skipped there.
        encode_image, encode_text: as :func:`encode_batch`.
        samples_per_shard: samples per safetensors file.
        dtype: stored dtype, ``"float32"`` or ``"float16"`` (halves the disk; T5 sequences dominate:
            512 x 4096 values per sample).
        metadata: JSON-friendly description of the encoders / resolution, stored in the index.
        bad_record_summary: e.g. ``loader.counter.summary()``, stored in the index.
    """
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    os.makedirs(output_dir, exist_ok=True)
    writer = ShardWriter(output_dir, samples_per_shard, dtype)
    for batch in batches:
        writer.add(encode_batch(batch, encode_image, encode_text))
    writer.flush()
    if not writer.shards:
        raise ValueError("no samples to cache: the data source gave no batch")
    return write_cache_index(output_dir, writer.shards, writer.text_shapes, dtype, bad_record_summary, metadata)


def write_cache_index(output_dir, shards, text_shapes, dtype, bad_record_summary=None, metadata=None):
    """Write ``cache_index.json`` for ``shards`` (``ShardWriter.shards``; ``text_shapes``: its ``text_shapes``)."""
    index = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "dtype": np.dtype(dtype).name,
        "prompt_embeds_shape": list(text_shapes[0]), "pooled_prompt_embeds_shape": list(text_shapes[1]),
        "shards": list(shards), "bad_records": bad_record_summary or {}, "metadata": metadata or {},
    }
    path = os.path.join(output_dir, CACHE_INDEX)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
    os.replace(path + ".tmp", path)
    return index


class CachedDataset(paddle.io.Dataset):
    """Map-style dataset over a cache folder; each item is one sample's tensors (float32 numpy).

    Rows are read lazily (memory-mapped safetensors); shard files are opened per process on first use,
    so the dataset is safe to hand to DataLoader workers.

    Returns per index:
        ``{"latents": [16, h, w], "prompt_embeds": [T, D], "pooled_prompt_embeds": [P], "index": int}``
    """

    def __init__(self, cache_dir):
        path = os.path.join(cache_dir, CACHE_INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a latent cache folder")
        with open(path, encoding="utf-8") as handle:
            self.index = json.load(handle)
        if self.index.get("format") != CACHE_FORMAT or self.index.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: format {self.index.get('format')} v{self.index.get('version')} is not "
                             f"{CACHE_FORMAT} v{CACHE_VERSION}")
        self.cache_dir = cache_dir
        self.shards = self.index["shards"]
        for shard in self.shards:
            if not os.path.isfile(os.path.join(cache_dir, shard["file"])):
                raise FileNotFoundError(f"cache shard {shard['file']} listed in {path} is missing")
        self._starts = np.cumsum([0] + [s["num_samples"] for s in self.shards])
        self._handles, self._pid = {}, None

    def __len__(self):
        return int(self._starts[-1])

    def group_ids(self):
        """One id per distinct latent shape, per sample: pass to the sampler so batches stack."""
        shapes = sorted({tuple(s["latent_shape"]) for s in self.shards})
        ids = [shapes.index(tuple(s["latent_shape"])) for s in self.shards]
        return np.repeat(ids, [s["num_samples"] for s in self.shards])

    def _handle(self, shard_id):
        if self._pid != os.getpid():  # a new worker process: do not reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard_id not in self._handles:
            path = os.path.join(self.cache_dir, self.shards[shard_id]["file"])
            self._handles[shard_id] = open_file(path, framework="np")
        return self._handles[shard_id]

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples")
        shard_id = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[shard_id])
        handle = self._handle(shard_id)
        item = {key: handle.get_slice(key)[row:row + 1][0].astype(np.float32) for key in TENSOR_KEYS}
        item["index"] = int(handle.get_slice("indices")[row:row + 1][0])
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state


def collate_cached(samples):
    """Stack cached items into ``{"latents", "prompt_embeds", "pooled_prompt_embeds", "indices"}``.

    Also gives ``bad_records``/``num_records`` so :class:`RobustDataLoader` can wrap a cache.
    """
    good = [s for s in samples if BAD_KEY not in s]
    batch = {key: np.stack([s[key] for s in good]) for key in TENSOR_KEYS}
    batch["indices"] = np.array([s["index"] for s in good], dtype=np.int64)
    batch["bad_records"], batch["num_records"] = [], _count(samples)
    return batch
