"""Run every benchmark (bench/scale_11b.py and bench/bench_*.py) and write bench/REPORT.md.

    python bench/run.py                 # all
    python bench/run.py processor data  # only bench_processor.py and bench_data.py (scale_11b always runs)

Each module exposes run() -> str, a Markdown section with its own medians and side-by-side ratios.
"""

import datetime
import importlib.util
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch


BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kept_sections(report: Path, ran: list[Path]) -> list[str]:
    """The old report's sections that this run did not rewrite (scripts left out of the selection, and
    bench/real_width.py, which runs on its own for hours on a CPU): they stay rather than vanish."""
    if not report.exists():
        return []
    ran_names = {path.name for path in ran}
    sections = re.split(r"\n(?=## )", report.read_text().strip())[1:]
    return [s for s in sections if (m := re.search(r"_([\w.]+\.py): \d+ s_$", s)) is None or m[1] not in ran_names]


def main(selected: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [BENCH / "scale_11b.py"] + sorted(
        p for p in BENCH.glob("bench_*.py") if not selected or p.stem.removeprefix("bench_") in selected
    )
    sections = []
    for path in paths:
        start = time.perf_counter()
        print(f"running {path.name} ...", flush=True)
        section = load(path).run()
        sections.append(f"{section}\n\n_{path.name}: {time.perf_counter() - start:.0f} s_")
    header = (
        f"# Benchmarks\n\nWritten by `python bench/run.py` on {datetime.date.today()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Times are medians of repeated runs; ratios are measured side by side in the same run."
    )
    report = "\n\n".join([header, *sections, *kept_sections(BENCH / "REPORT.md", paths)]) + "\n"
    (BENCH / "REPORT.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main(sys.argv[1:])
