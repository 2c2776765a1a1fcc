"""Where the main job spends its time: runs `train_hf.py` once (options after `--`; default the main job itself) and
writes its phase table (comparison.json's "phase_seconds", which every run records) as a section of bench/REPORT.md,
with the training loops against everything else, the MDF-MLLM arm against the baseline arm, and the process's wall
time and peak memory.

    python bench/phase_times.py                                   # the default main job, into a temporary folder
    python bench/phase_times.py -- --max_steps 2                  # the smoke run
    python bench/phase_times.py --read outputs/run                # the table of a run already made (no run)

Run it with the base cached (MDF_MLLM_BASE_CACHE) to time the warm job; the "base" phase then only loads it.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: its shared report writer
from report_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Phases of the main job"
TRAINING_LOOPS = re.compile(r"^(stage 1|stage 2: .*)$")  # the base's loop too, where it was trained ("base" > 60 s)


def summary(phase_seconds: dict, trained_base: bool) -> tuple[list[tuple[str, float]], float | None]:
    """(what, seconds) of the training loops and of everything else; the MDF arm's seconds ÷ the baseline arm's."""
    phases, wall = phase_seconds["phases"], phase_seconds["wall_seconds"]
    loops = sum(s for name, s in phases.items() if TRAINING_LOOPS.match(name) or (trained_base and name == "base"))
    lines = [("training loops (stage 1, the arms" + (", the base)" if trained_base else ")"), loops),
             ("everything else", wall - loops)]
    arms = [phases.get(f"stage 2: {name}") for name in ("MDF-MLLM", "Mllama baseline")]
    return lines, (arms[0] / arms[1] if all(arms) else None)


def section(phase_seconds: dict, command: str, process: dict | None) -> str:
    phases, wall = phase_seconds["phases"], phase_seconds["wall_seconds"]
    trained_base = phases.get("base", 0) > 60  # loading a cached base takes seconds; training it, minutes
    lines, ratio = summary(phase_seconds, trained_base)
    rows = [*phases.items(), ("(outside every phase)", phase_seconds["other_seconds"]), ("wall of the job", wall)]
    out = [SECTION, "", f"{command} on {platform.machine()} with {os.cpu_count()} cores "
           f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.1f} at "
           "the end: other work may have run beside it). A phase timed inside another (the scoring of a row) is left "
           "out of the outer one's seconds.", "", "| phase | wall s | share |", "|---|---:|---:|"]
    out += [f"| {name} | {s:.1f} | {s / wall:.0%} |" for name, s in rows]
    out += ["", *(f"- {what}: {s:.1f} s ({s / wall:.0%})" for what, s in lines)]
    if ratio:
        out.append(f"- MDF-MLLM arm ÷ baseline arm: {ratio:.2f}×")
    if process:
        cpu = (f", {process['cpu']:.1f} s CPU (user + system: about the wall time on a core of its own)"
               if "cpu" in process else "")  # a measurement made elsewhere may have none
        out.append(f"- the process: {process['wall']:.1f} s wall (Python start-up and imports included){cpu}, peak "
                   f"memory {process['peak_gb']:.2f} GB")
    return "\n".join(out) + "\n"


def run_job(options: list[str], output_dir: Path) -> dict:
    """Run the job in a child process: its wall seconds and peak resident memory."""
    command = [sys.executable, str(ROOT / "train_hf.py"), "--output_dir", str(output_dir), *options]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": time.perf_counter() - start, "peak_gb": usage.ru_maxrss / 2**20,
            "cpu": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--read", type=Path, help="an output folder of a finished run: report its table, run nothing")
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "REPORT.md")
    parser.add_argument("options", nargs="*", help="train_hf.py options (after --)")
    args = parser.parse_args()
    process, folder = None, args.read
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="phase-times-"))
        process = run_job(args.options, folder)
    command = f"The run in {folder}" if args.read else f"`{' '.join(['python train_hf.py', *args.options])}`"
    text = section(json.loads((folder / "comparison.json").read_text())["phase_seconds"], command, process)
    write_section(args.report, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
