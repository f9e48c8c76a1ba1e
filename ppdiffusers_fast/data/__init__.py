"""Training data: LAION metadata filtering, robust readers, resumable sampling, latent cache.

* ``laion_filter``: streaming filter of LAION-aesthetics-v2 metadata (``scripts/filter_laion_aesv2.py``).
* ``download``: the filtered URLs into webdataset tar shards with img2dataset (``scripts/download_laion_images.py``).
* ``sources``: which layout ``--data_path`` holds and the training stream built from it.
* ``readers`` / ``tar_shards``: three image layouts (base64 lines + file list, image + caption folders,
  img2dataset webdataset tars), each with ``read(index)`` and bad-record reporting; tars also stream.
* ``transforms``: resize / crop / aspect-ratio buckets / normalisation.
* ``sampler``: distributed batch sampler with ``state_dict`` / ``set_state_dict``.
* ``datasets``: ``paddle.io`` datasets and ``RobustDataLoader`` (skips and counts bad records).
* ``bad_records``: the counter and the cap (``max_bad_fraction``).
* ``cache`` / ``encoders``: VAE-latent and text-embedding cache in safetensors shards; ``cache_builder``: building
  it from any image layout, resumably, in several processes (``scripts/build_latent_cache.py``).
"""
from .bad_records import BadRecord, BadRecordCounter, BadRecordError, TooManyBadRecordsError
from .cache import CachedDataset, build_cache, collate_cached, encode_batch
from .datasets import (ImageCaptionDataset, RobustDataLoader, TarShardStream, build_image_caption_loader,
                       collate_samples)
from .encoders import FluxTextEncoder, VaeLatentEncoder
from .laion_filter import LaionFilterConfig, filter_laion
from .readers import Base64LineReader, ImageFolderReader, scan_image_sizes
from .sampler import ResumableDistributedBatchSampler
from .tar_shards import TarShardReader
from .transforms import AspectRatioBuckets, TrainTransform, resize_and_crop, to_normalized_array

__all__ = [
    "AspectRatioBuckets", "BadRecord", "BadRecordCounter", "BadRecordError", "Base64LineReader", "CachedDataset",
    "FluxTextEncoder", "ImageCaptionDataset", "ImageFolderReader", "LaionFilterConfig", "ResumableDistributedBatchSampler",
    "RobustDataLoader", "TarShardReader", "TarShardStream", "TooManyBadRecordsError", "TrainTransform",
    "VaeLatentEncoder", "build_cache", "build_image_caption_loader", "collate_cached", "collate_samples",
    "encode_batch", "filter_laion", "resize_and_crop", "scan_image_sizes", "to_normalized_array",
]
