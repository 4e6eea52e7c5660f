"""`arcflow verify`: find committed shards that do not read back, and optionally uncommit them.

Every chunk of every array of every committed shard is read through the reader, so format v2's
checksums (crc32c on every chunk) and its no-missing-chunk rule are checked, as is each shard's
Parquet index part. Repairing removes a damaged shard's index part, which un-commits it under the
commit protocol: ``generate-trajectories --resume`` with the same settings then regenerates exactly
those shards (one object delete on object stores, no rename). A dataset.json that disagrees with
every shard in the same way is reported instead (``storage/header.py``), and repair refuses it:
the header is the damaged object, and no shard is uncommitted for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from arcflow.core.errors import ArcflowError
from arcflow.storage.format import INDEX_DIR, index_part_name
from arcflow.storage.header import header_problem
from arcflow.storage.reader import list_shards, open_dataset


@dataclass
class VerifyReport:
    url: str
    checked: int
    problems: dict[int, str] = field(default_factory=dict)  # shard id -> one line
    repaired: list[int] = field(default_factory=list)
    header: str | None = None  # one line when dataset.json, not the shards, is damaged

    def summary_line(self) -> str:
        if self.header is not None:
            return f"{self.url}: dataset.json is damaged; its {self.checked} committed shard(s) are kept"
        text = f"{self.url}: {self.checked} committed shard(s) checked, {len(self.problems)} damaged"
        if self.repaired:
            text += (f"; uncommitted {len(self.repaired)} ({', '.join(map(str, self.repaired))}): rerun "
                     "generate-trajectories with the same settings and --resume to regenerate them")
        return text


def verify_dataset(url: str, repair: bool = False, progress: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check every committed shard of ``url``; with ``repair`` uncommit the damaged ones. A damaged
    dataset.json is reported as ``header`` (its shards are not judged by it); ``repair`` then refuses
    in one line and uncommits nothing."""
    reader = open_dataset(url, storage_options)
    shards = list_shards(reader.loc)[0]
    report = VerifyReport(reader.url, len(shards), header=header_problem(reader, shards))
    if report.header is not None:
        if repair:
            raise ArcflowError(f"{report.header}; --repair uncommits no shard for it, and none was uncommitted")
        return report
    for shard in tqdm(shards, desc="verify", unit="shard", disable=None if progress else True):
        problem = reader.verify_shard(shard)
        if problem is not None:
            report.problems[shard] = problem
    if repair:
        for shard in report.problems:
            reader.loc.rm_file(INDEX_DIR, index_part_name(shard))
            report.repaired.append(shard)
    return report
