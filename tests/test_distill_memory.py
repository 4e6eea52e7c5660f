"""Memory options of `arcflow distill`: gradient checkpointing and FSDP (sharded frozen weights)."""

import json
import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from arcflow.distill.parallel import prepare_student
from cli_helpers import assert_process_failed_one_line, run_subprocess
from dataset_factory import make_dataset
from safetensors.torch import load_file
from test_distill import metrics, run_local
from reference_sampling import reference_sample

PROMPTS = [f"a handwritten digit {d}" for d in (3, 5, 7, 1)]
SEGMENTS = torch.tensor([0, 1, 1, 0])
BOUNDS = [0, 2, 4]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", num_samples=32, steps=4, shard_size=16)


def _batch(rows: slice) -> dict:
    """A fixed synthetic trajectory batch of 4 samples (4 steps) on the digits conditioning."""
    from arcflow.pipeline.registry import load_teacher

    gen = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(4, 5, 16, 4, generator=gen),
        "u": torch.randn(4, 4, 16, 4, generator=gen),
        **load_teacher("digits").encode_prompts(PROMPTS),
    }
    from arcflow.distill.loss import segment_batch

    batch = {k: v[rows] for k, v in batch.items()}
    cond = {k: v for k, v in batch.items() if k not in ("x", "u")}
    return segment_batch(batch["x"], batch["u"], torch.linspace(1, 0, 5), BOUNDS, SEGMENTS[rows], cond)


def _loss_and_grads(checkpointing: bool, fsdp: bool = False, rank: int = 0, world_size: int = 1):
    """One forward/backward of a fresh digits student on (this rank's half of) the fixed batch."""
    from arcflow.distill.loss import segment_loss
    from arcflow.distill.student import StudentConfig, build_student
    from arcflow.pipeline.registry import load_teacher

    torch.manual_seed(0)
    student = build_student(load_teacher("digits"), StudentConfig(momentum=True, k=4, lora_rank=4), inplace=True)
    options = types.SimpleNamespace(gradient_checkpointing=checkpointing, fsdp=fsdp)
    model = prepare_student(student, options, world_size)
    per_rank = 4 // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    loss, _ = segment_loss(model, _batch(rows), len(BOUNDS) - 1)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    return student, loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(one_thread):
    _, loss, grads = _loss_and_grads(checkpointing=False)
    student, loss_ckpt, grads_ckpt = _loss_and_grads(checkpointing=True)
    assert student.transformer.gradient_checkpointing  # (that it recomputes: the next test)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_blocks(one_thread):
    from arcflow.distill.loss import segment_loss
    from arcflow.distill.student import StudentConfig, build_student
    from arcflow.pipeline.registry import load_teacher

    calls = {}
    for checkpointing in (False, True):
        student = build_student(load_teacher("digits"), StudentConfig(momentum=True, k=2, lora_rank=2), inplace=True)
        model = prepare_student(student, types.SimpleNamespace(gradient_checkpointing=checkpointing, fsdp=False), 1)
        block = student.transformer.transformer_blocks[0]
        count, forward = [0], block.forward

        def counting(*args, **kwargs):  # not a forward hook: hooks do not fire in the recompute
            count[0] += 1
            return forward(*args, **kwargs)

        block.forward = counting
        segment_loss(model, _batch(slice(0, 4)), len(BOUNDS) - 1)[0].backward()
        calls[checkpointing] = count[0]
    assert calls == {False: 1, True: 2}


def test_gradient_checkpointing_trains_to_the_same_weights(dataset, tmp_path, one_thread):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    run_local(dataset, plain, iters=4, checkpoint_every=4)
    run_local(dataset, ckpt, iters=4, checkpoint_every=4, gradient_checkpointing=True)
    for name in ("trainable", "ema"):
        a = load_file(str(plain / f"checkpoints/step-0000004/{name}.safetensors"))
        b = load_file(str(ckpt / f"checkpoints/step-0000004/{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for m_plain, m_ckpt in zip(metrics(plain), metrics(ckpt)):
        assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], abs=1e-6)


def _fsdp_rank(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        student, loss, grads = _loss_and_grads(checkpointing=True, fsdp=True, rank=rank, world_size=world_size)
        dist.all_reduce(loss)
        frozen = [p for p in student.transformer.parameters() if not p.requires_grad]
        shard_share = sum(p.to_local().numel() for p in frozen) / sum(p.numel() for p in frozen)
        if rank == 0:
            # no collective in here: rank 0 alone must be able to export
            lora = [k for k in student.transformer.state_dict() if ".lora_" in k]
            torch.save({"loss": loss / world_size, "grads": grads, "shard_share": shard_share, "lora": len(lora)}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp_two_ranks_match_one_process(tmp_path):
    """Two gloo ranks with sharded frozen weights (and checkpointing), each on half the batch, give
    the full-batch loss and gradients of one unsharded process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.start_processes(_fsdp_rank, args=(2, port, str(out)), nprocs=2, start_method="spawn")
    result = torch.load(out)
    _, loss, grads = _loss_and_grads(checkpointing=False)
    assert result["shard_share"] == pytest.approx(0.5, abs=0.05), "each rank holds about half the frozen weights"
    assert result["lora"] > 0
    torch.testing.assert_close(result["loss"], loss, rtol=0, atol=1e-6)
    assert result["grads"].keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # FSDP numerics: test_fsdp_two_ranks_match_one_process; two Ray Train workers: test_distill
def test_fsdp_two_workers_train_and_export_once(dataset, tmp_path):
    from arcflow.distill.student import load_student
    from arcflow.pipeline.registry import load_teacher

    run = tmp_path / "run"
    res = run_subprocess("distill", str(dataset), "--out", str(run), "--num-workers", "2", "--fsdp",
                         "--gradient-checkpointing", "--iters", "4", "--batch-size", "4", "--checkpoint-every", "4",
                         "--k", "2", "--lora-rank", "2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == [4], "rank 0 alone logs (at the last step, --log-every 10)"
    exported = sorted(p.name for p in run.iterdir() if p.suffix in (".safetensors", ".json"))
    assert exported == ["arcflow_config.json", "distill_config.json", "momentum_head.safetensors",
                        "pytorch_lora_weights.safetensors", "scheduler_config.json"]
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["transformer_class"] == "FluxTransformer2DModel"
    assert record["training"]["fsdp"] is True and record["training"]["gradient_checkpointing"] is True
    teacher = load_teacher("digits")
    student = load_student(teacher, run).eval()
    sample = reference_sample(student, teacher.noise([1, 2]), teacher.encode_prompts(PROMPTS[:2]))
    assert torch.isfinite(sample).all()
    # the export is the EMA of the last checkpoint, i.e. full (unsharded) tensors
    ema = load_file(str(run / "checkpoints/step-0000004/ema.safetensors"))
    params = dict(student.named_parameters())
    for key, value in ema.items():
        torch.testing.assert_close(params[key].detach().float(), value, rtol=0, atol=0)


def test_fsdp_with_full_training_is_refused(dataset, tmp_path):
    res = run_subprocess("distill", str(dataset), "--out", str(tmp_path / "r"), "--fsdp", "--trainable", "full")
    assert_process_failed_one_line(res, "--fsdp", "--trainable full")
    assert not (tmp_path / "r").exists()


def test_memory_options_may_change_on_resume(dataset, tmp_path, one_thread):
    run = tmp_path / "run"
    run_local(dataset, run, iters=2, checkpoint_every=2)
    run_local(dataset, run, iters=4, checkpoint_every=2, resume=True, gradient_checkpointing=True)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert Path(run / "checkpoints/step-0000004/state.json").is_file()
