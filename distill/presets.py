"""Named starting points for a distill run: ``--preset official`` is the ArcFlow paper's own recipe.

A preset is a set of ``DistillConfig`` settings (student fields flat beside the trainer's); what a
user sets explicitly wins over it, and what neither sets keeps the dataclasses' defaults. The CLI and
the Python API go through the same :func:`build_config`, so the same flags give the same run.

``official`` has one version per teacher family, read from the official code (``pnotp/ArcFlow``:
``configs/flux/arcflux_2nfe_k16.py``, ``configs/qwen/arcqwen_2nfe_k16.py``,
``configs/{flux,qwen}/_ddp_train.py``, ``lakonlab/models/architecture/arcflow/arcflux.py``); the
digits version scales it to the embedded 8x8 teacher. The README's table lists every value beside
the official one and its source, and the deliberate differences.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from arcflow.core.errors import ArcflowError, clip, quote

#: Shared by every family's official recipe.
_OFFICIAL_COMMON: dict[str, Any] = {
    "k": 16,
    "weight_groups": 4,
    "momentum": True,
    "lora_dropout": 0.05,
    "train_modules": ["norm_out"],
    "nfe": 2,
    "adam_beta2": 0.95,
    "weight_decay": 0.0,
    "log_gamma_lr_mult": 0.1,
    "warmup": 100,
    "warmup_start": 0.001,  # mmcv's linear warm-up, warmup_ratio=0.001
    "grad_clip": 50.0,
    "grad_clip_from": 100,
    # DiffusionMSELoss: 0.5 x MSE, rescaled x30 (rescale_cfg), per segment x its raw length
    "loss_scale": 15.0,
    "head_init": "official",
    "lora_init": "gaussian",
    "log_gamma_bound": 0.0,  # the official log-gammas are unbounded
    "plain_cfg": True,
    "ema_schedule": "karras",
    "ema_gamma": 7.0,
    "ema_start": 100,
    "intermediate_states": 4,
    "window_substeps": 3,
    "total_substeps": 128,
    "mixture_dropout": 0.1,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "official": {
        "flux": {**_OFFICIAL_COMMON, "lora_rank": 256, "lora_alpha": 256.0, "lr": 1e-4, "batch_size": 4,
                 "iters": 10_000, "teacher_mix_iters": 2000, "guidance": 3.5},
        "qwen-image": {**_OFFICIAL_COMMON, "lora_rank": 256, "lora_alpha": 256.0, "lr": 1e-4, "batch_size": 4,
                       "iters": 15_000, "teacher_mix_iters": 1000, "guidance": 4.0},
        # digits: the paper's adapter budget (rank 4 trains ~4.5% of the digits transformer), 4 weight
        # groups = one mixture weight per pixel as in FLUX's 2x2 patches, and the schedule scaled to a
        # 1,000-step CPU run (teacher mixing over the same first 20%, warm-up, clip and EMA start at 1%),
        # with a 10x larger learning rate for the 10x shorter run.
        "digits": {**_OFFICIAL_COMMON, "lora_rank": 4, "lora_alpha": 4.0, "lr": 1e-3, "batch_size": 32,
                   "iters": 1000, "teacher_mix_iters": 200, "warmup": 10, "ema_start": 10, "grad_clip_from": 10},
    },
}


def teacher_family(teacher_id: str) -> str:
    """``digits`` or a pipeline family's name (``flux``, ``qwen-image``, ...) for a teacher id (a
    local pipeline's class decides; a hub id by its name)."""
    import os

    if teacher_id == "digits":
        return "digits"
    if os.path.isdir(teacher_id):
        from arcflow.pipeline.diffusers_teachers import pipeline_class_name
        from arcflow.pipeline.families import family_for

        return family_for(pipeline_class_name(teacher_id)).name
    name = teacher_id.lower()
    for key, family in (("qwen", "qwen-image"), ("flux", "flux")):
        if key in name:
            return family
    raise ArcflowError(f"--preset: cannot tell the family of teacher {quote(teacher_id)}; name one: "
                       f"--preset official-flux or official-qwen-image")


def preset_settings(preset: str, teacher_id: Optional[str]) -> dict[str, Any]:
    """The settings of ``preset`` (``official``, or ``official-<family>`` to name the family)."""
    if preset not in preset_names():  # exact names only: "official-" is not "official"
        raise ArcflowError(f"--preset must be one of {', '.join(preset_names())}, got {quote(preset)}")
    name, _, family = preset.partition("-")
    if not family:
        if teacher_id is None:
            raise ArcflowError(f"--preset {preset}: no teacher to take the family from; name it (e.g. {name}-flux)")
        family = teacher_family(teacher_id)
        if family not in PRESETS[name]:
            raise ArcflowError(f"--preset {preset} has no recipe for the {family} family; name one: "
                               f"{', '.join(p for p in preset_names() if p.startswith(f'{name}-'))}")
    return dict(PRESETS[name][family])


