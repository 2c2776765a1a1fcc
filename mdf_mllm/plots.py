"""Plots, drawn on `matplotlib.figure.Figure` objects and saved as PNG, which renders with the Agg backend without
touching pyplot's global state; matplotlib is imported inside the plotting functions only."""

import math
from pathlib import Path

import numpy as np

from mdf_mllm import calibration
from mdf_mllm.metrics import _metric_functions

CONFUSION_MATRIX_FILE = "confusion_matrix_{level}.png"
TRAINING_CURVES_FILE = "training_curves.png"
RELIABILITY_FILE = "reliability.png"
RISK_COVERAGE_FILE = "risk_coverage.png"


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



def plot_ablation(summary: dict[str, dict], metrics, path) -> Path:
    """PNG grouped bar chart: one group per configuration name, one bar per metric of `metrics`, std error bars.
    `summary`: `mdf_mllm.ablation.summarize`'s ({name: {metric: {"mean", "std", ...}}}, the one ablation summary); a
    metric no row has a value for (mean None everywhere) gets no bars."""
    metric_names = [m for m in metrics if any(summary[name][m]["mean"] is not None for name in summary)]
    names = list(summary)
    figure = _new_figure(4 + 0.3 * len(names) * max(1, len(metric_names)), 4.5)  # about 0.3 inch per bar
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(metric_names))
    for offset, metric in enumerate(metric_names):
        stats = [(summary[name][metric]["mean"], summary[name][metric]["std"])
                 if summary[name][metric]["mean"] is not None else (math.nan, 0.0) for name in names]
        positions = np.arange(len(names)) + (offset - (len(metric_names) - 1) / 2) * width
        axes.bar(positions, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=metric)
    axes.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("Score (mean ± std over seeds)")
    axes.set_title("Ablation")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(figure, path)



def plot_reliability(probabilities: dict[str, np.ndarray], labels, path, columns: int = 3) -> Path:
    """PNG of one reliability diagram per row (a panel each, in the order given): per confidence bin of
    `calibration.reliability_bins`, a bar at the accuracy of its photos with their number above it, against the
    diagonal of perfect calibration; the panel's title gives the row's expected calibration error.

    Args:
        probabilities: row name -> its (N, K) class probabilities on the same test photos.
        labels: (N,) true label ids.
    """
    if not probabilities:
        raise ValueError("probabilities: no row to plot")
    rows = math.ceil(len(probabilities) / columns)
    width = min(columns, len(probabilities))
    figure = _new_figure(3.6 * width, 3.6 * rows)
    panels = figure.subplots(rows, width, squeeze=False).ravel()
    for axes, (name, row_probabilities) in zip(panels, probabilities.items()):
        bins = [b for b in calibration.reliability_bins(row_probabilities, labels) if b["n"]]
        centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
        heights = [b["accuracy"] for b in bins]
        axes.bar(centres, heights, width=1 / calibration.NUM_BINS, edgecolor="black", linewidth=0.5, label="accuracy")
        for centre, height, b in zip(centres, heights, bins):
            axes.text(centre, height + 0.02, str(b["n"]), ha="center", fontsize="x-small")
        axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.1)
        axes.set_xlabel("Top-label confidence")
        axes.set_ylabel("Accuracy (photos per bin above the bars)")
        ece = calibration.expected_calibration_error(row_probabilities, labels)
        axes.set_title(f"{name}\nECE {ece:.3f}", fontsize="medium")
        axes.legend(fontsize="x-small", loc="upper left")
    for axes in panels[len(probabilities):]:
        axes.set_axis_off()
    return _save(figure, path)


def plot_risk_coverage(probabilities: dict[str, np.ndarray], labels, path) -> Path:
    """PNG of each row's accuracy when it answers only its most confident photos against the share it answers
    (`calibration.coverage_curve`), the coverages of the risk-coverage table (`calibration.COVERAGES`) marked."""
    if not probabilities:
        raise ValueError("probabilities: no row to plot")
    figure = _new_figure(9, 4.5)
    axes = figure.add_subplot()
    for colour, (name, row_probabilities) in enumerate(probabilities.items()):
        curve = calibration.coverage_curve(row_probabilities, labels)
        axes.plot(curve["coverage"], curve["accuracy"], color=f"C{colour}", label=name)
        table = calibration.risk_coverage(row_probabilities, labels)
        axes.plot([r["coverage"] for r in table], [r["accuracy"] for r in table], "o", color=f"C{colour}")
    axes.set_xlim(0, 1.02)
    axes.set_xlabel("Coverage (share of photos answered, the most confident first)")
    axes.set_ylabel("Accuracy on the photos answered")
    axes.set_title("Risk-coverage (dots: the table's coverages)", fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(figure, path)
