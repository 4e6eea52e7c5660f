"""Checks every pipeline-family test file (tests/test_family_*.py) runs the same way.

``trained_student``: a momentum student nudged off its initialisation and saved as a run;
``assert_run_sampler_matches``: arcflow's own run sampler (what `arcflow sample --adapter` runs) gives
the expected latents; ``cli_end_to_end``: the CLI from a saved tiny pipeline directory to a sample.
"""

from __future__ import annotations

import torch

from cli_helpers import run_arcflow


def trained_student(teacher, run, record: dict):
    """A momentum student (K=4, LoRA rank 2) whose trainable parameters are moved off their init
    (seeded), saved to ``run`` with ``record``; the student."""
    from arcflow.distill.student import StudentConfig, build_student, save_student

    student = build_student(teacher, StudentConfig(momentum=True, k=4, lora_rank=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_student(student, run, record)
    return student


def assert_run_sampler_matches(teacher, run, noise, cond, expected) -> None:
    """arcflow's own scheduler loop (distill/runs.py ``sample_latents``, what `arcflow sample --adapter`
    runs) with the run's student and scheduler gives ``expected`` (atol 1e-5)."""
    from arcflow.distill.runs import sample_latents
    from arcflow.distill.student import load_scheduler, load_student, read_student_config

    scheduler = load_scheduler(run, read_student_config(run), teacher)
    own = sample_latents(load_student(teacher, run), scheduler, noise, cond)
    torch.testing.assert_close(own, expected, rtol=0, atol=1e-5)


def cli_end_to_end(tmp_path, teacher_dir, prompts, *, size=(32, 32), generate=(), sample=("--prompt", "a red car"),
                   **options):
    """`arcflow generate-trajectories` from the saved pipeline ``teacher_dir`` on the ``prompts`` file
    (4 samples, 4 steps, shards of 2, ``size`` = (height, width), ``generate``: more arguments), then
    `verify`, `distill` (3 iterations of batch 2, one checkpoint) and `sample` (2 images; ``sample``:
    the prompt arguments), all in ``tmp_path`` and all succeeding (``options``: ``run_arcflow``'s).
    Returns the dataset, the run and verify's result; the sample is written."""
    ds, run, png = tmp_path / "ds", tmp_path / "run", tmp_path / "x.png"
    run_arcflow("generate-trajectories", "--teacher", str(teacher_dir), "--height", str(size[0]),
                "--width", str(size[1]), "--num-samples", "4", "--steps", "4", "--shard-size", "2",
                "--prompts", str(prompts), *generate, "--out", str(ds), "--no-progress", cwd=tmp_path, **options)
    verified = run_arcflow("verify", str(ds), "--no-progress", cwd=tmp_path, **options)
    run_arcflow("distill", str(ds), "--out", str(run), "--iters", "3", "--batch-size", "2", "--checkpoint-every", "3",
                "--no-progress", cwd=tmp_path, **options)
    run_arcflow("sample", "--adapter", str(run), *sample, "--num", "2", "--out", str(png), cwd=tmp_path, **options)
    assert png.is_file()
    return ds, run, verified
