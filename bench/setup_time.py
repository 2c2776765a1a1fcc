"""Where the set-up of a fresh clone spends its time: `./run.sh main-job --help` on a new clone of two commits side by
side, pip's cache warm, with torch from pip's configured index (TORCH_INDEX_URL=default) and with PyTorch's index
unreachable; writes its section of bench/REPORT.md.

    python bench/setup_time.py                          # before = fe56dd8, after = HEAD
    python bench/setup_time.py --before main --after setup --repeat 2

Each run is traced, not instrumented, so an old run.sh is timed as it stands: bash's xtrace with a clock in PS4
times every command of run.sh (the virtual environment, each pip call, the checks, the command), and pip's own log
(PIP_LOG, timestamped even under --quiet) splits each pip call into start-up, the build back-end's environment, the
editable metadata, resolution with downloads, the editable wheel and the installation of files. One untimed run of
each commit first warms pip's cache.
"""

import argparse
import datetime
import os
import platform
import re
import sys
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: its shared report writer
from report_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Set-up on a fresh clone"
UNREACHABLE = "http://127.0.0.1:9/whl/cpu"  # nothing listens on the discard port: connections are refused

# What each command of run.sh is, by its traced text (first match wins); the rest is run.sh's own checks.
COMMANDS = [
    (r"-m venv", "venv"),
    (r"pip install .*--upgrade pip", "pip upgrade"),
    (r"pip install .*-e ", "package (editable)"),  # with torch in the same call where one resolution does both
    (r"pip install .*torch==", "torch"),
    (r"train_hf\.py", "the command (--help)"),
]
# Within one pip call, where each step of pip's log begins (pip writes these lines in this order).
PIP_STEPS = [
    (r"Installing build dependencies", "build back-end env"),
    (r"Getting requirements to build editable|Preparing editable metadata", "editable metadata"),
    (r"^Collecting |^Requirement already satisfied|^Looking in", "resolution + downloads"),
    (r"Building editable for", "editable wheel"),
    (r"Installing collected packages", "installing files"),
    (r"Successfully installed", "the rest"),
]
TRACE = re.compile(r"^\++ ?(\d+\.\d+) (.*)$")
PIP_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d),(\d{3}) (.*)$")


def command_kind(text: str) -> str:
    return next((kind for pattern, kind in COMMANDS if re.search(pattern, text)), "checks")


def trace_commands(stderr: str, end: float) -> list[tuple[float, float, str]]:
    """(start, end, kind) of every traced command: a command lasts until the next one is traced."""
    marks = [(float(m[1]), m[2]) for m in map(TRACE.match, stderr.splitlines()) if m]
    ends = [start for start, _ in marks[1:]] + [end]
    return [(start, stop, command_kind(text)) for (start, text), stop in zip(marks, ends)]


def pip_log(path: Path) -> list[tuple[float, str]]:
    lines = []
    if path.exists():
        for m in map(PIP_LINE.match, path.read_text(errors="replace").splitlines()):
            if m:
                stamp = datetime.datetime.fromisoformat(m[1]).timestamp() + int(m[2]) / 1000
                lines.append((stamp, m[3]))
    return lines


def pip_steps(lines: list[tuple[float, str]], start: float, stop: float, kind: str) -> dict[str, float]:
    """Seconds of each step of the pip call that ran from `start` to `stop` (start-up: until its first step)."""
    steps, step, previous = defaultdict(float), "start-up", start
    for stamp, text in ((s, t) for s, t in lines if start <= s <= stop):
        steps[f"{kind}: {step}"] += stamp - previous
        previous = stamp
        step = next((name for pattern, name in PIP_STEPS if re.search(pattern, text)), step)
    steps[f"{kind}: {step}"] += stop - previous
    return steps


def one_run(commit: str, torch_index: str, log_dir: Path) -> dict[str, float]:
    """Clone `commit` afresh and time `./run.sh main-job --help` in it: seconds by phase, with the total and
    the retry warnings pip logged."""
    with tempfile.TemporaryDirectory(prefix="setup-time-") as folder:
        clone = Path(folder) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
        log = Path(folder) / "pip.log"
        # bash takes PS4 from a file named by BASH_ENV, not from the environment (ignored when running as root).
        (Path(folder) / "ps4.sh").write_text("PS4='+${EPOCHREALTIME} '\n")
        env = {**os.environ, "TORCH_INDEX_URL": torch_index, "PIP_LOG": str(log), "BASH_ENV": f"{folder}/ps4.sh"}
        env.pop("VIRTUAL_ENV", None)
        start = time.time()
        done = subprocess.run(["bash", "-x", "./run.sh", "main-job", "--help"], cwd=clone, env=env,
                              capture_output=True, text=True)
        end = time.time()
        name = f"{commit[:12]}-{'default' if torch_index == 'default' else 'unreachable'}"
        (log_dir / f"{name}.trace").write_text(done.stderr)
        (log_dir / f"{name}.pip.log").write_bytes(log.read_bytes() if log.exists() else b"")
        if done.returncode:
            raise SystemExit(f"setup_time.py: ./run.sh main-job --help failed at {commit} (exit {done.returncode}); "
                             f"trace in {log_dir / (name + '.trace')}")
        lines = pip_log(log)
        phases = defaultdict(float)
        for first, last, kind in trace_commands(done.stderr, end):
            phases[kind] += last - first
            if kind in ("pip upgrade", "torch", "package (editable)"):
                for step, seconds in pip_steps(lines, first, last, kind).items():
                    phases[step] += seconds
        phases["total (wall)"] = end - start
        phases["pip retry warnings"] = sum("Retrying (Retry(" in text for _, text in lines)
        return phases


