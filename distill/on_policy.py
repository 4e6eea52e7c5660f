"""On-policy (data-free) distillation: the student rolls out, the tied teacher labels what it visits.

This is how the ArcFlow paper trains (docs/architecture.md, On-policy distillation). No trajectory
dataset: each iteration draws noise and prompts, and the student is rolled out from pure noise
through its NFE segments (equal in raw time, warped by the teacher's shift). In a segment starting
at ``(x_src, s_src)`` the student makes one prediction (with gradients); the rollout then visits
``intermediate_states`` states, moving

* by the STUDENT's own exact momentum integral (its prediction detached, each mixture component
  dropped with probability ``mixture_dropout``) over random "student intervals", and
* by the TEACHER's Euler step over random "teacher intervals",

the teacher's share of the segment decaying linearly from 1 to 0 over ``teacher_mix_iters``
iterations. At each visited state ``(x_a, s_a)`` the target is the teacher's guided velocity there
and the prediction is the student's mean velocity from ``s_a`` over the following teacher interval
plus a short window (``window_substeps`` of ``total_substeps`` raw sub-steps per unit; the
instantaneous velocity when that rounds to under 2 sub-steps). Loss: ``loss_scale`` x MSE, averaged
over states, each segment weighted by its raw length. The next segment starts where the detached
student rollout ends the segment, so segments share no gradient: each one is back-propagated on its
own (one forward, one backward; DDP synchronises on the last).

The teacher is TIED to the student (:class:`TiedTeacher`): the student's own transformer with its
LoRA adapters disabled and the original output projection (and any module the student trains
outright) swapped back in, so no second copy of the weights is held.

Everything random (noise, prompts, intervals, dropout) is a pure function of (seed, rank, step), so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from arcflow.core.errors import ArcflowError
from arcflow.pipeline.sigmas import shift_sigmas, shifted_schedule

from .momentum import MomentumParams, average_velocities, integrate, velocity_at
from .student.config import StudentConfig
from .student.model import head_spec

if TYPE_CHECKING:
    from .config import DistillConfig

log = logging.getLogger(__name__)

#: SeedSequence domain of the on-policy draws (disjoint from the builder's and evaluation's seeds).
ON_POLICY_SEED_DOMAIN = 0x0B0C
#: Prompts encoded per call when the prompt set is encoded once at start-up.
ENCODE_BATCH = 64


# ----- time ---------------------------------------------------------------------------------------
def segment_sigmas(nfe: int, shift: float) -> list[float]:
    """Sigmas of ``nfe`` segments equal in raw time (1 -> 0): the student's sampling schedule,
    the teacher's own ``nfe``-step schedule."""
    return shifted_schedule(nfe, shift).tolist()


def teacher_share(step: int, mix_iters: int) -> float:
    """The teacher's share of a segment at iteration ``step`` (0-based): 1 -> 0 linearly."""
    if mix_iters <= 0:
        return 0.0
    return 1.0 - min(step, mix_iters) / mix_iters


def draw_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one iteration's draws on one rank."""
    lo, hi = (int(w) for w in np.random.SeedSequence([ON_POLICY_SEED_DOMAIN, seed, rank, step]).generate_state(2, np.uint32))
    return torch.Generator().manual_seed(((hi << 32) | lo) >> 1)


