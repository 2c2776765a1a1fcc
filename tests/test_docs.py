"""The README and docs name only files that exist."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path of this repository starts with one of its tracked top-level entries (not what a run left, such as outputs/).
TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
TOP_LEVEL = sorted({name.split("/")[0] for name in TRACKED} - {".gitignore"})
PATH = re.compile(r"(?<![\w/.~-])((?:" + "|".join(map(re.escape, TOP_LEVEL)) + r")(?:/[\w.*-]+)*/?)")


def named_paths(text: str) -> set[str]:
    """Paths in backticks or markdown links (a command's arguments included), minus globs and placeholders."""
    spans = re.findall(r"`([^`]+)`", text) + re.findall(r"\]\(([^)#]+)", text)
    return {match for span in spans for match in PATH.findall(span) if "*" not in match and "<" not in match}


def test_every_path_the_documents_name_exists():
    missing = {f"{doc.relative_to(ROOT)}: {path}" for doc in DOCUMENTS
               for path in named_paths(doc.read_text(encoding="utf-8"))
               if not (ROOT / path).exists() and not (doc.parent / path).exists()}
    assert sorted(missing) == []


def test_the_check_sees_a_stale_path():
    assert named_paths("see `docs/DATA.md` and [design](docs/design.md), run `python bench/run.py`") == {
        "docs/DATA.md", "docs/design.md", "bench/run.py"}
