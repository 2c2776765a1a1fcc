"""Metrics module, reports, plots, model card and accelerate configs (reporting.py, metrics/, configs/)."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn import metrics as skm

import reporting
from conftest import ROOT, launch_two_cpu_processes
from configuration_mdf_mllm import DEFAULT_LABELS, DISEASE_TYPES

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
    return reporting.load_fundus_metric()


@pytest.fixture(scope="module")
def report():
    y_true, y_pred = noisy_labels(0, n=150)
    return reporting.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=0)


def test_metric_loads_from_folder_without_network(monkeypatch):
    import evaluate

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = evaluate.load(str(ROOT / "metrics" / "fundus_metrics"), keep_in_memory=True)
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

    metric = evaluate.load(str(ROOT / "metrics" / "fundus_metrics"), config_name="a,b,c", keep_in_memory=True)
    result = metric.compute(predictions=[0, 2], references=[0, 1])
    assert list(result["per_class"]) == ["a", "b", "c"]
    assert np.array(result["confusion_matrix"]).shape == (3, 3)


def test_metric_rejects_out_of_range_label(metric):
    with pytest.raises(ValueError, match=r"references must lie in \[0, 3\)"):
        metric.compute(predictions=[0, 1], references=[0, 3], num_classes=3)


def test_batched_confusion_matrix_matches_per_row():
    functions = reporting._metric_functions()
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
    report = reporting.classification_report(
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
        reporting.classification_report(**{**args, **kwargs})


def test_bootstrap_ci_brackets_estimate_and_is_seeded(report):
    y_true, y_pred = noisy_labels(0, n=150)
    again = reporting.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=0)
    other = reporting.classification_report(y_true, y_pred, LABEL_NAMES, LABEL_TYPES, n_bootstrap=300, seed=1)
    for level in reporting.LEVELS:
        for name in reporting.CI_METRICS:
            low, high = report[level]["ci95"][name]
            assert low < report[level][name] < high, (level, name)
        assert again[level]["ci95"] == report[level]["ci95"]
        assert other[level]["ci95"] != report[level]["ci95"]


def test_bootstrap_ci_equals_naive_loop():
    y_true, y_pred = noisy_labels(4, n=40)
    ci = reporting.bootstrap_ci(y_true, y_pred, 8, n_bootstrap=300, seed=7)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.integers(0, 40, (256, 40)), rng.integers(0, 40, (44, 40))])  # the chunked draws
    accuracy = [skm.accuracy_score(y_true[r], y_pred[r]) for r in rows]
    macro_f1 = [skm.f1_score(y_true[r], y_pred[r], average="macro", zero_division=0) for r in rows]
    np.testing.assert_allclose(ci["accuracy"], np.percentile(accuracy, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(ci["macro_f1"], np.percentile(macro_f1, [2.5, 97.5]), atol=1e-12)


def assert_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_write_results_files(report, tmp_path):
    paths = reporting.write_results(report, tmp_path / "eval")
    assert json.loads(paths["json"].read_text()) == report
    markdown = paths["markdown"].read_text()
    accuracy, (low, high) = report["disease"]["accuracy"], report["disease"]["ci95"]["accuracy"]
    assert f"| disease | {accuracy:.3f} ({low:.3f}–{high:.3f}) |" in markdown
    assert "| retinitis_pigmentosa |" in markdown and "| inherited |" in markdown
    assert_png(paths["confusion_disease"])
    assert_png(paths["confusion_type"])


def test_training_curve(tmp_path):
    history = [
        {"loss": 2.0, "step": 5, "epoch": 0.5},
        {"loss": 1.4, "step": 10, "epoch": 1.0},
        {"eval_loss": 1.6, "step": 10, "epoch": 1.0},
        {"train_runtime": 3.0, "step": 10},
    ]
    assert_png(reporting.plot_training_curve(history, tmp_path / "curve.png"))
    with pytest.raises(ValueError, match="no entry with 'loss' or 'eval_loss'"):
        reporting.plot_training_curve([{"train_runtime": 3.0, "step": 10}], tmp_path / "none.png")


def test_ablation_table_and_plot(tmp_path):
    rows = [
        {"name": "baseline", "seed": seed, "accuracy": acc, "macro_f1": f1, "type_accuracy": 0.7, "run_dir": "x"}
        for seed, acc, f1 in [(0, 0.60, 0.50), (1, 0.64, 0.52), (2, 0.62, 0.57)]
    ] + [{"name": "mdf", "seed": 0, "accuracy": 0.9, "macro_f1": 0.88, "type_accuracy": 0.95}]
    table = reporting.ablation_table(rows)
    f1 = np.array([0.50, 0.52, 0.57])
    assert "| Name | Seeds | accuracy | macro_f1 | type_accuracy |" in table
    assert f"| baseline | 3 | 0.620 ± 0.020 | {f1.mean():.3f} ± {f1.std(ddof=1):.3f} | 0.700 ± 0.000 |" in table
    assert "| mdf | 1 | 0.900 ± 0.000 |" in table
    assert_png(reporting.plot_ablation(rows, tmp_path / "ablation.png"))
    with pytest.raises(ValueError, match="ablation row 0 needs 'name' and 'seed'"):
        reporting.ablation_table([{"name": "x", "accuracy": 1.0}])


def test_memory_table():
    base, mdf, lora = 10_000_000_000, 200_000_000, 50_000_000
    table = reporting.memory_table_11b(base, mdf, lora)
    gib = 2**30
    full = 16 * (base + mdf)
    assert f"| Full fine-tuning | 10.200 B | {2 * (base + mdf) / gib:.1f} |" in table
    assert f"| {full / gib:.1f} | {full / 8 / gib:.1f} |" in table
    lora_total = 2 * base + 16 * (mdf + lora)
    assert "| LoRA | 0.250 B |" in table and f"| {lora_total / gib:.1f} | {lora_total / 8 / gib:.1f} |" in table
    qlora_total = 4.127 / 8 * base + 16 * (mdf + lora)
    assert f"| {qlora_total / gib:.1f} | {qlora_total / 8 / gib:.1f} |" in table


def write_card(report, out_dir: Path, image_path="examples/rp.png"):
    (out_dir / "examples").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 40, 20)).save(out_dir / "examples" / "rp.png")
    return reporting.write_model_card(
        out_dir,
        base_model="meta-llama/Llama-3.2-11B-Vision-Instruct",
        metrics_report=report,
        datasets=["mdf-mllm/synthetic-fundus"],
        widget_examples=[
            {
                "image_path": image_path,
                "text": "Night blindness since childhood.",
                "output": {"normal": 0.1, "retinitis_pigmentosa": 0.9},
            }
        ],
        training_args_summary={"epochs": 3, "learning_rate": 2e-5},
        synthetic_data=True,
    )


def front_matter(path: Path) -> dict:
    _, header, _ = path.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def test_model_card_metadata(report, tmp_path):
    path = write_card(report, tmp_path)
    meta = front_matter(path)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert meta["datasets"] == ["mdf-mllm/synthetic-fundus"]
    assert meta["license"] == "llama3.2"
    assert {"medical", "ophthalmology", "fundus", "retina", "mllama", "custom_code"} <= set(meta["tags"])

    measured = {
        (metric["name"].split()[0].lower(), metric["type"]): metric
        for result in meta["model-index"][0]["results"]
        for metric in result["metrics"]
    }
    for level in reporting.LEVELS:
        for key, metric_type in [("accuracy", "accuracy"), ("macro_f1", "f1")]:
            entry = measured[(level, metric_type)]
            low, high = report[level]["ci95"][key]
            assert entry["value"] == round(report[level][key], 4)
            assert f"95% CI {low:.3f}–{high:.3f}" in entry["name"]

    (widget,) = meta["widget"]
    assert (tmp_path / widget["src"]).is_file() and widget["src"] == "examples/rp.png"
    assert widget["output"] == [{"label": "retinitis_pigmentosa", "score": 0.9}, {"label": "normal", "score": 0.1}]
    body = path.read_text()
    assert "trust_remote_code=True" in body and "model.classify(**inputs)" in body
    assert "synthetic fundus images" in body and "Research use only" in body


def test_model_card_parses_with_huggingface_hub(report, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(write_card(report, tmp_path))
    assert card.data.pipeline_tag == "image-text-to-text"
    values = {(r.metric_name.split()[0].lower(), r.metric_type): r.metric_value for r in card.data.eval_results}
    assert len(values) == 4
    assert values[("type", "accuracy")] == round(report["type"]["accuracy"], 4)
    assert values[("disease", "f1")] == round(report["disease"]["macro_f1"], 4)


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
