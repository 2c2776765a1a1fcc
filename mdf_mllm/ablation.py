"""The paper's ablation, fine-tuned from a pretrained base: which part of MDF-MLLM carries the gain.

    python train_hf.py --ablation [--seeds 3]

Rows: the baseline (the base fine-tuned alone), the U-Net alone (the stage-1 U-Net and its class head, image only:
what the photo alone gives), every reference registered in `comparison.REFERENCES` (text only and late fusion: what
the history alone gives, and the two combined without a language model), MDF with every depth, each single depth (every fused layer
reads that U-Net depth), MDF without FiLM, without clinical text, without stage 1 (a random U-Net, frozen as the
recipe freezes the trained one), and with Flamingo's closed gates (g_u = 0, with a gate learning rate of their own)
in place of the main job's open gates over zero value projections. Every row starts from the same base; every MDF row but "no stage 1" from the
stage-1 U-Net of its seed. Each row runs `seeds` times (seed k: stage 1, data order and MDF initialisation); the
table gives mean ± sample std over seeds and a 95% Student-t
interval over seeds, mean ± t(0.975, n-1) · std / sqrt(n), which measures how much the result moves between training
runs (the per-run bootstrap over test photos, in each run's report, does not); a second table gives each row's
per-class sensitivity, the mean over seeds.
"""

import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from scipy import stats

from mdf_mllm import comparison, stage1, stages
from mdf_mllm.comparison import UNET_ALONE, Result
from mdf_mllm.job import Job
from mdf_mllm.model_setup import cross_attention_layers
from mdf_mllm.plots import plot_ablation
from mdf_mllm.training import Phases, RunContext

METRICS = ("accuracy", "accuracy_with_history", "accuracy_age_dependent", "macro_f1", "type_accuracy", "type_macro_f1")
PAIRED = ("accuracy", "accuracy_with_history", "accuracy_age_dependent")  # the metrics paired by seed


@dataclass(frozen=True)
class Row:
    """One configuration of the table."""

    name: str
    baseline: bool = False  # the base fine-tuned alone: no U-Net at all
    unet_alone: bool = False  # the stage-1 U-Net and class head, no language model
    reference: bool = False  # a registered reference (comparison.REFERENCES): no model trained
    depth: int | None = None  # every fused layer reads this U-Net depth (None: the default spread of depths)
    no_film: bool = False
    no_text: bool = False
    stage1: bool = True
    gate_start: float | None = None  # the U-Net gates' start (None: the job's --unet_gate_start)
    gate_learning_rate: float | None = None  # (None: the job's --gate_learning_rate)


# The trained rows; `default_rows()` puts the registered references after the first two.
ROWS = (
    Row("Mllama baseline", baseline=True),
    Row(UNET_ALONE, unet_alone=True),
    Row("MDF, all depths"),
    *(Row(f"MDF, depth {depth} only", depth=depth) for depth in range(1, 5)),
    Row("MDF, no FiLM", no_film=True),
    Row("MDF, no clinical text", no_text=True),
    Row("MDF, no stage 1", stage1=False),
    # Flamingo's closed gates need a fast gate of their own to move at all.
    Row("MDF, closed gates", gate_start=0.0, gate_learning_rate=5e-2),
)


def default_rows(trained: tuple[Row, ...] = ROWS) -> tuple[Row, ...]:
    """The table's rows: the baseline, the U-Net alone, every registered reference, then the MDF rows."""
    return (*trained[:2], *(Row(name, reference=True) for name in comparison.REFERENCES), *trained[2:])


def row_model_changes(job: Job, row: Row) -> dict:
    """The model settings one row changes: fusion map, FiLM, the gates' start and learning rate."""
    if row.baseline:
        return {"fusion_layers": "none"}
    changes = {"no_film": row.no_film}
    if row.depth is not None:
        layers = cross_attention_layers(job.model)
        changes["fusion_layers"] = ",".join(f"{layer}:{row.depth}" for layer in layers)
    if row.gate_start is not None:
        changes["unet_gate_start"] = row.gate_start
    if row.gate_learning_rate is not None:
        changes["gate_learning_rate"] = row.gate_learning_rate
    return changes


