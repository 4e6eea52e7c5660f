"""What a distill run will do, decided on the driver before anything is written.

:func:`plan_run` refuses, as one ``ArcflowError`` line, everything a user can get wrong, and returns
the :class:`RunPlan` the driver hands every Ray Train worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from arcflow.core.errors import ArcflowError

from .checkpoint import checkpoint_step, latest_checkpoint
from .config import DistillConfig
from .segments import segment_step_indices

DISTILL_CONFIG_FILE = "distill_config.json"
#: Key of ``distill_config.json`` holding the dataset fingerprint a run started on (checked on resume).
FINGERPRINT_KEY = "dataset_fingerprint"


@dataclass(frozen=True)
class RunPlan:
    """A checked run: the dataset facts the workers need and where training starts."""

    teacher_id: str
    #: diffusers teachers: resolution, dtype and guidance the data was recorded with ({} for digits).
    teacher_options: dict[str, Any]
    #: Indices of the recorded steps where the student's segments begin and end.
    segment_bounds: list[int]
    #: The recorded sigmas at ``segment_bounds``: the student's sampling schedule.
    segment_sigmas: list[float]
    dataset_fingerprint: str
    resume_step: int = 0
    #: The newest checkpoint (workers prefer Ray Train's own record; this serves a run Ray never saw).
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
    that do not divide the latent channels, an NFE whose segment ends do not fall on recorded
    steps, and an ``--out`` holding another run (without ``--resume``) or a different run (with it:
    other settings or other data; a run directory may be moved or copied and resumed there).
    Everything a training worker would reject is refused here, before anything is written.
    """
    from arcflow.storage import _io

    config.validate()
    if config.on_policy:
        from .on_policy import plan_source

        source = plan_source(config)
        facts: dict[str, Any] = dict(
            teacher_id=source.teacher_id, teacher_options=source.teacher_options,
            segment_bounds=list(range(config.student.nfe + 1)), segment_sigmas=[],
            dataset_fingerprint=source.fingerprint, guidance=source.guidance, teacher_evals=source.teacher_evals_before)
    else:
        facts = _dataset_facts(config)
    fingerprint = facts["dataset_fingerprint"]
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ArcflowError(f"--out {out} exists and is not a directory")
    _io.Location(str(out)).check_writable()
    saved = out / DISTILL_CONFIG_FILE
    resume_step, checkpoint = 0, None
    if saved.is_file():
        previous, previous_fingerprint = _read_saved_config(saved)
        if not config.resume:
            raise ArcflowError(f"{out} already holds a distill run; pass --resume to continue it or choose another --out")
        changed = config.differences(previous)
        if changed:
            raise ArcflowError(f"cannot resume {out}: these settings differ from the saved run: {', '.join(changed)}")
        if previous_fingerprint not in (None, fingerprint):
            raise ArcflowError(f"cannot resume {out}: the dataset's committed data differs from the data the run started on")
        checkpoint = latest_checkpoint(out)
        resume_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    elif out.exists() and any(out.iterdir()):
        raise ArcflowError(f"--out {out} exists and is not an arcflow distill run; choose an empty or new directory")
    return RunPlan(**facts, resume_step=resume_step, resume_checkpoint=str(checkpoint) if resume_step else None)


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
    channels = int(reader.spec.latent_shape[-1])
    if channels % config.student.weight_groups:
        raise ArcflowError(f"--weight-groups {config.student.weight_groups} does not divide the {channels} latent channels")
    check_teacher_id(reader.spec.teacher_id)
    try:
        bounds = segment_step_indices(int(reader.spec.steps), config.student.nfe)
    except ValueError as exc:
        raise ArcflowError(f"--nfe {config.student.nfe} is not representable on this dataset: {exc}") from None
    spec = reader.spec
    per_velocity = velocity_evaluations(bool((spec.extra or {}).get("true_cfg", True)), float(spec.guidance),
                                        cfg_below_one=not is_diffusers_teacher(spec.teacher_id))
    return dict(
        teacher_id=spec.teacher_id,
        teacher_options=teacher_options_for_dataset(spec),
        segment_bounds=bounds,
        segment_sigmas=[float(spec.sigmas[i]) for i in bounds],
        dataset_fingerprint=reader.fingerprint(),
        guidance=float(spec.guidance),
        # what the data cost: every selected trajectory is `steps` guided velocities
        teacher_evals=sum(sizes[s] for s in selected) * int(spec.steps) * per_velocity,
    )


def _read_saved_config(path: Path) -> tuple[DistillConfig, Optional[str]]:
    """A run's saved config and the dataset fingerprint it started on; one line if it is damaged."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object was expected, got {type(data).__name__}")
        return DistillConfig.from_dict(data), data.get(FINGERPRINT_KEY)
    except (ValueError, TypeError) as exc:
        raise ArcflowError(f"{path} is damaged ({exc}); resume is impossible, start a new --out") from None
