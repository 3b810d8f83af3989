"""Group-in-batch sampler of Sparse4D's temporal training.

Every batch slot walks one sequence (a group of the dataset's ``flag``) forward in time, frame
by frame; when its sequence is exhausted it takes the next group. Groups are dealt out in a
seeded random order that is the same on every rank: global slot ``rank * batch_size + i`` takes
every ``world_size * batch_size``-th group of that order, starting at its own position, so the
ranks of a distributed run never train on the same sequence at the same time.

With ``get_augmentation`` (the dataset's), each slot draws one augmentation per sequence and
every frame of the sequence uses it (the reference's ``keep_consistent_seq_aug``); the items are
then ``{"idx": i, "aug_config": aug}``, else plain indices.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

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
    ):
        flags = np.asarray(flags, np.int64)
        self.batch_size, self.world_size, self.rank, self.seed = int(batch_size), int(world_size), int(rank), int(seed)
        self.get_augmentation = get_augmentation
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
                if not self._queues[slot]:
                    group = next(self._group_streams[slot])
                    self._queues[slot] = self.group_members[group].tolist()
                    if self.get_augmentation is not None:
                        self._augs[slot] = self.get_augmentation()
                idx = self._queues[slot].pop(0)
                batch.append(idx if self.get_augmentation is None else {"idx": idx, "aug_config": self._augs[slot]})
            yield batch

    def __len__(self) -> int:  # an endless stream; one "epoch" is the dataset once
        return max(1, sum(len(m) for m in self.group_members) // (self.batch_size * self.world_size))
