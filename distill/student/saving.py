"""A student on disk: the run directory's files, written and read back through ONE path.

* ``pytorch_lora_weights.safetensors``: the LoRA, written and read by diffusers' own
  ``save_lora_adapter`` / ``load_lora_adapter`` (its ``LoraConfig``, rank/alpha/targets included,
  rides in the safetensors metadata);
* ``momentum_head.safetensors``: the head;
* ``trainable_weights.safetensors``: other trained transformer weights (``trainable="full"`` only);
* ``scheduler_config.json``: the :class:`~arcflow.distill.arcflow_scheduler.ArcFlowScheduler` that samples it
  (diffusers' own ``save_config``; :func:`load_scheduler` reads it back);
* ``arcflow_config.json``: student config, teacher id/revision, shift, NFE and the trainer's extras.
  Written last: a directory without it is not a student.

:func:`attach_student` puts a saved run onto a transformer in place (what a stock diffusers pipeline
needs); :func:`load_student` does it on a copy of a teacher's. :func:`merge_lora` fuses the LoRA into
the base weights (diffusers' ``fuse_lora``) so a student call costs one teacher call plus the head.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Union

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
from torch import Tensor, nn

from arcflow.core.errors import ArcflowError, first_line, json_object, quote
from arcflow.core.files import canonical_safetensors, save_safetensors

from ..arcflow_scheduler import ArcFlowScheduler
from .config import ADAPTER_NAME, StudentConfig
from .head import MomentumHead, head_for
from .model import Student, get_head, head_spec, set_head, transformer_class_name

logger = logging.getLogger(__name__)

#: diffusers' ``LORA_WEIGHT_NAME_SAFE`` (diffusers.loaders.lora_base).
LORA_FILE = "pytorch_lora_weights.safetensors"
HEAD_FILE = "momentum_head.safetensors"
TRAINABLE_FILE = "trainable_weights.safetensors"
STUDENT_CONFIG_FILE = "arcflow_config.json"
CONFIG_FORMAT = "arcflow-student"
CONFIG_VERSION = 1
#: ``LoraConfig`` fields peft keeps as sets (diffusers writes them as lists in the set's order).
SET_VALUED_LORA_FIELDS = ("target_modules", "exclude_modules")
#: Key prefix of LoRA files written by earlier arcflow versions (the diffusers pipeline format).
LEGACY_LORA_PREFIX = "transformer"


def _cpu_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_student(student: Student, out_dir: Union[str, os.PathLike], extra_config: Mapping[str, Any]) -> Path:
    """Write the run directory (see the module docstring); returns its path.

    ``extra_config`` (JSON-serializable: dataset fingerprint, training config, ...) is merged into
    ``arcflow_config.json``; it may repeat but not contradict the keys this function writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export-tmp"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        record = _write_student(student, tmp, extra_config)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = _as_os_error(exc, tmp)
        if converted is exc:
            raise
        raise converted from exc
    # Each file replaces its name (a link there is replaced, never followed); the record goes last.
    for name in [*sorted(set(record["files"].values())), SCHEDULER_CONFIG_NAME, STUDENT_CONFIG_FILE]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    logger.info("saved student to %s", out)
    return out


def _as_os_error(exc: Exception, where: Path) -> Exception:
    """safetensors' Rust I/O errors (``IoError(Os { code: 28, ...})``, a full disk) as the OSError
    they are, naming ``where``; anything else unchanged."""
    match = re.search(r"Os \{ code: (\d+)", str(exc))
    if match is None:
        return exc
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(where))


