"""Metrics module, reports, plots, model card and accelerate configs (mdf_mllm: metrics, tables, plots, model_card, fundus_metrics/; configs/)."""

import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn import metrics as skm

from conftest import ROOT, launch_two_cpu_processes
from configuration_mdf_mllm import DEFAULT_LABELS, DISEASE_TYPES
from mdf_mllm import comparison, metrics, model_card, plots, tables

LABEL_NAMES = [name for name, _, _ in DEFAULT_LABELS]
LABEL_TYPES = [disease_type for _, _, disease_type in DEFAULT_LABELS]


def noisy_labels(seed: int, n: int = 120, num_classes: int = 8, keep: float = 0.7, classes=None):
    """True labels drawn from `classes` (default: all) and predictions that copy them with probability `keep`."""
    rng = np.random.default_rng(seed)
    classes = np.arange(num_classes) if classes is None else np.asarray(classes)
    y_true = rng.choice(classes, n)
    y_pred = np.where(rng.random(n) < keep, y_true, rng.choice(classes, n))
    return y_true, y_pred


@pytest.fixture(scope="module")
def metric():
    return metrics.load_fundus_metric()


@pytest.fixture(scope="module")
def report():
    y_true, y_pred = noisy_labels(0, n=150)
    return metrics.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=0)


def test_metric_loads_from_folder_without_network(monkeypatch):
    import evaluate

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = evaluate.load(str(metrics.METRIC_PATH), keep_in_memory=True)
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "seed, classes", [(0, None), (1, None), (2, [0, 1, 3, 6]), (3, [2, 7])], ids=["all", "all-2", "gaps", "two"]
)
def test_metric_matches_sklearn(metric, seed, classes):
    y_true, y_pred = noisy_labels(seed, classes=classes)
    result = metric.compute(predictions=y_pred, references=y_true, label_names=LABEL_NAMES)

    assert result["accuracy"] == skm.accuracy_score(y_true, y_pred)
    sklearn_macro = {"macro_f1": skm.f1_score, "macro_recall": skm.recall_score, "macro_precision": skm.precision_score}
    for key, score in sklearn_macro.items():
        assert abs(result[key] - score(y_true, y_pred, average="macro", zero_division=0)) < 1e-12, key
    labels = list(range(8))
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()

    sensitivity = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    per_label = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # (K, 2, 2): [[tn, fp], [fn, tp]]
    specificity = per_label[:, 0, 0] / (per_label[:, 0, 0] + per_label[:, 0, 1])
    for k, name in enumerate(LABEL_NAMES):
        scores = result["per_class"][name]
        assert scores["support"] == int((y_true == k).sum())
        if np.isnan(sensitivity[k]):
            assert scores["sensitivity"] is None
        else:
            assert abs(scores["sensitivity"] - sensitivity[k]) < 1e-12
        assert abs(scores["specificity"] - specificity[k]) < 1e-12


def test_metric_absent_classes_give_none_not_nan(metric):
    # Class 2 only predicted, class 3 only true, class 4 absent from both.
    result = metric.compute(predictions=[0, 2, 1, 1], references=[0, 1, 1, 3], num_classes=5)
    per_class = result["per_class"]
    assert per_class["2"]["sensitivity"] is None and per_class["2"]["precision"] == 0.0
    assert per_class["3"]["precision"] is None and per_class["3"]["sensitivity"] == 0.0
    assert per_class["4"] == {"sensitivity": None, "specificity": 1.0, "precision": None, "f1": None, "support": 0}
    # Macro averages skip class 4 (sklearn's default labels) and count the undefined present scores as 0.
    assert result["macro_f1"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert json.loads(json.dumps(result)) == result


def test_metric_classes_from_config_name():
    import evaluate

    metric = evaluate.load(str(metrics.METRIC_PATH), config_name="a,b,c", keep_in_memory=True)
    result = metric.compute(predictions=[0, 2], references=[0, 1])
    assert list(result["per_class"]) == ["a", "b", "c"]
    assert np.array(result["confusion_matrix"]).shape == (3, 3)


def test_metric_rejects_out_of_range_label(metric):
    with pytest.raises(ValueError, match=r"references must lie in \[0, 3\)"):
        metric.compute(predictions=[0, 1], references=[0, 3], num_classes=3)


def test_batched_confusion_matrix_matches_per_row():
    functions = metrics._metric_functions()
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, (5, 30)), rng.integers(0, 4, (5, 30))
    batched = functions.confusion_matrix(y_true, y_pred, 4)
    for row in range(5):
        np.testing.assert_array_equal(batched[row], skm.confusion_matrix(y_true[row], y_pred[row], labels=range(4)))
        summary = functions.summary_scores(batched[row])
        expected = skm.f1_score(y_true[row], y_pred[row], average="macro", zero_division=0)
        assert abs(summary["macro_f1"] - expected) < 1e-12


