"""``paddle.io`` datasets over the readers, and a data loader that skips bad records safely.

Bad records travel as data, not as exceptions: a dataset returns ``{"bad_record": (reason, where,
detail)}`` for a record it cannot use, :func:`collate_samples` drops it from the batch and lists it
under ``"bad_records"``, and :class:`RobustDataLoader` counts it in the main process (one
:class:`BadRecordCounter`, whatever the number of workers) and skips batches left empty. No record
is retried, so a bad data set cannot make the loader loop; it stops with the counter's message.

A training batch (``pixel_values`` path)::

    {"pixel_values": [B, 3, H, W] float32 in [-1, 1], "captions": [B] str, "indices": [B] int64,
     "bad_records": list of (reason, where, detail), "num_records": [1] int64 (good + bad)}
"""
import os

import numpy as np
import paddle

from .bad_records import BadRecordCounter, BadRecordError, TooManyBadRecordsError
from .records import decode_image
from .sampler import ResumableDistributedBatchSampler

BAD_KEY = "bad_record"


class ImageCaptionDataset(paddle.io.Dataset):
    """Map-style dataset over an indexed reader (``Base64LineReader``, ``ImageFolderReader``,
    ``TarShardReader``).

    Args:
        reader: has ``len``, ``read(index) -> RawRecord`` (may raise :class:`BadRecordError`).
        transform: ``TrainTransform`` (decoded ``PIL.Image``, index) -> ``[3, H, W]`` float32.
        min_width, min_height: smaller images are ``image_too_small`` bad records.
    Returns per index:
        ``{"pixel_values": [3, H, W], "caption": str, "index": int}`` or ``{"bad_record": tuple}``.
    """

    def __init__(self, reader, transform, min_width=0, min_height=0):
        self.reader, self.transform = reader, transform
        self.min_width, self.min_height = min_width, min_height

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        try:
            record = self.reader.read(index)
            image = decode_image(record.image_bytes, record.where, self.min_width, self.min_height)
        except BadRecordError as error:
            return {BAD_KEY: error.record.as_tuple()}
        return {"pixel_values": self.transform(image, index), "caption": record.caption, "index": index}


class TarShardStream(paddle.io.IterableDataset):
    """Streams tar shards (``TarShardReader.iter_records``), split over replicas and workers, resumable.

    Shard ``s`` of the (per-epoch shuffled) shard list goes to global worker
    ``s % (num_replicas * num_workers)``. Every item carries its ``position`` (shard id, ordinal in the
    shard); :class:`RobustDataLoader` reports the positions of the batches the training loop received to
    :meth:`mark_consumed`, so :meth:`state_dict` is "items consumed per shard this epoch" and a restored
    stream passes over exactly those items (without decoding them) and goes on at the next one.
    With ``num_workers=0`` the resumed batches are exactly those an uninterrupted run would have given; with
    workers each worker resumes at its next item, but the order in which workers' batches interleave
    starts again from worker 0.

    Args:
        reader: ``TarShardReader`` (``build_index=False`` is enough).
        transform, min_width, min_height: as :class:`ImageCaptionDataset`; the transform's index is the
            item's :func:`stable_index` (the same crop and flip after a resume).
        num_replicas, rank: data-parallel layout (default from ``paddle.distributed``).
        seed: shuffles the shard order per epoch; ``None`` keeps the order.
    Returns per item:
        ``{"pixel_values": [3, H, W], "caption": str, "index": stable index, "position": [shard id, ordinal]}``
        or ``{"bad_record": tuple, "position": [...]}``.
    """

    def __init__(self, reader, transform, min_width=0, min_height=0, num_replicas=None, rank=None, seed=0):
        self.reader, self.transform = reader, transform
        self.min_width, self.min_height = min_width, min_height
        self.num_replicas = paddle.distributed.get_world_size() if num_replicas is None else num_replicas
        self.rank = paddle.distributed.get_rank() if rank is None else rank
        self.seed, self.epoch = seed, 0
        self.consumed = {}  # shard id -> items of that shard consumed in this epoch

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, {}

    def end_epoch(self):
        self.set_epoch(self.epoch + 1)

    def mark_consumed(self, positions):
        """``positions``: ``[N, 2]`` (shard id, ordinal) of items the training loop received."""
        for shard_id, ordinal in np.asarray(positions, dtype=np.int64).reshape(-1, 2).tolist():
            self.consumed[shard_id] = max(self.consumed.get(shard_id, 0), ordinal + 1)

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in sorted(self.consumed.items())},
                "shards": [os.path.basename(path) for path in self.reader.shards], "seed": self.seed,
                "num_replicas": self.num_replicas}

    def set_state_dict(self, state):
        """Restore the position; the shard list, seed and number of replicas must be those of the saved run."""
        now = self.state_dict()
        mismatched = [f"{key} saved={state[key]} now={now[key]}" for key in ("shards", "seed", "num_replicas")
                      if state.get(key) != now[key]]
        if mismatched:
            raise ValueError("cannot resume the tar-shard stream: " + "; ".join(mismatched))
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}

    def my_shards(self, worker_id=0, num_workers=1):
        order = np.arange(len(self.reader.shards))
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        slot, slots = self.rank * num_workers + worker_id, self.num_replicas * num_workers
        return order[slot::slots].tolist()

    def __iter__(self):
        info = paddle.io.get_worker_info()
        shard_ids = self.my_shards(info.id, info.num_workers) if info is not None else self.my_shards()
        for shard_id, ordinal, item in self.reader.iter_records(shard_ids, skip=self.consumed):
            position = [shard_id, ordinal]
            if not hasattr(item, "image_bytes"):  # a BadRecord
                yield {BAD_KEY: item.as_tuple(), "position": position}
                continue
            try:
                image = decode_image(item.image_bytes, item.where, self.min_width, self.min_height)
            except BadRecordError as error:
                yield {BAD_KEY: error.record.as_tuple(), "position": position}
                continue
            index = stable_index(shard_id, ordinal)
            yield {"pixel_values": self.transform(image, index), "caption": item.caption, "index": index,
                   "position": position}


