"""The ArcFlow student: the frozen teacher transformer + LoRA adapters (peft) + a momentum head.

``build_student`` copies the teacher's transformer, freezes it, swaps its top-level output
projection ``proj_out`` for a :class:`~arcflow.distill.heads.MomentumHead` and adds LoRA adapters
through diffusers' ``add_adapter`` (peft underneath). ``save_student`` writes a run directory:

* ``pytorch_lora_weights.safetensors``: the LoRA in the diffusers pipeline format (keys prefixed
  ``transformer.``, the ``LoraConfig`` incl. rank/alpha/targets in the safetensors metadata under
  ``lora_adapter_metadata``), loadable by ``pipeline.load_lora_weights(run_dir)`` or
  ``transformer.load_lora_adapter(run_dir, weight_name=..., prefix="transformer")``;
* ``momentum_head.safetensors``: the head;
* ``trainable_weights.safetensors``: other trained transformer weights (``trainable="full"`` only);
* ``scheduler_config.json``: the :class:`~arcflow.distill.scheduler.ArcFlowScheduler` that samples it;
* ``arcflow_config.json``: student config, teacher id/revision, shift, NFE and the trainer's extras.
  Written last: a directory without it is not a student.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors.torch
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from arcflow.storage.errors import ArcflowError

from .heads import MomentumHead, head_for
from .momentum import MomentumParams
from .sampler import sample_few_step
from .scheduler import save_scheduler

logger = logging.getLogger(__name__)

TRAINABLE_MODES = ("lora+heads", "heads", "full")
#: Name of the peft adapter the student trains.
ADAPTER_NAME = "arcflow"
#: The transformer attribute holding the output projection that the momentum head replaces.
HEAD_ATTRIBUTE = "proj_out"
#: Prefix of the LoRA keys and metadata in the diffusers pipeline LoRA format.
LORA_PREFIX = "transformer"
#: diffusers' ``LORA_WEIGHT_NAME_SAFE`` and ``LORA_ADAPTER_METADATA_KEY`` (diffusers.loaders.lora_base).
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
HEAD_FILE = "momentum_head.safetensors"
TRAINABLE_FILE = "trainable_weights.safetensors"
CONFIG_FILE = "arcflow_config.json"
CONFIG_FORMAT = "arcflow-student"
CONFIG_VERSION = 1

# Default LoRA targets per transformer class (peft regexes, full match against module names).
# FLUX (the ArcFlow FLUX recipe): dual-block feed-forwards, single-block MLP in/out projections and
# the timestep embedder; the top-level proj_out (replaced by the head) never matches.
FLUX_LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
    r"|time_text_embed\.timestep_embedder\.linear_[12]"
)
QWEN_IMAGE_LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
    r"|time_text_embed\.timestep_embedder\.linear_[12]"
)
DEFAULT_LORA_TARGETS = {
    "FluxTransformer2DModel": FLUX_LORA_TARGETS,
    "QwenImageTransformer2DModel": QWEN_IMAGE_LORA_TARGETS,
}


@dataclass
class StudentConfig:
    """Everything that determines a student's architecture and which weights train.

    ``lora_targets``: a peft ``target_modules`` value (a regex string full-matched against module
    names, or a list of module-name suffixes); None picks the transformer family's default.
    ``lora_alpha``: None means equal to ``lora_rank``. ``momentum=False`` fixes every log-gamma at 0
    (the no-momentum control). ``nfe`` is the number of segments the student is trained for.
    """

    k: int = 8
    weight_groups: int = 1
    momentum: bool = True
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: Optional[Union[str, list[str]]] = None
    trainable: str = "lora+heads"
    log_gamma_bound: float = 6.0
    nfe: int = 2
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        if self.k < 1:
            raise ArcflowError(f"student k must be >= 1, got {self.k}")
        if self.weight_groups < 1:
            raise ArcflowError(f"weight_groups must be >= 1, got {self.weight_groups}")
        if self.trainable not in TRAINABLE_MODES:
            raise ArcflowError(f"trainable must be one of {', '.join(TRAINABLE_MODES)}, got {self.trainable!r}")
        if self.trainable == "lora+heads" and self.lora_rank < 1:
            raise ArcflowError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArcflowError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.nfe < 1:
            raise ArcflowError(f"NFE must be >= 1, got {self.nfe}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudentConfig":
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArcflowError(f"unknown student config keys: {', '.join(unknown)}")
        return cls(**dict(data))


class Student(nn.Module):
    """The few-step student. Calling it (or :meth:`predict`) gives one segment's momentum params."""

    def __init__(self, teacher: Any, transformer: nn.Module, config: StudentConfig) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = config
        # Plain attribute: the teacher supplies input formatting and metadata, it is not a submodule.
        self.teacher = teacher

    @property
    def head(self) -> MomentumHead:
        return getattr(self.transformer, HEAD_ATTRIBUTE)

    @property
    def has_lora(self) -> bool:
        return self.config.trainable == "lora+heads"

    def forward(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> MomentumParams:
        """Latent tokens ``x`` ``(B, N, C)`` at per-sample ``sigma`` ``(B,)`` -> params with
        velocities ``(B, K, C, N)``, logits ``(B, K, G, N)``, log-gammas ``(B, K-1, G, N)``."""
        out = self.transformer(**self.teacher.transformer_inputs(x, sigma, cond))
        packed = out[0] if isinstance(out, (tuple, list)) else out.sample
        return self.head.unpack(packed)

    def predict(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> MomentumParams:
        """Same as calling the module (kept for readability at call sites)."""
        return self(x, sigma, cond)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        cond: Mapping[str, Tensor],
        nfe: Optional[int] = None,
        sigmas: Optional[Tensor] = None,
    ) -> Tensor:
        """Few-step sample ``(B, N, C)`` from ``noise`` ``(B, N, C)``: one network call per segment.

        ``nfe`` defaults to the config's; segments are the teacher's ``sigmas(nfe)`` unless explicit
        boundaries ``sigmas`` are given. Leaves the train/eval mode alone.
        """

        def predict(x_cf: Tensor, sigma: Tensor, c: Mapping[str, Tensor]) -> MomentumParams:
            return self(x_cf.transpose(1, 2).contiguous(), sigma, c)

        if sigmas is None:
            sigmas = self.teacher.sigmas(nfe or self.config.nfe)
        out = sample_few_step(predict, noise.transpose(1, 2), cond, sigmas=sigmas)
        return out.transpose(1, 2).contiguous()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_share(self) -> float:
        """Trainable parameters / all transformer parameters (LoRA and head included)."""
        total = sum(p.numel() for p in self.transformer.parameters())
        return sum(p.numel() for p in self.trainable_parameters()) / max(total, 1)

    def describe_trainable(self) -> str:
        """One line: trainable count, total, share, and the LoRA / head split."""
        total = sum(p.numel() for p in self.transformer.parameters())
        lora = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and ".lora_" in n)
        head = sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        train = sum(p.numel() for p in self.trainable_parameters())
        return (
            f"student ({self.config.trainable}, K={self.config.k}): trainable {_count(train)} of "
            f"{_count(total)} transformer parameters ({100 * train / max(total, 1):.3f}%): "
            f"LoRA {_count(lora)}, head {_count(head)}, other {_count(train - lora - head)}"
        )


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def default_lora_targets(transformer: nn.Module) -> str:
    """The family's default LoRA target regex for ``transformer``'s class."""
    name = type(transformer).__name__
    if name not in DEFAULT_LORA_TARGETS:
        raise ArcflowError(f"no default LoRA targets for {name}; set lora_targets in the student config")
    return DEFAULT_LORA_TARGETS[name]


