"""Refresh the generated blocks of README.md and docs/benchmarks.md from the repo's own results.

A block is delimited by ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; its content
is replaced by the file registered for NAME below (markdown tables written by `arcflow evaluate`
and the benchmark scripts) or, for ``families``, by the table of supported pipeline classes that
pipeline/families.py itself describes. A block may sit in any of the TARGETS (README.md holds the demo table,
docs/benchmarks.md the rest); each registered block is expected in exactly one of them.
``--demo REPORT_DIR`` first copies a demo report (report.md, report.json, grid.png) into docs/demo/.
``--check`` writes nothing and exits 1 if a target is out of date. Nothing in a generated block is
typed by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "demo-report": ROOT / "docs/demo/report.md",
    "ablation": ROOT / "benchmarks/results/ablation.md",
    "nfe-transfer": ROOT / "benchmarks/results/nfe_transfer.md",
    "method-comparison": ROOT / "benchmarks/results/method_comparison.md",
    "teacher-quality": ROOT / "benchmarks/results/teacher_quality.md",
    "builder": ROOT / "benchmarks/results/builder.md",
    "storage-bytes-formats": ROOT / "benchmarks/results/storage_bytes_formats.md",
    "storage-estimate": ROOT / "benchmarks/results/storage_estimate.md",
    "format-quality": ROOT / "benchmarks/results/format_quality.md",
    "loader": ROOT / "benchmarks/results/loader.md",
    "loader-flux-shaped": ROOT / "benchmarks/results/loader_flux_shaped.md",
    "gpu-scale": ROOT / "benchmarks/results/gpu_scale.md",
}


def families_table() -> str:
    """Supported pipeline classes with their default LoRA targets, from pipeline/families.py."""
    from arcflow.pipeline.families import ALL_FAMILIES

    rows = ["| pipeline class | family | reference images | head replaced | default LoRA targets (`--lora-targets`) |",
            "|---|---|---|---|---|"]
    for family in ALL_FAMILIES:
        for cls in family.pipeline_classes:
            targets = family.lora_targets.replace("|", "\\|")
            rows.append(f"| `{cls}` | {family.name} | {'yes' if family.edit else 'no'} | `{family.head_module}` | `{targets}` |")
    return "\n".join(rows)


GENERATORS = {"families": families_table}
#: The files holding generated blocks.
TARGETS = (ROOT / "README.md", ROOT / "docs/benchmarks.md")


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every registered block it holds refilled from its source, and their names."""
    updated = []
    for name, source in {**SOURCES, **GENERATORS}.items():
        pattern = re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)", re.S)
        if not pattern.search(text) or (isinstance(source, Path) and not source.is_file()):
            continue
        body = (source.read_text() if isinstance(source, Path) else source()).rstrip() + "\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(3), text)
        updated.append(name)
    return text, updated


def refresh(path: Path, check: bool = False) -> tuple[list[str], bool]:
    """Refill ``path``'s blocks (unless ``check``); return their names and whether it changed."""
    old = path.read_text()
    new, names = render(old)
    if new != old and not check:
        path.write_text(new)
    return names, new != old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a report directory written by `arcflow evaluate`")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    if args.demo is not None:
        target = ROOT / "docs/demo"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.json", "grid.png"):
            shutil.copy2(args.demo / name, target / name)
    found: list[str] = []
    stale = []
    for path in TARGETS:
        names, changed = refresh(path, check=args.check)
        found += names
        rel = path.relative_to(ROOT)
        if changed:
            stale.append(str(rel))
        state = ("out of date" if args.check else "updated") if changed else "up to date"
        print(f"{rel}: {state} ({', '.join(names) if names else 'no blocks'})")
    missing = [name for name in SOURCES if name not in found]
    if missing:
        print(f"not refreshed (no block in any target, or no source file): {', '.join(missing)}")
    if args.check and stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
