"""What a finished training job leaves: the comparison of its models (comparison.md / .json), the trained MDF-MLLM as
a complete Hub model repository (weights, remote code, processor, pipeline registration, Inference Endpoints handler,
results, plots, model card with the baseline beside it), and the job's closing summary."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mdf_mllm import guards, model_card, plots
from mdf_mllm.calibration import apply_temperature
from mdf_mllm.comparison import Result
from mdf_mllm.job import Job
from mdf_mllm.tables import comparison_markdown, comparison_table
from mdf_mllm.model_setup import describe_base
from mdf_mllm.real_photos import real_photo_section
from mdf_mllm.training import ProcessedSplit, predict
from pipeline_mdf_mllm import register_pipeline
from processing_mdf_mllm import MdfMllmDataCollator


# Inference Endpoints' custom handler, shipped in every export as model_card.ENDPOINT_HANDLER_FILE.
HANDLER_SOURCE = Path(__file__).resolve().parent / "handler.py"


# Every file an export wrote, so that a later export replaces the folder only when it holds nothing else.
EXPORT_MANIFEST = "export_files.json"


def files_in(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}


def export_dir_problem(export_dir: Path, overwrite: bool) -> str | None:
    """Why the export may not go to `export_dir` (None: it may). It may when the folder is missing or empty, or with
    `overwrite` when it is an earlier export of this project holding only what that export wrote; never when it
    holds anything else, which an export would delete."""
    if not export_dir.exists() or (export_dir.is_dir() and not any(export_dir.iterdir())):
        return None
    if not export_dir.is_dir():
        return f"--export_dir: {export_dir} is a file"
    try:
        ours = json.loads((export_dir / "config.json").read_text())["model_type"] == "mdf_mllm"
        written = set(json.loads((export_dir / EXPORT_MANIFEST).read_text())["files"]) if ours else set()
    except (OSError, ValueError, KeyError, TypeError):
        ours, written = False, set()
    foreign = sorted(files_in(export_dir) - written - {EXPORT_MANIFEST}) if ours else sorted(files_in(export_dir))
    if foreign or not ours:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (f"--export_dir: {export_dir} holds files an export did not write ({shown or 'no MDF-MLLM export'}); "
                "the export replaces its folder, so choose another --export_dir")
    if not overwrite:
        return f"--export_dir: {export_dir} holds an earlier export; --overwrite_export replaces it"
    return None


def export(job: Job, ours: Result, processor, dataset, **card) -> Path:
    """Write the repository into `job.export_dir`, atomically: everything goes to a temporary folder beside it that
    replaces the old one only once complete, so a crash never leaves a half-written model. The folder must pass
    `export_dir_problem` (checked before training; should files have appeared there since, the export goes to a new
    folder beside it instead: nothing the project did not write is deleted). `card`: see `write_repository`."""
    export_dir = job.export_dir
    if export_dir_problem(export_dir, job.run.overwrite_export):
        taken = export_dir
        export_dir = next(taken.with_name(f"{taken.name}-{n}") for n in range(1, 10**6)
                          if not taken.with_name(f"{taken.name}-{n}").exists())
        print(f"{taken} changed during training: the export goes to {export_dir} instead")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-", dir=export_dir.parent))
    try:
        write_repository(job, staging, ours, processor, dataset, **card)
        written = json.dumps({"files": sorted(files_in(staging))}, indent=1, allow_nan=False)
        (staging / EXPORT_MANIFEST).write_text(written + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # a folder's usual permissions, not mkdtemp's 0700
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-previous-", dir=export_dir.parent))
    if export_dir.exists():  # an earlier export (export_dir_problem): moved aside, deleted once replaced
        export_dir.rename(previous / export_dir.name)
    staging.rename(export_dir)
    shutil.rmtree(previous)
    return export_dir


def exported_results(ours: Result) -> dict:
    """results.json: the report, and the test photos' probabilities as the exported model gives them: scaled by its
    temperature when it carries one (`stages.calibrate`), the raw ones beside them."""
    results, temperature = ours.results_json(), ours.model.config.classifier_temperature
    if temperature is None:
        return results
    calibrated = apply_temperature(temperature, probabilities=results["probabilities"])
    return {**results, "classifier_temperature": temperature, "probabilities": calibrated.tolist(),
            "raw_probabilities": results["probabilities"]}


def write_repository(job: Job, folder: Path, ours: Result, processor, dataset, baseline: Result | None = None,
                     comparison: str = "", calibration: dict | None = None, counterfactual: dict | None = None) -> None:
    """Weights, code, processor, pipeline registration, Endpoints handler, results, plots and the model card.

    `ours`: the exported model's `Result` (its model is written, its trainer's log and gate history plotted);
    `baseline`: the `Result` of the baseline trained beside it (its loss curve goes into the plot), or None;
    `comparison`: the comparison as markdown (`tables.comparison_markdown`) for the card; `calibration`: {row name:
    (N, K) class probabilities of the test photos}, drawn as reliability diagrams and risk-coverage curves;
    `counterfactual`: the counterfactual table (`stages.counterfactual`), whence the examples' second histories.
    """
    model, trainer = ours.model, ours.trainer
    model.config.verbalizer_token_ids = processor.verbalizer_token_ids
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    register_pipeline(folder)
    shutil.copyfile(HANDLER_SOURCE, folder / model_card.ENDPOINT_HANDLER_FILE)
    model_card.write_results(exported_results(ours), folder)
    histories = {ours.name: trainer.state.log_history}
    if baseline is not None:
        histories[baseline.name] = baseline.trainer.state.log_history
    if all(any("loss" in entry for entry in history) for history in histories.values()):
        plots.plot_training_curves(histories, folder / plots.TRAINING_CURVES_FILE, ours.gate_history or None)
    if calibration:
        labels = dataset["test"]["label"]
        plots.plot_reliability(calibration, labels, folder / plots.RELIABILITY_FILE)
        plots.plot_risk_coverage(calibration, labels, folder / plots.RISK_COVERAGE_FILE)
    base_model, data = job.model.base_model, job.data
    widgets = _widget_examples(folder, dataset["test"], model, processor, counterfactual or {}, job.run.eval_batch_size)
    model_card.write_model_card(
        folder,
        base_model,
        metrics_report=ours.report,
        datasets=[data.dataset],
        widget_examples=widgets,
        training_args_summary=_training_summary(job, trainer),
        comparison=comparison,
        dataset_seed=data.dataset_seed,
        base_description=describe_base(base_model) if base_model else None,
        extra_markdown=examples_markdown(widgets) + (
            "\n" + real_photo_section(model, processor) if data.dataset == "synthetic" else ""),
    )


EXAMPLE_HISTORIES = "histories.json"  # examples/<photo> -> its clinical history, which the demo offers with it


def example_inputs(test_split, counterfactual: dict, label_names: list[str], count: int = 3) -> list[dict]:
    """The card's and the demo's examples, from the test split: `count` photos of distinct classes, each with its own
    history (those with one first); then, from the counterfactual table, one phenocopy photo with its own history and
    its twin's, and one age-dependent photo with its own history and the age swapped (the same photo, two answers;
    each the first test photo of its kind not shown before, where there is one).
    `[{"index": the test photo, "text", "title"}]`."""
    labels, texts = test_split["label"], test_split["text"]
    examples, seen = [], set()
    for index in sorted(range(len(labels)), key=lambda i: not texts[i]):  # stable: test order within each
        if labels[index] not in seen and len(seen) < count:
            seen.add(labels[index])
            own = "its own history" if texts[index] else "no history"
            examples.append({"index": index, "text": texts[index], "title": f"{label_names[labels[index]]}, {own}"})
    photos = list(zip(test_split["case_id"], test_split["file_name"]))
    for kind, other in (("phenocopy", "a {} history"), ("age swap", "the age of {}'s stage")):
        # A photo not shown yet, where there is one.
        shown = {e["index"] for e in examples}
        found = [(photos.index((p["case_id"], p["file_name"])), n)
                 for n, p in enumerate(counterfactual.get("photos", [])) if p["kind"] == kind]
        if found:
            index, number = min(found, key=lambda pair: (pair[0] in shown, pair))
            photo = counterfactual["photos"][number]
            name = label_names[labels[index]]
            examples += [{"index": index, "text": texts[index], "title": f"{kind}: a {name} photo, its own history"},
                         {"index": index, "text": photo["text"],
                          "title": f"{kind}: the same photo, " + other.format(photo["points_to"][0])}]
    return examples


def _widget_examples(folder: Path, test_split, model, processor, counterfactual: dict, batch_size: int) -> list[dict]:
    """`example_inputs` shipped in the folder (one file per example, named by its place and title) with what the
    exported model answers to each (its temperature included) and, for the demo, their histories."""
    examples = example_inputs(test_split, counterfactual, model.config.label_names)
    if not examples:
        return []
    chosen = test_split.select([e["index"] for e in examples]).remove_columns("text")
    split = ProcessedSplit(chosen.add_column("text", [e["text"] for e in examples]), processor, with_answers=False)
    probabilities = predict(model, split, MdfMllmDataCollator(processor), batch_size)
    (folder / "examples").mkdir()
    widgets = []
    for number, (example, scores) in enumerate(zip(examples, probabilities), 1):
        path = folder / "examples" / f"{number}-{re.sub(r'[^A-Za-z0-9]+', '-', example['title']).strip('-')}.png"
        test_split[example["index"]]["image"].convert("RGB").save(path)
        widgets.append({"image_path": str(path.relative_to(folder)), "text": example["text"], "title": example["title"],
                        "output": {name: round(float(score), 4) for name, score in
                                   zip(model.config.label_names, scores)}})
    histories = {Path(widget["image_path"]).name: widget["text"] for widget in widgets}
    (folder / "examples" / EXAMPLE_HISTORIES).write_text(json.dumps(histories, indent=1, allow_nan=False) + "\n")
    return widgets


def examples_markdown(widgets: list[dict]) -> str:
    """The examples as a table of the card: each photo's history and the model's two most probable answers."""
    if not widgets:
        return ""
    lines = ["## Examples from the test split", "",
             "Each photo with its own history; a phenocopy photo and an age-dependent photo also with another history "
             "(the same photo, two answers). The exported model's probabilities (the widget shows them too):", "",
             "| Example | Photo | History | Answer (probability) |", "|---|---|---|---|"]
    for widget in widgets:
        top = sorted(widget["output"].items(), key=lambda item: -item[1])[:2]
        answer = ", ".join(f"{label} ({score:.3f})" for label, score in top)
        lines.append(f"| {widget['title']} | `{widget['image_path']}` | {widget['text'] or '(none)'} | {answer} |")
    return "\n".join(lines) + "\n"


def _training_summary(job: Job, trainer) -> dict:
    args, model = trainer.args, job.model
    return {
        # A local base by its folder's name: its path is the training machine's, and the card is public.
        "base_model": model_card.hub_base_model(model.base_model) or (
            f"local folder {Path(model.base_model).name}" if model.base_model
            else f"none (trained from scratch, {model.model_size or 'small'})"),
        "dataset": job.data.dataset,
        "train_examples": len(trainer.train_dataset),
        "epochs": args.num_train_epochs,
        **({"max_steps": args.max_steps} if args.max_steps > 0 else {}),  # a smoke run says so
        "batch_size": args.per_device_train_batch_size,
        "learning_rate": args.learning_rate,
        "lora": model.lora,
        "bf16": args.bf16,
        "seed": args.seed,
        "train_runtime_s": round(trainer.state.log_history[-1].get("train_runtime", float("nan")), 1),
    }


def summary(job: Job, results: list[Result], export_dir: Path) -> str:
    """The job's last lines: what was compared, the headline numbers, where everything is."""
    base = f"fine-tuned from {job.model.base_model}" if job.model.base_model else "trained from scratch"
    lines = [f"\n{' vs '.join(r.name for r in results)}, {base}, on {job.data.dataset} "
             f"(test n={results[0].report['num_items']}):", comparison_table(results)]
    for r in results:
        per_class = r.report["disease"]["per_class"]
        sensitivity = ", ".join(f"{name} {_rate(s['sensitivity'])}" for name, s in per_class.items())
        lines.append(f"{r.name}: accuracy {r.accuracy():.3f} (with a history {_rate(r.accuracy('with_history'))}, "
                     f"without {_rate(r.accuracy('without_history'))}, age-dependent "
                     f"{_rate(r.accuracy('age_dependent'))}), macro F1 {r.report['disease']['macro_f1']:.3f}; "
                     f"sensitivity: {sensitivity}")
        if r.gate_history:
            end = r.gate_history[-1]
            lines.append(f"{r.name}: U-Net gates tanh(g_u) at step {end['step']}: " + ", ".join(
                f"layer {k} {v:+.4f} (tau {end['tau'][k]:.3f})" for k, v in end["gates"].items()))
    lines += [f"report: {job.output_dir / 'comparison.md'} (and comparison.json: paired differences, counterfactual histories, "
              "gate values)",
              f"plots: {export_dir / plots.TRAINING_CURVES_FILE}, {export_dir}/confusion_matrix_*.png",
              f"model card: {export_dir / 'README.md'}", f"exported MDF model: {export_dir}"]
    if job.data.dataset == "synthetic":
        lines.append("The data is SYNTHETIC: these numbers show the pipeline works, not how it does on real photos.")
    return "\n".join(lines)


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_comparison(results: list[Result], differences: dict, counterfactual: dict, out: Path,
                     stage1_losses: list[float], calibrated: Result | None = None) -> str:
    """comparison.md / .json: every row (the first is ours), the paired differences of ours against each other row,
    the counterfactual-history table, every row's calibration (and ours temperature-scaled, `stages.calibrate`);
    each trained baseline's results beside its checkpoints. Returns the markdown."""
    markdown = comparison_markdown(results, differences, counterfactual, calibrated)
    out.mkdir(parents=True, exist_ok=True)
    # Each replaces an earlier run's whole or not at all (a full disk leaves the earlier file, not half of this one).
    guards.atomic_write_text(out / "comparison.md", markdown)
    guards.atomic_write_text(out / "comparison.json", json.dumps(
        {"models": [r.as_json() for r in results], "paired_differences": {results[0].name: differences},
         "counterfactual_histories": counterfactual, "stage1_loss": stage1_losses,
         "temperature_scaled": calibrated.as_json() if calibrated else None}, indent=1, allow_nan=False))
    for result in results[1:]:
        if result.trainer is not None:
            model_card.write_results(result.results_json(), result.trainer.args.output_dir)
    return markdown
