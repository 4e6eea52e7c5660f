"""What a distill run will do, decided on the driver before anything is written.

:func:`plan_run` refuses, as one ``ArcflowError`` line, everything a user can get wrong, and returns
the :class:`RunPlan` the driver hands every Ray Train worker.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from arcflow.core.errors import ArcflowError

from .checkpoint import Found, find_checkpoint
from .config import DistillConfig
from .segments import segment_sigmas

DISTILL_CONFIG_FILE = "distill_config.json"
#: Key of ``distill_config.json`` holding the dataset fingerprint a run started on (checked on resume).
FINGERPRINT_KEY = "dataset_fingerprint"
#: The exported student's record (``student.saving.STUDENT_CONFIG_FILE``, not imported: that loads diffusers).
STUDENT_RECORD = "arcflow_config.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """A checked run: the dataset facts the workers need and where training starts."""

    teacher_id: str
    #: diffusers teachers: resolution, dtype and guidance the data was recorded with ({} for digits).
    teacher_options: dict[str, Any]
    #: Where the student's segments begin and end (:func:`~arcflow.distill.segments.segment_sigmas`):
    #: the sigmas its items are cut at, and its sampling schedule.
    segment_sigmas: list[float]
    dataset_fingerprint: str
    #: Where training continues: the newest intact checkpoint (0 and None: the run starts afresh).
    resume_step: int = 0
    resume_checkpoint: Optional[str] = None
    #: The driver process Ray workers watch (:func:`~arcflow.core.driver_watch.driver_identity`).
    driver: Optional[dict[str, object]] = None
    #: The teacher's guidance: the dataset's, or the on-policy run's (None: the teacher's default).
    guidance: Optional[float] = None
    #: Teacher network evaluations spent before training: the dataset's (samples x steps x 2 with
    #: true CFG), or for an on-policy polish the run it continues; on-policy runs add their own.
    teacher_evals: int = 0


def plan_run(config: DistillConfig) -> RunPlan:
    """Validate the config, the dataset and the output directory, and plan the run.

    An on-policy run has no dataset: :func:`~arcflow.distill.on_policy.plan_source` checks its
    teacher, prompts and the run it continues instead.

    Raises ``ArcflowError`` (one line) for: bad values, a missing dataset, a dataset with no
    committed shards or a damaged index part, more Ray Train workers than shards, weight groups
    that do not divide the latent channels, an NFE whose segment ends fall between recorded steps
    of a schedule without a static shift, and an ``--out`` holding another run (without ``--resume``) or a different run (with it:
    other settings or other data; a run directory may be moved or copied and resumed there).
    Everything a training worker would reject is refused here, before anything is written.
    """
    from arcflow.storage import _io

    config.validate()
    if config.on_policy:
        from .on_policy import plan_source

        source = plan_source(config)
        facts: dict[str, Any] = dict(
            teacher_id=source.teacher_id, teacher_options=source.teacher_options, segment_sigmas=[],
            dataset_fingerprint=source.fingerprint, guidance=source.guidance, teacher_evals=source.teacher_evals_before)
    else:
        facts = _dataset_facts(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ArcflowError(f"--out {out} exists and is not a directory")
    _io.Location(str(out)).check_writable()
    found = find_resume(config, facts["dataset_fingerprint"])
    return RunPlan(**facts, resume_step=found.step,
                   resume_checkpoint=str(found.path) if found.path is not None else None)


def _dataset_facts(config: DistillConfig) -> dict[str, Any]:
    """An offline run's dataset checks and what the workers need from the dataset."""
    from arcflow.pipeline.registry import check_teacher_id, is_diffusers_teacher, teacher_options_for_dataset
    from arcflow.pipeline.teacher import velocity_evaluations
    from arcflow.storage.reader import open_dataset

    reader = open_dataset(config.dataset)
    selected = reader.require_committed_shards(config.shards)
    if not selected:  # an empty selection
        raise ArcflowError(f"dataset {config.dataset}: shards [] are not committed")
    sizes = reader.shard_sizes(selected)  # one line naming a damaged index part
    if config.num_workers > len(selected):
        raise ArcflowError(
            f"--num-workers {config.num_workers} needs at least {config.num_workers} committed shards "
            f"(each worker streams its own); the dataset has {len(selected)}"
        )
    _check_batch_size(config, sum(sizes.values()))
    spec = reader.spec
    channels = int(spec.latent_shape[-1])
    if channels % config.student.weight_groups:
        raise ArcflowError(f"--weight-groups {config.student.weight_groups} does not divide the {channels} latent channels")
    check_teacher_id(spec.teacher_id)
    try:
        sigmas = segment_sigmas(spec.sigmas, float(spec.shift), config.student.nfe)
    except ValueError as exc:
        raise ArcflowError(f"--nfe {config.student.nfe} is not representable on this dataset: {exc}") from None
    per_velocity = velocity_evaluations(bool((spec.extra or {}).get("true_cfg", True)), float(spec.guidance),
                                        cfg_below_one=not is_diffusers_teacher(spec.teacher_id))
    return dict(
        teacher_id=spec.teacher_id,
        teacher_options=teacher_options_for_dataset(spec),
        segment_sigmas=sigmas,
        dataset_fingerprint=reader.fingerprint(),
        guidance=float(spec.guidance),
        # what the data cost: every selected trajectory is `steps` guided velocities
        teacher_evals=sum(sizes[s] for s in selected) * int(spec.steps) * per_velocity,
    )