def stable_index(shard_id, ordinal):
    """One int64 per streamed item, fixed across passes and resumes: ``shard_id * 2**32 + ordinal``."""
    return (int(shard_id) << 32) + int(ordinal)


def _count(samples):
    """``len(samples)`` as a 1-element int64 array: a paddle DataLoader ends its iteration at a batch
    that holds no array at all (e.g. one whose records were all bad), so every batch carries this one."""
    return np.array([len(samples)], dtype=np.int64)


def collate_samples(samples):
    """List of dataset items -> training batch dict (see the module docstring); bad items dropped."""
    good = [s for s in samples if BAD_KEY not in s]
    batch = {"bad_records": [s[BAD_KEY] for s in samples if BAD_KEY in s], "num_records": _count(samples)}
    if any("position" in s for s in samples):  # streamed items: where each one (good or bad) came from
        batch["positions"] = np.array([s["position"] for s in samples], dtype=np.int64).reshape(-1, 2)
    if good:
        shapes = {tuple(s["pixel_values"].shape) for s in good}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch have different sizes {sorted(shapes)}; with aspect-ratio "
                             f"buckets give the sampler group_ids so that a batch holds one bucket")
        batch["pixel_values"] = np.stack([s["pixel_values"] for s in good])
        batch["captions"] = [s["caption"] for s in good]
        batch["indices"] = np.array([s["index"] for s in good], dtype=np.int64)
    return batch


