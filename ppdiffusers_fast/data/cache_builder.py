"""Build a latent / embedding cache from any image layout, resumably and in several processes
(``scripts/build_latent_cache.py``).

Process ``r`` of ``W`` (``paddle.distributed.launch``) encodes the records ``r, r + W, r + 2W, ...`` of the
source (:func:`data.sources.image_reader`: base64 lines, tar shards or an image folder), ``samples_per_shard``
records at a time: each chunk is centre-cropped to ``resolution`` (``TrainTransform``), encoded with the VAE and
both text encoders (``cache.encode_batch``), written as one shard ``shard-r<r>-NNNNN.safetensors`` and then
recorded in ``progress-r<r>.json`` (the next chunk, the shards, the bad-record counts), each file replaced
atomically. A killed run, started again with the same command, goes on after the last recorded chunk. When every
process has finished, process 0 writes ``cache_index.json`` over all shards (``cache.write_cache_index``), which
is what makes the folder a cache for training.

Progress: a tqdm bar per process, and VisualDL scalars in ``<output_dir>/logs/r<rank>`` (``cache/records_done``,
``cache/samples_cached``, ``cache/bad_records``, ``cache/records_per_second``) after every chunk.

Bad records are skipped and counted as in training (``BadRecordCounter``: the run stops once more than
``max_bad_fraction`` of at least ``min_records`` records are bad, or when no record at all is good).
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from .bad_records import BadRecordCounter, TooManyBadRecordsError
from .cache import CACHE_INDEX, ShardWriter, encode_batch, write_cache_index
from .datasets import ImageCaptionDataset, collate_samples

SETTINGS_FILE = "cache_settings.json"


@dataclass
class CacheSettings:
    data_path: str
    layout: str
    num_records: int
    resolution: int
    max_sequence_length: int
    teacher: str
    world_size: int = 1
    samples_per_shard: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    max_bad_fraction: float = 0.05
    min_records: int = 100


def progress_file(rank: int) -> str:
    return f"progress-r{rank:03d}.json"


def _write_json(payload, path):
    with open(str(path) + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(str(path) + ".tmp", path)


def _read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_settings(output_dir, settings: CacheSettings) -> None:
    """Record the settings; refuse to go on in a folder started with other ones (mixed shards)."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    current = asdict(settings)
    if os.path.isfile(path):
        previous = _read_json(path)
        changed = [f"{k}: {previous.get(k)} -> {v}" for k, v in current.items() if k != "batch_size"
                   and previous.get(k) != v]
        if changed:
            raise ValueError(f"{path}: this cache folder was started with other settings ({'; '.join(changed)}); "
                             f"use a new --output_dir or the same settings")
        return
    os.makedirs(output_dir, exist_ok=True)
    _write_json(current, path)


