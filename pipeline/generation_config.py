"""The settings of a `generate-trajectories` job (``GenerationConfig``), their limits, and the prompts file."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from arcflow.core.errors import ArcflowError, check_numbers, clip, quote
from arcflow.core.ray_runtime import check_device, check_local_workers
from arcflow.storage.format import DEFAULT_KEYFRAME_EVERY, STORAGE_DTYPES

from .registry import TeacherSource, teacher_name

#: Sanity limits: far beyond any real job, low enough that planning and validation stay instant.
MAX_SAMPLES = 10**9
MAX_SHARDS = 10**6
MAX_STEPS = 10_000
MAX_WORKERS = 100_000
MAX_SHARD_SIZE = 1_000_000
MAX_THREADS = 1024
#: The float32 trajectories of one shard (and of one micro-batch) a worker holds while recording.
MAX_SHARD_BYTES = 64 * 2**30


@dataclass
class GenerationConfig:
    """Everything `arcflow generate-trajectories` needs; written into the dataset for reproduction.

    ``teacher`` is a registry id (what the CLI passes) or, from Python, a ``TeacherFactory`` that
    the Ray workers call (benchmarks and tests use it for stand-in teachers).
    """

    out: str
    teacher: TeacherSource = "digits"
    num_samples: int = 1000
    prompts_file: Optional[str] = None
    steps: int = 50
    guidance: Optional[float] = None
    shard_size: int = 256
    seed: int = 0
    batch_size: int = 256
    dtype: str = "float16"
    #: format v2 stores the state at every ``keyframe_every``-th step (and the last); 1 keeps them all
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY
    #: consecutive samples per prompt (several seeds of one prompt in one shard share its stored conditioning)
    seeds_per_prompt: int = 1
    compress: bool = True
    workers: int = 1
    cpus_per_worker: Optional[float] = None
    #: torch intra-op threads per worker (None: one per CPU of the worker, see ``default_threads``).
    threads: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    ray_address: Optional[str] = None
    resume: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)

    #: Fields that do not change a dataset's contents (may differ on --resume); the prompts file is
    #: compared by its content (``prompts_sha256``), not by the path that names it.
    RUNTIME_FIELDS = ("out", "workers", "cpus_per_worker", "gpus_per_worker", "threads", "ray_address", "resume",
                      "prompts_file")

    def validate(self) -> None:
        """Raise ``ArcflowError`` with one line for a value no run could use (before anything starts)."""
        check_numbers(
            self,
            positive=("num_samples", "steps", "shard_size", "batch_size", "workers", "keyframe_every", "seeds_per_prompt"),
            at_most={"num_samples": MAX_SAMPLES, "steps": MAX_STEPS, "workers": MAX_WORKERS, "keyframe_every": MAX_STEPS,
                     "seeds_per_prompt": MAX_SAMPLES,
                     "shard_size": MAX_SHARD_SIZE, "batch_size": MAX_SHARD_SIZE},
        )
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ArcflowError(f"--threads must be from 1 to {MAX_THREADS}, got {self.threads}")
        shards = -(-self.num_samples // self.shard_size)
        if shards > MAX_SHARDS:
            raise ArcflowError(
                f"{self.num_samples} samples in shards of {self.shard_size} make {shards} shards (at most "
                f"{MAX_SHARDS}); raise --shard-size"
            )
        if self.guidance is not None and self.guidance < 0:
            raise ArcflowError(f"--guidance must be >= 0, got {self.guidance}")
        check_local_workers("--workers", self.workers, self.ray_address)
        if self.teacher_options.get("device") is not None:
            check_device("--device", str(self.teacher_options["device"]), self.ray_address)
        for name in ("cpus_per_worker", "gpus_per_worker"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ArcflowError(f"{name} must be >= 0, got {value}")
        if self.dtype not in STORAGE_DTYPES:
            raise ArcflowError(f"unknown --dtype {quote(self.dtype)}; choose one of {', '.join(STORAGE_DTYPES)}")
        if not self.out:
            raise ArcflowError("--out is required")
        check_outlives_process(self.out)
        if isinstance(self.teacher, str):
            from .registry import check_teacher_id, require_prompts

            check_teacher_id(self.teacher)
            require_prompts(self.teacher, self.prompts_file is not None, "--prompts")
        elif not callable(self.teacher) or not isinstance(getattr(self.teacher, "teacher_id", None), str):
            raise ArcflowError(f"teacher must be a teacher id or a TeacherFactory, got {self.teacher!r}")

    def check_memory(self, latent_shape: Sequence[int]) -> None:
        """Refuse a shard or micro-batch that could never fit in a worker's memory, before any work."""
        per_sample = 4 * (2 * self.steps + 1) * math.prod(latent_shape)  # float32 x and u, as recorded
        for flag, count in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size)):
            if count * per_sample > MAX_SHARD_BYTES:
                raise ArcflowError(
                    f"{flag} {count} needs {count * per_sample / 2**30:.0f} GiB per worker for its trajectories "
                    f"(at most {MAX_SHARD_BYTES / 2**30:.0f} GiB); lower it"
                )

    def content_config(self, prompts: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """The configuration that determines the dataset's bytes (compared on resume); JSON-ready,
        with a factory recorded by its ``teacher_id`` and the prompts (``prompts``, else those of
        the prompts file) by their content hash. None stands for a default (the teacher's prompts,
        its guidance) until the teacher resolves it."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUNTIME_FIELDS}
        config["teacher"] = teacher_name(self.teacher)
        config["teacher_options"] = dict(self.teacher_options)
        if prompts is None and self.prompts_file is not None:
            prompts = read_prompts(self.prompts_file)
        config["prompts_sha256"] = prompts_digest(prompts) if prompts is not None else None
        return config


def default_threads(cpus: float) -> int:
    """torch threads for a worker with ``cpus`` CPUs: one per CPU. Shard writes overlap the next
    shard's compute on the worker's other task thread and take ~10% of the time, so reserving a
    core for them idled it 90% of the time (benchmarks/builder_throughput.py)."""
    return max(1, int(cpus))


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 (hex) of a prompt list: what a dataset records of its prompts, wherever they came from."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def check_outlives_process(url: str) -> None:
    """Refuse an output filesystem that lives in one process's memory (``memory://``): the Ray
    workers would each write into their own, and every shard would vanish with its worker."""
    from arcflow.storage._io import Location

    if Location(url).is_process_local:
        raise ArcflowError(
            f"--out {url[:100]}: an in-memory filesystem lives in one process, but shards are written by Ray "
            "workers and would be lost with them; use a directory or an object store URL (s3://...)"
        )


def read_prompts(path: Optional[str]) -> Optional[list[str]]:
    """Prompts from a text file, one per line (blank lines skipped), or from a JSON Lines file
    (``.jsonl``: prompts with reference images, pipeline/edit_inputs.py); None means the teacher's own.
    Any other file is plain text: a line that would read as an edit prompt is refused."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ArcflowError(f"prompts file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ArcflowError(f"prompts file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if p.suffix.lower() == ".jsonl":
        from .edit_inputs import read_jsonl_prompts

        return read_jsonl_prompts(p, text)
    from .edit_inputs import check_prompt_length, plain_prompt

    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{clip(path)} line {number}"
            check_prompt_length(line.strip(), where)
            prompts.append(plain_prompt(line.strip(), where))
    if not prompts:
        raise ArcflowError(f"prompts file is empty: {path}")
    return prompts