class RobustDataLoader:
    """``paddle.io.DataLoader`` that counts and skips bad records, and saves its position.

    Args:
        dataset: a map-style dataset (with ``batch_sampler``) or an ``IterableDataset`` (with
            ``batch_size``) whose items follow the ``bad_record`` convention.
        batch_sampler: for map-style datasets; :class:`ResumableDistributedBatchSampler` makes the
            loader resumable (``state_dict``), any other iterable of index lists is used as it is.
        counter: :class:`BadRecordCounter` (a default one if None).
        batch_size: for iterable datasets only (the last, smaller batch is kept).
        num_workers: worker processes of a ``paddle.io.DataLoader``; with 0, batches are loaded in
            the calling thread instead, because Paddle 3.3's single-process loader waits forever when
            a dataset or collate function raises.
        collate_fn, **loader_kwargs: passed to ``paddle.io.DataLoader``.

    Iterating yields batches with at least one good sample (``bad_records``/``num_records``
    removed, arrays as ``paddle.Tensor``), counts every record, raises :class:`TooManyBadRecordsError`
    from the counter, and calls ``counter.end_epoch()`` after a full pass.
    """

    def __init__(self, dataset, batch_sampler=None, counter=None, batch_size=None, num_workers=0,
                 collate_fn=collate_samples, **loader_kwargs):
        self.dataset, self.batch_sampler, self.batch_size = dataset, batch_sampler, batch_size
        self.counter = counter or BadRecordCounter()
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self._resumable = isinstance(batch_sampler, ResumableDistributedBatchSampler)
        self._stream = dataset if hasattr(dataset, "mark_consumed") else None  # a resumable stream
        if batch_sampler is not None:
            if len(dataset) == 0:
                raise TooManyBadRecordsError("the data set has no readable records" + _index_errors(dataset))
            if len(batch_sampler) == 0:
                raise ValueError(f"{len(dataset)} records give no full batch of "
                                 f"{getattr(batch_sampler, 'batch_size', '?')} x "
                                 f"{getattr(batch_sampler, 'num_replicas', 1)} replicas (drop_last)")
            loader_kwargs["batch_sampler"] = batch_sampler
        elif batch_size is None or batch_size < 1:
            raise ValueError("an iterable dataset needs batch_size >= 1")
        else:
            loader_kwargs["batch_size"] = batch_size
        self.loader = None
        if num_workers > 0:
            self.loader = paddle.io.DataLoader(dataset, num_workers=num_workers, collate_fn=collate_fn,
                                               **loader_kwargs)
        self._epoch = self._consumed = None

    def __len__(self):
        if self.batch_sampler is None:
            raise TypeError("the number of batches of an iterable dataset is not known")
        return len(self.batch_sampler)

    def _collated(self, samples):
        batch = self.collate_fn(samples)
        return {key: paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
                for key, value in batch.items()}

    def _raw_batches(self):
        if self.loader is not None:
            yield from self.loader
        elif self.batch_sampler is not None:
            for indices in self.batch_sampler:
                yield self._collated([self.dataset[index] for index in indices])
        else:
            pending = []
            for item in self.dataset:
                pending.append(item)
                if len(pending) == self.batch_size:
                    yield self._collated(pending)
                    pending = []
            if pending:
                yield self._collated(pending)

    def __iter__(self):
        sampler = self.batch_sampler if self._resumable else None
        if sampler is not None:
            if self._epoch == sampler.epoch:  # a loop left early: workers had drawn batches ahead
                sampler.position = self._consumed
            if sampler.position >= len(sampler):
                sampler.set_epoch(sampler.epoch + 1)
            self._epoch, self._consumed = sampler.epoch, sampler.position
        resumed_stream = self._stream is not None and bool(self._stream.consumed)
        records_this_pass = 0
        for batch in self._raw_batches():
            if sampler is not None:
                self._consumed += 1
            bad_records = batch.pop("bad_records")
            count = batch.pop("num_records")
            positions = batch.pop("positions", None)
            if positions is not None and self._stream is not None:
                self._stream.mark_consumed(positions.numpy() if hasattr(positions, "numpy") else positions)
            num_records = int((count.numpy() if hasattr(count, "numpy") else np.asarray(count)).reshape(-1)[0])
            records_this_pass += num_records
            for bad in bad_records:
                self.counter.add_bad(tuple(bad), check=False)
            self.counter.add_good(num_records - len(bad_records))
            self.counter.check()
            if num_records > len(bad_records):
                yield batch
        if records_this_pass == 0 and resumed_stream:  # resumed after the epoch's last batch: next epoch
            self._stream.end_epoch()
            return
        if records_this_pass == 0:
            raise TooManyBadRecordsError("a pass over the data set produced no records at all"
                                         + _index_errors(self.dataset))
        if self._stream is not None:
            self._stream.end_epoch()
        self.counter.end_epoch()

    def state_dict(self):
        """``{"sampler": {..., epoch, position = batches received}, "bad_records": counts}``, or for a
        resumable stream ``"stream"`` (items received per shard) instead of ``"sampler"``."""
        state = {"bad_records": self.counter.state_dict()}
        if self._stream is not None:
            state["stream"] = self._stream.state_dict()
        if self._resumable:
            sampler_state = self.batch_sampler.state_dict()
            if self._epoch is not None:
                sampler_state.update(epoch=self._epoch, position=self._consumed)
            state["sampler"] = sampler_state
        return state

    def set_state_dict(self, state):
        self.counter.set_state_dict(state["bad_records"])
        if self._stream is not None:
            if "stream" not in state:
                raise ValueError("cannot resume a tar-shard stream from a state without a stream position")
            self._stream.set_state_dict(state["stream"])
        if self._resumable:
            self.batch_sampler.set_state_dict(state["sampler"])
        self._epoch = self._consumed = None


def _index_errors(dataset):
    errors = getattr(getattr(dataset, "reader", None), "index_errors", [])
    if not errors:
        return ""
    shown = "; ".join(f"{e.reason} at {e.where}" for e in errors[:5])
    return f" ({len(errors)} bad while indexing, e.g. {shown})"


def build_image_caption_loader(reader, transform, batch_size, num_workers=0, seed=0, num_replicas=None, rank=None,
                               min_width=0, min_height=0, max_bad_fraction=0.05, min_records=100,
                               drop_last=True, image_sizes=None):
    """An indexed reader -> :class:`RobustDataLoader` with a resumable distributed sampler.

    Index-time bad records (listed files that are missing, truncated shards) are counted at once.
    With ``transform.buckets`` set, each record's image size is read from its header (or taken from
    ``image_sizes``, an ``[N, 2]`` array of width, height) to group batches by bucket; records whose
    header cannot be read are counted as bad then and never sampled.
    """
    counter = BadRecordCounter(max_bad_fraction=max_bad_fraction, min_records=min_records)
    for record in getattr(reader, "index_errors", []):
        counter.add_bad(record, check=False)
    group_ids = None
    if transform.buckets is not None:
        if image_sizes is None:
            from .readers import scan_image_sizes

            image_sizes, unreadable = scan_image_sizes(reader)
            for record in unreadable:
                counter.add_bad(record, check=False)
        group_ids = transform.buckets.assign(image_sizes)
        if (group_ids < 0).all():
            counter.end_epoch()  # raises: every record was bad
    counter.check()
    dataset = ImageCaptionDataset(reader, transform, min_width, min_height)
    sampler = ResumableDistributedBatchSampler(len(dataset), batch_size, num_replicas, rank, shuffle=True,
                                               seed=seed, drop_last=drop_last, group_ids=group_ids)
    return RobustDataLoader(dataset, sampler, counter, num_workers=num_workers)