def preset_names() -> list[str]:
    return [p for name, families in PRESETS.items() for p in (name, *(f"{name}-{f}" for f in families))]


def run_teacher_id(settings: Mapping[str, Any]) -> Optional[str]:
    """The teacher a run's settings name: ``teacher``, ``from_run``'s record, or the dataset's."""
    if settings.get("teacher"):
        return str(settings["teacher"])
    if settings.get("from_run"):
        from arcflow.distill.student import read_student_config

        return str(read_student_config(settings["from_run"]).get("teacher", {}).get("id"))
    if settings.get("dataset"):
        from arcflow.storage.reader import open_dataset

        return open_dataset(str(settings["dataset"])).spec.teacher_id
    return None


def _flags(names: Iterable[str], settings: Mapping[str, Any] = {}) -> str:
    """The flags of ``names`` (the CLI's teacher options by their own flags)."""
    from arcflow.pipeline.registry import option_flags

    return ", ".join(option_flags(settings.get("teacher_options") or {}) if n == "teacher_options"
                     else "--" + n.replace("_", "-") for n in names)


def check_applicable(settings: Mapping[str, Any]) -> None:
    """A setting given explicitly that cannot apply to the run is refused in one line: on-policy
    settings on an offline run and dataset settings on an on-policy one, LoRA settings when no LoRA
    trains, and student settings a polish (``from_run``) takes from its run that differ from it."""
    from arcflow.distill.config import OFFLINE_FIELDS, ON_POLICY_FIELDS

    on_policy = bool(settings.get("on_policy"))
    misplaced = [n for n in ON_POLICY_FIELDS if n in settings and settings[n] is not None] if not on_policy else []
    if misplaced:
        raise ArcflowError(f"{_flags(misplaced, settings)} only apply with --on-policy (an offline run's dataset fixes them)")
    misplaced = [n for n in OFFLINE_FIELDS if n in settings and n != "dataset"] if on_policy else []
    if misplaced:
        raise ArcflowError(f"{_flags(misplaced)} do not apply with --on-policy (it reads no dataset)")
    trainable = settings.get("trainable")
    lora = [n for n in LORA_FIELDS if n in settings]
    if trainable not in (None, "lora+heads") and lora:
        raise ArcflowError(f"{_flags(lora)} apply to the LoRA; --trainable {trainable} trains none")
    if on_policy and settings.get("from_run"):
        _check_polish_student(settings)


#: Student settings that only shape the LoRA.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _check_polish_student(settings: Mapping[str, Any]) -> None:
    """A polish keeps its run's student: a student setting given that differs from it is refused
    (the NFE is compared by :func:`~arcflow.distill.on_policy.plan_source`)."""
    from dataclasses import fields

    from arcflow.distill.student import read_student_config
    from arcflow.distill.student.config import StudentConfig

    names = {f.name for f in fields(StudentConfig)} - {"nfe", "init_seed"}
    given = {k: v for k, v in settings.items() if k in names}
    if not given:
        return
    run = str(settings["from_run"])
    saved = StudentConfig.from_dict(read_student_config(run).get("student") or {})
    wanted = StudentConfig.from_dict({**saved.to_dict(), **given})
    differ = [n for n in given if getattr(wanted, n) != getattr(saved, n)]
    if differ:
        theirs = ", ".join(f"{n}={getattr(saved, n)}" for n in differ)
        raise ArcflowError(f"{_flags(differ)} cannot apply with --from {clip(run)}: a polish keeps the run's student "
                           f"({theirs}); drop the flag or distill a new run")


def build_config(settings: Mapping[str, Any], preset: Optional[str] = None):
    """The ``DistillConfig`` of explicit ``settings`` (flat: student fields beside the trainer's) over
    ``preset``'s values over the defaults. The CLI passes only the flags a user gave; one that
    cannot apply is refused (:func:`check_applicable`)."""
    from arcflow.distill.config import ON_POLICY_FIELDS, DistillConfig

    check_applicable(settings)
    values: dict[str, Any] = {}
    if preset is not None:
        named = "-" in preset  # official-<family> names it: no teacher, run or dataset to read
        values = preset_settings(preset, None if named else run_teacher_id(settings))
        if not settings.get("on_policy"):
            values = {k: v for k, v in values.items() if k not in ON_POLICY_FIELDS}
        if settings.get("from_run"):  # a polish keeps the run's student (distill/on_policy.py resolve)
            from arcflow.distill.student.config import StudentConfig
            from dataclasses import fields

            student = {f.name for f in fields(StudentConfig)} - {"nfe"}
            values = {k: v for k, v in values.items() if k not in student}
    return DistillConfig.from_dict({**values, **dict(settings), "preset": preset})
