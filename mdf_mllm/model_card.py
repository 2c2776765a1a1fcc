"""Evaluation and reporting for MDF-MLLM training runs: metrics with bootstrap CIs, tables, plots, model card.

Metrics come from the repository's own `evaluate` module (`metrics/fundus_metrics`), loaded from disk so that
evaluation runs offline. Plots are drawn on `matplotlib.figure.Figure` objects and saved as PNG, which renders with
the Agg backend without touching pyplot's global state; matplotlib is imported inside the plotting functions only.
"""

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np

from configuration_mdf_mllm import DISEASE_TYPES

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "fundus_metrics"
LEVELS = ("disease", "type")
CI_METRICS = ("accuracy", "macro_f1")
BOOTSTRAP_CHUNK = 256  # resamples drawn at once: bounds memory to CHUNK x num_items indices


@functools.lru_cache(maxsize=1)
def load_fundus_metric():
    """The repository's `evaluate` metric module, loaded from its folder (no Hub access)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def _metric_functions():
    """The python module behind the loaded metric, whose array functions serve the bootstrap."""
    return sys.modules[type(load_fundus_metric()).__module__]


def _label_arrays(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"y_true and y_pred must be non-empty, 1-D and equal in length, got {y_true.shape} and {y_pred.shape}"
        )
    for field, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{field} must hold label ids in [0, {num_classes}), got {values.min()}..{values.max()}")
    return y_true, y_pred


def type_ids(disease_types: list[str]) -> np.ndarray:
    """Index into `DISEASE_TYPES` of each label id's disease type. `(num_labels,)` ints."""
    unknown = sorted(set(disease_types) - set(DISEASE_TYPES))
    if unknown:
        raise ValueError(f"disease_types: {unknown} not in {DISEASE_TYPES}")
    return np.array([DISEASE_TYPES.index(t) for t in disease_types], dtype=np.int64)


def bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_bootstrap: int, seed: int
) -> dict[str, list[float]]:
    """Percentile 95% intervals of accuracy and macro F1 over `n_bootstrap` resamples of the items (with replacement).

    The same seed draws the same resamples, so the disease and type levels of one report share them.
    """
    functions = _metric_functions()
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in CI_METRICS}
    for start in range(0, n_bootstrap, BOOTSTRAP_CHUNK):
        rows = rng.integers(0, len(y_true), size=(min(BOOTSTRAP_CHUNK, n_bootstrap - start), len(y_true)))
        scores = functions.summary_scores(functions.confusion_matrix(y_true[rows], y_pred[rows], num_classes))
        for name in CI_METRICS:
            samples[name].append(scores[name])
    return {name: np.percentile(np.concatenate(values), [2.5, 97.5]).tolist() for name, values in samples.items()}


def misclassified_items(y_true, y_pred, label_names, items: list[dict], probabilities=None) -> list[dict]:
    """The test items the model got wrong, in item order, so that a user can open those photos.

    Args:
        y_true, y_pred: `(num_items,)` label ids.
        label_names: name of each label id.
        items: one dict per item, in the order of `y_true`, with its `case_id` and `file_name` (the photo's path
            relative to the data folder).
        probabilities: `(num_items, num_labels)` class probabilities, or None.

    Returns:
        `[{"index", "case_id", "file_name", "truth", "prediction", "probability"}]`: `index` is the item's position,
        truth and prediction are label names, `probability` the one given to the (wrong) prediction (None without
        `probabilities`).
    """
    if len(items) != len(y_true):
        raise ValueError(f"items has {len(items)} entries, y_true {len(y_true)}: one item per test example")
    for index, item in enumerate(items):
        missing = sorted({"case_id", "file_name"} - set(item))
        if missing:
            raise ValueError(f"items[{index}] has no {missing}; each item needs 'case_id' and 'file_name'")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(y_true), len(label_names)):
            raise ValueError(
                f"probabilities must have shape (num_items, num_labels) = {(len(y_true), len(label_names))}, "
                f"got {probabilities.shape}"
            )
    return [
        {
            "index": int(index),
            "case_id": items[index]["case_id"],
            "file_name": items[index]["file_name"],
            "truth": label_names[y_true[index]],
            "prediction": label_names[y_pred[index]],
            "probability": None if probabilities is None else float(probabilities[index, y_pred[index]]),
        }
        for index in np.flatnonzero(y_true != y_pred)
    ]


