"""Reproducible training of the digits teacher (rectified flow matching) and its classifier.

Determinism: every random draw (init, data order, noise, sigmas, prompt dropout, augmentation)
comes from generators seeded by ``seed``, and torch runs with a fixed number of intra-op threads
(``threads``, default 1; on a shared or busy machine one thread is also the fastest) during
training, so the same seed and thread count give bit-identical weight files on the same machine
and torch build. Different CPUs, SIMD widths or torch versions may round differently: the recipe,
not the bits, is what carries across machines.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from arcflow.core.files import atomic_outputs, save_safetensors
from arcflow.pipeline.classifier import CLASSIFIER_FILE, DigitsClassifier
from arcflow.pipeline.digits import TEACHER_CONFIG_FILE, TEACHER_FILE
from arcflow.pipeline.digits_data import SPLIT_SEED, digits_split, images_to_latents
from arcflow.pipeline.digits_model import (
    MAX_TOKENS,
    TEXT_DIM,
    TRANSFORMER_CONFIG,
    VOCAB,
    DigitsTextEncoder,
    build_transformer,
    image_ids,
    text_ids,
    tokenize,
)
from arcflow.pipeline.digits_prompts import PROMPTS

#: What `train-teacher` writes into its output directory.
OUTPUT_FILES = (TEACHER_FILE, TEACHER_CONFIG_FILE, CLASSIFIER_FILE)

log = logging.getLogger(__name__)

DEFAULT_ITERS = 3000
DEFAULT_THREADS = 1
#: Guidance scale written into the shipped teacher's config (chosen with benchmarks/teacher_quality.py: 100% accuracy at 1.5-4, lowest FD at 1.5).
DEFAULT_GUIDANCE = 1.5
PROMPT_DROPOUT = 0.1
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
WARMUP = 200
EMA_DECAY = 0.999
CLASSIFIER_EPOCHS = 40


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Fixed intra-op threads, and denormals flushed to zero (tiny values stall x86 float units)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


# Own factor: library warm-ups (transformers' cosine-with-min-lr) start at 0, a step behind the shipped weights' recipe.
def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up to 1 over ``WARMUP`` steps (from ``1 / WARMUP``), then cosine decay to 0.1."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _shift_augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Shift each image by up to one pixel in x and y (zero fill)."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_teacher_weights(
    seed: int = 0, iters: int = DEFAULT_ITERS, progress: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train transformer + text encoder by rectified flow matching on the train split.

    Returns the EMA state dict (``transformer.*``, ``text_encoder.*``) and the teacher config.
    ``x_s = (1 - s) x0 + s eps`` with ``s ~ logit-normal(0, 1)``; the target is ``eps - x0``; the
    prompt is dropped to ``""`` with probability 0.1 so the same network gives the CFG branch.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    split = digits_split(SPLIT_SEED)
    latents = images_to_latents(split.train_images)
    labels = split.train_labels
    token_ids = tokenize(list(PROMPTS))
    empty_ids = tokenize([""])[0]

    transformer, text_encoder = build_transformer(), DigitsTextEncoder(TEXT_DIM)
    model = nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder}).train()
    params = list(model.parameters())
    if len(params) != len(model.state_dict()):
        raise RuntimeError("the digits teacher is expected to hold parameters only (no buffers)")
    ema = EMAModel(params, decay=EMA_DECAY, foreach=True)
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, foreach=True)
    schedule = LambdaLR(opt, lambda step: _lr_factor(step, iters))
    img_ids, txt_ids = image_ids(), text_ids()

    order = torch.randperm(len(latents), generator=gen)
    cursor = 0
    bar = tqdm(range(iters), desc="training digits teacher", unit="it", disable=None if progress else True)
    for step in bar:
        if cursor + BATCH_SIZE > len(order):
            order, cursor = torch.randperm(len(latents), generator=gen), 0
        idx = order[cursor : cursor + BATCH_SIZE]
        cursor += BATCH_SIZE
        x0 = latents[idx]
        ids = token_ids[labels[idx]].clone()
        ids[torch.rand(len(idx), generator=gen) < PROMPT_DROPOUT] = empty_ids
        eps = torch.randn(x0.shape, generator=gen)
        s = compute_density_for_timestep_sampling("logit_normal", len(idx), logit_mean=0.0, logit_std=1.0, generator=gen)
        xs = (1.0 - s[:, None, None]) * x0 + s[:, None, None] * eps
        embeds, pooled = text_encoder(ids)
        pred = transformer(
            hidden_states=xs,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=s,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        ema.step(params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    config = {
        "teacher_id": "digits",
        "transformer_config": {**TRANSFORMER_CONFIG, "axes_dims_rope": list(TRANSFORMER_CONFIG["axes_dims_rope"])},
        "vocab": list(VOCAB),
        "max_tokens": MAX_TOKENS,
        "text_dim": TEXT_DIM,
        "default_guidance": DEFAULT_GUIDANCE,
        "shift": 1.0,
        "training": {"seed": seed, "iters": iters, "split_seed": SPLIT_SEED, "batch_size": BATCH_SIZE},
    }
    names = [name for name, _ in model.named_parameters()]
    return {name: v.contiguous() for name, v in zip(names, ema.shadow_params)}, config


def train_classifier_weights(seed: int = 0, epochs: int = CLASSIFIER_EPOCHS) -> tuple[dict[str, Tensor], float]:
    """Train the evaluation classifier on the train split; returns weights and held-out accuracy."""
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    split = digits_split(SPLIT_SEED)
    model = DigitsClassifier().train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    n = len(split.train_images)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            images = _shift_augment(split.train_images[idx], gen)
            loss = F.cross_entropy(model(images), split.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    accuracy = (model.predict(split.heldout_images) == split.heldout_labels).float().mean().item()
    return {k: v.contiguous() for k, v in model.state_dict().items()}, accuracy


def train_digits(
    out_dir: str | Path,
    seed: int = 0,
    iters: int = DEFAULT_ITERS,
    classifier_epochs: int = CLASSIFIER_EPOCHS,
    threads: int = DEFAULT_THREADS,
    progress: bool = True,
) -> dict[str, Any]:
    """Train teacher and classifier into ``out_dir`` (the layout ``load_digits_teacher`` reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _threads(threads):
        teacher_state, config = train_teacher_weights(seed, iters, progress)
        teacher_time = time.perf_counter() - start
        classifier_state, accuracy = train_classifier_weights(seed, classifier_epochs)
    config["training"]["threads"] = threads
    # all three or none: a teacher cut short by a full disk must not block the rerun ("already holds")
    with atomic_outputs([out / name for name in OUTPUT_FILES]) as (teacher_path, config_path, classifier_path):
        save_safetensors(teacher_state, teacher_path)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors(classifier_state, classifier_path)
    summary = {
        "out_dir": str(out),
        "teacher_seconds": round(teacher_time, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "classifier_heldout_accuracy": round(accuracy, 4),
    }
    log.info("trained digits teacher + classifier: %s", summary)
    return summary
