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


def classification_report(y_true, y_pred, label_names, disease_types, n_bootstrap=1000, seed=0) -> dict:
    """Disease- and type-level metrics with bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true, y_pred: `(num_items,)` label ids in `[0, len(label_names))`.
        label_names: name of each label id.
        disease_types: disease type (one of `DISEASE_TYPES`) of each label id.

    Returns:
        `{"num_items", "bootstrap": {...}, "disease": metrics, "type": metrics}`, where metrics is the metric module's
        output plus `ci95: {"accuracy": [low, high], "macro_f1": [low, high]}`.
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
    bootstrap = report["bootstrap"]
    lines += [
        "",
        f"{report['num_items']} items; 95% CIs: {bootstrap['method']} bootstrap over items, "
        f"{bootstrap['n_resamples']} resamples, seed {bootstrap['seed']}. Macro averages run over the classes present "
        "in labels or predictions; – marks a score with a zero denominator.",
    ]
    for level in LEVELS:
        lines += ["", f"Per class ({level}):", "", "| Class | Support | Sensitivity | Specificity | Precision | F1 |"]
        lines.append("|---|---|---|---|---|---|")
        for name, scores in report[level]["per_class"].items():
            lines.append(
                f"| {name} | {scores['support']} | {_fmt(scores['sensitivity'])} | {_fmt(scores['specificity'])} | "
                f"{_fmt(scores['precision'])} | {_fmt(scores['f1'])} |"
            )
    return "\n".join(lines) + "\n"


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion_matrix(matrix, label_names: list[str], path, title: str) -> Path:
    """PNG heat map of a confusion matrix (rows true, columns predicted) with the count in every cell."""
    matrix = np.asarray(matrix)
    size = 2.5 + 0.6 * len(label_names)
    figure = _new_figure(size, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = np.arange(len(label_names))
    axes.set_xticks(ticks, label_names, rotation=45, ha="right")
    axes.set_yticks(ticks, label_names)
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("True label")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def write_results(report: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md and one confusion-matrix PNG per level into `out_dir`. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text("# Evaluation results\n\n" + markdown_table(report))
    for level in LEVELS:
        paths[f"confusion_{level}"] = plot_confusion_matrix(
            report[level]["confusion_matrix"],
            report[level]["label_names"],
            out_dir / f"confusion_matrix_{level}.png",
            title=f"Confusion matrix ({level}, n={report['num_items']})",
        )
    return paths


def plot_training_curve(log_history: list[dict], path) -> Path:
    """PNG of training and evaluation loss against the global step, from `trainer.state.log_history`."""
    curves = {
        "train loss": [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry],
        "eval loss": [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry],
    }
    if not any(curves.values()):
        raise ValueError("log_history has no entry with 'loss' or 'eval_loss'")
    figure = _new_figure(6, 4)
    axes = figure.add_subplot()
    for label, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, marker="o" if len(points) < 30 else None, label=label)
    axes.set_xlabel("Step")
    axes.set_ylabel("Loss")
    axes.set_title("Training curve")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


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
    figure = _new_figure(2 + 1.2 * len(names) * max(1, len(metric_names)) / 2, 4)
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
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


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


def _model_index_results(report: dict, dataset: str, split: str) -> list:
    """One `EvalResult` per level and CI metric; the metric's display name carries its level, 95% CI and n.

    huggingface_hub groups results by task type and dataset, so both levels share one task entry.
    """
    from huggingface_hub import EvalResult

    metric_types = {"accuracy": ("accuracy", None, "accuracy"), "macro_f1": ("f1", "macro", "macro F1")}
    results = []
    for level in LEVELS:
        for key, (metric_type, metric_config, title) in metric_types.items():
            low, high = report[level]["ci95"][key]
            description = f"{level.capitalize()} {title} (95% CI {low:.3f}–{high:.3f}, n={report['num_items']})"
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Retinal disease and disease-type classification (fundus photo + clinical text)",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_config=metric_config,
                    metric_value=round(report[level][key], 4),
                    metric_name=description,
                )
            )
    return results


def _widgets(out_dir: Path, widget_examples: list[dict]) -> list[dict]:
    """Hub widget entries with static outputs; every image must be a file inside `out_dir`."""
    widgets = []
    for example in widget_examples:
        image = Path(example["image_path"])
        image = image if image.is_absolute() else out_dir / image
        if not image.is_file():
            raise FileNotFoundError(f"widget image {image} does not exist; copy it into {out_dir} first")
        if not image.resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(f"widget image {image} is outside {out_dir}; the Hub only serves files in the repo")
        scores = sorted(example["output"].items(), key=lambda item: -item[1])
        widgets.append(
            {
                "src": image.resolve().relative_to(out_dir.resolve()).as_posix(),
                "text": example["text"],
                "example_title": example.get("title", image.stem),
                "output": [{"label": label, "score": round(float(score), 4)} for label, score in scores],
            }
        )
    return widgets


MODEL_CARD_TAGS = ["medical", "ophthalmology", "fundus", "retina", "mllama", "image-text-to-text", "custom_code"]


DEFAULT_USAGE_CODE = """from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("path/or/repo-id", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/or/repo-id", trust_remote_code=True)
inputs = processor(images=Image.open("fundus.png"), clinical_text="62-year-old, blurred central vision.")
probabilities = model.classify(**inputs)  # (batch, num_labels)
print(model.config.id2label[int(probabilities.argmax(-1)[0])])"""


def _model_card_body(
    model_name, base_model, metrics_report, datasets, training_args_summary, synthetic_data, usage_code, extra_markdown
) -> str:
    data_note = (
        "**The reported numbers come from synthetic fundus images; they show the pipeline works, not clinical "
        "performance.** "
        if synthetic_data
        else ""
    )
    training_rows = "\n".join(f"| {key} | {value} |" for key, value in training_args_summary.items())
    return f"""# {model_name}

MDF-MLLM (multi-depth fusion multimodal LLM) classifies retinal diseases from a fundus photograph plus optional
clinical text. It is Llama 3.2 Vision (Mllama, base `{base_model}`) with a U-Net beside it: skip features from four
U-Net encoder depths are projected to the language model's width and read by its cross-attention layers through
extra gated cross-attention, and the text conditions the U-Net through FiLM. A prediction scores every class
verbalizer by its log-likelihood given the prompt; labels are two-level (disease, and its type:
{", ".join(DISEASE_TYPES)}).

## How to use

The model and processor classes live in this repository, so loading needs `trust_remote_code=True`:

```python
{usage_code}
```

The widget on this page shows stored example outputs: the hosted inference API does not run custom code.

## Results

Evaluated on {", ".join(datasets)}.

{markdown_table(metrics_report)}
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
    out_dir,
    *,
    base_model: str,
    metrics_report: dict,
    datasets: list[str],
    widget_examples: list[dict],
    training_args_summary: dict,
    extra_markdown: str = "",
    model_name: str = "MDF-MLLM",
    license: str = "llama3.2",
    eval_split: str = "test",
    synthetic_data: bool = False,
    usage_code: str = DEFAULT_USAGE_CODE,
) -> Path:
    """Write `out_dir/README.md`: a Hub model card with metadata, model-index, static widgets and usage notes.

    Args:
        base_model: Hub id (or path) of the Mllama checkpoint the model was built from.
        metrics_report: `classification_report(...)` of the evaluation set, `datasets[0]`.
        widget_examples: `[{"image_path": file inside out_dir, "text": clinical text, "output": {label: score},
            "title": optional caption}]`; the Hub shows these stored outputs.
        training_args_summary: setting -> value, shown as the training details table.
        synthetic_data: say in the limitations that the numbers come from synthetic images.
        usage_code: the Python shown under "How to use" (load, preprocess, `model.classify`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = Path(out_dir)
    if not datasets:
        raise ValueError("datasets must name at least one dataset (the first is the evaluation set)")
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        tags=MODEL_CARD_TAGS,
        datasets=list(datasets),
        eval_results=_model_index_results(metrics_report, datasets[0], eval_split),
        widget=_widgets(out_dir, widget_examples),
    )
    body = _model_card_body(
        model_name, base_model, metrics_report, datasets, training_args_summary, synthetic_data, usage_code,
        extra_markdown,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = out_dir / "README.md"
    card.save(path)
    return path
