"""Train/eval modes are set by arcflow itself: LoRA dropout acts in training steps and nowhere else.

peft creates its dropout modules in training mode whatever the transformer's mode, so a student
left alone would drop out while sampling. These tests follow the dropout modules through a real
training step (student and tied teacher), the EMA export, a loaded run and an attached one.
"""

import copy
from pathlib import Path

import pytest
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import plan_run
from arcflow.distill.runs import load_run
from arcflow.distill.student import attach_student, build_student, get_head, head_spec, load_student
from arcflow.distill.student.config import ADAPTER_NAME, StudentConfig
from arcflow.distill.student.head import MomentumHead
from arcflow.distill.worker import export, setup, train_step
from arcflow.pipeline.registry import load_teacher
from dataset_factory import TINY_ON_POLICY

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


def lora_dropouts(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The student adapter's dropout modules (``nn.Dropout`` where p > 0)."""
    return [m for n, m in transformer.named_modules() if n.endswith(f"lora_dropout.{ADAPTER_NAME}")]


def two_passes(student) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = load_teacher("digits")
    x, sigma = teacher.noise([0, 1]), torch.full((2,), 0.7)
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        return student(x, sigma, cond).velocities, student(x, sigma, cond).velocities


def assert_eval(module: torch.nn.Module) -> None:
    training = [n for n, m in module.named_modules() if m.training]
    assert not training, f"in training mode: {training[:3]}"


def test_lora_dropout_acts_in_training_steps_only(tmp_path):
    out = tmp_path / "run"
    config = DistillConfig.from_dict({"out": str(out), "on_policy": True, "teacher": "digits", **TINY_ON_POLICY,
                                      "iters": 2, "lora_dropout": 0.5, "train_modules": ["norm_out"]})
    out.mkdir()
    plan = plan_run(config)
    run = setup(config, plan, 0, 1, torch.device("cpu"), None)
    transformer = run.student.transformer
    drops = lora_dropouts(transformer)
    assert drops and all(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in drops)
    assert_eval(run.student)  # built in eval mode, peft's dropout modules included

    calls: list[tuple[bool, bool, bool]] = []  # (student call, transformer.training, every dropout training)

    def record(module, args, kwargs):
        student_call = isinstance(get_head(module, head_spec(module).path), MomentumHead)
        calls.append((student_call, module.training, all(m.training for m in drops)))

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    for _ in range(2):
        train_step(run)
    hook.remove()
    student_calls = [c for c in calls if c[0]]
    teacher_calls = [c for c in calls if not c[0]]
    assert len(student_calls) == 2 * 2, "one student forward per segment and step"
    assert len(teacher_calls) == 2 * 2 * 4, "one tied-teacher call per visited state (CFG batched)"
    assert all(c[1] and c[2] for c in student_calls), "training steps: the student and its LoRA dropout train"
    assert not any(c[1] or c[2] for c in teacher_calls), "the tied teacher answers in eval mode"
    a, b = two_passes(run.student)
    assert not torch.equal(a, b), "in training mode the dropout acts: two passes differ"

    export(run, plan)  # EMA weights copied in, the run written
    assert_eval(run.student)
    a, b = two_passes(run.student)
    assert torch.equal(a, b)

    loaded = load_student(load_teacher("digits"), out)  # sampling and evaluation load runs this way
    assert_eval(loaded)
    a, b = two_passes(loaded)
    assert torch.equal(a, b)
    assert_eval(load_run(out, merge_lora=False).student)

    plain = copy.deepcopy(load_teacher("digits").transformer).train()  # a pipeline's transformer, any mode
    attach_student(plain, out, StudentConfig.from_dict(loaded.config.to_dict()))
    assert_eval(plain)


def test_a_built_student_is_in_eval_mode():
    student = build_student(load_teacher("digits"), StudentConfig(k=2, lora_rank=2, lora_dropout=0.5))
    assert lora_dropouts(student.transformer)
    assert_eval(student)