def _check_batch_size(config: DistillConfig, samples: int) -> None:
    """Refuse a batch larger than one pass over the data gives a worker: each step would read the
    whole dataset several times over (minutes without a step) to repeat the same pairs."""
    per_worker = samples * config.student.nfe // config.num_workers
    if config.batch_size > per_worker:
        workers = f", split over {config.num_workers} workers" if config.num_workers > 1 else ""
        raise ArcflowError(
            f"--batch-size {config.batch_size} exceeds the {per_worker} (sample, segment) pairs one pass over the "
            f"dataset gives each worker ({samples} committed samples x {config.student.nfe} segments{workers}); "
            f"lower --batch-size to at most {per_worker}"
        )


def find_resume(config: DistillConfig, fingerprint: str) -> Found:
    """Where the run in ``config.out`` continues: its newest intact checkpoint, or none (a new run).

    A directory whose job ended before its first intact checkpoint (and exported nothing) has not
    started: the corrected command, with or without ``--resume`` and whatever its settings, starts
    it afresh. A started run is continued only with ``--resume``, the same settings and the same data.
    """
    out = Path(config.out)
    saved = out / DISTILL_CONFIG_FILE
    if not os.path.lexists(saved):
        if out.exists() and any(out.iterdir()):
            raise ArcflowError(f"--out {out} exists and is not an arcflow distill run; choose an empty or new directory")
        return Found(None, 0, [])
    found = find_checkpoint(out)
    exported = os.path.lexists(out / STUDENT_RECORD)
    if found.path is None and not exported:
        log.info("%s holds no intact checkpoint (its job ended before the first one): starting it afresh", out)
        return found
    if not config.resume:
        raise ArcflowError(f"{out} already holds a distill run; pass --resume to continue it or choose another --out")
    previous, previous_fingerprint = _read_saved_config(saved)
    changed = config.differences(previous)
    if changed:
        raise ArcflowError(f"cannot resume {out}: these settings differ from the saved run: {', '.join(changed)}")
    if previous_fingerprint not in (None, fingerprint):
        raise ArcflowError(f"cannot resume {out}: the dataset's committed data differs from the data the run started on")
    if found.path is None:
        raise ArcflowError(f"{out} holds an exported student but no intact checkpoint to continue from; choose another --out")
    return found


def _read_saved_config(path: Path) -> tuple[DistillConfig, Optional[str]]:
    """A run's saved config and the dataset fingerprint it started on; one line if it is damaged."""
    if path.is_symlink():
        raise ArcflowError(f"{path} is a link; a run's files must be inside it, start a new --out")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object was expected, got {type(data).__name__}")
        return DistillConfig.from_dict(data), data.get(FINGERPRINT_KEY)
    except (ValueError, TypeError) as exc:
        raise ArcflowError(f"{path} is damaged ({exc}); resume is impossible, start a new --out") from None
