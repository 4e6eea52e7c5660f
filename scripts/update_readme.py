"""Refresh the generated blocks of README.md from files written by the repo's own commands.

A block is delimited by ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; its content
is replaced by the file registered for NAME below (markdown tables written by `arcflow evaluate`
and the benchmark scripts). ``--demo REPORT_DIR`` first copies a demo report (report.md, grid.png)
into docs/demo/. Nothing in a generated block is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "demo-report": ROOT / "docs/demo/report.md",
    "ablation": ROOT / "benchmarks/results/ablation.md",
    "teacher-quality": ROOT / "benchmarks/results/teacher_quality.md",
    "builder": ROOT / "benchmarks/results/builder.md",
    "storage-bytes-formats": ROOT / "benchmarks/results/storage_bytes_formats.md",
    "storage-estimate": ROOT / "benchmarks/results/storage_estimate.md",
    "format-quality": ROOT / "benchmarks/results/format_quality.md",
    "loader": ROOT / "benchmarks/results/loader.md",
    "loader-flux-shaped": ROOT / "benchmarks/results/loader_flux_shaped.md",
    "gpu-scale": ROOT / "benchmarks/results/gpu_scale.md",
}


def refresh(readme: Path) -> list[str]:
    text = readme.read_text()
    updated = []
    for name, source in SOURCES.items():
        pattern = re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)", re.S)
        if not source.is_file() or not pattern.search(text):
            continue
        body = source.read_text().rstrip() + "\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(3), text)
        updated.append(name)
    readme.write_text(text)
    return updated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a report directory written by `arcflow evaluate`")
    args = parser.parse_args()
    if args.demo is not None:
        target = ROOT / "docs/demo"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.json", "grid.png"):
            shutil.copy2(args.demo / name, target / name)
    names = refresh(ROOT / "README.md")
    print(f"README.md: refreshed {', '.join(names) if names else 'nothing'}")


if __name__ == "__main__":
    main()