def _write_student(student: Student, out: Path, extra_config: Mapping[str, Any]) -> dict[str, Any]:
    """Write every file of the run directory into ``out``; returns the record written."""
    transformer, config, teacher = student.transformer, student.config, student.teacher
    files = {"head": HEAD_FILE}
    if student.has_lora:
        transformer.save_lora_adapter(str(out), adapter_name=ADAPTER_NAME, weight_name=LORA_FILE)
        _canonical_lora_file(out / LORA_FILE)
        files["lora"] = LORA_FILE
    save_safetensors(_cpu_state(student.head.state_dict()), out / HEAD_FILE, metadata={"format": "pt"})
    head_prefix = f"{head_spec(transformer).path}."
    other = {
        n: p
        for n, p in transformer.named_parameters()
        if p.requires_grad and ".lora_" not in n and not n.startswith(head_prefix)
    }
    if other:
        save_safetensors(_cpu_state(other), out / TRAINABLE_FILE, metadata={"format": "pt"})
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
    _scheduler_for_record(record, teacher).save_config(str(out))
    (out / STUDENT_CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _canonical_lora_file(path: Path) -> None:
    """Rewrite diffusers' LoRA file byte-identical for the same weights: its metadata keys sorted
    (:func:`canonical_safetensors`), and the ``LoraConfig`` fields peft keeps as sets, which
    diffusers writes as lists in the set's (hash-seeded) order, sorted."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    metadata = dict(json.loads(data[8:8 + size]).get("__metadata__") or {})
    if LORA_ADAPTER_METADATA_KEY in metadata:
        config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
        for key in SET_VALUED_LORA_FIELDS:
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    path.write_bytes(canonical_safetensors(data, metadata))


def _scheduler_for_record(record: Mapping[str, Any], teacher: Any) -> ArcFlowScheduler:
    """The scheduler of a run from its ``arcflow_config.json`` record.

    Segments: the sigmas recorded at the segment boundaries during training when they fit the
    run's NFE, else the teacher's own ``sigmas(nfe)``. This is the one place that choice is made.
    """
    student = record["student"]
    nfe = int(record.get("nfe", student["nfe"]))
    recorded = record.get("segment_sigmas")
    sigmas = list(recorded) if recorded is not None and len(recorded) == nfe + 1 else teacher.sigmas(nfe).tolist()
    family = getattr(teacher, "family", None)
    return ArcFlowScheduler(
        k=int(student["k"]),
        weight_groups=int(student["weight_groups"]),
        channels=int(teacher.latent_shape[-1]),
        momentum=bool(student["momentum"]),
        segment_sigmas=sigmas,
        latent_layout=str(getattr(family, "latent_layout", "tokens")),
        output_sign=int(getattr(family, "output_sign", 1)),
    )


def load_scheduler(run_dir: Union[str, os.PathLike], record: Mapping[str, Any], teacher: Any) -> ArcFlowScheduler:
    """The run's scheduler from ``scheduler_config.json``, checked against the student it samples.

    A run saved before schedulers were exported has no such file: its record gives the same one.
    Values the scheduler refuses (its ``ValueError``) are one ``ArcflowError`` line naming the file.
    """
    try:
        expected = _scheduler_for_record(record, teacher)
    except ValueError as exc:
        raise ArcflowError(f"{run_dir}/{STUDENT_CONFIG_FILE} is damaged: {first_line(exc)}") from None
    if not (Path(run_dir) / SCHEDULER_CONFIG_NAME).is_file():
        logger.info("%s has no %s; using its %s", run_dir, SCHEDULER_CONFIG_NAME, STUDENT_CONFIG_FILE)
        return expected
    try:
        scheduler = ArcFlowScheduler.from_pretrained(str(run_dir))
    except (ValueError, TypeError, OSError) as exc:
        raise ArcflowError(f"{run_dir}/{SCHEDULER_CONFIG_NAME} is damaged: {first_line(exc)}") from None
    shape = ("k", "weight_groups", "channels", "momentum", "latent_layout", "output_sign")
    differ = [key for key in shape if scheduler.config[key] != expected.config[key]]
    if differ:
        raise ArcflowError(f"{run_dir}/{SCHEDULER_CONFIG_NAME} does not fit the run's student ({', '.join(differ)} differ)")
    if not _same_sigmas(scheduler.config["segment_sigmas"], expected.config["segment_sigmas"]):
        raise ArcflowError(
            f"{run_dir}/{SCHEDULER_CONFIG_NAME} is damaged: its segment_sigmas differ from the ones the run "
            f"recorded in {STUDENT_CONFIG_FILE}"
        )
    return scheduler


def _same_sigmas(mine: Any, recorded: Any) -> bool:
    """Two sigma schedules agree (to float32 rounding: the teacher's own schedule is float32)."""
    return len(mine) == len(recorded) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(mine, recorded))


def read_student_config(run_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed ``arcflow_config.json`` of a run directory (``ArcflowError`` if it is not one)."""
    path = Path(run_dir) / STUDENT_CONFIG_FILE
    if not path.is_file():
        raise ArcflowError(f"{run_dir} is not a student run directory (no {STUDENT_CONFIG_FILE})")
    record = json_object(path.read_bytes(), path)
    if record.get("format") != CONFIG_FORMAT or record.get("format_version") != CONFIG_VERSION:
        raise ArcflowError(
            f"{path} is not an {CONFIG_FORMAT} v{CONFIG_VERSION} config "
            f"(format={record.get('format')!r}, version={record.get('format_version')!r})"
        )
    for key, kind in (("student", dict), ("files", dict), ("teacher", dict), ("teacher_options", dict)):
        if key in record and not isinstance(record[key], kind):
            raise ArcflowError(f"{path} is damaged: {key!r} must be a JSON object")
    return record


def check_teacher_revision(run_dir: Union[str, os.PathLike], record: Mapping[str, Any]) -> None:
    """Refuse, BEFORE it is loaded, a teacher whose revision differs from the one the run recorded
    (its ``arcflow_config.json`` names another directory, or the weights changed): one line."""
    from arcflow.pipeline.registry import local_revision

    teacher = record.get("teacher") or {}
    saved, teacher_id = teacher.get("revision"), teacher.get("id")
    if saved is None or not isinstance(teacher_id, str):
        return
    options = record.get("teacher_options") or {}
    current = local_revision(teacher_id, options.get("weights_dir"))
    if current is not None and current != saved:
        raise ArcflowError(
            f"{run_dir}/{STUDENT_CONFIG_FILE} names teacher {quote(teacher_id)}, which is revision {current}, "
            f"but the run was trained on revision {quote(saved)}; the teacher was not loaded"
        )


def run_file(run_dir: Union[str, os.PathLike], name: object) -> Path:
    """A file a run config names, resolved strictly INSIDE the run directory (links included):
    a crafted config cannot make arcflow read anything else."""
    root = Path(run_dir).resolve()
    if not isinstance(name, str) or not name:
        raise ArcflowError(f"{run_dir}/{STUDENT_CONFIG_FILE} is damaged: file names must be non-empty strings")
    path = (root / name).resolve()
    if path.parent != root and root not in path.parents:
        raise ArcflowError(f"{run_dir}/{STUDENT_CONFIG_FILE} names {name!r}, which is outside the run directory")
    if not path.is_file():
        raise ArcflowError(f"student run directory {run_dir} is missing {name}")
    return path


def attach_student(transformer: nn.Module, run_dir: Union[str, os.PathLike], config: StudentConfig,
                   adapter_name: str = ADAPTER_NAME) -> MomentumHead:
    """Put a saved run onto ``transformer`` IN PLACE: its LoRA (as adapter ``adapter_name``), its
    trained weights, and its momentum head in place of the output projection (``proj_out``, or the
    family's :func:`~arcflow.distill.student.config.head_spec` path); returns the replaced output
    projection (a pipeline can put it back). The transformer is left in eval mode (sampling: no LoRA
    dropout, whose modules peft creates in training mode). ``ArcflowError`` for a run that does not fit."""
    run = Path(run_dir)
    record = read_student_config(run)
    files = record.get("files", {})
    head_path = run_file(run, files.get("head", HEAD_FILE))
    spec = head_spec(transformer)
    proj = get_head(transformer, spec.path)
    if isinstance(proj, MomentumHead):
        raise ArcflowError("the transformer already carries an arcflow head")
    if not isinstance(proj, nn.Linear):
        raise ArcflowError(f"{type(transformer).__name__} has no linear '{spec.path}' output projection")
    try:
        if config.trainable == "lora+heads":
            _load_lora(transformer, run_file(run, files.get("lora", LORA_FILE)), adapter_name)
        if "trainable" in files:
            weights = load_weights(run_file(run, files["trainable"]))
            result = transformer.load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise ArcflowError(f"{files['trainable']} in {run} holds weights the transformer lacks")
        head = head_for(proj, config.k, config.weight_groups, config.momentum, config.log_gamma_bound, spec.positions)
        head.load_state_dict(load_weights(head_path))
    except ArcflowError:
        raise
    except Exception as exc:  # shapes, dtypes, keys or file bytes that do not fit the config
        reason = first_line(exc)
        raise ArcflowError(f"student run {run} is damaged or inconsistent with its {STUDENT_CONFIG_FILE}: {reason}") from None
    # The head stays float32 (its forward casts the hidden state), as in training.
    set_head(transformer, spec, head.to(next(transformer.parameters()).device).requires_grad_(False))
    transformer.eval()
    return proj


def run_weights(run_dir: Union[str, os.PathLike], record: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """A run's weight files by role (``head``, and ``lora`` / ``trainable`` where it has them), each
    read through :func:`load_weights`: a damaged run is refused before anything starts from it."""
    files = record.get("files", {})
    names = {"head": files.get("head", HEAD_FILE), **{role: files[role] for role in ("lora", "trainable") if role in files}}
    return {role: load_weights(run_file(run_dir, name)) for role, name in names.items()}


def load_weights(path: Path) -> dict[str, Tensor]:
    """A run's weights file (the ONE way arcflow reads one), refused as one line naming it where a
    weight is NaN or infinite or the file does not read as safetensors."""
    try:
        weights = safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as exc:  # truncated, garbage, a header that lies
        raise ArcflowError(f"{path} is damaged: {first_line(exc)}") from None
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArcflowError(f"{path} holds a weight that is not finite ({name[:100]}): the run diverged or the file is damaged")
    return weights


def _load_lora(transformer: nn.Module, path: Path, adapter_name: str) -> None:
    """diffusers' ``load_lora_adapter`` from the run's file (older runs' prefixed keys too)."""
    weights = load_weights(path)
    legacy = any(k.startswith(f"{LEGACY_LORA_PREFIX}.") for k in weights)
    transformer.load_lora_adapter(
        str(path.parent), weight_name=path.name, adapter_name=adapter_name,
        prefix=LEGACY_LORA_PREFIX if legacy else None,
    )
    if not any(hasattr(m, "lora_A") and adapter_name in getattr(m, "lora_A", {}) for m in transformer.modules()):
        raise ArcflowError(f"{path} holds no LoRA weights for this transformer")


def load_student(teacher: Any, run_dir: Union[str, os.PathLike]) -> Student:
    """Rebuild a saved student on a copy of ``teacher``'s transformer (which must have the weights it
    was trained on), in eval mode. A run directory whose files do not fit its config (tampered,
    mixed from two runs, truncated) is refused with one ``ArcflowError`` line."""
    run = Path(run_dir)
    record = read_student_config(run)
    saved_revision = record.get("teacher", {}).get("revision")
    if saved_revision is not None and saved_revision != teacher.revision:
        raise ArcflowError(
            f"student in {run} was trained on teacher revision {saved_revision}, "
            f"but the loaded teacher is {teacher.revision}"
        )
    try:
        config = StudentConfig.from_dict(record["student"])
    except ArcflowError:
        raise
    except Exception as exc:  # a field of the wrong type
        raise ArcflowError(f"student run {run} has a damaged student config: {exc}") from None
    transformer = copy.deepcopy(teacher.transformer).requires_grad_(False)
    attach_student(transformer, run, config)
    logger.info("loaded student from %s", run)
    return Student(teacher, transformer, config).eval()


def merge_lora(student: Student) -> None:
    """Fuse the student's LoRA into the base weights (diffusers' ``fuse_lora``): sampling then costs
    exactly one teacher call plus the head per segment."""
    if student.has_lora:
        student.transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
