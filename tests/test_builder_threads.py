"""The builder's worker threads: every teacher call on one thread, and the dataset's bytes do not
depend on how many torch threads it uses (issue: the builder uses the machine it is given)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from arcflow.pipeline.generate import dataset_spec
from arcflow.pipeline.generation_config import GenerationConfig, default_threads
from arcflow.pipeline.plan import plan_shards
from arcflow.pipeline.registry import load_teacher
from arcflow.pipeline.shard_worker import TeacherThread, commit_shard, describe_teacher, record_shard
from arcflow.storage.writer import create_or_open_dataset


def test_default_threads_use_every_cpu_of_the_worker():
    assert [default_threads(c) for c in (0.5, 1, 2, 3, 16)] == [1, 1, 2, 3, 16]


def test_teacher_thread_runs_every_call_on_one_thread_with_its_own_thread_count():
    before = torch.get_num_threads()
    worker = TeacherThread(3)
    seen = [worker.run(lambda: (threading.get_ident(), torch.get_num_threads())) for _ in range(3)]
    assert len({ident for ident, _ in seen}) == 1 and seen[0][0] != threading.get_ident()
    assert {n for _, n in seen} == {3}
    assert torch.get_num_threads() == before  # the caller's own setting is untouched
    with pytest.raises(ZeroDivisionError):  # an exception reaches the caller
        worker.run(lambda: 1 / 0)


def _chunk_bytes(root: Path) -> dict[str, bytes]:
    """Every stored array chunk of a dataset (the Parquet parts carry write-time metadata)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/**/*")) if p.is_file()}


@pytest.mark.parametrize("micro_batch", [8, 5])
def test_datasets_are_bit_identical_whatever_the_thread_count(tmp_path, micro_batch):
    teacher = load_teacher("digits", device="cpu")
    config = GenerationConfig(out="unused", teacher="digits", num_samples=16, steps=6, shard_size=8,
                              batch_size=micro_batch, dtype="float32", compress=True)
    info = describe_teacher(teacher, None, config.steps)
    spec = dataset_spec(config, info, info["default_guidance"])
    plans = plan_shards(config.num_samples, config.shard_size, info["prompts"], config.seed)
    arrays, chunks = {}, {}
    for threads in (1, 2):
        worker = TeacherThread(threads)
        arrays[threads] = [worker.run(record_shard, teacher, spec, plan, micro_batch) for plan in plans]
        out = tmp_path / f"threads{threads}"
        create_or_open_dataset(str(out), spec, resume=False)
        for plan, shard in zip(plans, arrays[threads]):
            commit_shard(str(out), spec, plan, shard)
        chunks[threads] = _chunk_bytes(out)
    for one, two in zip(arrays[1], arrays[2]):
        for key in ("x", "u", "sigmas"):
            assert np.array_equal(one[key], two[key]), key
    assert chunks[1] and chunks[1] == chunks[2]
