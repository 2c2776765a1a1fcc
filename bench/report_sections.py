"""The one way the bench scripts write their section of bench/REPORT.md."""

import re
from pathlib import Path


def write_section(report: Path, title: str, text: str) -> None:
    """Replace the section that starts with `title` (a "## ..." heading) by `text`, or add it at the end; every
    section stripped and one blank line between sections, so that rewriting one never grows the others."""
    old = report.read_text() if report.exists() else "# Benchmarks\n"
    parts = [part.strip() for part in re.split(r"\n(?=## )", old.strip()) if not part.startswith(title)]
    report.write_text("\n\n".join([*parts, text.strip()]) + "\n")
