"""Pure functions from (job seed, sample index) to sample ids, seeds, prompts and shards.

Everything a shard contains is decided here, before any worker runs, so a retried or resumed
shard is bit-identical and nothing is duplicated or lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def sample_seed(job_seed: int, index: int) -> int:
    """A 63-bit noise seed for sample ``index`` of a job (stable across platforms and versions)."""
    state = np.random.SeedSequence([int(job_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True)
class ShardPlan:
    """The samples of one shard: ``sample_ids[i]`` uses ``prompts[i]`` and noise seed ``seeds[i]``."""

    shard_id: int
    sample_ids: tuple[int, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.sample_ids)


def plan_shards(num_samples: int, shard_size: int, prompts: Sequence[str], job_seed: int) -> list[ShardPlan]:
    """Split ``num_samples`` into shards of ``shard_size``; prompts are cycled over sample indices."""
    if num_samples < 1 or shard_size < 1 or not prompts:
        raise ValueError("num_samples and shard_size must be >= 1 and prompts non-empty")
    plans = []
    for shard_id, start in enumerate(range(0, num_samples, shard_size)):
        ids = tuple(range(start, min(start + shard_size, num_samples)))
        plans.append(
            ShardPlan(
                shard_id=shard_id,
                sample_ids=ids,
                prompts=tuple(prompts[i % len(prompts)] for i in ids),
                seeds=tuple(sample_seed(job_seed, i) for i in ids),
            )
        )
    return plans
