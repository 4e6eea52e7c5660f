"""Memory options of the distill stage: gradient checkpointing and sharding the frozen base weights.

:func:`prepare_student` is the one place the trainer turns a built student into the module its loss
calls. Without ``fsdp`` that is the student itself (one worker) or Ray Train's DDP wrapper.

With ``fsdp`` the frozen teacher weights (the bulk: 12B parameters for FLUX.1-dev, 20B for
Qwen-Image) are sharded over the workers with FSDP2 (``torch.distributed.fsdp.fully_shard``, one
unit per transformer block plus one for the rest), while the trainable weights (LoRA, momentum head)
stay whole on every worker and are kept in step like DDP does: the same start (broadcast from rank 0)
and gradients averaged over workers as each one is accumulated. So the optimizer, EMA, checkpoints and
the export see ordinary full tensors on every rank and rank 0 writes the same files as without FSDP.

Why not Ray's ``prepare_model(parallel_strategy="fsdp")``: it wraps with FSDP1, whose state-dict
hooks are collectives (rank 0 alone exporting would hang), which flattens parameters (the
optimizer and EMA built before wrapping would hold stale tensors), and whose gradient reduce-scatter
the CPU gloo backend of the tests does not need here. Since no sharded weight requires a gradient,
FSDP2 only all-gathers (forward, and again in backward to compute input gradients), which gloo
supports, so the CPU tests run the same sharding as a GPU cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from arcflow.core.errors import ArcflowError

log = logging.getLogger(__name__)

#: ``nn.ModuleList`` attributes of diffusers transformers whose items become one FSDP unit each
#: (FLUX: double- and single-stream blocks; Qwen-Image: its 60 blocks).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def enable_gradient_checkpointing(transformer: nn.Module) -> None:
    """Recompute each block's activations in backward (diffusers' own checkpointing)."""
    if not getattr(transformer, "_supports_gradient_checkpointing", False):
        raise ArcflowError(f"{type(transformer).__name__} does not support --gradient-checkpointing")
    transformer.enable_gradient_checkpointing()


def _average_gradient_hook(group: Any, world_size: int):
    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)  # SUM: gloo has no AVG
        param.grad.div_(world_size)

    return hook


def shard_frozen_weights(transformer: nn.Module, trainable: list[nn.Parameter], world_size: int) -> None:
    """FSDP2-shard ``transformer``'s frozen weights over the default process group (in place).

    ``trainable`` parameters are left whole (``ignored_params``): broadcast from rank 0 now and
    their gradients averaged over ranks after each backward, on a process group of their own so
    these collectives never interleave with FSDP's all-gathers.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ArcflowError("--fsdp needs torch.distributed (it runs under Ray Train)")
    device = next(transformer.parameters()).device
    mesh = init_device_mesh(device.type, (world_size,))
    ignored = set(trainable)
    for name in BLOCK_LISTS:
        for block in getattr(transformer, name, None) or ():
            fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, ignored_params=ignored)
    group = dist.new_group(backend=dist.get_backend())
    with torch.no_grad():
        for param in trainable:
            dist.broadcast(param, src=0, group=group)
    for param in trainable:
        param.register_post_accumulate_grad_hook(_average_gradient_hook(group, world_size))
    log.info("FSDP: frozen weights sharded over %d workers; %d trainable tensors replicated", world_size, len(trainable))


def prepare_student(student: nn.Module, config: Any, world_size: int) -> nn.Module:
    """Apply ``config.gradient_checkpointing`` / ``config.fsdp`` to ``student``; returns the module
    the loss calls (the student, or its DDP wrapper when several workers train without FSDP)."""
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student.transformer)
    if config.fsdp:
        trainable = [p for p in student.parameters() if p.requires_grad]
        shard_frozen_weights(student.transformer, trainable, world_size)
        return student
    if world_size > 1:
        from ray.train.torch import prepare_model

        return prepare_model(student, move_to_device=False)
    return student