def lora_config_for(config: StudentConfig, transformer: nn.Module) -> LoraConfig:
    """The peft ``LoraConfig`` a student config implies for ``transformer``."""
    targets = config.lora_targets if config.lora_targets is not None else default_lora_targets(transformer)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        init_lora_weights=True,
    )


def build_student(teacher: Any, config: StudentConfig, inplace: bool = False) -> Student:
    """Student from ``teacher`` (a :class:`~arcflow.pipeline.teacher.Teacher`) and ``config``.

    The teacher's transformer is deep-copied (``inplace=True`` adapts it in place instead, saving
    memory when the teacher is no longer needed), frozen, given the momentum head and, for
    ``trainable="lora+heads"``, LoRA adapters. ``"heads"`` trains only the head, ``"full"`` every
    transformer weight plus the head.
    """
    transformer = teacher.transformer if inplace else copy.deepcopy(teacher.transformer)
    transformer.requires_grad_(False)
    proj = getattr(transformer, HEAD_ATTRIBUTE, None)
    if not isinstance(proj, nn.Linear):
        raise ArcflowError(
            f"{type(transformer).__name__} has no linear '{HEAD_ATTRIBUTE}' output projection to replace"
        )
    if proj.out_features % config.weight_groups:
        raise ArcflowError(
            f"weight_groups={config.weight_groups} does not divide the {proj.out_features} latent channels"
        )
    head = head_for(proj, config.k, config.weight_groups, config.momentum, config.log_gamma_bound)
    head.init_from_projection(proj, generator=torch.Generator().manual_seed(config.init_seed))
    setattr(transformer, HEAD_ATTRIBUTE, head)

    if config.trainable == "lora+heads":
        if not hasattr(transformer, "add_adapter"):
            raise ArcflowError(f"{type(transformer).__name__} does not support peft adapters (add_adapter)")
        try:
            transformer.add_adapter(lora_config_for(config, transformer), adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError and friends
            raise ArcflowError(f"LoRA targets {config.lora_targets!r} match no module of the transformer ({exc})") from None
        wrapped = [n for n, m in transformer.named_modules() if hasattr(m, "lora_A")]
        if not wrapped:
            raise ArcflowError(f"LoRA targets {config.lora_targets!r} match no module of the transformer")
        if any(n == HEAD_ATTRIBUTE or n.startswith(f"{HEAD_ATTRIBUTE}.") for n in wrapped):
            raise ArcflowError("LoRA targets must not match the output head (top-level proj_out)")
    elif config.trainable == "full":
        transformer.requires_grad_(True)
    # After add_adapter: peft marks only adapter weights trainable.
    head.requires_grad_(True)

    student = Student(teacher, transformer, config)
    logger.info(student.describe_trainable())
    return student


def transformer_class_name(transformer: nn.Module) -> str:
    """The diffusers class name, also under FSDP2 (which swaps in a subclass ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(transformer).__mro__ if not issubclass(c, FSDPModule)).__name__


def _lora_metadata(lora_config: LoraConfig) -> dict[str, Any]:
    data = lora_config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def _cpu_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_student(student: Student, out_dir: Union[str, os.PathLike], extra_config: Mapping[str, Any]) -> Path:
    """Write the run directory (see the module docstring); returns its path.

    ``extra_config`` (JSON-serializable: dataset fingerprint, training config, ...) is merged into
    ``arcflow_config.json``; it may repeat but not contradict the keys this function writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer, config, teacher = student.transformer, student.config, student.teacher
    files = {"head": HEAD_FILE}
    lora_names: set[str] = set()

    if student.has_lora:
        lora_config = transformer.peft_config[ADAPTER_NAME]
        lora_state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
        metadata = {f"{LORA_PREFIX}.{k}": v for k, v in _lora_metadata(lora_config).items()}
        safetensors.torch.save_file(
            _cpu_state({f"{LORA_PREFIX}.{k}": v for k, v in lora_state.items()}),
            str(out / LORA_FILE),
            metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)},
        )
        files["lora"] = LORA_FILE
        lora_names = {n for n, _ in transformer.named_parameters() if ".lora_" in n}

    safetensors.torch.save_file(_cpu_state(student.head.state_dict()), str(out / HEAD_FILE), metadata={"format": "pt"})

    head_prefix = f"{HEAD_ATTRIBUTE}."
    other = {
        n: p
        for n, p in transformer.named_parameters()
        if p.requires_grad and n not in lora_names and not n.startswith(head_prefix)
    }
    if other:
        safetensors.torch.save_file(_cpu_state(other), str(out / TRAINABLE_FILE), metadata={"format": "pt"})
        files["trainable"] = TRAINABLE_FILE

    record: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "student": config.to_dict(),
        "k": config.k,
        "nfe": config.nfe,
        "shift": float(teacher.shift),
        "teacher": {"id": teacher.teacher_id, "revision": teacher.revision},
        "transformer_class": transformer_class_name(transformer),
        "files": files,
    }
    clash = sorted(k for k in set(extra_config) & set(record) if extra_config[k] != record[k])
    if clash:
        raise ValueError(f"extra_config contradicts the student on {', '.join(clash)}")
    record.update(extra_config)
    save_scheduler(out, record, teacher)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    logger.info("saved student to %s", out)
    return out


