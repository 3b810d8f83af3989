"""Group-in-batch sampler of Sparse4D's temporal training (the reference's, RNG call for RNG call).

Every batch slot walks one sequence (a group of the dataset's ``flag``) frame by frame; when its
sequence is exhausted it takes the next group. Groups are dealt out in a seeded random order that
is the same on every rank: global slot ``rank * batch_size + i`` takes every
``world_size * batch_size``-th group of that order, starting at its own position, so the ranks of
a distributed run never train on the same sequence at the same time.

As the reference (``GroupInBatchSampler`` of Sparse4D), per slot and per batch:

- ``skip_prob``: one ``np.random.uniform()`` is drawn; below ``skip_prob``, and with at least two
  frames left in the slot's sequence, the next frame is skipped (the step spans 1 s, not 0.5 s).
  The draw happens before a finished sequence is refilled, so a sequence's first frame is never
  skipped;
- ``sequence_flip_prob``: when a slot starts a new sequence, one more ``np.random.uniform()``
  decides whether the sequence is walked backward in time;
- with ``get_augmentation`` (the dataset's), one augmentation is drawn per sequence, after the
  flip draw, and every frame of the sequence uses it (``consistent_aug``, the reference's
  ``keep_consistent_seq_aug``), or one per frame; the items are then
  ``{"idx": i, "aug_config": aug}``, else plain indices.

All draws come from numpy's global RNG in the reference's order, so for one numpy seed the
reference sampler and this one hand out the same batches (tested). The training loop runs the
sampler under a private numpy state (`SeededBatches`), which makes it replayable after a resume:
its position is the number of batches the loop has taken, and a resumed run skips that many.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch


class SamplerError(ValueError):
    pass


class GroupInBatchSampler(torch.utils.data.Sampler):
    def __init__(
        self,
        flags: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        get_augmentation: Callable[[], dict] | None = None,
        skip_prob: float = 0.5,
        sequence_flip_prob: float = 0.1,
        consistent_aug: bool = True,
    ):
        flags = np.asarray(flags, np.int64)
        self.batch_size, self.world_size, self.rank, self.seed = int(batch_size), int(world_size), int(rank), int(seed)
        for name, value in (("data.skip_prob", skip_prob), ("data.sequence_flip_prob", sequence_flip_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise SamplerError(f"{name}: expected a probability in [0, 1], got {value!r}")
        self.skip_prob, self.sequence_flip_prob = float(skip_prob), float(sequence_flip_prob)
        self.get_augmentation = get_augmentation
        self.consistent_aug = bool(consistent_aug)
        self.num_groups = int(flags.max()) + 1 if flags.size else 0
        global_batch = self.batch_size * self.world_size
        if self.num_groups < global_batch:
            raise SamplerError(
                f"{self.num_groups} sequences cannot fill a global batch of {global_batch} slots "
                f"(lower train.total_batch_size or data.sequences_split_num is too small)"
            )
        self.group_members = [np.flatnonzero(flags == g) for g in range(self.num_groups)]
        self._group_streams = [
            itertools.islice(self._group_order(), self.rank * self.batch_size + i, None, global_batch)
            for i in range(self.batch_size)
        ]
        self._queues: list[list[int]] = [[] for _ in range(self.batch_size)]
        self._augs: list[dict | None] = [None] * self.batch_size

    def _group_order(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.num_groups, generator=generator).tolist()

    def __iter__(self) -> Iterator[list]:
        while True:
            batch = []
            for slot in range(self.batch_size):
                queue = self._queues[slot]
                # Drawn for every slot and step, as the reference (its RNG stream depends on it).
                skip = np.random.uniform() < self.skip_prob and len(queue) > 1
                if not queue:
                    group = next(self._group_streams[slot])
                    queue = self.group_members[group].tolist()
                    if np.random.uniform() < self.sequence_flip_prob:
                        queue.reverse()
                    self._queues[slot] = queue
                    if self.get_augmentation is not None and self.consistent_aug:
                        self._augs[slot] = self.get_augmentation()
                if self.get_augmentation is not None and not self.consistent_aug:
                    self._augs[slot] = self.get_augmentation()
                if skip:
                    queue.pop(0)
                idx = queue.pop(0)
                batch.append(idx if self.get_augmentation is None else {"idx": idx, "aug_config": self._augs[slot]})
            yield batch

    def __len__(self) -> int:  # an endless stream; one "epoch" is the dataset once
        return max(1, sum(len(m) for m in self.group_members) // (self.batch_size * self.world_size))


class SeededBatches:
    """Batches from the group-in-batch sampler, each item tagged with its own seed.

    The sampler draws augmentations from numpy's global RNG; it runs here under a private numpy
    state, so the training process's RNG (grid mask) is not disturbed by how far the data loader
    prefetches, and drawing the first `skip` batches again restores the sampler exactly (only
    indices and augmentation settings are drawn, no data is loaded). `skip` is the number of
    batches the training loop had taken, one per iteration: the loader may have drawn more.
    """

    def __init__(self, sampler: GroupInBatchSampler, seed: int, skip: int = 0):
        self.sampler = sampler
        self.seed = seed
        self.drawn = 0
        self._state = np.random.RandomState(seed).get_state()
        self._it = iter(sampler)
        for _ in range(skip):
            self._next()

    def _next(self) -> list:
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            batch = next(self._it)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)
        items = []
        for slot, item in enumerate(batch):
            item = dict(item) if isinstance(item, dict) else {"idx": int(item)}
            item["seed"] = (self.seed * 1_000_003 + self.drawn * 1009 + slot) % (2**32)
            items.append(item)
        self.drawn += 1
        return items

    def __iter__(self) -> Iterator[list]:
        while True:
            yield self._next()


class SeededDataset(torch.utils.data.Dataset):
    """Seeds numpy per item (photometric distortion etc. then do not depend on the worker), and
    puts the caller's numpy state back: with num_workers 0 items load in the training process,
    whose numpy stream (the grid mask) must not depend on the loading."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: dict) -> dict:
        item = dict(item)
        saved = np.random.get_state()
        np.random.seed(item.pop("seed"))
        try:
            return self.dataset[item if "aug_config" in item else item["idx"]]
        finally:
            np.random.set_state(saved)