def phase_order(phase: str) -> tuple[int, int]:
    """run.sh's order: the venv, pip's calls (each split in pip's order), the checks, the command; totals last."""
    kinds = ["venv", "pip upgrade", "torch", "package (editable)", "checks", "the command (--help)",
             "pip retry warnings"]
    steps = ["start-up"] + [name for _, name in PIP_STEPS]
    kind, _, step = phase.partition(": ")
    return kinds.index(kind) if kind in kinds else len(kinds), steps.index(step) + 1 if step else 0


def table(results: dict[str, dict[str, dict[str, float]]], labels: list[str]) -> str:
    """One row per phase, one column per (commit, scenario)."""
    columns = [(scenario, label) for scenario in results for label in labels]
    rows = sorted({phase for scenario in results.values() for runs in scenario.values() for phase in runs},
                  key=phase_order)
    head = "| phase | " + " | ".join(f"{label}, {scenario}" for scenario, label in columns) + " |"
    out = [head, "|---|" + "---:|" * len(columns)]
    for phase in rows:
        cells = []
        for scenario, label in columns:
            value = results[scenario][label].get(phase, 0.0)
            cells.append(f"{value:.0f}" if phase.startswith("pip retry") else f"{value:.1f}")
        bold = phase.startswith("total")
        out.append(f"| {'**' + phase + '**' if bold else phase} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {phase: statistics.median(run.get(phase, 0.0) for run in runs) for phase in set().union(*runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="fe56dd8", help="the commit measured as before (default: %(default)s)")
    parser.add_argument("--after", default="HEAD", help="the commit measured as after (default: %(default)s)")
    parser.add_argument("--unreachable", default=UNREACHABLE, help="a torch index that does not answer")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each (commit, scenario); median")
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "REPORT.md")
    parser.add_argument("--no_warm_up", dest="warm_up", action="store_false",
                        help="skip the untimed run of each commit (pip's cache already holds what both install)")
    args = parser.parse_args()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    commits = {}
    for label in ("before", "after"):
        ref = getattr(args, label)
        commits[label] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], check=True,
                                        capture_output=True, text=True).stdout.strip()
    scenarios = {"TORCH_INDEX_URL=default": "default", "torch index unreachable": args.unreachable}
    log_dir = Path(tempfile.mkdtemp(prefix="setup-time-traces-"))
    for label, commit in commits.items() if args.warm_up else ():  # pip's cache: everything each commit installs
        print(f"warming pip's cache: {label} ({commit[:12]})", flush=True)
        one_run(commit, "default", log_dir)
    results = {}
    for scenario, index in scenarios.items():
        results[scenario] = {}
        for label, commit in commits.items():
            runs = []
            for _ in range(args.repeat):
                print(f"timing {label} ({commit[:12]}), {scenario}", flush=True)
                runs.append(one_run(commit, index, log_dir))
                print(f"  {runs[-1]['total (wall)']:.1f} s", flush=True)
            results[scenario][label] = median_runs(runs)
    totals = {s: {label: r[label]["total (wall)"] for label in commits} for s, r in results.items()}
    default, offline = totals["TORCH_INDEX_URL=default"], totals["torch index unreachable"]
    loads = f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    section = "\n".join([
        SECTION,
        "",
        f"`./run.sh main-job --help` on a new clone (`git clone` + checkout), pip's cache warm, on "
        f"{platform.machine()} with {os.cpu_count()} cores (load average {loads}), median of "
        f"{args.repeat} run(s); before = {commits['before'][:12]}, after = {commits['after'][:12]}. Seconds by "
        "phase: each command of run.sh timed by bash's xtrace, each pip call split by pip's own log (its debug "
        "log, which every pip call writes here, costs both commits alike). The torch "
        f"index unreachable: TORCH_INDEX_URL={args.unreachable} (connections refused). `python bench/setup_time.py` "
        "writes this section.",
        "",
        table(results, list(commits)),
        "",
        f"After ÷ before: {default['after'] / default['before']:.2f} with TORCH_INDEX_URL=default (target <= 0.5); "
        f"with the torch index unreachable the after set-up takes {offline['after'] - default['after']:+.1f} s "
        "beside its default (target <= +20 s).",
        "",
        f"_setup_time.py: {time.perf_counter() - started:.0f} s_",
    ])
    write_section(args.report, SECTION, section)
    print(section)
    print(f"traces: {log_dir}")


if __name__ == "__main__":
    main()
