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


def num_shards(num_samples: int, shard_size: int) -> int:
    """How many shards ``num_samples`` make in shards of ``shard_size`` (the last may be short)."""
    return -(-num_samples // shard_size)


def shard_length(shard_id: int, num_samples: int, shard_size: int) -> int:
    """Samples in shard ``shard_id`` (without planning it)."""
    return max(0, min(shard_size, num_samples - shard_id * shard_size))


def plan_shard(
    shard_id: int, num_samples: int, shard_size: int, prompts: Sequence[str], job_seed: int, seeds_per_prompt: int = 1
) -> ShardPlan:
    """The plan of one shard; prompts are cycled over sample indices, each used by
    ``seeds_per_prompt`` consecutive samples (so a shard holds whole groups of seeds of one prompt,
    and format v2 stores their conditioning once). Plans are made one at a time, when a shard is
    handed out, so a job of a billion samples costs nothing to plan."""
    if num_samples < 1 or shard_size < 1 or seeds_per_prompt < 1 or not prompts or not 0 <= shard_id < num_shards(num_samples, shard_size):
        raise ValueError("num_samples, shard_size and seeds_per_prompt must be >= 1, prompts non-empty and shard_id in range")
    start = shard_id * shard_size
    ids = tuple(range(start, min(start + shard_size, num_samples)))
    return ShardPlan(
        shard_id=shard_id,
        sample_ids=ids,
        prompts=tuple(prompts[(i // seeds_per_prompt) % len(prompts)] for i in ids),
        seeds=tuple(sample_seed(job_seed, i) for i in ids),
    )


def plan_shards(
    num_samples: int, shard_size: int, prompts: Sequence[str], job_seed: int, seeds_per_prompt: int = 1
) -> list[ShardPlan]:
    """Every shard's plan (see :func:`plan_shard`)."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError("num_samples and shard_size must be >= 1 and prompts non-empty")
    return [plan_shard(i, num_samples, shard_size, prompts, job_seed, seeds_per_prompt)
            for i in range(num_shards(num_samples, shard_size))]