def encode_part(reader, transform, encode_image: Callable, encode_text: Callable, output_dir,
                settings: CacheSettings, rank: int = 0, progress: bool = True, visualdl: bool = True) -> dict:
    """Encode this process's records (``rank::world_size``) into shards; returns its progress record.

    Args:
        reader: indexed reader of the image layout (``len``, ``read``).
        transform: ``TrainTransform`` giving ``[3, R, R]`` pixels in [-1, 1].
        encode_image, encode_text: as ``cache.encode_batch``.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, progress_file(rank))
    positions = np.arange(rank, len(reader), settings.world_size)
    state = _read_json(path) if os.path.isfile(path) else {
        "rank": rank, "next": 0, "num_records": int(len(positions)), "shards": [], "text_shapes": None,
        "bad_records": {"num_good": 0, "bad_by_reason": {}}}
    counter = BadRecordCounter(max_bad_fraction=settings.max_bad_fraction, min_records=settings.min_records)
    counter.set_state_dict(state["bad_records"])
    writer = ShardWriter(output_dir, settings.samples_per_shard, settings.dtype, prefix=f"shard-r{rank:03d}",
                         shards=state["shards"])
    dataset = ImageCaptionDataset(reader, transform)
    bar = tqdm(total=len(positions), initial=state["next"], desc=f"encoding (process {rank})", unit="image",
               disable=not progress)
    writer_log = None
    if visualdl:
        from visualdl import LogWriter

        writer_log = LogWriter(logdir=os.path.join(output_dir, "logs", f"r{rank:03d}"), display_name="latent cache")
    started = time.perf_counter()
    first_position = state["next"]
    for start in range(state["next"], len(positions), settings.samples_per_shard):
        chunk = positions[start:start + settings.samples_per_shard]
        for first in range(0, len(chunk), settings.batch_size):
            batch = collate_samples([dataset[int(i)] for i in chunk[first:first + settings.batch_size]])
            for bad in batch["bad_records"]:
                counter.add_bad(tuple(bad), check=False)
            counter.add_good(len(batch.get("captions", [])))
            counter.check()
            if "pixel_values" in batch:
                writer.add(encode_batch(batch, encode_image, encode_text))
            bar.update(int(batch["num_records"][0]))
        writer.flush()
        state.update(next=int(start + len(chunk)), shards=writer.shards, bad_records=counter.state_dict(),
                     text_shapes=writer.text_shapes or state["text_shapes"])
        _write_json(state, path)
        if writer_log is not None:
            done = state["next"]
            scalars = {"records_done": done, "samples_cached": sum(s["num_samples"] for s in writer.shards),
                       "bad_records": counter.num_bad,
                       "records_per_second": (done - first_position) / max(time.perf_counter() - started, 1e-9)}
            for name, value in scalars.items():
                writer_log.add_scalar(tag=f"cache/{name}", value=float(value), step=done)
    bar.close()
    if writer_log is not None:
        writer_log.close()
    return state


def assemble_index(output_dir, settings: CacheSettings, metadata: Optional[dict] = None) -> dict:
    """Process 0, after all processes finished: ``cache_index.json`` over every process's shards."""
    shards, text_shapes, good, bad = [], None, 0, {}
    for rank in range(settings.world_size):
        path = os.path.join(output_dir, progress_file(rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: process {rank} has not encoded its part")
        state = _read_json(path)
        if state["next"] < state["num_records"]:
            raise RuntimeError(f"{path}: process {rank} stopped at record {state['next']} of {state['num_records']}; "
                               f"run the same command again to finish")
        shards += state["shards"]
        text_shapes = text_shapes or state["text_shapes"]
        good += state["bad_records"]["num_good"]
        for reason, count in state["bad_records"]["bad_by_reason"].items():
            bad[reason] = bad.get(reason, 0) + count
    if not shards:
        raise TooManyBadRecordsError(f"no record of {settings.data_path} could be encoded (bad records: {bad})")
    summary = {"good": good, "bad": sum(bad.values()), "bad_by_reason": bad}
    return write_cache_index(output_dir, shards, text_shapes, settings.dtype, summary,
                             dict(metadata or {}, **asdict(settings)))


def build_latent_cache(reader, transform, encode_image, encode_text, output_dir, settings: CacheSettings,
                       rank=0, barrier: Callable = lambda: None, progress=True, metadata=None) -> Optional[dict]:
    """Encode this process's part, wait for the others (``barrier``), and let process 0 write the index.

    Returns the index (process 0) or None. An existing index means the cache is complete: nothing is encoded.
    """
    index_path = os.path.join(output_dir, CACHE_INDEX)
    if rank == 0:
        check_settings(output_dir, settings)
    barrier()
    if rank != 0:
        check_settings(output_dir, settings)
    if os.path.isfile(index_path):
        return _read_json(index_path) if rank == 0 else None
    started = time.time()
    encode_part(reader, transform, encode_image, encode_text, output_dir, settings, rank, progress)
    barrier()
    if rank != 0:
        return None
    return assemble_index(output_dir, settings, dict(metadata or {}, seconds=round(time.time() - started, 2)))