def test_type_level_mapping_by_hand():
    label_names = ["healthy", "dr", "amd", "rp"]
    disease_types = ["normal", "acquired", "acquired", "inherited"]
    # types true: normal, acquired, acquired, inherited, inherited
    # predicted:  normal, acquired, acquired, inherited, normal
    report = metrics.classification_report(
        [0, 1, 2, 3, 3], [0, 2, 1, 3, 0], label_names, disease_types, n_bootstrap=10
    )
    assert report["disease"]["accuracy"] == pytest.approx(2 / 5)
    assert report["type"]["accuracy"] == pytest.approx(4 / 5)
    assert report["type"]["label_names"] == DISEASE_TYPES
    assert report["type"]["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [1, 0, 1]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(disease_types=["normal", "rare"]), r"\['rare'\] not in"),
        (dict(disease_types=["normal"]), "disease_types has 1 entries, label_names 2"),
        (dict(y_pred=[0, 2]), r"y_pred must hold label ids in \[0, 2\)"),
    ],
)
def test_report_rejects_bad_input(kwargs, message):
    args = dict(y_true=[0, 1], y_pred=[0, 1], label_names=["a", "b"], disease_types=["normal", "acquired"])
    with pytest.raises(ValueError, match=message):
        metrics.classification_report(**{**args, **kwargs})


def test_bootstrap_ci_brackets_estimate_and_is_seeded(report):
    y_true, y_pred = noisy_labels(0, n=150)
    again = metrics.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=0)
    other = metrics.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=1)
    for level in metrics.LEVELS:
        for name in metrics.CI_METRICS:
            low, high = report[level]["ci95"][name]
            assert low < report[level][name] < high, (level, name)
        assert again[level]["ci95"] == report[level]["ci95"]
        assert other[level]["ci95"] != report[level]["ci95"]