def without_film(unet_path: str, unet) -> str:
    """The stage-1 U-Net minus its FiLM layers (a U-Net built without FiLM has none), written beside it. Which
    tensors are FiLM's, `unet` (the U-Net the file was saved from) says by class (its `parameter_kinds()`)."""
    kinds = unet.parameter_kinds()
    path = Path(unet_path).with_name("unet-no-film.safetensors")
    save_file({k: v for k, v in load_file(unet_path).items() if kinds.get(k) != "film"}, path)
    return str(path)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean over seeds; None for a single value."""
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return float(np.mean(values) - half), float(np.mean(values) + half)


def summarize(results: list[dict]) -> dict[str, dict]:
    """{row name: {"seeds": n, metric: {"mean", "std", "ci95"}}} in the order rows first appear."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        summary[name] = {"seeds": len(runs)}
        for metric in (*METRICS, "train_seconds"):
            values = [r.get(metric) for r in runs if r.get(metric) is not None]  # None: no such test photo
            summary[name][metric] = {"mean": float(np.mean(values)) if values else None,
                                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                     "ci95": t_interval(values)}
    return summary


def mean_sensitivities(results: list[dict]) -> dict[str, dict[str, float | None]]:
    """{row name: {class: mean sensitivity over the row's seeds}} (None for a class the test split lacks)."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r["sensitivity"] for r in results if r["name"] == name]
        values = {label: [run[label] for run in runs if run[label] is not None] for label in runs[0]}
        summary[name] = {label: float(np.mean(v)) if v else None for label, v in values.items()}
    return summary


REFERENCE_ROW = "MDF, all depths"  # what each other row is compared with, seed by seed


def differences(results: list[dict], reference: str = REFERENCE_ROW) -> dict[str, dict]:
    """{row name: {metric: {"mean", "ci95", "seeds"}}}: the row minus `reference` on the same seed (same stage 1,
    data order and test photos), for accuracy over all photos, over the photos with a history and over the
    age-dependent ones (`PAIRED`); the mean over seeds and its Student-t 95% interval."""
    base = {r["seed"]: r for r in results if r["name"] == reference}
    table = {}
    for name in dict.fromkeys(r["name"] for r in results if r["name"] != reference):
        paired = [(r, base[r["seed"]]) for r in results if r["name"] == name and r["seed"] in base]
        table[name] = {}
        for metric in PAIRED:
            values = [row[metric] - ref[metric] for row, ref in paired
                      if row.get(metric) is not None and ref.get(metric) is not None]
            table[name][metric] = {"mean": float(np.mean(values)) if values else None, "ci95": t_interval(values),
                                   "seeds": len(values)}
    return table


def differences_markdown(table: dict[str, dict], reference: str = REFERENCE_ROW) -> str:
    cell = lambda d: "–" if d["mean"] is None else (  # noqa: E731
        f"{d['mean']:+.3f}" + (f" ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d["ci95"] else ""))
    lines = [f"Each row minus \"{reference}\" on the same seed (mean over seeds, Student-t 95% interval):", "",
             "| row | seeds | accuracy, all photos | photos with a history | age-dependent photos |",
             "|---|---:|---|---|---|"]
    lines += [f"| {name} | {d['accuracy']['seeds']} | " + " | ".join(cell(d[metric]) for metric in PAIRED) + " |"
              for name, d in table.items()]
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, dict], wall_seconds: float, command: str,
             sensitivities: dict[str, dict[str, float | None]] | None = None) -> str:
    lines = ["| row | seeds | accuracy | 95% CI | with a history | 95% CI | age-dependent | 95% CI | macro F1 | 95% CI | "
             "type accuracy | type macro F1 | train s |", "|---|---:|---|---|---|---|---|---|---|---|---|---|---:|"]
    cell = lambda s: "–" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    ci = lambda s: f"{s['ci95'][0]:.3f}–{s['ci95'][1]:.3f}" if s["ci95"] else "–"  # noqa: E731
    for name, s in summary.items():
        lines.append(f"| {name} | {s['seeds']} | {cell(s['accuracy'])} | {ci(s['accuracy'])} | "
                     f"{cell(s['accuracy_with_history'])} | {ci(s['accuracy_with_history'])} | "
                     f"{cell(s['accuracy_age_dependent'])} | {ci(s['accuracy_age_dependent'])} | {cell(s['macro_f1'])} | "
                     f"{ci(s['macro_f1'])} | {cell(s['type_accuracy'])} | {cell(s['type_macro_f1'])} | "
                     f"{s['train_seconds']['mean']:.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds; 95% CI: Student-t interval of the mean over seeds.",
              f"Command: `{command}`; wall time {wall_seconds / 60:.1f} min."]
    if sensitivities:
        labels = list(next(iter(sensitivities.values())))
        lines += ["", "Sensitivity per class, mean over seeds:", "", f"| row | {' | '.join(labels)} |",
                  f"|---|{'---:|' * len(labels)}"]
        lines += [f"| {name} | {' | '.join('–' if row[label] is None else f'{row[label]:.2f}' for label in labels)} |"
                  for name, row in sensitivities.items()]
    return "\n".join(lines) + "\n"


def run_ablation(run: RunContext, rows: tuple[Row, ...] | None = None, command: str | None = None) -> list[dict]:
    """Train and test every row (default `default_rows()`) `job.run.seeds` times from the job's base,
    `job.run.ablation_epochs` each; write ablation.json (every run, the summary), ablation.md and ablation.png into the
    output folder after every run. Returns one dict per run. `command` (default: this process's command line) is
    quoted in the table."""
    job = run.job
    start, out, epochs, rows = time.perf_counter(), job.output_dir, job.run.ablation_epochs, rows or default_rows()
    command = command or f"python {shlex.join(sys.argv)}"
    results = []
    # Seed-major: a run stopped early still has every row for its first seeds.
    for seed in range(job.run.seeds):
        seed_run = replace(run.with_job(job.replace(training={"seed": seed, "output_dir": str(out / f"seed-{seed}")})),
                           phases=run.phases.scoped(f"seed {seed}"))
        with seed_run.phases("stage 1"):
            unet_alone = stage1.run(seed_run)
        unet_path = unet_alone.weights if unet_alone else None
        no_film_path = (without_film(unet_path, unet_alone.model) if unet_path and any(row.no_film for row in rows)
                        else None)
        # The references of this seed's U-Net alone (none without stage 1): no model is trained for their rows.
        unet_row = {unet_alone.name: unet_alone} if unet_alone else {}
        with seed_run.phases("references"):
            references = {**unet_row, **{r.name: r for r in comparison.references(seed_run, unet_row)}}
        for row in rows:
            if row.unet_alone or row.reference:
                scored = references.get(row.name)
            else:
                unet = None if row.baseline or not row.stage1 else no_film_path if row.no_film else unet_path
                # No checkpoints, no validation passes: each run is short and only its test result is kept.
                row_job = seed_run.job.replace(
                    model=row_model_changes(job, row), data={"no_text": row.no_text},
                    training=dict(num_train_epochs=epochs, resume_from_checkpoint=None, save_strategy="no",
                                  eval_strategy="no", output_dir=str(out / re.sub(r"[^A-Za-z0-9]+", "_",
                                                                                  f"{row.name}-{seed}"))))
                scored = stages.train_arm(seed_run.with_job(row_job), row.name, unet_weights=unet)
            if scored is None or scored.report is None:  # no stage 1 to read, or not the main process
                continue
            results.append(result(row.name, seed, scored))
            write(out, results, time.perf_counter() - start, epochs, command, run.phases)
    if results:
        print((out / "ablation.md").read_text())
    return results


def result(name: str, seed: int, run: Result) -> dict:
    """One run's line of ablation.json: the metrics of the table, its gates at the end, per-class sensitivity."""
    report = run.report
    return {"name": name, "seed": seed, "accuracy": report["disease"]["accuracy"],
            "accuracy_with_history": run.accuracy("with_history"),
            "accuracy_age_dependent": run.accuracy("age_dependent"), "macro_f1": report["disease"]["macro_f1"],
            "type_accuracy": report["type"]["accuracy"], "type_macro_f1": report["type"]["macro_f1"],
            "train_seconds": run.train_seconds or 0.0, "gates": run.gate_history[-1]["gates"] if run.gate_history else {},
            "sensitivity": {label: scores["sensitivity"] for label, scores in report["disease"]["per_class"].items()}}


def write(out: Path, results: list[dict], wall_seconds: float, epochs: float, command: str,
          phases: Phases | None = None) -> None:
    """ablation.json (every run, the summary, the phase table so far), ablation.md and ablation.png of the runs so
    far."""
    summary = summarize(results)
    against = differences(results)
    (out / "ablation.json").write_text(json.dumps({"runs": results, "summary": summary, "differences": against,
                                                   "wall_seconds": wall_seconds, "epochs": epochs, "command": command,
                                                   "phase_seconds": phases.as_json() if phases else None},
                                                  indent=1, allow_nan=False))
    table = markdown(summary, wall_seconds, command, mean_sensitivities(results))
    if any(r["name"] == REFERENCE_ROW for r in results):
        table += "\n" + differences_markdown(against)
    if phases:
        table += "\nPhases so far (wall seconds; a phase inside another is left out of the outer one's):\n\n"
        table += phases.markdown()
    (out / "ablation.md").write_text(table)
    plot_ablation(summary, METRICS, out / "ablation.png")
