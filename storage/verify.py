"""`arcflow verify`: find committed shards that do not read back, and optionally uncommit them.

Every chunk of every array of every committed shard is read through the reader, so format v2's
checksums (crc32c on every chunk) and its no-missing-chunk rule are checked, as is each shard's
Parquet index part. Repairing removes a damaged shard's index part, which un-commits it under the
commit protocol: ``generate-trajectories --resume`` with the same settings then regenerates exactly
those shards (one object delete on object stores, no rename).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from arcflow.storage.format import INDEX_DIR, index_part_name
from arcflow.storage.reader import list_shards, open_dataset


@dataclass
class VerifyReport:
    url: str
    checked: int
    problems: dict[int, str] = field(default_factory=dict)  # shard id -> one line
    repaired: list[int] = field(default_factory=list)

    def summary_line(self) -> str:
        text = f"{self.url}: {self.checked} committed shard(s) checked, {len(self.problems)} damaged"
        if self.repaired:
            text += (f"; uncommitted {len(self.repaired)} ({', '.join(map(str, self.repaired))}): rerun "
                     "generate-trajectories with the same settings and --resume to regenerate them")
        return text


def verify_dataset(url: str, repair: bool = False, progress: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check every committed shard of ``url``; with ``repair`` uncommit the damaged ones."""
    reader = open_dataset(url, storage_options)
    shards = list_shards(reader.loc)[0]
    report = VerifyReport(reader.url, len(shards))
    for shard in tqdm(shards, desc="verify", unit="shard", disable=None if progress else True):
        problem = reader.verify_shard(shard)
        if problem is not None:
            report.problems[shard] = problem
    if repair:
        for shard in report.problems:
            reader.loc.rm_file(INDEX_DIR, index_part_name(shard))
            report.repaired.append(shard)
    return report
