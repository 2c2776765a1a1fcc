"""Does stage 1 converge on every seed? Runs stage 1 alone (`mdf_mllm.stage1.run`) for each recipe given on the
command line on the five runs the results compare (dataset seed 0, 1, 2 with Trainer seed 0; Trainer seed 1 and 2
with dataset seed 0), on the data, processor and splits the main job builds (`main_job.run_context`), and writes a
section of bench/REPORT.md: per run the epochs, the last epoch's loss, the U-Net alone's accuracy on the validation
and test photos, and the seconds of stage 1's loop.

    python bench/stage1_recipes.py --recipe before="--stage1_epochs 12 --no_stage1_standardise" --recipe now=""
    python bench/stage1_recipes.py --recipe now="" --runs 1:0 0:1   # only dataset seed 1 and Trainer seed 1

A recipe is a name and `train_hf.py` options for stage 1 (an empty string: the defaults). Stage 1 reads the base's
layout and processor, never its weights (the U-Net trains image only, FiLM stays the identity), so every run uses one
cached base of the main job's layout (--base; default the newest cached one) and gets the U-Net the main job gets at
its seeds and thread count (the figures depend on it). Run it with OMP_NUM_THREADS=1, and nothing else on the cores
for comparable seconds; --saved keeps the rows measured so far in a JSON file and does not run them again.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdf_mllm import stage1  # noqa: E402
from mdf_mllm.main_job import check_arguments, parse_arguments, run_context  # noqa: E402
from mdf_mllm.model_setup import BASE_RECORD_FILE, build_model  # noqa: E402
from mdf_mllm.training import Phases  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: its shared report writer
from report_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Stage 1 on every seed"
RUNS = ((0, 0), (1, 0), (2, 0), (0, 1), (0, 2))  # (dataset seed, Trainer seed): the five runs of docs/results.md


def job_of(dataset_seed: int, seed: int, options: str, output_dir: Path):
    job = parse_arguments(["--output_dir", str(output_dir), "--dataset_seed", str(dataset_seed), "--seed", str(seed),
                           *shlex.split(options)])
    check_arguments(job)
    return job


def validation_accuracy(run, weights: str) -> float:
    """The stage-1 U-Net and class head (from their files) on the validation photos."""
    unet = build_model(run.job.replace(model={"lora": False}).model, run.processor).model.unet.float()
    unet.load_state_dict(load_file(weights))
    folder = Path(weights).parent
    head = torch.nn.Linear(sum(unet.widths), len(run.label_names))
    head.load_state_dict(load_file(folder / "class_head.safetensors"))
    split = run.splits["validation"]
    probabilities = stage1.unet_alone_probabilities(unet, head, split, run.collator, run.job.run.eval_batch_size)
    return float((probabilities.argmax(1) == np.array(split.label_ids)).mean())


def measure(dataset_seed: int, seed: int, recipes: dict[str, str], base: Path, saved: dict,
            keep=lambda saved: None) -> dict[str, dict]:
    """Each recipe's stage 1 on one run's data (a row in `saved` under the same run and options is reused; `keep`
    gets `saved` after each new row); the data, base and splits are made once for all recipes."""
    rows, context = {}, None
    with tempfile.TemporaryDirectory(prefix="stage1-recipes-") as folder:
        for name, options in recipes.items():
            key = f"{dataset_seed}:{seed} {options}"
            if key in saved:
                rows[name] = saved[key]
                continue
            job = job_of(dataset_seed, seed, f"--base_model {base} --model_size small {options}", Path(folder) / name)
            context = context or run_context(job, Phases())
            if job.data != context.job.data:
                raise SystemExit(f"stage1_recipes.py: recipe {name!r} changes the data; give it stage-1 options only")
            run = context.with_job(job)
            start = time.perf_counter()
            result = stage1.run(run)
            rows[name] = {"loss": result.losses[-1], "losses": result.losses, "validation": validation_accuracy(
                run, result.weights), "test": result.accuracy(), "seconds": result.train_seconds,
                "epochs": len(result.losses), "wall": time.perf_counter() - start}
            print(f"dataset seed {dataset_seed}, seed {seed}, {name}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[name].items()
                if k != "losses") + f"; losses {[round(x, 3) for x in result.losses]}", flush=True)
            saved[key] = rows[name]
            keep(saved)
    return rows


def section(results: dict[tuple[int, int], dict[str, dict]], recipes: dict[str, str], command: str) -> str:
    out = [SECTION, "", f"`{command}` on {platform.machine()} with {os.cpu_count()} cores (OMP_NUM_THREADS="
           f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.1f} at the end). Stage "
           "1 alone on the main job's data, base and splits; validation and test: the U-Net alone's accuracy on "
           "all photos; seconds: stage 1's loop.", "", "Recipes:", "",
           *(f"- {name}: `{options or '(the defaults)'}`" for name, options in recipes.items()), "",
           "| dataset seed | seed | recipe | epochs | last-epoch loss | validation | test | seconds |",
           "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for (dataset_seed, seed), rows in results.items():
        out += [f"| {dataset_seed} | {seed} | {name} | {r['epochs']} | {r['loss']:.3f} | {r['validation']:.3f} | "
                f"{r['test']:.3f} | {r['seconds']:.0f} |" for name, r in rows.items()]
    out += ["", "| recipe | worst loss | worst validation | worst test | mean test | mean seconds |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in recipes:
        rows = [r[name] for r in results.values()]
        out.append(f"| {name} | {max(r['loss'] for r in rows):.3f} | {min(r['validation'] for r in rows):.3f} | "
                   f"{min(r['test'] for r in rows):.3f} | {np.mean([r['test'] for r in rows]):.3f} | "
                   f"{np.mean([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(out) + "\n"


def newest_base() -> Path:
    """The newest base in the main job's base cache (one of the small layout: the main job's)."""
    root = Path(os.environ.get("MDF_MLLM_BASE_CACHE") or Path.home() / ".cache" / "mdf_mllm")
    bases = [p.parent for p in root.glob("base-*/config.json")
             if json.loads((p.parent / BASE_RECORD_FILE).read_text()).get("model_size") == "small"]
    if not bases:
        raise SystemExit(f"stage1_recipes.py: no cached base in {root}: run the main job once first, or give --base")
    return max(bases, key=lambda p: p.stat().st_mtime)


def recipe(text: str) -> tuple[str, str]:
    name, _, options = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a recipe is NAME=OPTIONS")
    return name, options


def run_of(text: str) -> tuple[int, int]:
    dataset_seed, _, seed = text.partition(":")
    return int(dataset_seed), int(seed or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=recipe, action="append", required=True, help="NAME=OPTIONS (repeatable)")
    parser.add_argument("--runs", type=run_of, nargs="+", default=RUNS, help="DATASET_SEED:SEED ... (default: "
                        "the five)")
    parser.add_argument("--base", type=Path, default=None, help="a cached base of the main job's layout (default: "
                        "the newest in the base cache)")
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "REPORT.md")
    parser.add_argument("--saved", type=Path, help="a JSON file of rows measured before: a run and recipe found "
                        "there (same options) is not run again; new rows are added to it")
    parser.add_argument("--no_report", action="store_true", help="print the section, do not write it")
    args = parser.parse_args()
    recipes = dict(args.recipe)
    args.base = args.base or newest_base()
    saved = json.loads(args.saved.read_text()) if args.saved and args.saved.exists() else {}
    keep = (lambda rows: args.saved.write_text(json.dumps(rows, indent=1))) if args.saved else (lambda rows: None)
    results = {run: measure(*run, recipes, args.base, saved, keep) for run in args.runs}
    command = "python bench/stage1_recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = section(results, recipes, command)
    if not args.no_report:
        write_section(args.report, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