def test_bootstrap_ci_equals_naive_loop():
    y_true, y_pred = noisy_labels(4, n=40)
    ci = metrics.bootstrap_ci(y_true, y_pred, 8, n_bootstrap=300, seed=7)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.integers(0, 40, (256, 40)), rng.integers(0, 40, (44, 40))])  # the chunked draws
    accuracy = [skm.accuracy_score(y_true[r], y_pred[r]) for r in rows]
    macro_f1 = [skm.f1_score(y_true[r], y_pred[r], average="macro", zero_division=0) for r in rows]
    np.testing.assert_allclose(ci["accuracy"], np.percentile(accuracy, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(ci["macro_f1"], np.percentile(macro_f1, [2.5, 97.5]), atol=1e-12)


def assert_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plotting functions save, in order, for their content to be checked."""
    saved, save = [], plots._save

    def keep(figure, path):
        saved.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


# True classes 0, 0, 0, 1, 1, 2, 2, 2, 2 (class 3 never occurs) and their predictions.
KNOWN_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
KNOWN_PRED = [0, 1, 0, 1, 3, 2, 0, 2, 2]
KNOWN_NAMES = ["normal", "amd", "retinitis_pigmentosa", "stargardt"]
KNOWN_TYPES = ["normal", "acquired", "inherited", "inherited"]


def test_row_normalised_rates_of_a_known_matrix():
    counts = [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 3, 0], [0, 0, 0, 0]]
    rates = plots.row_normalised(counts)
    expected = [[2 / 3, 1 / 3, 0, 0], [0, 1 / 2, 0, 1 / 2], [1 / 4, 0, 3 / 4, 0]]
    np.testing.assert_allclose(rates[:3], expected, atol=1e-15)
    assert np.isnan(rates[3]).all()  # no true item of class 3: its rates are undefined, not 0


def test_confusion_plot_colours_by_rate_and_writes_count_and_rate(figures, tmp_path):
    counts = skm.confusion_matrix(KNOWN_TRUE, KNOWN_PRED, labels=range(4))
    assert_png(plots.plot_confusion_matrix(counts, KNOWN_NAMES, tmp_path / "cm.png", title="t"))
    (axes, _colourbar) = figures[0].axes
    shown = axes.images[0].get_array()
    by_hand = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    np.testing.assert_allclose(shown[:3], by_hand[:3])
    assert shown.mask[3].all() and (axes.images[0].norm.vmin, axes.images[0].norm.vmax) == (0, 1)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
    assert texts[(0, 0)] == "2\n0.67" and texts[(0, 1)] == "1\n0.33" and texts[(2, 0)] == "1\n0.25"
    assert texts[(1, 3)] == "1\n0.50" and texts[(3, 3)] == "0\n–"
    assert len(texts) == 16


def test_misclassified_items_of_a_known_prediction_vector():
    items = [{"case_id": f"c{i // 2}", "file_name": f"img/{i}.png", "split": "test"} for i in range(9)]
    probabilities = np.full((9, 4), 0.1)
    probabilities[np.arange(9), KNOWN_PRED] = 0.7
    probabilities[4] = [0.05, 0.15, 0.2, 0.6]
    report = metrics.classification_report(
        KNOWN_TRUE, KNOWN_PRED, KNOWN_NAMES, KNOWN_TYPES, n_bootstrap=10, items=items, probabilities=probabilities
    )
    assert report["misclassified"] == [  # positions 1, 4 and 6 are wrong
        {"index": 1, "case_id": "c0", "file_name": "img/1.png", "truth": "normal", "prediction": "amd",
         "probability": 0.7},
        {"index": 4, "case_id": "c2", "file_name": "img/4.png", "truth": "amd", "prediction": "stargardt",
         "probability": 0.6},
        {"index": 6, "case_id": "c3", "file_name": "img/6.png", "truth": "retinitis_pigmentosa",
         "prediction": "normal", "probability": 0.7},
    ]
    without_probabilities = metrics.classification_report(
        KNOWN_TRUE, KNOWN_PRED, KNOWN_NAMES, KNOWN_TYPES, n_bootstrap=10, items=items
    )
    assert [item["probability"] for item in without_probabilities["misclassified"]] == [None] * 3
    assert "misclassified" not in metrics.classification_report(
        KNOWN_TRUE, KNOWN_PRED, KNOWN_NAMES, KNOWN_TYPES, n_bootstrap=10
    )


def test_results_list_the_misclassified_items(tmp_path):
    items = [{"case_id": f"c{i}", "file_name": f"img/{i}.png"} for i in range(9)]
    report = metrics.classification_report(
        KNOWN_TRUE, KNOWN_PRED, KNOWN_NAMES, KNOWN_TYPES, n_bootstrap=10, items=items
    )
    paths = model_card.write_results(report, tmp_path)
    assert json.loads(paths["json"].read_text())["misclassified"] == report["misclassified"]
    rows = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("| ") and "img/" in line]
    assert rows == [
        "| 1 | c1 | img/1.png | normal | amd | – |",
        "| 4 | c4 | img/4.png | amd | stargardt | – |",
        "| 6 | c6 | img/6.png | retinitis_pigmentosa | normal | – |",
    ]
    assert "Misclassified test items (3 of 9;" in paths["markdown"].read_text()
    right = metrics.classification_report([0, 1], [0, 1], KNOWN_NAMES, KNOWN_TYPES, n_bootstrap=10, items=items[:2])
    assert "Misclassified test items: none of 2." in model_card.write_results(right, tmp_path)["markdown"].read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(items=[{"case_id": "a", "file_name": "a.png"}]), "items has 1 entries, y_true 2"),
        (dict(items=[{"case_id": "a", "file_name": "a"}, {"case_id": "b"}]), r"items\[1\] has no \['file_name'\]"),
        (dict(items=[{"case_id": 0, "file_name": "a"}] * 2, probabilities=np.ones((2, 3))), r"shape .* \(2, 2\)"),
    ],
)
def test_misclassified_items_reject_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.classification_report([0, 1], [1, 0], ["a", "b"], ["normal", "acquired"], n_bootstrap=5, **kwargs)


def test_write_results_files(report, tmp_path):
    paths = model_card.write_results(report, tmp_path / "eval")
    assert json.loads(paths["json"].read_text()) == report
    markdown = paths["markdown"].read_text()
    accuracy, (low, high) = report["disease"]["accuracy"], report["disease"]["ci95"]["accuracy"]
    assert f"| disease | {accuracy:.3f} ({low:.3f}–{high:.3f}) |" in markdown
    assert "| retinitis_pigmentosa |" in markdown and "| inherited |" in markdown
    assert "Misclassified" not in markdown  # the report was made without items
    assert_png(paths["confusion_disease"])
    assert paths["confusion_type"] == tmp_path / "eval" / "confusion_matrix_type.png"
    assert_png(paths["confusion_type"])


HISTORIES = {
    "MDF-MLLM": [
        {"loss": 2.0, "step": 5, "epoch": 0.5},
        {"loss": 0.4, "step": 10, "epoch": 1.0},
        {"eval_loss": 0.6, "step": 10, "epoch": 1.0},
        {"train_runtime": 3.0, "step": 10},
    ],
    "baseline": [{"loss": 2.5, "step": 5}, {"loss": 0.9, "step": 10}, {"eval_loss": 1.1, "step": 10}],
}
GATES = [  # layer keys as JSON gives them (str) and as a Python dict may hold them (int): the same layers
    {"step": 0, "gates": {"13": 0.0, "3": 0.0}, "tau": {"13": 1.0, "3": 1.0}},
    {"step": 10, "gates": {13: 0.2, 3: -0.05}, "tau": {13: 1.3, 3: 0.9}},
]


def plotted(axes) -> dict[str, list]:
    return {line.get_label(): [list(line.get_xdata()), list(line.get_ydata())] for line in axes.get_lines()
            if not line.get_label().startswith("_")}


def test_training_curves_both_models_on_one_log_axis(figures, tmp_path):
    assert_png(plots.plot_training_curves(HISTORIES, tmp_path / "curves.png"))
    (axes,) = figures[0].axes
    assert axes.get_yscale() == "log"
    assert plotted(axes) == {
        "MDF-MLLM, train": [[5, 10], [2.0, 0.4]],
        "MDF-MLLM, eval": [[10], [0.6]],
        "baseline, train": [[5, 10], [2.5, 0.9]],
        "baseline, eval": [[10], [1.1]],
    }
    colour = {line.get_label(): line.get_color() for line in axes.get_lines()}
    assert colour["MDF-MLLM, train"] == colour["MDF-MLLM, eval"] != colour["baseline, train"]


def test_training_curves_with_gate_panels(figures, tmp_path):
    assert_png(plots.plot_training_curves(HISTORIES, tmp_path / "curves.png", gate_history=GATES))
    losses, gates, tau = figures[0].axes
    assert len(plotted(losses)) == 4
    assert plotted(gates) == {"layer 3": [[0, 10], [0.0, -0.05]], "layer 13": [[0, 10], [0.0, 0.2]]}
    assert plotted(tau) == {"layer 3": [[0, 10], [1.0, 0.9]], "layer 13": [[0, 10], [1.0, 1.3]]}
    assert gates.get_ylabel() == "tanh(g_u)" and tau.get_ylabel() == "tau"
    assert all(axes.get_xlabel() == "Step" and axes.get_title() for axes in (losses, gates, tau))


def test_training_curves_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"no entry with 'loss' or 'eval_loss' for \['empty'\]"):
        plots.plot_training_curves({**HISTORIES, "empty": [{"train_runtime": 3.0}]}, tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"gate_history\[1\] has no \['tau'\]"):
        plots.plot_training_curves(HISTORIES, tmp_path / "x.png", [GATES[0], {"step": 5, "gates": {}}])


def test_ablation_plot_draws_the_one_ablation_summary(tmp_path, monkeypatch):
    """plot_ablation draws mdf_mllm.ablation.summarize's summary (there is no second one): a bar per row and metric at
    its mean with its std, and no bars for a metric no row has (no test photo with a history)."""
    from mdf_mllm import ablation

    def run(name, seed, accuracy, f1):
        return {"name": name, "seed": seed, "accuracy": accuracy, "accuracy_with_history": None, "macro_f1": f1,
                "type_accuracy": 0.7, "type_macro_f1": 0.5, "train_seconds": 1.0}

    runs = [run("baseline", seed, acc, f1) for seed, acc, f1 in [(0, 0.60, 0.50), (1, 0.64, 0.52), (2, 0.62, 0.57)]]
    runs.append(run("mdf", 0, 0.9, 0.88))
    drawn = {}

    def keep(figure, path):
        drawn["figure"] = figure
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_ablation(ablation.summarize(runs), ablation.METRICS, tmp_path / "ablation.png")
    axes = drawn["figure"].axes[0]
    bars = [(patch.get_height(), container.get_label()) for container in axes.containers
            if hasattr(container, "patches") for patch in container.patches]
    f1 = np.array([0.50, 0.52, 0.57])
    assert [label for _, label in bars] == [m for m in ablation.METRICS  # no run has the two subsets' accuracies
                                            if m not in ("accuracy_with_history", "accuracy_age_dependent") for _ in "ab"]
    assert [height for height, _ in bars] == pytest.approx([0.62, 0.9, f1.mean(), 0.88, 0.7, 0.7, 0.5, 0.5])
    monkeypatch.undo()
    assert_png(plots.plot_ablation(ablation.summarize(runs), ablation.METRICS, tmp_path / "ablation.png"))


def test_memory_table():
    base, mdf, lora = 10_000_000_000, 200_000_000, 50_000_000
    table = tables.memory_table_11b(base, mdf, lora)
    gib = 2**30
    full = 16 * (base + mdf)
    assert f"| Full fine-tuning | 10.200 B | {2 * (base + mdf) / gib:.1f} |" in table
    assert f"| {full / gib:.1f} | {full / 8 / gib:.1f} |" in table
    lora_total = 2 * base + 16 * (mdf + lora)
    assert "| LoRA | 0.250 B |" in table and f"| {lora_total / gib:.1f} | {lora_total / 8 / gib:.1f} |" in table
    qlora_total = 4.127 / 8 * base + 16 * (mdf + lora)
    assert f"| {qlora_total / gib:.1f} | {qlora_total / 8 / gib:.1f} |" in table


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is `first_cell`."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[cell.strip() for cell in row] for row in rows]


def with_ci(scores: dict, name: str) -> str:
    low, high = scores["ci95"][name]
    return f"{scores[name]:.3f} ({low:.3f}–{high:.3f})"


def scored(name, y_true, y_pred, **timings):
    """A comparison row of hard predictions; the first 50 of the 150 test items carry a history."""
    history = np.arange(len(y_true)) < 50
    return comparison.score(name, np.eye(len(LABEL_NAMES))[y_pred], y_true, history, LABEL_NAMES, LABEL_TYPES,
                            n_bootstrap=300, **timings)


def test_comparison_table_numbers_are_the_results():
    y_true, y_ours = noisy_labels(0, n=150)
    _, y_base = noisy_labels(5, n=150, keep=0.4)
    ours = scored("MDF-MLLM", y_true, y_ours, parameters=1_234_567, train_seconds=20.0)
    base = scored("Mllama baseline", y_true, y_base)
    table = tables.comparison_table([ours, base])
    for row, y_pred in ((ours, y_ours), (base, y_base)):
        (cells,) = table_rows(table, row.name)
        report = row.report
        right = y_pred == y_true
        assert cells[1:7] == [with_ci(report["disease"], "accuracy"), f"{right[:50].mean():.3f}",
                              f"{right[50:].mean():.3f}", "–", with_ci(report["disease"], "macro_f1"),
                              with_ci(report["type"], "accuracy")]  # "–": no age-dependent photo
    assert table_rows(table, "MDF-MLLM")[0][7:] == ["1,234,567", "20"]
    assert table_rows(table, "Mllama baseline")[0][7:] == ["–", "–"]  # a row without sizes says so
    assert "| Model | Accuracy, all (95% CI) | With a history (n=50) | Without (n=100) |" in table
    (amd,) = table_rows(table, "amd")
    amd_id = LABEL_NAMES.index("amd")
    assert amd[1:] == [
        str(int((y_true == amd_id).sum())),
        f"{ours.report['disease']['per_class']['amd']['sensitivity']:.3f}",
        f"{skm.recall_score(y_true, y_base, labels=[amd_id], average=None)[0]:.3f}",
    ]


def write_card(report, folder: Path, base_model=None, image_path="examples/rp.png", **kwargs):
    (folder / "examples").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 40, 20)).save(folder / "examples" / "rp.png")
    return model_card.write_model_card(
        folder,
        base_model,
        metrics_report=report,
        datasets=["synthetic"],
        widget_examples=[
            {
                "image_path": image_path,
                "text": "Night blindness since childhood.",
                "output": {"normal": 0.1, "retinitis_pigmentosa": 0.9},
            }
        ],
        training_args_summary={"epochs": 3, "learning_rate": 2e-5},
        dataset_seed=7,
        **kwargs,
    )


def front_matter(path: Path) -> dict:
    _, header, _ = path.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def test_model_card_of_a_model_trained_from_scratch(report, tmp_path):
    path = write_card(report, tmp_path, base_model=None)
    meta = front_matter(path)
    assert "base_model" not in meta
    assert meta["license"] == "apache-2.0"
    assert "datasets" not in meta and "model-index" not in meta  # the synthetic set is no Hub dataset
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert {"medical", "ophthalmology", "fundus", "retina", "mllama", "custom_code"} <= set(meta["tags"])
    (widget,) = meta["widget"]
    assert (tmp_path / widget["src"]).is_file() and widget["src"] == "examples/rp.png"
    assert widget["output"] == [{"label": "retinitis_pigmentosa", "score": 0.9}, {"label": "normal", "score": 0.1}]
    body = path.read_text()
    assert "trained from scratch" in body and "no pretrained weights" in body and "fine-tuned from" not in body
    assert "synthetic fundus set rendered by this repository's `dataset_builder` with seed 7" in body
    assert "trust_remote_code=True" in body and "model.classify(**inputs)" in body
    assert "synthetic fundus images" in body and "Research use only" in body
    accuracy = with_ci(report["disease"], "accuracy")
    assert f"| disease | {accuracy} |" in body


@pytest.mark.parametrize(
    "base_model, license, origin",
    [
        ("meta-llama/Llama-3.2-11B-Vision-Instruct", "llama3.2", "`meta-llama/Llama-3.2-11B-Vision-Instruct`"),
        # Local folders: no `base_model` metadata (tests/test_hub_card.py), the folder's name in the text.
        ("/models/Llama-3.2-11B-Vision-Instruct", "llama3.2",
         "a local base, the Mllama checkpoint in a folder named `Llama-3.2-11B-Vision-Instruct`"),
        ("outputs/run/base", "apache-2.0", "a local base, the Mllama checkpoint in a folder named `base`"),
    ],
)
def test_model_card_of_a_fine_tuned_base(report, tmp_path, base_model, license, origin):
    path = write_card(report, tmp_path, base_model=base_model)
    meta = front_matter(path)
    assert meta.get("base_model") == model_card.hub_base_model(base_model)
    assert meta["license"] == license
    assert f"fine-tuned from {origin}:" in path.read_text()


def image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture(scope="module")
def results_folder(report, tmp_path_factory) -> Path:
    """A folder with what `write_results(report)` writes (drawn once; tests copy it)."""
    folder = tmp_path_factory.mktemp("results")
    model_card.write_results(report, folder)
    return folder


def test_model_card_embeds_the_figures_and_comparison_it_ships(report, results_folder, tmp_path):
    shutil.copytree(results_folder, tmp_path, dirs_exist_ok=True)
    plots.plot_training_curves(HISTORIES, tmp_path / plots.TRAINING_CURVES_FILE, GATES)
    y_true, y_ours = noisy_labels(0, n=150)
    _, y_base = noisy_labels(5, n=150, keep=0.4)
    rows = [scored("MDF-MLLM", y_true, y_ours), scored("Mllama baseline", y_true, y_base)]
    markdown = tables.comparison_markdown(rows, comparison.paired_differences(rows[0], rows[1:], y_true,
                                                                              np.arange(150) < 50, 300))
    body = write_card(report, tmp_path, comparison=markdown).read_text()
    links = image_links(body)
    assert links == ["training_curves.png", "confusion_matrix_disease.png", "confusion_matrix_type.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert "[results.md](results.md)" in body
    assert markdown in body
    ours, ours_calibration = table_rows(body, "MDF-MLLM")
    # Its comparison row, then MDF-MLLM minus it, then its calibration.
    baseline, paired, baseline_calibration = table_rows(body, "Mllama baseline")
    for row, cells in zip(rows, (ours_calibration, baseline_calibration)):
        assert cells[1].startswith(f"{row.report['calibration']['ece']:.3f} (")
    assert ours[1] == with_ci(report["disease"], "accuracy")  # the card's row is the exported model's report
    assert baseline[1] == with_ci(rows[1].report["disease"], "accuracy")

def test_model_card_links_only_figures_that_exist(report, results_folder, tmp_path):
    shutil.copytree(results_folder, tmp_path, dirs_exist_ok=True)  # confusion matrices, no training curve
    body = write_card(report, tmp_path).read_text()
    assert image_links(body) == ["confusion_matrix_disease.png", "confusion_matrix_type.png"]
    assert "### Comparison" not in body
    with pytest.raises(FileNotFoundError, match="figure .*gates.png does not exist"):
        write_card(report, tmp_path, figures={"gates.png": "U-Net gates"})


def test_model_card_parses_with_huggingface_hub(report, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(write_card(report, tmp_path, base_model="meta-llama/Llama-3.2-11B-Vision-Instruct"))
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert card.data.license == "llama3.2"


def test_model_card_rejects_unknown_dataset_names(report, tmp_path):
    with pytest.raises(ValueError, match=r"datasets: expected names from \['all', .*got \['imagenet'\]"):
        model_card.write_model_card(
            tmp_path, None, metrics_report=report, datasets=["imagenet"], training_args_summary={}
        )


def test_model_card_widget_image_must_be_shipped(report, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_card(report, tmp_path, image_path="missing.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    with pytest.raises(ValueError, match="is outside"):
        write_card(report, tmp_path / "card", image_path=str(outside))


@pytest.mark.parametrize("name", ["fsdp_cpu", "fsdp_gpu", "deepspeed_zero3"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(ROOT / "configs" / f"{name}.yaml"))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launch_options  # fsdp keys become launch options; a typo would be dropped
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",") == [
            "MllamaSelfAttentionDecoderLayer", "MdfMllmCrossAttentionDecoderLayer", "MllamaVisionEncoderLayer"
        ]


def test_fsdp_wrap_classes_exist_in_model():
    # accelerate's FSDP2 auto-wrap raises if any listed class is missing from the model (Mllama's own
    # `_no_split_modules` names MllamaCrossAttentionDecoderLayer, which MDF-MLLM replaces: the list must be explicit).
    from accelerate.utils.dataclasses import get_module_class_from_name
    from accelerate.commands.config.config_args import load_config_from_file
    from conftest import mdf_config
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration

    model = MdfMllmForConditionalGeneration(mdf_config("a", fusion_layers={}))  # baseline: no fusion layer at all
    for name in ("fsdp_cpu", "fsdp_gpu"):
        fsdp_config = load_config_from_file(str(ROOT / "configs" / f"{name}.yaml")).fsdp_config
        for class_name in fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert get_module_class_from_name(model, class_name) is not None, (name, class_name)


def test_deepspeed_json_is_zero3():
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    ds_config = HfDeepSpeedConfig(str(ROOT / "configs" / "ds_zero3.json"))
    assert ds_config.is_zero3()
    assert ds_config.get_value("train_micro_batch_size_per_gpu") == "auto"


TOY_SCRIPT = """
import json, os, torch
from accelerate import Accelerator
accelerator = Accelerator()
torch.manual_seed(accelerator.process_index)  # different data and init per rank: training must reconcile them
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
for _ in range(2):
    accelerator.backward(model(torch.randn(3, 4)).pow(2).mean())
    optimizer.step(); optimizer.zero_grad()
# One file per rank: two processes printing at once can interleave their lines.
with open(f"rank{accelerator.process_index}.json", "w") as f:
    json.dump({"rank": accelerator.process_index, "world": accelerator.num_processes,
        "backend": accelerator.state.backend, "wrap": os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"),
        "checksum": sum(p.detach().sum().item() for p in model.parameters())}, f)
accelerator.end_training()
# Skip interpreter finalization: under FSDP on gloo it now and then aborts the process after the work is done
# ("terminate called without an active exception": gloo work objects freed while the interpreter is torn down).
os._exit(0)
"""


def test_fsdp_cpu_config_launches_two_processes(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY_SCRIPT)
    config = ROOT / "configs" / "fsdp_cpu.yaml"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = launch_two_cpu_processes(["--config_file", str(config), str(script)], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["wrap"] == yaml.safe_load(config.read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-6)  # weights synchronised across ranks