def read_student_config(run_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed ``arcflow_config.json`` of a run directory (``ArcflowError`` if it is not one)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArcflowError(f"{run_dir} is not a student run directory (no {CONFIG_FILE})")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArcflowError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ArcflowError(f"{path} is damaged: a JSON object was expected, got {type(record).__name__}")
    if record.get("format") != CONFIG_FORMAT or record.get("format_version") != CONFIG_VERSION:
        raise ArcflowError(
            f"{path} is not an {CONFIG_FORMAT} v{CONFIG_VERSION} config "
            f"(format={record.get('format')!r}, version={record.get('format_version')!r})"
        )
    for key, kind in (("student", dict), ("files", dict), ("teacher", dict), ("teacher_options", dict)):
        if key in record and not isinstance(record[key], kind):
            raise ArcflowError(f"{path} is damaged: {key!r} must be a JSON object")
    return record


def run_file(run_dir: Union[str, os.PathLike], name: object) -> Path:
    """A file a run config names, resolved strictly INSIDE the run directory (links included):
    a crafted config cannot make arcflow read anything else."""
    root = Path(run_dir).resolve()
    if not isinstance(name, str) or not name:
        raise ArcflowError(f"{run_dir}/{CONFIG_FILE} is damaged: file names must be non-empty strings")
    path = (root / name).resolve()
    if path.parent != root and root not in path.parents:
        raise ArcflowError(f"{run_dir}/{CONFIG_FILE} names {name!r}, which is outside the run directory")
    if not path.is_file():
        raise ArcflowError(f"student run directory {run_dir} is missing {name}")
    return path


def load_student(teacher: Any, run_dir: Union[str, os.PathLike]) -> Student:
    """Rebuild a saved student on ``teacher`` (which must have the weights it was trained on).

    A run directory whose files do not fit its config (tampered, mixed from two runs, truncated)
    is refused with one ``ArcflowError`` line.
    """
    run = Path(run_dir)
    record = read_student_config(run)
    saved_revision = record.get("teacher", {}).get("revision")
    if saved_revision is not None and saved_revision != teacher.revision:
        raise ArcflowError(
            f"student in {run} was trained on teacher revision {saved_revision}, "
            f"but the loaded teacher is {teacher.revision}"
        )
    try:
        return _load_student(teacher, run, record)
    except ArcflowError:
        raise
    except Exception as exc:  # shapes, dtypes, keys or file bytes that do not fit the config
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ArcflowError(f"student run {run} is damaged or inconsistent with its {CONFIG_FILE}: {reason}") from None


def _load_student(teacher: Any, run: Path, record: dict[str, Any]) -> Student:
    config = StudentConfig.from_dict(record["student"])
    files = record.get("files", {})
    paths = {"head": run_file(run, files.get("head", HEAD_FILE))}
    if config.trainable == "lora+heads":
        paths["lora"] = run_file(run, files.get("lora", LORA_FILE))
    if "trainable" in files:
        paths["trainable"] = run_file(run, files["trainable"])
    student = build_student(teacher, config)
    transformer = student.transformer
    device = str(next(transformer.parameters()).device)

    if student.has_lora:
        prefix = f"{LORA_PREFIX}."
        lora_state = {k.removeprefix(prefix): v for k, v in safetensors.torch.load_file(str(paths["lora"]), device=device).items()}
        result = set_peft_model_state_dict(transformer, lora_state, adapter_name=ADAPTER_NAME)
        expected = {n for n, _ in transformer.named_parameters() if ".lora_" in n}
        missing = [k for k in getattr(result, "missing_keys", []) if k in expected]
        if result.unexpected_keys or missing:
            raise ArcflowError(
                f"LoRA weights in {run} do not fit the student: "
                f"{len(result.unexpected_keys)} unexpected, {len(missing)} missing keys"
            )
    student.head.load_state_dict(safetensors.torch.load_file(str(paths["head"]), device=device))
    if "trainable" in paths:
        result = transformer.load_state_dict(safetensors.torch.load_file(str(paths["trainable"]), device=device), strict=False)
        if result.unexpected_keys:
            raise ArcflowError(f"{files['trainable']} in {run} holds weights the transformer lacks")
    logger.info("loaded student from %s", run)
    return student
