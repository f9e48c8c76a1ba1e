"""A distributed batch sampler whose position can be saved and restored for exact resume.

Epoch ``e`` is a fixed function of ``(seed, e, num_samples, batch_size, num_replicas, group_ids)``:

1. order = ``default_rng([seed, e]).permutation(num_samples)`` (or ``arange`` without shuffle);
2. global batches of ``batch_size * num_replicas`` indices are cut from ``order`` -- within one group
   at a time when ``group_ids`` are given (aspect-ratio buckets: a global batch never mixes sizes);
   the incomplete tail of each group is dropped (``drop_last``) or filled by repeating that group's
   indices from its start;
3. with groups, the order of the global batches is shuffled by the same generator;
4. replica ``r`` takes slice ``[r * batch_size, (r + 1) * batch_size)`` of every global batch.

The state is ``(epoch, position)`` with ``position`` = batches of this epoch already consumed; a
sampler restored with :meth:`set_state_dict` yields exactly the batches that were still to come.
Note that a ``paddle.io.DataLoader`` draws batches ahead of the training loop (prefetch), so the
sampler's own count runs ahead: ``datasets.RobustDataLoader`` saves the number of batches the
loop actually received instead.
"""
import numpy as np

_FIXED_KEYS = ("seed", "num_samples", "batch_size", "num_replicas", "shuffle", "drop_last")


def _default_replicas():
    import paddle.distributed as dist

    return dist.get_world_size(), dist.get_rank()


class ResumableDistributedBatchSampler:
    """Yields lists of dataset indices for one replica (rank).

    Args:
        num_samples: dataset length (an ``int`` or anything with ``len``).
        batch_size: indices per batch on each replica.
        num_replicas, rank: data-parallel world size and this process's rank (default: from
            ``paddle.distributed``).
        shuffle: shuffle with ``seed`` and the epoch.
        seed: shared by all replicas.
        drop_last: drop incomplete global batches (``False`` fills them by repetition).
        group_ids: optional ``[num_samples]`` ints; a global batch only holds indices of one group.
            Indices with a negative group id are never yielded.
    """

    def __init__(self, num_samples, batch_size, num_replicas=None, rank=None, shuffle=True, seed=0,
                 drop_last=True, group_ids=None):
        if not isinstance(num_samples, int):
            num_samples = len(num_samples)
        if num_replicas is None or rank is None:
            default_replicas, default_rank = _default_replicas()
            num_replicas = default_replicas if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_ids is not None and len(group_ids) != num_samples:
            raise ValueError(f"group_ids has {len(group_ids)} entries for {num_samples} samples")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)
        self.epoch = 0
        self.position = 0  # batches of this epoch consumed; iteration starts here
        self._cache_epoch, self._cache_batches = None, None

    def _global_batches(self, epoch):
        """``[num_batches, batch_size * num_replicas]`` index array of epoch ``epoch`` (cached)."""
        if self._cache_epoch == epoch:
            return self._cache_batches
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        width = self.batch_size * self.num_replicas
        if self.group_ids is None:
            groups = [order]
        else:
            ids = self.group_ids[order]
            groups = [order[ids == g] for g in np.unique(ids) if g >= 0]
        batches = []
        for members in groups:
            full = len(members) // width * width
            if not self.drop_last and len(members) > full:
                members = np.resize(members, full + width)  # repeats the group from its start
                full += width
            batches += list(members[:full].reshape(-1, width))
        batches = np.array(batches, dtype=np.int64).reshape(-1, width)
        if self.group_ids is not None and self.shuffle:
            batches = batches[rng.permutation(len(batches))]
        self._cache_epoch, self._cache_batches = epoch, batches
        return batches

    def __len__(self):
        """Batches per epoch for this replica."""
        return len(self._global_batches(self.epoch))

    def set_epoch(self, epoch):
        """Move to ``epoch`` (position 0); a no-op when already there, so a resumed position stays."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self):
        if self.position >= len(self):  # the previous epoch was finished: go on with the next one
            self.epoch, self.position = self.epoch + 1, 0
        batches = self._global_batches(self.epoch)
        start = self.rank * self.batch_size
        epoch = self.epoch
        for step in range(self.position, len(batches)):
            if self.epoch != epoch:  # set_epoch / set_state_dict during iteration ends it
                return
            self.position = step + 1
            yield batches[step, start:start + self.batch_size].tolist()

    def state_dict(self):
        state = {key: getattr(self, key) for key in _FIXED_KEYS}
        state.update(epoch=self.epoch, position=self.position, rank=self.rank)
        return state

    def set_state_dict(self, state):
        """Restore ``epoch`` and ``position``; the settings that define the order must match."""
        mismatched = {key: (state[key], getattr(self, key)) for key in _FIXED_KEYS
                      if key in state and state[key] != getattr(self, key)}
        if mismatched:
            raise ValueError("cannot resume: sampler settings differ from the saved state "
                             + ", ".join(f"{k} saved={a} now={b}" for k, (a, b) in mismatched.items()))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
