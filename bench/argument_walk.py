"""Where a job's settings walk: every call of a repository function that receives them, in the order of the calls,
during a tiny main job and a tiny ablation (one seed, two trained rows).

    OMP_NUM_THREADS=1 python bench/argument_walk.py [--output_dir outputs/bench]   # writes argument_walk.md

The settings are the parsed arguments (`ModelArguments`, `DataArguments`, the job's own arguments, the training
arguments), the `Job` that holds them and the `RunContext` that holds the `Job`. For each function that takes one or
more of them as parameters (their own methods aside) the report counts:
- calls: the calls that received settings, and the settings parameters they received in all (four objects passed
  side by side count four);
- rooms: the modules those calls were in; a *return* is a call in a module that the walk had already left (entering
  a room once is the aim); `model_setup` entries, which the issue counted, are given apart.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# By class name, so that the same script measures earlier commits too (RunArguments was JobArguments before the Job;
# the RunContext, which holds the Job, came after it).
SETTINGS = {"ModelArguments", "DataArguments", "JobArguments", "RunArguments", "MdfTrainingArguments", "Job",
            "RunContext"}
TINY = ["--model_size", "tiny", "--num_images", "40", "--image_size", "64", "--per_device_train_batch_size", "8",
        "--n_bootstrap", "20", "--num_train_epochs", "1", "--base_epochs", "1", "--stage1_epochs", "1",
        "--disable_tqdm", "true"]


def trace(run) -> list[tuple[str, str, int]]:
    """(module, function, settings parameters) of every repository call that received settings while `run()` ran."""
    stays = []

    def profile(frame, event, _):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(str(ROOT)) or "/.venv/" in code.co_filename:
            return
        parameters = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        count = sum(type(frame.f_locals.get(name)).__name__ in SETTINGS for name in parameters)
        # The settings' own methods (mdf_mllm/job.py, the RunContext's, dataclasses' __init__) are not a room they
        # walk into.
        own = code.co_filename.endswith("mdf_mllm/job.py") or code.co_qualname.startswith("RunContext.")
        if count and code.co_name != "__init__" and not own:
            module = Path(code.co_filename).relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            stays.append((module, code.co_name, count))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return stays


def walk(stays: list[tuple[str, str, int]]) -> dict:
    rooms, left, returns, path = [], set(), 0, []
    for module, _, _ in stays:
        if path and path[-1] == module:
            continue
        if path:
            left.add(path[-1])
        returns += module in left
        path.append(module)
        if module not in rooms:
            rooms.append(module)
    return {"calls": len(stays), "settings passed": sum(count for _, _, count in stays),
            "functions": len({(m, f) for m, f, _ in stays}), "rooms": len(rooms), "room changes": len(path) - 1,
            "returns to a room already left": returns,
            "model_setup entries": sum(m == "mdf_mllm.model_setup" for m in path), "path": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="outputs/bench")
    out = Path(parser.parse_args().output_dir)
    from mdf_mllm import ablation, main_job

    rows = [row for row in ablation.ROWS if row.name in ("Mllama baseline", "MDF, all depths")]
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MDF_MLLM_BASE_CACHE"] = os.environ["MDF_MLLM_DATA_CACHE"] = scratch
        jobs = {"main job": [*TINY, "--output_dir", f"{scratch}/main"],
                "ablation": [*TINY, "--ablation", "--seeds", "1", "--ablation_epochs", "1", "--output_dir",
                             f"{scratch}/ablation"]}
        saved = ablation.ROWS
        ablation.ROWS = tuple(rows)
        try:
            for name, argv in jobs.items():
                if name == "ablation":  # the default `rows` argument was bound at definition: pass ours
                    real = ablation.run_ablation
                    ablation.run_ablation = lambda *a, **k: real(*a, **{**k, "rows": tuple(rows)})
                reports[name] = walk(trace(lambda: main_job.main(argv)))
        finally:
            ablation.ROWS = saved
    keys = [key for key in next(iter(reports.values())) if key != "path"]
    lines = ["# Where a job's settings walk", "", "Command: `OMP_NUM_THREADS=1 python bench/argument_walk.py`", "",
             f"| | {' | '.join(keys)} |", f"|---|{'---:|' * len(keys)}"]
    lines += [f"| {name} | {' | '.join(str(report[key]) for key in keys)} |" for name, report in reports.items()]
    for name, report in reports.items():
        lines += ["", f"{name}, rooms in the order entered: " + " → ".join(p.split(".")[-1] for p in report["path"])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "argument_walk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
