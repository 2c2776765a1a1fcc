"""ablation.py: every row of the ablation trained from one tiny base with the right settings, and the table's
statistics checked against numbers computed here."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import mdf_config
from mdf_mllm import ablation, comparison, model_setup, stage1, stages, main_job as job, training
from mdf_mllm.job import ModelArguments
from mdf_mllm.stage1 import UNET_ALONE
from modeling_mdf_mllm import MdfMllmFiLM, MdfMllmForConditionalGeneration
from test_mdf_parameters import rename

SEEDS = 2
TINY_ABLATION = [
    "--model_size", "tiny",
    "--num_images", "40",
    "--image_size", "64",
    "--per_device_train_batch_size", "8",
    "--n_bootstrap", "20",
    "--base_epochs", "1",
    "--stage1_epochs", "1",
    "--seeds", str(SEEDS),
]  # fmt: skip
# Student-t quantiles t(0.975, df), from tables.
T_975 = {1: 12.706204736, 2: 4.302652730}


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    """The whole ablation on a tiny base (1 epoch per run), every train_arm call recorded with what it was given."""
    out = tmp_path_factory.mktemp("ablation")
    settings = job.parse_arguments([*TINY_ABLATION, "--ablation_epochs", "1", "--output_dir", str(out)])
    dataset = training.load_data(settings.data)
    base = stages.make_base(settings, out / "base", dataset)
    settings = settings.replace(model={"base_model": str(base)})
    processor = model_setup.base_processor(settings.model)
    calls, real_train_arm, real_stage1 = [], stages.train_arm, stage1.run

    def recording_train_arm(row, name, *args, **kwargs):
        calls.append({"name": name, "model_args": row.job.model, "splits": row.splits, "args": row.job.training,
                      **kwargs})
        result = real_train_arm(row, name, *args, **kwargs)
        calls[-1]["probabilities"] = result.probabilities
        return result

    def recording_stage1(seed):
        result = real_stage1(seed)
        calls.append({"name": UNET_ALONE, "args": seed.job.training, "unet_weights": result.weights,
                      "probabilities": result.probabilities})
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "train_arm", recording_train_arm)
        patch.setattr(stage1, "run", recording_stage1)
        patch.setattr(training, "clock", itertools.count().__next__)  # the phase table in ticks: exact sums
        runs = ablation.run_ablation(training.RunContext(settings, dataset, processor), command="pytest")
    return {"out": out, "calls": calls, "runs": runs, "dataset": dataset, "processor": processor,
            "layers": json.loads((base / "config.json").read_text())["text_config"]["cross_attention_layers"]}


def test_every_row_runs_once_per_seed_in_order(ablation_run):
    names = ["Mllama baseline", UNET_ALONE, *comparison.REFERENCES, "MDF, all depths",
             *(f"MDF, depth {k} only" for k in range(1, 5)), "MDF, no FiLM", "MDF, no clinical text", "MDF, no stage 1",
             "MDF, closed gates"]
    expected = [(name, seed) for seed in range(SEEDS) for name in names]  # seed-major: a stopped run has every row
    # Each seed trains its own stage 1 (the U-Net-alone row) before its rows; the references train no model.
    trained = names[2 + len(comparison.REFERENCES):]
    stage1_first = [(name, seed) for seed in range(SEEDS) for name in [names[1], names[0], *trained]]
    assert [(c["name"], c["args"].seed) for c in ablation_run["calls"]] == stage1_first
    assert [(r["name"], r["seed"]) for r in ablation_run["runs"]] == expected
    assert {c["args"].num_train_epochs for c in ablation_run["calls"] if c["name"] != UNET_ALONE} == {1.0}


def test_rows_change_only_what_they_name(ablation_run):
    calls = {c["name"]: c for c in ablation_run["calls"] if c["args"].seed == 0 and c["name"] != UNET_ALONE}
    layers = ablation_run["layers"]
    assert layers == [1, 3]
    assert calls["Mllama baseline"]["model_args"].fusion_layers == "none"
    assert calls["MDF, all depths"]["model_args"].fusion_layers is None  # the config's default spread
    for k in range(1, 5):
        assert calls[f"MDF, depth {k} only"]["model_args"].fusion_layers == f"1:{k},3:{k}"
    assert [name for name, c in calls.items() if c["model_args"].no_film] == ["MDF, no FiLM"]
    default = ModelArguments()
    gates = {name: (c["model_args"].unet_gate_start, c["model_args"].gate_learning_rate) for name, c in calls.items()}
    assert gates == {name: (0.0, 5e-2) if name == "MDF, closed gates" else
                     (default.unet_gate_start, default.gate_learning_rate) for name in calls}
    # The fused layers each trained run really had, from its gate log.
    gates = {r["name"]: sorted(r["gates"]) for r in ablation_run["runs"] if r["seed"] == 0}
    untrained = ("Mllama baseline", UNET_ALONE, *comparison.REFERENCES)
    assert [gates.pop(name) for name in untrained] == [[]] * len(untrained)
    assert set(map(tuple, gates.values())) == {("1", "3")}


def test_mdf_rows_start_from_their_seeds_stage1_unet_except_no_stage1(ablation_run):
    firsts = []
    for seed in range(SEEDS):
        calls = {c["name"]: c for c in ablation_run["calls"] if c["args"].seed == seed}
        stage1 = ablation_run["out"] / f"seed-{seed}" / "stage1" / "unet.safetensors"
        assert calls[UNET_ALONE]["unet_weights"] == str(stage1)
        assert calls["Mllama baseline"]["unet_weights"] is None and calls["MDF, no stage 1"]["unet_weights"] is None
        for name in ("MDF, all depths", "MDF, depth 3 only", "MDF, no clinical text"):
            assert calls[name]["unet_weights"] == str(stage1)
        full, no_film = load_file(stage1), load_file(calls["MDF, no FiLM"]["unet_weights"])
        assert any(key.startswith("film.") for key in full)
        assert sorted(no_film) == sorted(key for key in full if not key.startswith("film."))
        assert all(np.array_equal(no_film[key].numpy(), full[key].numpy()) for key in no_film)
        firsts.append(full["stages.0.0.weight"])
    assert not np.array_equal(firsts[0].numpy(), firsts[1].numpy())  # each seed trained its own stage 1


def test_only_the_no_text_row_drops_the_clinical_text(ablation_run):
    without = training.process_splits(ablation_run["dataset"], ablation_run["processor"], no_text=True)["train"]
    with_text = training.process_splits(ablation_run["dataset"], ablation_run["processor"], no_text=False)["train"]
    ids = lambda split: [item["input_ids"].tolist() for item in split.items]  # noqa: E731
    assert ids(without) != ids(with_text)  # the tiny set has photos with clinical text
    for call in ablation_run["calls"]:
        if call["name"] == UNET_ALONE:  # image only: no prompt
            continue
        assert ids(call["splits"]["train"]) == ids(without if call["name"] == "MDF, no clinical text" else with_text)


def test_table_statistics_match_an_independent_computation(ablation_run):
    saved = json.loads((ablation_run["out"] / "ablation.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(ablation_run["runs"]))
    table = (ablation_run["out"] / "ablation.md").read_text().split("Sensitivity per class")[0].splitlines()
    for name, summary in saved["summary"].items():
        accuracies = [r["accuracy"] for r in saved["runs"] if r["name"] == name]
        mean = sum(accuracies) / len(accuracies)
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1))
        half = T_975[len(accuracies) - 1] * std / math.sqrt(len(accuracies))
        assert summary["seeds"] == SEEDS
        assert summary["accuracy"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert summary["accuracy"]["std"] == pytest.approx(std, abs=1e-12)
        assert summary["accuracy"]["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-8)
        (line,) = [line for line in table if line.startswith(f"| {name} |")]
        assert f"| {mean:.3f} ± {std:.3f} | {mean - half:.3f}–{mean + half:.3f} |" in line
    assert [line.split(" | ")[0][2:] for line in table[2 : 2 + len(saved["summary"])]] == list(saved["summary"])
    assert (ablation_run["out"] / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_phase_table_holds_each_seeds_stage_1_references_and_rows(ablation_run):
    """ablation.json and ablation.md: per seed, stage 1, the references, then each trained row's training and
    scoring, in the order they ran, each at least one tick."""
    saved = json.loads((ablation_run["out"] / "ablation.json").read_text())["phase_seconds"]
    trained = [name for name in dict.fromkeys(c["name"] for c in ablation_run["calls"]) if name != UNET_ALONE]
    assert list(saved["phases"]) == [f"seed {seed}: {phase}" for seed in range(SEEDS) for phase in [
        "stage 1", f"scoring: {UNET_ALONE}", "references", *(f"scoring: {name}" for name in comparison.REFERENCES),
        *(phase for name in trained for phase in (f"stage 2: {name}", f"scoring: {name}"))]]
    # Outside every phase: at least the tick before each seed's stage 1 (each tick counted once, none twice).
    assert all(seconds >= 1 for seconds in saved["phases"].values()) and saved["other_seconds"] >= SEEDS
    table = (ablation_run["out"] / "ablation.md").read_text().split("Phases so far")[1].strip().splitlines()
    assert [line.split(" | ")[0][2:] for line in table[4:-2]] == list(saved["phases"])


def test_sensitivity_table_is_the_mean_over_seeds_of_each_runs_report(ablation_run):
    table = (ablation_run["out"] / "ablation.md").read_text().split("Sensitivity per class, mean over seeds:")[1]
    labels = list(ablation_run["dataset"]["test"].features["label"].names)
    assert table.strip().splitlines()[0] == f"| row | {' | '.join(labels)} |"
    truth = np.array(next(c for c in ablation_run["calls"] if "splits" in c)["splits"]["test"].label_ids)
    for name in dict.fromkeys(c["name"] for c in ablation_run["calls"]):
        # Recomputed from each run's predicted classes against the truth, not from the reports' sensitivities.
        predicted = [np.argmax(c["probabilities"], -1) for c in ablation_run["calls"] if c["name"] == name]
        cells = []
        for k in range(len(labels)):
            rates = [np.mean(p[truth == k] == k) for p in predicted] if (truth == k).any() else None
            cells.append("–" if rates is None else f"{np.mean(rates):.2f}")
        assert f"| {name} | {' | '.join(cells)} |" in table
    assert len(set(truth.tolist())) > 1


def test_t_interval_of_three_seeds():
    low, high = ablation.t_interval([0.5, 0.7, 0.6])
    half = T_975[2] * 0.1 / math.sqrt(3)
    assert (low, high) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-9)
    assert ablation.t_interval([0.5]) is None


def test_summary_and_table_of_three_seeds():
    def run(name, seed, accuracy):
        return {"name": name, "seed": seed, "accuracy": accuracy, "accuracy_with_history": accuracy - 0.1,
                "macro_f1": accuracy / 2, "type_accuracy": 0.75, "type_macro_f1": 0.125, "train_seconds": 10.0 + seed,
                "gates": {}}

    runs = [run(name, seed, a) for seed, (a, b) in enumerate([(0.5, 0.4), (0.7, 0.4), (0.6, 0.4)])
            for name, a in (("MDF, all depths", a), ("Mllama baseline", b))]
    summary = ablation.summarize(runs)
    assert list(summary) == ["MDF, all depths", "Mllama baseline"]  # first-seen order
    half = T_975[2] * 0.1 / math.sqrt(3)
    mdf = summary["MDF, all depths"]
    assert mdf["seeds"] == 3 and mdf["train_seconds"]["mean"] == pytest.approx(11.0)
    assert (mdf["accuracy"]["mean"], mdf["accuracy"]["std"]) == pytest.approx((0.6, 0.1), abs=1e-12)
    assert mdf["accuracy"]["ci95"] == pytest.approx((0.6 - half, 0.6 + half), abs=1e-9)
    assert mdf["macro_f1"]["std"] == pytest.approx(0.05, abs=1e-12)
    baseline = summary["Mllama baseline"]["accuracy"]
    assert (baseline["mean"], baseline["std"], *baseline["ci95"]) == pytest.approx((0.4, 0.0, 0.4, 0.4))
    lines = ablation.markdown(summary, 90.0, "python train_hf.py --ablation").splitlines()
    assert lines[2] == (f"| MDF, all depths | 3 | 0.600 ± 0.100 | {0.6 - half:.3f}–{0.6 + half:.3f} | 0.500 ± 0.100 | "
                        f"{0.5 - half:.3f}–{0.5 + half:.3f} | – | – | 0.300 ± 0.050 | "
                        f"{0.3 - half / 2:.3f}–{0.3 + half / 2:.3f} | 0.750 ± 0.000 | 0.125 ± 0.000 | 11 |")
    assert lines[-1] == "Command: `python train_hf.py --ablation`; wall time 1.5 min."


def test_a_row_with_one_seed_so_far_has_no_interval():
    run = {"name": "MDF, all depths", "seed": 0, "accuracy": 0.5, "accuracy_with_history": None, "macro_f1": 0.25,
           "type_accuracy": 0.75, "type_macro_f1": 0.125, "train_seconds": 10.0}
    summary = ablation.summarize([run])
    assert summary["MDF, all depths"]["accuracy"] == {"mean": 0.5, "std": 0.0, "ci95": None}
    line = ablation.markdown(summary, 60.0, "cmd").splitlines()[2]
    # No test photo with a history: a dash, not a number.
    assert line == ("| MDF, all depths | 1 | 0.500 ± 0.000 | – | – | – | – | – | 0.250 ± 0.000 | – | 0.750 ± 0.000 | "
                    "0.125 ± 0.000 | 10 |")


def test_sensitivities_are_averaged_over_seeds_per_class_and_a_missing_class_is_a_dash():
    # The tiny runs above can predict alike under every seed; here the seeds differ by construction.
    results = [{"name": "a", "sensitivity": {"x": 1.0, "y": None}}, {"name": "a", "sensitivity": {"x": 0.5, "y": None}},
               {"name": "b", "sensitivity": {"x": 0.0, "y": 0.25}}, {"name": "b", "sensitivity": {"x": 0.2, "y": 0.75}}]
    means = ablation.mean_sensitivities(results)
    assert means == {"a": {"x": 0.75, "y": None}, "b": {"x": pytest.approx(0.1), "y": 0.5}}
    table = ablation.markdown({}, 60.0, "pytest", means).split("Sensitivity per class, mean over seeds:")[1]
    assert "| a | 0.75 | – |" in table and "| b | 0.10 | 0.50 |" in table


def test_differences_pair_rows_by_seed():
    runs = [{"name": "MDF, all depths", "seed": 0, "accuracy": 0.90, "accuracy_with_history": 0.80},
            {"name": "MDF, no FiLM", "seed": 0, "accuracy": 0.85, "accuracy_with_history": 0.70},
            {"name": "MDF, all depths", "seed": 1, "accuracy": 0.92, "accuracy_with_history": 0.90},
            {"name": "MDF, no FiLM", "seed": 1, "accuracy": 0.90, "accuracy_with_history": 0.95},
            {"name": "MDF, no FiLM", "seed": 2, "accuracy": 0.10, "accuracy_with_history": 0.10}]  # no pair: left out
    table = ablation.differences(runs)
    values = [0.85 - 0.90, 0.90 - 0.92]
    assert table["MDF, no FiLM"]["accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert table["MDF, no FiLM"]["accuracy"]["ci95"] == pytest.approx(ablation.t_interval(values))
    assert table["MDF, no FiLM"]["accuracy_with_history"]["mean"] == pytest.approx((-0.10 + 0.05) / 2)
    assert table["MDF, no FiLM"]["accuracy"]["seeds"] == 2
    line = ablation.differences_markdown(table).splitlines()[-1]
    assert line.startswith(f"| MDF, no FiLM | 2 | {np.mean(values):+.3f} (")


@pytest.mark.parametrize("attribute", ["film", "text_modulation"])
def test_without_film_drops_exactly_the_tensors_of_the_film_modules(attribute, tmp_path):
    """Whatever attribute FiLM hangs under: the no-FiLM row's U-Net file is the stage-1 file less the tensors of its
    `MdfMllmFiLM` modules, and holds what a U-Net built without FiLM holds."""
    unet = MdfMllmForConditionalGeneration(mdf_config()).model.unet
    rename(unet, "film", attribute)
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, path)
    film = [p for module in unet.modules() if isinstance(module, MdfMllmFiLM) for p in module.parameters()]
    full, kept = load_file(path), load_file(ablation.without_film(str(path), unet))
    assert len(full) - len(kept) == len(film) > 0
    assert sum(v.numel() for v in full.values()) - sum(v.numel() for v in kept.values()) == sum(p.numel() for p in film)
    assert all(torch.equal(kept[k], full[k]) for k in kept)
    assert sorted(kept) == sorted(MdfMllmForConditionalGeneration(mdf_config(use_film=False)).model.unet.state_dict())