# ----- the tied teacher ----------------------------------------------------------------------------
def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class TiedTeacher:
    """The teacher's guided velocity from the student's own transformer.

    Built by :meth:`capture` BEFORE the student is built in place on the teacher's transformer: it
    keeps the original output projection (the head replaces it in the transformer) and frozen copies
    of the modules the student trains outright (``train_modules``: small, e.g. ``norm_out``). A call
    swaps them in, disables the LoRA adapters, asks the teacher, and restores the student.
    """

    def __init__(self, teacher: Any, originals: Mapping[str, nn.Module]) -> None:
        self.teacher = teacher
        self.originals = dict(originals)

    @classmethod
    def capture(cls, teacher: Any, student: StudentConfig) -> "TiedTeacher":
        transformer = teacher.transformer
        path = head_spec(transformer).path
        originals = {path: transformer.get_submodule(path)}
        for name in student.train_modules or ():
            originals[name] = copy.deepcopy(transformer.get_submodule(name)).requires_grad_(False)
        return cls(teacher, originals)

    @contextlib.contextmanager
    def as_teacher(self) -> Iterator[None]:
        """Inside: the transformer IS the teacher's (adapters off, original modules in)."""
        transformer = self.teacher.transformer
        current = {name: transformer.get_submodule(name) for name in self.originals}
        lora = bool(getattr(transformer, "_hf_peft_config_loaded", False))
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        training = transformer.training
        for name, module in self.originals.items():
            _set_submodule(transformer, name, module)
        if lora:
            transformer.disable_adapters()
        transformer.eval()  # the teacher runs without dropout (the official code's module_eval)
        try:
            yield
        finally:
            transformer.train(training)
            if lora:
                transformer.enable_adapters()
            for name, module in current.items():
                _set_submodule(transformer, name, module)
            for p in trainable:  # peft's disable/enable toggles requires_grad; keep what trains
                p.requires_grad_(True)

    @torch.no_grad()
    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: float,
                 plain_cfg: bool = False) -> Tensor:
        """The teacher's guided velocity at tokens ``x`` ``(B, N, C)`` and per-sample ``sigma``
        (``plain_cfg``: true CFG combined plainly, see ``DistillConfig.plain_cfg``)."""
        with self.as_teacher():
            return self.teacher.velocity(x, sigma, cond, guidance, plain_cfg=plain_cfg).float()


# ----- the rollout loss ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutSettings:
    """What one rollout needs besides the networks (from the config and the plan)."""

    nfe: int
    shift: float
    guidance: float
    intermediate_states: int
    total_substeps: int
    window_substeps: int
    mixture_dropout: float
    loss_scale: float
    plain_cfg: bool = False

    @classmethod
    def of(cls, config: DistillConfig, shift: float, guidance: float) -> "RolloutSettings":
        return cls(config.student.nfe, float(shift), float(guidance), config.intermediate_states,
                   config.total_substeps, config.window_substeps, config.mixture_dropout, config.loss_scale,
                   config.plain_cfg)


def detached_with_dropout(params: MomentumParams, p: float, generator: torch.Generator) -> MomentumParams:
    """The prediction without gradients, each (sample, component) dropped from the mixture with
    probability ``p`` (never all components of a sample)."""
    logits = params.logits.detach()
    if p > 0 and logits.shape[1] > 1:
        drop = torch.rand(logits.shape[:2], generator=generator) < p
        drop &= ~drop.all(dim=1, keepdim=True)
        drop = drop.to(logits.device).reshape(*drop.shape, *([1] * (logits.dim() - 2)))
        logits = logits.masked_fill(drop, float("-inf"))
    return MomentumParams(params.velocities.detach(), logits, params.log_gammas.detach())