def classification_report(
    y_true,
    y_pred,
    label_names,
    disease_types,
    n_bootstrap=1000,
    seed=0,
    items: list[dict] | None = None,
    probabilities=None,
) -> dict:
    """Disease- and type-level metrics with bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true, y_pred: `(num_items,)` label ids in `[0, len(label_names))`.
        label_names: name of each label id.
        disease_types: disease type (one of `DISEASE_TYPES`) of each label id.
        items: optional, one `{"case_id", "file_name", ...}` per item: the report then lists the misclassified ones.
        probabilities: optional `(num_items, num_labels)` class probabilities, for the misclassified list.

    Returns:
        `{"num_items", "bootstrap": {...}, "disease": metrics, "type": metrics}`, where metrics is the metric module's
        output plus `ci95: {"accuracy": [low, high], "macro_f1": [low, high]}`; with `items`, also `"misclassified"`
        (see `misclassified_items`).
    """
    label_names = list(label_names)
    if len(disease_types) != len(label_names):
        raise ValueError(f"disease_types has {len(disease_types)} entries, label_names {len(label_names)}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    y_true, y_pred = _label_arrays(y_true, y_pred, len(label_names))
    type_of_label = type_ids(disease_types)
    levels = {
        "disease": (y_true, y_pred, label_names),
        "type": (type_of_label[y_true], type_of_label[y_pred], list(DISEASE_TYPES)),
    }
    report = {
        "num_items": int(len(y_true)),
        "bootstrap": {"method": "percentile", "confidence": 0.95, "n_resamples": n_bootstrap, "seed": seed},
    }
    if items is not None:
        report["misclassified"] = misclassified_items(y_true, y_pred, label_names, items, probabilities)
    for level, (references, predictions, names) in levels.items():
        scores = load_fundus_metric().compute(predictions=predictions, references=references, label_names=names)
        scores["ci95"] = bootstrap_ci(references, predictions, len(names), n_bootstrap, seed)
        report[level] = scores
    return report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _with_ci(scores: dict, name: str) -> str:
    low, high = scores["ci95"][name]
    return f"{scores[name]:.3f} ({low:.3f}–{high:.3f})"


def markdown_table(report: dict) -> str:
    """Summary table of both levels, then one per-class table per level."""
    lines = [
        "| Level | Accuracy (95% CI) | Macro F1 (95% CI) | Macro recall | Macro precision |",
        "|---|---|---|---|---|",
    ]
    for level in LEVELS:
        scores = report[level]
        lines.append(
            f"| {level} | {_with_ci(scores, 'accuracy')} | {_with_ci(scores, 'macro_f1')} | "
            f"{scores['macro_recall']:.3f} | {scores['macro_precision']:.3f} |"
        )
    lines += ["", _bootstrap_note(report)]
    for level in LEVELS:
        lines += ["", f"Per class ({level}):", "", "| Class | Support | Sensitivity | Specificity | Precision | F1 |"]
        lines.append("|---|---|---|---|---|---|")
        for name, scores in report[level]["per_class"].items():
            lines.append(
                f"| {name} | {scores['support']} | {_fmt(scores['sensitivity'])} | {_fmt(scores['specificity'])} | "
                f"{_fmt(scores['precision'])} | {_fmt(scores['f1'])} |"
            )
    return "\n".join(lines) + "\n"


def _bootstrap_note(report: dict) -> str:
    bootstrap = report["bootstrap"]
    return (
        f"{report['num_items']} items; 95% CIs: {bootstrap['method']} bootstrap over items, "
        f"{bootstrap['n_resamples']} resamples, seed {bootstrap['seed']}. Macro averages run over the classes present "
        "in labels or predictions; – marks a score with a zero denominator."
    )


def misclassified_table(report: dict) -> str:
    """Markdown list of the misclassified items of a report made with `items` (empty string without them)."""
    if "misclassified" not in report:
        return ""
    wrong = report["misclassified"]
    if not wrong:
        return f"Misclassified test items: none of {report['num_items']}.\n"
    lines = [
        f"Misclassified test items ({len(wrong)} of {report['num_items']}; file names are relative to the data "
        "folder):",
        "",
        "| # | Case | File | Truth | Prediction | Probability |",
        "|---:|---|---|---|---|---:|",
    ]
    for item in wrong:
        lines.append(
            f"| {item['index']} | {item['case_id']} | {item['file_name']} | {item['truth']} | {item['prediction']} | "
            f"{_fmt(item['probability'])} |"
        )
    return "\n".join(lines) + "\n"


def comparison_table(reports: list[dict]) -> str:
    """Markdown comparison of several models evaluated on the same items: one row per report (named by its "name"),
    disease and type accuracy and macro F1 with their 95% CIs (plus parameters and training seconds when every report
    has them), then per-class sensitivity side by side."""
    for index, report in enumerate(reports):
        if "name" not in report:
            raise ValueError(f"reports[{index}] has no 'name'; each compared report needs one")
    extra = [key for key in ("parameters", "train_seconds") if all(key in report for report in reports)]
    headers = {"parameters": "Parameters", "train_seconds": "Train s"}
    columns = ["Model", "Accuracy (95% CI)", "Macro F1 (95% CI)", "Type accuracy (95% CI)", "Type macro F1 (95% CI)"]
    lines = [
        "| " + " | ".join(columns + [headers[key] for key in extra]) + " |",
        "|---|---|---|---|---|" + "---:|" * len(extra),
    ]
    for report in reports:
        disease, kind = report["disease"], report["type"]
        cells = [_with_ci(level, name) for level in (disease, kind) for name in CI_METRICS]
        cells += [f"{report[key]:,}" for key in extra]
        lines.append(f"| {report['name']} | " + " | ".join(cells) + " |")
    lines += ["", _bootstrap_note(reports[0]), "", "Sensitivity per class:", ""]
    lines.append("| Class | Support | " + " | ".join(report["name"] for report in reports) + " |")
    lines.append("|---|---:|" + "---:|" * len(reports))
    for name, scores in reports[0]["disease"]["per_class"].items():
        sensitivities = [_fmt(report["disease"]["per_class"][name]["sensitivity"]) for report in reports]
        lines.append(f"| {name} | {scores['support']} | " + " | ".join(sensitivities) + " |")
    return "\n".join(lines) + "\n"


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def row_normalised(matrix) -> np.ndarray:
    """Each row of a confusion matrix over its total: the share of a true class given each prediction.
    `(K, K)` counts -> `(K, K)` rates; a row with no items is NaN (undefined)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return _metric_functions()._safe_divide(matrix, matrix.sum(axis=1, keepdims=True))


def plot_confusion_matrix(matrix, label_names: list[str], path, title: str) -> Path:
    """PNG heat map of a confusion matrix (rows true, columns predicted), coloured by the row-normalised rate so that
    a small class reads as clearly as a large one; each cell shows its count over its rate."""
    counts = np.asarray(matrix)
    rates = row_normalised(counts)
    size = 3 + 0.7 * len(label_names)
    figure = _new_figure(size + 1, size)
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)  # NaN rows (no true items) stay blank
    figure.colorbar(image, ax=axes, shrink=0.8, label="Share of the true class (row-normalised)")
    ticks = np.arange(len(label_names))
    axes.set_xticks(ticks, label_names, rotation=45, ha="right")
    axes.set_yticks(ticks, label_names)
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("True label")
    axes.set_title(title)
    for (row, column), count in np.ndenumerate(counts):
        rate = rates[row, column]
        axes.text(
            column, row, f"{count}\n{_rate_text(rate)}", ha="center", va="center", fontsize="small",
            color="white" if rate > 0.5 else "black",
        )
    return _save(figure, path)


def _rate_text(rate: float) -> str:
    return "–" if np.isnan(rate) else f"{rate:.2f}"


def write_results(report: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md (with the misclassified items when the report has them) and one
    confusion-matrix PNG per level (`CONFUSION_MATRIX_FILE`) into `out_dir`. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    misclassified = misclassified_table(report)
    paths["markdown"].write_text(
        "# Evaluation results\n\n" + markdown_table(report) + (f"\n{misclassified}" if misclassified else "")
    )
    for level in LEVELS:
        paths[f"confusion_{level}"] = plot_confusion_matrix(
            report[level]["confusion_matrix"],
            report[level]["label_names"],
            out_dir / CONFUSION_MATRIX_FILE.format(level=level),
            title=f"Confusion matrix ({level}, n={report['num_items']})",
        )
    return paths


CONFUSION_MATRIX_FILE = "confusion_matrix_{level}.png"
TRAINING_CURVES_FILE = "training_curves.png"
ENDPOINT_HANDLER_FILE = "handler.py"  # the name Inference Endpoints looks for


def _loss_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """`trainer.state.log_history` -> {"train": [(step, loss)], "eval": [(step, eval_loss)]}."""
    return {
        "train": [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry],
        "eval": [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry],
    }


def _gate_curves(gate_history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """gate_history -> {"gates": {layer: [(step, tanh(g_u))]}, "tau": {layer: [(step, tau)]}}."""
    curves = {"gates": {}, "tau": {}}
    for index, entry in enumerate(gate_history):
        missing = sorted({"step", "gates", "tau"} - set(entry))
        if missing:
            raise ValueError(f"gate_history[{index}] has no {missing}; entries are {{'step', 'gates', 'tau'}}")
        for kind, series in curves.items():
            for layer, value in entry[kind].items():
                series.setdefault(str(layer), []).append((entry["step"], float(value)))
    for series in curves.values():  # layers in numeric order: "3" before "13"
        ordered = sorted(series, key=lambda layer: (not layer.isdigit(), int(layer) if layer.isdigit() else layer))
        series.update({layer: series.pop(layer) for layer in ordered})
    return curves


def plot_training_curves(histories: dict[str, list[dict]], path, gate_history: list[dict] | None = None) -> Path:
    """PNG of every model's training loss (solid) and evaluation loss (dashed) against the step, on one log-scale axis
    so the first steps do not flatten the rest; with `gate_history`, two panels beside it: each fused layer's U-Net
    gate tanh(g_u) and its attention scale tau against the step.

    Args:
        histories: model name -> its `trainer.state.log_history` (entries with `step` and `loss` or `eval_loss`).
        gate_history: `[{"step": int, "gates": {layer: tanh(g_u)}, "tau": {layer: tau}}]`, layer = the fused
            cross-attention layer's index.
    """
    curves = {name: _loss_curves(history) for name, history in histories.items()}
    empty = [name for name, curve in curves.items() if not any(curve.values())]
    if not curves or empty:
        raise ValueError(f"histories: no entry with 'loss' or 'eval_loss' for {empty or 'any model'}")
    gates = _gate_curves(gate_history) if gate_history is not None else None
    figure = _new_figure(6 if gates is None else 15, 4.5)
    panels = figure.subplots(1, 1 if gates is None else 3, squeeze=False)[0]
    losses = panels[0]
    for colour, (name, curve) in enumerate(curves.items()):
        for kind, style in (("train", "-"), ("eval", "--")):
            if curve[kind]:
                steps, values = zip(*curve[kind])
                losses.plot(steps, values, style, color=f"C{colour}", marker="o" if kind == "eval" else None,
                            markersize=4, label=f"{name}, {kind}")
    losses.set_yscale("log")
    losses.yaxis.set_major_formatter(_plain_log_formatter())
    losses.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    _label(losses, "Loss (log scale)", "Loss: training (solid) and evaluation (dashed)")
    if gates is not None:
        for axes, kind, ylabel, title in (
            (panels[1], "gates", "tanh(g_u)", "U-Net branch gates (model parameters)"),
            (panels[2], "tau", "tau", "U-Net attention scale tau (model parameters)"),
        ):
            for colour, (layer, points) in enumerate(gates[kind].items()):
                steps, values = zip(*points)
                axes.plot(steps, values, color=f"C{colour}", label=f"layer {layer}")
            _label(axes, ylabel, title)
        panels[1].axhline(0, color="grey", linewidth=0.8)
    return _save(figure, path)


def _plain_log_formatter(**kwargs):
    """matplotlib's choice of which log ticks to label (fewer minor labels over a wider range), written as 0.3 and 2
    rather than 3e-01."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    return PlainLogFormatter(**kwargs)


def _label(axes, ylabel: str, title: str) -> None:
    axes.set_xlabel("Step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")


def ablation_summary(rows: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """Group rows by name and reduce each numeric metric over seeds.

    Returns the metric names (in first-seen order) and `{name: {"seeds": n, metric: (mean, std)}}`, std being the
    sample standard deviation (ddof=1; 0 for a single seed).
    """
    metric_names, values = [], {}
    for index, row in enumerate(rows):
        if "name" not in row or "seed" not in row:
            raise ValueError(f"ablation row {index} needs 'name' and 'seed', got keys {sorted(row)}")
        for key, value in row.items():
            if key not in ("name", "seed") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in metric_names:
                    metric_names.append(key)
                values.setdefault(row["name"], {}).setdefault(key, []).append(float(value))
        values.setdefault(row["name"], {})
    seeds = {name: len({row["seed"] for row in rows if row["name"] == name}) for name in values}
    summary = {
        name: {
            "seeds": seeds[name],
            **{key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for key, v in metrics.items()},
        }
        for name, metrics in values.items()
    }
    return metric_names, summary


def ablation_table(rows: list[dict]) -> str:
    """Markdown table of mean ± std per configuration name over seeds."""
    metric_names, summary = ablation_summary(rows)
    lines = ["| Name | Seeds | " + " | ".join(metric_names) + " |", "|---|---|" + "---|" * len(metric_names)]
    for name, stats in summary.items():
        cells = [f"{stats[key][0]:.3f} ± {stats[key][1]:.3f}" if key in stats else "–" for key in metric_names]
        lines.append(f"| {name} | {stats['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation (ddof=1) over seeds."]
    return "\n".join(lines) + "\n"


def plot_ablation(rows: list[dict], path) -> Path:
    """PNG grouped bar chart: one group per configuration name, one bar per metric, std error bars."""
    metric_names, summary = ablation_summary(rows)
    names = list(summary)
    figure = _new_figure(4 + 0.3 * len(names) * max(1, len(metric_names)), 4.5)  # about 0.3 inch per bar
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(metric_names))
    for offset, metric in enumerate(metric_names):
        stats = [summary[name].get(metric, (math.nan, 0.0)) for name in names]
        positions = np.arange(len(names)) + (offset - (len(metric_names) - 1) / 2) * width
        axes.bar(positions, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=metric)
    axes.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("Score (mean ± std over seeds)")
    axes.set_title("Ablation")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(figure, path)


# Bytes per parameter; see the caption of `memory_table_11b`.
BF16_BYTES = 2
NF4_BYTES = 4.127 / 8  # 4-bit NormalFloat + double-quantised block constants (QLoRA paper: 0.127 bits/param)
GRAD_BYTES = 2  # bf16 gradients
OPTIMIZER_BYTES = 4 + 8  # fp32 master copy + Adam first and second moments in fp32


def memory_table_11b(num_params_base: int, num_params_mdf: int, num_params_lora: int = 0, num_gpus: int = 8) -> str:
    """Markdown table of the training-state memory of full fine-tuning, LoRA and QLoRA, on 1 and `num_gpus` GPUs.

    Full fine-tuning trains base + MDF parameters; LoRA and QLoRA train the MDF modules and the adapters
    (`num_params_lora`) and freeze the base, in bf16 or 4-bit NF4.
    """
    gib = 2**30
    total = num_params_base + num_params_mdf
    adapters = num_params_mdf + num_params_lora
    methods = {  # name: (trainable params, weight bytes)
        "Full fine-tuning": (total, BF16_BYTES * total),
        "LoRA": (adapters, BF16_BYTES * (num_params_base + adapters)),
        "QLoRA": (adapters, NF4_BYTES * num_params_base + BF16_BYTES * adapters),
    }
    lines = [
        f"| Method | Trainable params | Weights (GiB) | Grads (GiB) | Optimizer (GiB) | Total, 1 GPU (GiB) | "
        f"Per GPU, {num_gpus} GPUs FSDP/ZeRO-3 (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (trainable, weight_bytes) in methods.items():
        grads, optimizer = GRAD_BYTES * trainable, OPTIMIZER_BYTES * trainable
        state = weight_bytes + grads + optimizer
        lines.append(
            f"| {name} | {trainable / 1e9:.3f} B | {weight_bytes / gib:.1f} | {grads / gib:.1f} | "
            f"{optimizer / gib:.1f} | {state / gib:.1f} | {state / num_gpus / gib:.1f} |"
        )
    lines += [
        "",
        f"Parameters: base {num_params_base / 1e9:.3f} B, MDF modules {num_params_mdf / 1e9:.3f} B, "
        f"LoRA adapters {num_params_lora / 1e9:.3f} B. Per parameter: weights bf16 = 2 B (QLoRA's frozen base: "
        "NF4 with double quantisation = 4.127 bits = 0.516 B); gradients bf16 = 2 B per trainable parameter; "
        "optimizer = fp32 master copy 4 B + Adam moments 2 × 4 B = 12 B per trainable parameter, so a trainable "
        f"parameter costs 16 B in all. Sharded column = 1-GPU total / {num_gpus} (FSDP full shard / ZeRO-3 shard "
        "weights, gradients and optimizer state). Activations (cut by gradient checkpointing), FSDP all-gather "
        "buffers (about one wrapped layer), the CUDA context and allocator fragmentation come on top.",
    ]
    return "\n".join(lines) + "\n"


def _shipped_file(folder: Path, path, what: str) -> str:
    """`path` (absolute, or relative to `folder`) as a POSIX path relative to `folder`; the file must exist inside it,
    since a model repository can only link and serve its own files."""
    file = Path(path)
    file = file if file.is_absolute() else folder / file
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist; copy it into {folder} first")
    if not file.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{what} {file} is outside {folder}; the Hub only serves files in the repo")
    return file.resolve().relative_to(folder.resolve()).as_posix()


def _widgets(folder: Path, widget_examples: list[dict]) -> list[dict]:
    """Hub widget entries with static outputs; every image must be a file inside `folder`."""
    widgets = []
    for example in widget_examples:
        src = _shipped_file(folder, example["image_path"], "widget image")
        scores = sorted(example["output"].items(), key=lambda item: -item[1])
        widgets.append(
            {
                "src": src,
                "text": example["text"],
                "example_title": example.get("title", Path(src).stem),
                "output": [{"label": label, "score": round(float(score), 4)} for label, score in scores],
            }
        )
    return widgets


MODEL_CARD_TAGS = ["medical", "ophthalmology", "fundus", "retina", "mllama", "image-text-to-text", "custom_code"]
LLAMA_LICENSE = "llama3.2"  # Meta's Llama 3.2 Community License: binds every model fine-tuned from its weights
PROJECT_LICENSE = "apache-2.0"  # this repository's licence (pyproject.toml)

# How the card names each dataset_builder configuration. None of them is a Hub dataset, so the card's metadata has
# no `datasets:` entry and no model-index (whose `dataset.type` must be a Hub dataset id): results are in the text.
DATASET_DESCRIPTIONS = {
    "synthetic": "the synthetic fundus set rendered by this repository's `dataset_builder`{seed} (fundus-like "
    "photos with exact vessel masks and clinical texts; not a Hub dataset)",
    "fives": "FIVES (AMD, DR, glaucoma and normal fundus photos with vessel masks), read by `dataset_builder` from "
    "a local copy",
    "hrf": "HRF (healthy, DR and glaucoma fundus photos with vessel masks), read by `dataset_builder` from a local "
    "copy",
    "stonerounds": "StoneRounds inherited retinal disease cases with clinical histories, read by `dataset_builder` "
    "from a local copy",
    "all": "FIVES, HRF and StoneRounds together, read by `dataset_builder` from local copies",
    "manifest": "a local image folder described by its `metadata.jsonl`, read by `dataset_builder`",
}

# The figures `write_results` and `plot_training_curves` write, with their captions in the card.
STANDARD_FIGURES = {
    TRAINING_CURVES_FILE: "Training and evaluation loss of each model (log scale), and the U-Net gates when logged",
    **{
        CONFUSION_MATRIX_FILE.format(level=level): f"Confusion matrix, {level} level, test set (count and share of "
        "the true class)"
        for level in LEVELS
    },
}


def license_for(base_model: str | None) -> str:
    """The licence a model inherits from its base: Llama 3.2's for anything fine-tuned from a Meta Llama 3.2
    checkpoint (a Hub id under meta-llama/ or a local copy named after it), else this project's Apache-2.0 (a model
    trained from scratch with the repository's own tokenizer, or from a base made by `train_hf.py --make_base`)."""
    name = (base_model or "").lower()
    return LLAMA_LICENSE if "meta-llama" in name or "llama-3.2" in name else PROJECT_LICENSE


def describe_data(datasets: list[str], dataset_seed: int | None = None) -> str:
    """One sentence naming the data as it is, from `dataset_builder` configuration names."""
    unknown = sorted(set(datasets) - set(DATASET_DESCRIPTIONS))
    if not datasets or unknown:
        raise ValueError(f"datasets: expected names from {sorted(DATASET_DESCRIPTIONS)}, got {datasets}")
    seed = "" if dataset_seed is None else f" with seed {dataset_seed}"
    return "; ".join(DATASET_DESCRIPTIONS[name].format(seed=seed) for name in datasets)


DEFAULT_USAGE_CODE = """from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("path/or/repo-id", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/or/repo-id", trust_remote_code=True)
inputs = processor(images=Image.open("fundus.png"), clinical_text="62-year-old, blurred central vision.")
probabilities = model.classify(**inputs)  # (batch, num_labels)
print(model.config.id2label[int(probabilities.argmax(-1)[0])])"""


def hub_base_model(base_model: str | None) -> str | None:
    """`base_model` when it names a Hub model; None for no base or a local folder, whose path (on the training
    machine) means nothing on the Hub: the card then describes the base in its text."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if base_model is None or Path(base_model).exists():
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _origin(base_model: str | None, base_description: str | None) -> str:
    if base_model is None:
        return (
            "This model was trained from scratch: Llama 3.2 Vision's (Mllama's) architecture at a small size, randomly "
            "initialised, with the repository's own tokenizer; it holds no pretrained weights."
        )
    hub_id = hub_base_model(base_model)
    base = f"`{hub_id}`" if hub_id else (
        f"a local base, {base_description or f'the Mllama checkpoint in a folder named `{Path(base_model).name}`'}")
    return (
        f"This model was fine-tuned from {base}: every Mllama weight was loaded from it, and the MDF modules "
        "were added with their U-Net gates at zero, so training started from exactly the base model's outputs."
    )


def _results_section(folder: Path, model_name: str, metrics_report: dict, comparison_reports, figures) -> str:
    """Results tables, the comparison with other models, the full results file and the figures, as markdown."""
    parts = [markdown_table(metrics_report)]
    if comparison_reports:
        ours = {"name": model_name, **metrics_report}
        parts.append(
            "### Comparison\n\nThe same test items, every model trained on the same data:\n\n"
            + comparison_table([ours, *comparison_reports])
        )
    if (folder / "results.md").is_file():
        listed = " and the misclassified test items" if "misclassified" in metrics_report else ""
        parts.append(f"The full results{listed}: [results.md](results.md).\n")
    if figures:
        parts.append(
            "### Figures\n\n"
            + "\n".join(
                f"{caption}:\n\n![{caption}]({_shipped_file(folder, path, 'figure')})\n"
                for path, caption in figures.items()
            )
        )
    return "\n".join(parts)


def _handler_note(folder: Path) -> str:
    if not (folder / ENDPOINT_HANDLER_FILE).is_file():
        return ""
    return (
        f"Deployed on Inference Endpoints, the repository's `{ENDPOINT_HANDLER_FILE}` (a custom handler) serves it: "
        'send `{"inputs": <the photo, base64>, "parameters": {"clinical_text": "...", "top_k": 3, "check_fundus": '
        'true}}` (parameters optional) and get the pipeline\'s `[{"label", "score", "disease_type"}, ...]`, highest '
        'score first, or `{"error": "..."}` for a photo that is not a fundus photograph or a malformed request.\n'
    )


def _model_card_body(folder, model_name, origin, metrics_report, data, comparison_reports, figures,
                     training_args_summary, synthetic_data, usage_code, extra_markdown) -> str:
    data_note = (
        "**The reported numbers come from synthetic fundus images; they show the pipeline works, not clinical "
        "performance.** "
        if synthetic_data
        else ""
    )
    training_rows = "\n".join(f"| {key} | {value} |" for key, value in training_args_summary.items())
    return f"""# {model_name}

MDF-MLLM (multi-depth fusion multimodal LLM) classifies retinal diseases from a fundus photograph plus optional
clinical text. It is Llama 3.2 Vision (Mllama) with a U-Net beside it: skip features from four U-Net encoder depths
are projected to the language model's width and read by its cross-attention layers through extra gated
cross-attention, and the text conditions the U-Net through FiLM. A prediction scores every class verbalizer by its
log-likelihood given the prompt; labels are two-level (disease, and its type: {", ".join(DISEASE_TYPES)}).

{origin}

## How to use

The model and processor classes live in this repository, so loading needs `trust_remote_code=True`:

```python
{usage_code}
```

The widget on this page shows stored example outputs: the hosted inference API does not run custom code.
{_handler_note(folder)}
## Results

Trained and evaluated on {data}.

{_results_section(folder, model_name, metrics_report, comparison_reports, figures)}
## Intended use and limitations

Research use only. This model is not a medical device, has not been validated clinically, and must not be used
for diagnosis or treatment decisions. {data_note}Fundus datasets are small, come from few sites and cameras, and
rare inherited diseases have few examples; expect lower performance on other populations, devices and image
quality, and check calibration before using the probabilities.

## Training details

| Setting | Value |
|---|---|
{training_rows}
{extra_markdown}"""


def write_model_card(
    folder,
    base_model: str | None,
    *,
    metrics_report: dict,
    datasets: list[str],
    training_args_summary: dict,
    widget_examples: list[dict] = (),
    comparison_reports: list[dict] | None = None,
    dataset_seed: int | None = None,
    figures: dict[str, str] | None = None,
    extra_markdown: str = "",
    model_name: str = "MDF-MLLM",
    license: str | None = None,
    usage_code: str = DEFAULT_USAGE_CODE,
    base_description: str | None = None,
) -> Path:
    """Write `folder/README.md`: a Hub model card (metadata, static widgets, usage, results, figures, limitations).

    Args:
        base_model: the checkpoint actually loaded (Hub id or path), or None for a model trained from scratch. Only
            a Hub id goes into the card's `base_model` metadata; a local base is described in the text
            (`base_description`, else its folder's name), never by its path. The licence follows from it
            (`license_for`).
        metrics_report: `classification_report(...)` of the test set.
        datasets: the `dataset_builder` names of the data (`DATASET_DESCRIPTIONS`), described in the text.
        training_args_summary: setting -> value, shown as the training details table.
        widget_examples: `[{"image_path": file inside folder, "text": clinical text, "output": {label: score},
            "title": optional caption}]`; the Hub shows these stored outputs.
        comparison_reports: reports of other models on the same test items (each with its "name", e.g. the
            baseline's), shown in a comparison table beside this model's.
        dataset_seed: the seed the synthetic set (and the splits) were made with.
        figures: path (inside `folder`) -> caption of each image embedded in the card; default: the
            `STANDARD_FIGURES` that exist in `folder`.
        license: overrides `license_for(base_model)`, for a Llama-derived base whose name does not show it.
        usage_code: the Python shown under "How to use" (load, preprocess, `model.classify`).
        base_description: what a local base is and how it was made (e.g. `model_setup.describe_base`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    data = describe_data(list(datasets), dataset_seed)
    if figures is None:
        figures = {name: caption for name, caption in STANDARD_FIGURES.items() if (folder / name).is_file()}
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_base_model(base_model),
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license or license_for(base_model),
        tags=MODEL_CARD_TAGS,
        widget=_widgets(folder, widget_examples) or None,
    )
    body = _model_card_body(
        folder, model_name, _origin(base_model, base_description), metrics_report, data, comparison_reports, figures,
        training_args_summary, "synthetic" in datasets, usage_code, extra_markdown,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    card.save(path)
    return path
