"""Markdown tables: a report, its misclassified items, a comparison of models and the 11B memory estimate (the
ablation's table is `mdf_mllm.ablation.markdown`)."""

from mdf_mllm import calibration
from mdf_mllm.comparison import SUBSETS, Result
from mdf_mllm.metrics import LEVELS

SUBSET_NAMES = {"all": "All photos", "with_history": "With a history", "without_history": "Without",
                "age_dependent": "Age-dependent"}


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


def _accuracy(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def comparison_table(results: list[Result]) -> str:
    """Markdown comparison of models and references scored on the same photos: one row per `Result`, accuracy over
    all photos (95% CI), over the photos with a clinical history, those without and the age-dependent ones, macro F1
    and type accuracy (95% CIs), parameters and training seconds where known; then per-class sensitivity side by
    side."""
    reports = [result.report for result in results]
    subsets = reports[0]["subsets"]
    columns = ["Model", "Accuracy, all (95% CI)", *(f"{SUBSET_NAMES[name]} (n={subsets[name]['n']})"
                                                    for name in SUBSETS if name != "all"),
               "Macro F1 (95% CI)", "Type accuracy (95% CI)", "Parameters", "Train s"]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(SUBSETS) - 1) + "---|---|---:|---:|"]
    for result, report in zip(results, reports):
        cells = [_with_ci(report["disease"], "accuracy"),
                 *(_accuracy(result.accuracy(name)) for name in SUBSETS if name != "all"),
                 _with_ci(report["disease"], "macro_f1"),
                 _with_ci(report["type"], "accuracy"),
                 "–" if result.parameters is None else f"{result.parameters:,}",
                 "–" if result.train_seconds is None else f"{result.train_seconds:.0f}"]
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    lines += ["", _bootstrap_note(reports[0]), "", "Sensitivity per class:", ""]
    lines.append("| Class | Support | " + " | ".join(result.name for result in results) + " |")
    lines.append("|---|---:|" + "---:|" * len(results))
    for name, scores in reports[0]["disease"]["per_class"].items():
        sensitivities = [_fmt(report["disease"]["per_class"][name]["sensitivity"]) for report in reports]
        lines.append(f"| {name} | {scores['support']} | " + " | ".join(sensitivities) + " |")
    return "\n".join(lines) + "\n"


def _difference(entry: dict) -> str:
    if entry["difference"] is None:
        return "–"
    low, high = entry["ci95"]
    return f"{entry['difference']:+.3f} ({low:+.3f} to {high:+.3f})"


def paired_table(ours: str, differences: dict[str, dict]) -> str:
    """Markdown table of `comparison.paired_differences`: our accuracy minus each other row's, with the paired 95%
    bootstrap interval, on each subset of photos (`comparison.SUBSETS`)."""
    lines = [f"| {ours} minus | " + " | ".join(f"{SUBSET_NAMES[name]}: difference (95% CI)" for name in SUBSETS) + " |",
             "|---|" + "---|" * len(SUBSETS)]
    lines += [f"| {name} | " + " | ".join(_difference(d[subset]) for subset in SUBSETS) + " |"
              for name, d in differences.items()]
    return "\n".join(lines) + "\n"


def counterfactual_table(table: dict[str, list[dict]]) -> str:
    """Markdown table of the summary of `stages.counterfactual`: per group of photos, how often each model's answer follows the
    swapped history (phenocopies) and how often it changes (photos that decide alone)."""
    names = list(table)
    lines = ["| Test photos | Kind | n | " + " | ".join(f"{name}: follows / changed" for name in names) + " |",
             "|---|---|---:|" + "---|" * len(names)]
    for index, row in enumerate(table[names[0]]):
        cells = [f"{table[name][index]['follows']:.3f} / {table[name][index]['changed']:.3f}" for name in names]
        label = f"**{row['group']}**" if row["group"].startswith("all ") else row["group"]
        lines.append(f"| {label} | {row['kind']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibration_markdown(results: list[Result], calibrated: Result | None = None) -> str:
    """Every row's calibration (`calibration.markdown_table`), ours raw and, where there is one, after its
    temperature (`stages.calibrate`) beside it."""
    rows = [results[0], *([calibrated] if calibrated else []), *results[1:]]
    lead = "Calibration on all test photos"
    if calibrated:
        lead += (f"; \"{calibrated.name}\": {results[0].name}'s probabilities after one temperature, T = "
                 f"{calibrated.temperature:.3f}, fitted on the validation photos (the exported model answers with it)")
    return f"{lead}:\n\n" + calibration.markdown_table({r.name: r.report["calibration"] for r in rows})


def comparison_markdown(results: list[Result], differences: dict[str, dict], counterfactual: dict | None = None,
                        calibrated: Result | None = None) -> str:
    """The comparison as comparison.md and the model card show it: the rows, the paired differences of the first
    row against the others, the rows' calibration and, where there is one, the counterfactual-history table."""
    parts = [comparison_table(results), f"Paired differences (the same resampled test photos for both models, "
             f"{results[0].report['bootstrap']['n_resamples']} resamples):", "", paired_table(results[0].name, differences)]
    if all("calibration" in r.report for r in results):
        parts.append(calibration_markdown(results, calibrated))
    if counterfactual:
        parts += ["Counterfactual histories: each test photo whose look another class draws too gets that class's "
                  "own history (phenocopy: the answer should follow the history), each photo that only its class "
                  "draws gets a history that no class of its look writes (photo decides: the answer should not "
                  "move); each age-dependent photo is asked again with its own history, the age moved to the other "
                  "class's stage of its look (age swap: the answer should move to that class). Follows: share of "
                  "answers that are a class the swapped history is written for (or, for an age swap, the class whose "
                  "stage the photo then fits); changed: share of answers that differ from the answer to the photo's "
                  "own input.", "",
                  counterfactual_table(counterfactual["summary"])]
    return "\n".join(parts)


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