def _intervals(batch: int, states: int, share: float, room: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random student and teacher intervals ``(B, states)`` of one segment (raw time): the student's
    sum to at most ``(1 - share) room``, the teacher's to exactly ``share room``."""
    cuts = torch.sort(torch.rand(batch, states, generator=generator, dtype=torch.float64), dim=1).values
    student = torch.diff(cuts, dim=1, prepend=torch.zeros(batch, 1, dtype=torch.float64)) * ((1 - share) * room)
    inner = torch.sort(torch.rand(batch, states - 1, generator=generator, dtype=torch.float64), dim=1).values
    teacher = torch.diff(inner, dim=1, prepend=torch.zeros(batch, 1, dtype=torch.float64),
                         append=torch.ones(batch, 1, dtype=torch.float64)) * (share * room)
    return student, teacher


def _to_tokens(channels_first: Tensor) -> Tensor:
    """``(B, C, N)`` -> ``(B, N, C)``."""
    return channels_first.transpose(1, 2)


def rollout_loss(
    model: Any,
    tied: TiedTeacher,
    settings: RolloutSettings,
    noise: Tensor,
    cond: Mapping[str, Tensor],
    share: float,
    generator: torch.Generator,
    backward: bool = True,
    trace: Optional[list[dict[str, Tensor]]] = None,
) -> tuple[Tensor, Tensor, int]:
    """One on-policy iteration (see the module docstring) over a batch of noises ``(B, N, C)``.

    With ``backward`` each segment's loss is back-propagated as soon as it is computed (under DDP's
    ``no_sync`` except the last), and the returned loss is detached. Returns the total loss, a
    ``(nfe,)`` tensor of per-segment losses (each the scaled MSE averaged over its states) and the
    teacher network evaluations spent (per sample and state: 1, or 2 with true CFG). ``trace``
    (tests) receives every visited state: segment, sigmas, the state and the teacher's velocity.
    """
    device = noise.device
    batch = noise.shape[0]
    n, states = settings.nfe, settings.intermediate_states
    per_call = tied.teacher.velocity_evaluations(settings.guidance)
    x = noise.float()
    total = torch.zeros((), device=device)
    per_segment = torch.zeros(n, device=device)
    evals = 0
    for seg in range(n):
        raw_src, size = 1.0 - seg / n, 1.0 / n
        raw_dst = max(raw_src - size, 0.0) if seg < n - 1 else 0.0
        substeps = max(round(size * settings.total_substeps), 1)
        window = min(settings.window_substeps * size / substeps, size)
        s_src = shift_sigmas(torch.full((batch,), raw_src, dtype=torch.float64), settings.shift)
        params = model(x, s_src.float().to(device), cond)
        rollout = detached_with_dropout(params, settings.mixture_dropout, generator)
        student_iv, teacher_iv = _intervals(batch, states, share, torch.tensor(size - window, dtype=torch.float64), generator)
        raw = torch.full((batch,), raw_src, dtype=torch.float64)
        preds, targets = [], []
        for j in range(states):
            raw_a = (raw - student_iv[:, j]).clamp(min=0)
            raw_b = (raw_a - teacher_iv[:, j]).clamp(min=0)
            raw_end = (raw_b - window).clamp(min=raw_dst)
            s_now, s_a, s_b, s_end = (shift_sigmas(r, settings.shift).float().to(device) for r in (raw, raw_a, raw_b, raw_end))
            with torch.no_grad():
                x_a = _step(x, rollout, s_src.float().to(device), s_now, s_a)
                target = tied.velocity(x_a, s_a, cond, settings.guidance, settings.plain_cfg)
            evals += batch * per_call
            mean = average_velocities(params, s_src.float().to(device), torch.stack([s_a, s_end], dim=1))[:, 0]
            instant = velocity_at(params, s_src.float().to(device), s_a)
            short = (torch.round((raw_a - raw_end) * settings.total_substeps) < 2).to(device)
            pred = torch.where(short.reshape(-1, *([1] * (mean.dim() - 1))), instant, mean)
            preds.append(_to_tokens(pred))
            targets.append(target)
            if trace is not None:
                trace.append({"segment": seg, "s_src": s_src.float(), "s_a": s_a, "s_b": s_b, "s_end": s_end,
                              "x_a": x_a.detach().clone(), "target": target, "pred": preds[-1].detach()})
            x = (x_a + target * (s_b - s_a).reshape(-1, 1, 1)).float()  # the teacher's Euler step
            raw = raw_b
        loss = settings.loss_scale * (torch.stack(preds) - torch.stack(targets)).pow(2).mean()
        weighted = loss * size
        if backward:
            last = seg == n - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                weighted.backward()
        total = total + weighted.detach()
        per_segment[seg] = loss.detach()
        with torch.no_grad():  # where the detached student rollout ends the segment
            s_now = shift_sigmas(raw, settings.shift).float().to(device)
            x = _step(x, rollout, s_src.float().to(device), s_now,
                      torch.full((batch,), float(shift_sigmas(torch.tensor(raw_dst, dtype=torch.float64), settings.shift)),
                                 device=device))
    return total, per_segment, evals


def _step(x: Tensor, params: MomentumParams, s_src: Tensor, s_a: Tensor, s_b: Tensor) -> Tensor:
    """Move tokens ``x`` ``(B, N, C)`` from ``s_a`` to ``s_b`` along the student's momentum flow."""
    return _to_tokens(integrate(_to_tokens(x), params, s_src, s_a, s_b))


# ----- the data source: prompts and noise ----------------------------------------------------------
def read_prompts(path: Optional[str], teacher: Any) -> list[str]:
    """The prompts of a run: those of the prompts file ``path`` (as generate-trajectories reads
    it), or the teacher's own set."""
    from arcflow.pipeline.generation_config import read_prompts as read_prompts_file

    if path is None:
        return list(teacher.prompt_set())
    prompts = read_prompts_file(path)
    teacher.validate_prompts(prompts)
    return prompts


class PromptStream:
    """An endless source of on-policy batches: per iteration ``batch_size`` prompts drawn from the
    run's set (encoded once at start-up, then the text encoders are released) and their noises.

    Offers what the worker's loop asks of a data stream (``state_dict``, ``load_state_dict``,
    ``mark_consumed``) and keeps the run's teacher-evaluation count, so a checkpoint holds both.
    """

    def __init__(self, teacher: Any, prompts: Sequence[str], batch_size: int, seed: int, rank: int,
                 device: torch.device) -> None:
        self.teacher, self.batch_size, self.seed, self.rank, self.device = teacher, batch_size, seed, rank, device
        self.prompts = list(prompts)
        parts = [teacher.encode_prompts(self.prompts[i : i + ENCODE_BATCH]) for i in range(0, len(self.prompts), ENCODE_BATCH)]
        self.cond = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
        release = getattr(teacher, "release_text_encoders", None)
        if release is not None:
            release()
        self.step = 0
        self.teacher_evals = 0

    def batch(self, step: int) -> dict[str, Any]:
        generator = draw_generator(self.seed, self.rank, step)
        index = torch.randint(len(self.prompts), (self.batch_size,), generator=generator)
        seeds = torch.randint(2**31 - 1, (self.batch_size,), generator=generator).tolist()
        return {
            "step": step,
            "noise": self.teacher.noise(seeds).to(self.device).float(),
            "cond": {k: v[index].to(self.device) for k, v in self.cond.items()},
            "generator": generator,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.step
        while True:
            yield self.batch(step)
            step += 1

    def mark_consumed(self, batch: Mapping[str, Any]) -> None:
        self.step = int(batch["step"]) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "teacher_evals": self.teacher_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.teacher_evals = int(state.get("teacher_evals", 0))


# ----- planning (driver) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OnPolicySource:
    """What the driver decides about an on-policy run's teacher (see :func:`plan_source`)."""

    teacher_id: str
    teacher_options: dict[str, Any]
    guidance: Optional[float]
    fingerprint: str
    #: Teacher evaluations already spent on the run this one continues (``from_run``), else 0.
    teacher_evals_before: int


def resolve(config: DistillConfig) -> DistillConfig:
    """A polish (``from_run``) takes its student from the run it continues: the config with that
    student (the user's NFE must match; other student settings are the run's). Other configs as given.
    The run's weights are read here, so a damaged or diverged parent is refused before Ray starts."""
    from .student import run_weights

    if not config.on_policy or config.from_run is None:
        return config
    record = _run_record(config.from_run)
    run_weights(config.from_run, record)
    saved = StudentConfig.from_dict(record["student"])
    return replace(config, student=replace(saved, init_seed=config.student.init_seed))


def _run_record(run: str) -> dict[str, Any]:
    from .student import check_teacher_revision, read_student_config

    if not Path(run).is_dir():
        raise ArcflowError(f"--from {run}: no such run directory")
    record = read_student_config(run)
    if not isinstance(record.get("teacher"), dict) or "student" not in record:
        raise ArcflowError(f"--from {run}: its arcflow_config.json names no teacher or student")
    check_teacher_revision(run, record)
    return record


def run_guidance(record: Mapping[str, Any]) -> Optional[float]:
    """The guidance a finished run was trained at: its record's, else its dataset's, else None."""
    if record.get("guidance") is not None:
        return float(record["guidance"])
    options = record.get("teacher_options") or {}
    if options.get("guidance") is not None:
        return float(options["guidance"])
    dataset = (record.get("training") or {}).get("dataset")
    if dataset:
        try:
            from arcflow.storage.reader import open_dataset

            return float(open_dataset(dataset).spec.guidance)
        except Exception:  # noqa: BLE001 - a moved dataset: fall back to the teacher's default
            return None
    return None


def plan_source(config: DistillConfig) -> OnPolicySource:
    """The teacher, its options and guidance, the run's fingerprint (prompts, teacher, parent run)
    and the evaluations spent before it; one ``ArcflowError`` line for what cannot work."""
    from arcflow.pipeline.registry import check_teacher_id, check_teacher_options, is_diffusers_teacher, require_prompts

    if config.from_run is not None:
        record = _run_record(config.from_run)
        teacher_id = str(record["teacher"]["id"])
        options = {k: v for k, v in (record.get("teacher_options") or {}).items() if k != "text_encoders"}
        guidance = config.guidance if config.guidance is not None else run_guidance(record)
        before = int(record.get("teacher_evals") or 0)
        if int(record["student"].get("nfe", 2)) != config.student.nfe:
            raise ArcflowError(f"--nfe {config.student.nfe} differs from --from {config.from_run}'s NFE "
                               f"{record['student'].get('nfe')}; a polish keeps the run's student")
        parent = str(record.get("dataset_fingerprint", ""))
    else:
        teacher_id, options, guidance, before, parent = str(config.teacher), {}, config.guidance, 0, ""
    options.update(config.teacher_options or {})
    check_teacher_id(teacher_id)
    check_teacher_options(teacher_id, config.teacher_options or {})
    require_prompts(teacher_id, config.prompts is not None, "--prompts")
    if is_diffusers_teacher(teacher_id):
        options = {**options, "text_encoders": True}
        if guidance is not None:
            options["guidance"] = float(guidance)
    if config.prompts is not None and not Path(config.prompts).is_file():
        raise ArcflowError(f"--prompts {config.prompts}: no such file")
    if teacher_id == "digits":  # cheap to load: check what its worker would refuse, here
        from arcflow.pipeline.registry import load_teacher

        teacher = load_teacher(teacher_id)
        read_prompts(config.prompts, teacher)
        channels = int(teacher.latent_shape[-1])
        if channels % config.student.weight_groups:
            raise ArcflowError(f"--weight-groups {config.student.weight_groups} does not divide the {channels} latent channels")
    blob = json.dumps({
        "teacher": teacher_id,
        "prompts": hashlib.sha256(Path(config.prompts).read_bytes()).hexdigest() if config.prompts else "teacher",
        "parent": parent,
    }, sort_keys=True).encode()
    return OnPolicySource(teacher_id, options, guidance, "on-policy:" + hashlib.sha256(blob).hexdigest()[:32], before)


def parent_weights(student: Any, run: str) -> None:
    """Start ``student`` (built with the run's own config) from a finished run's exported weights:
    its LoRA, head and other trained weights, matched by parameter name, read through the run
    loader's one path (``run_weights``: non-finite or damaged files refused)."""
    from .student import read_student_config, run_weights
    from .student.config import ADAPTER_NAME

    weights = run_weights(run, read_student_config(run))
    wanted = {n: p for n, p in student.named_parameters() if p.requires_grad}
    found: dict[str, Tensor] = {}
    for key, value in weights.get("lora", {}).items():
        key = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.{ADAPTER_NAME}.weight")
        found[f"transformer.{key}"] = value
    head = head_spec(student.transformer).path
    found.update({f"transformer.{head}.{key}": value for key, value in weights["head"].items()})
    found.update({f"transformer.{key}": value for key, value in weights.get("trainable", {}).items()})
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ArcflowError(f"--from {run}: its files lack {len(missing)} trained weights of its student (e.g. {missing[0]})")
    with torch.no_grad():
        for name, param in wanted.items():
            if tuple(found[name].shape) != tuple(param.shape):
                raise ArcflowError(f"--from {run}: {name} has shape {tuple(found[name].shape)}, the student needs {tuple(param.shape)}")
            param.copy_(found[name].to(param))
    log.info("started from %s", run)
