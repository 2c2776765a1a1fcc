"""Markdown tables: a report, its misclassified items, a comparison of models, the ablation and the 11B memory
estimate."""

import numpy as np

from mdf_mllm.metrics import CI_METRICS, LEVELS


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
