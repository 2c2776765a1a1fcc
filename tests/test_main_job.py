"""mdf_mllm/main_job.py (train_hf.py): the pretrained-base main job end to end on tiny layouts (base, stage 1, both
arms, export), its command line. Resume after a kill and FSDP sharding: tests/test_distributed.py."""

import itertools
import json
import math
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, MllamaForConditionalGeneration, MllamaProcessor, set_seed

from conftest import TINY_JOB, TINY_STAGES
from mdf_mllm import ablation, comparison, export, guards, model_setup, stage1, stages, main_job as job, training
from mdf_mllm.job import DataArguments, MdfTrainingArguments, ModelArguments, RunArguments
from processing_mdf_mllm import MdfMllmDataCollator


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The default main job (cached base -> stage 1 -> MDF-MLLM and baseline from the base -> export) on 40 synthetic
    64 px photos, run from an empty working directory. Records the weights every train() call starts from."""
    out, cwd = tmp_path_factory.mktemp("job"), tmp_path_factory.mktemp("cwd")
    cache = tmp_path_factory.mktemp("base-cache")
    starts, original_train = {}, stages.train_model

    def recording_train(model, *args, label=None, **kwargs):
        starts[label] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original_train(model, *args, label=label, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "train_model", recording_train)  # the name make_base and train_arm call
        patch.setattr(training, "clock", itertools.count().__next__)  # the phase table in ticks: exact sums
        patch.chdir(cwd)
        job.main([*TINY_JOB, *TINY_STAGES, "--output_dir", str(out), "--base_cache_dir", str(cache)])
    (base,) = cache.glob("base-*")
    return {"out": out, "cwd": cwd, "base": base, "starts": starts}


def test_main_job_compares_mdf_with_the_baseline_fine_tuned_from_the_same_base(main_job):
    saved = json.loads((main_job["out"] / "comparison.json").read_text())
    rows = saved["models"]
    assert [row["name"] for row in rows] == ["MDF-MLLM", "Mllama baseline", "U-Net alone (image only)",
                                            *comparison.REFERENCES]
    mdf, baseline, unet_alone, text_only, late_fusion = rows[:5]
    assert mdf["parameters"] > baseline["parameters"]
    assert unet_alone["gate_history"] == [] and unet_alone["train_seconds"] > 0
    assert "parameters" not in text_only and "train_seconds" not in late_fusion  # references: nothing trained
    for row in rows:
        assert row["num_items"] == 8  # the test split of 40 photos
        low, high = row["disease"]["ci95"]["accuracy"]
        assert low <= row["disease"]["accuracy"] <= high
        subsets = row["subsets"]
        assert subsets["with_history"]["n"] + subsets["without_history"]["n"] == 8
    # MDF-MLLM against every other row, paired, over all photos and over the photos with a history.
    differences = saved["paired_differences"]["MDF-MLLM"]
    assert list(differences) == [row["name"] for row in rows[1:]]
    assert differences["Mllama baseline"]["all"]["difference"] == pytest.approx(
        mdf["disease"]["accuracy"] - baseline["disease"]["accuracy"])
    counterfactual = saved["counterfactual_histories"]
    assert set(counterfactual["summary"]) == {"MDF-MLLM", "Mllama baseline", comparison.LATE_FUSION, comparison.JOINT}
    assert len(counterfactual["photos"]) == 8
    gates = mdf["gate_history"]
    start = math.tanh(ModelArguments().unet_gate_start)  # open over zero value projections
    assert gates[0] == {"step": 0, "gates": {"1": pytest.approx(start), "3": pytest.approx(start)},
                        "tau": {"1": 1.0, "3": 1.0}}
    assert [entry["step"] for entry in gates] == list(range(len(gates)))  # logged every step (--logging_steps 1)
    assert all(value != 0 for value in gates[-1]["gates"].values())
    assert baseline["gate_history"] == []
    table = (main_job["out"] / "comparison.md").read_text()
    assert all(f"| {row['name']} |" in table for row in rows)


README_TABLE = "<!-- outputs/run/comparison.md of the default run -->"


def test_readme_quotes_the_default_runs_comparison_in_the_format_the_job_writes(main_job):
    """The README's results table is the default run's comparison table, pasted: same columns, same row layout,
    every row, as the job writes it today (a changed table format or a hand-edited README fails here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = readme.split(README_TABLE)[1].split("<!-- end -->")[0].strip().splitlines()
    written = (main_job["out"] / "comparison.md").read_text().split("\n\n")[0].strip().splitlines()
    assert quoted[0].split(" | ")[:2] == written[0].split(" | ")[:2] and quoted[1] == written[1]
    ci = r"(0|1)\.\d{3} \((0|1)\.\d{3}–(0|1)\.\d{3}\)"
    subset = r"((0|1)\.\d{3}|–)"  # with a history, without, age-dependent
    row = re.compile(rf"\| ([^|]+) \| {ci} \| {subset} \| {subset} \| {subset} \| {ci} \| {ci} \| ([\d,]+|–) \| "
                     r"(\d+|–) \|$")
    names = ["MDF-MLLM", "Mllama baseline", "U-Net alone (image only)", *comparison.REFERENCES]
    assert [row.match(line)[1] for line in written[2:]] == [row.match(line)[1] for line in quoted[2:]] == names


def test_the_phase_table_holds_every_phase_of_the_job_in_order(main_job):
    """comparison.json (as left after the export) and comparison.md: every phase, in the order it ran, each at least
    one tick of the test's clock (a phase timed is never 0 ticks), each tick counted once."""
    saved = json.loads((main_job["out"] / "comparison.json").read_text())["phase_seconds"]
    rows = ["MDF-MLLM", "Mllama baseline"]
    assert list(saved["phases"]) == [
        "set-up checks", "data", "base", "preprocessing", "stage 1", f"scoring: {comparison.UNET_ALONE}",
        *(phase for name in rows for phase in (f"stage 2: {name}", f"scoring: {name}")), "probe ladder", "references",
        *(f"scoring: {name}" for name in comparison.REFERENCES), "paired differences", "counterfactual pass",
        "temperature", "scoring: MDF-MLLM, temperature-scaled", "export and plots"]
    assert all(seconds >= 1 for seconds in saved["phases"].values())
    # Every tick counts once: outside every phase are only the tick before each of the 17 outermost phases entered (a
    # trained arm's scoring is entered twice, its forward pass and its metrics) and the one after the last.
    assert saved["other_seconds"] == 18
    assert sum(saved["phases"].values()) + saved["other_seconds"] == saved["wall_seconds"]
    table = (main_job["out"] / "comparison.md").read_text().split(job.PHASES_HEADING)[1]
    assert [line.split(" | ")[0][2:] for line in table.strip().splitlines()[2:]] == [
        *saved["phases"], "(outside every phase)", "wall"]


def test_both_arms_start_from_bit_identical_base_weights(main_job):
    base = MllamaForConditionalGeneration.from_pretrained(main_job["base"]).state_dict()
    mdf, baseline = main_job["starts"]["stage 2: MDF-MLLM"], main_job["starts"]["stage 2: Mllama baseline"]
    assert baseline.keys() == base.keys() and baseline.keys() < mdf.keys()
    assert all(torch.equal(base[k], baseline[k]) and torch.equal(base[k], mdf[k]) for k in base)
    # Every new tensor sits under an MDF module's attribute (the names the tiny model's classes hang under).
    assert all({"unet", "unet_projector", "unet_attn"} & set(k.split(".")) for k in mdf.keys() - base.keys())


def test_stage_1_lowers_the_class_loss_and_stage_2_starts_from_its_u_net(main_job, tiny_data):
    model_args, processor, _, splits = tiny_data
    folder = main_job["out"] / "stage1"
    warmed = load_file(folder / "unet.safetensors")
    start = main_job["starts"]["stage 2: MDF-MLLM"]
    assert all(torch.equal(start[f"model.unet.{k}"], v) for k, v in warmed.items())
    set_seed(42)  # the seed stage 1 builds its model with
    unet = model_setup.build_model(replace(model_args, base_model=str(main_job["base"])), processor).model.unet
    head = torch.nn.Linear(sum(unet.widths), 8)
    head.load_state_dict(load_file(folder / "class_head.safetensors"))
    train = splits["train"]
    batch = MdfMllmDataCollator(processor)([train[i] for i in range(len(train))])
    labels = torch.tensor(train.label_ids)
    with torch.no_grad():
        before = stage1.loss(unet, head, batch, labels, vessel_weight=0).item()
        unet.load_state_dict(warmed)
        after = stage1.loss(unet, head, batch, labels, vessel_weight=0).item()
        # Image only: the stage-1 U-Net's FiLM is still the identity, whatever the prompt.
        assert all((unet.film[k].mlp[2].weight == 0).all() for k in range(4))
    assert after < before - 0.1


def test_everything_the_job_writes_is_under_output_dir(main_job):
    assert list(main_job["cwd"].iterdir()) == []
    assert {p.name for p in main_job["out"].iterdir()} == {"comparison.json", "comparison.md", "mdf-mllm", "baseline",
                                                          "stage1", "probe_ladder.md", guards.RUN_RECORD}
    assert json.loads((main_job["out"] / guards.RUN_RECORD).read_text())["--num_images"] == 40  # the lock is gone
    assert not list(main_job["out"].glob("**/checkpoint-*"))  # removed once each arm finished
    assert (main_job["out"] / "baseline" / "results.json").is_file()


def test_export_is_a_complete_hub_repository(main_job):
    folder = main_job["out"] / "mdf-mllm"
    names = set(os.listdir(folder))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_mdf_mllm.py",
        "modeling_mdf_mllm.py",
        "processing_mdf_mllm.py",
        "image_processing_mdf_mllm.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
        "results.json",
        "training_curves.png",
        "confusion_matrix_disease.png",
        "handler.py",
    } <= names
    config = json.loads((folder / "config.json").read_text())
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    assert len(config["verbalizer_token_ids"]) == 8
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    # A local base: described in the text, never by its path on this machine (tests/test_hub_card.py).
    assert "base_model" not in front_matter and str(main_job["base"]) not in card
    assert "trained from scratch by `train_hf.py --make_base` for 2 epochs on the synthetic data" in card
    results = json.loads((folder / "results.json").read_text())
    assert f"| disease | {results['disease']['accuracy']:.3f} (" in card
    assert "| Mllama baseline | " in card and "| U-Net alone (image only) | " in card  # the comparison rows
    for widget in front_matter["widget"]:
        assert (folder / widget["src"]).is_file()
    # Issue 25 row 15: a synthetic-trained export says what it is for, with its answers on real photos measured.
    assert "not for real eyes" in card and "| `skimage.data.retina()` | a normal human retina" in card
    histories = json.loads((folder / "examples" / "histories.json").read_text())
    assert sorted(histories) == sorted(os.path.basename(w["src"]) for w in front_matter["widget"])
    assert not [name for name in os.listdir(main_job["out"]) if name.startswith(".")]  # no staging left behind


def test_a_failed_export_keeps_the_previous_model_and_leaves_nothing_behind(main_job, monkeypatch):
    folder = main_job["out"] / "mdf-mllm"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}

    def crash_half_way(settings, staging, *args, **kwargs):
        (staging / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_repository", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(job.parse_arguments(["--export_dir", str(folder), "--overwrite_export"]), None, None, None)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    assert not [name for name in os.listdir(main_job["out"]) if name.startswith(".")]


def test_the_exported_temperature_is_fitted_on_the_validation_photos_and_every_row_is_calibrated(main_job, tiny_data):
    """The export's config carries the temperature that minimises the NLL of the exported model's own raw
    probabilities on the validation prompts (fitted again here); comparison.json holds every row's ECE, Brier and NLL
    and MDF-MLLM's after the temperature; the card shows the table and both plots, which the export holds."""
    from mdf_mllm.calibration import calibration_scores, fit_temperature

    folder = main_job["out"] / "mdf-mllm"
    config = json.loads((folder / "config.json").read_text())
    saved = json.loads((main_job["out"] / "comparison.json").read_text())
    temperature = config["classifier_temperature"]
    assert saved["temperature_scaled"]["temperature"] == temperature
    model = model_setup.MdfMllmForConditionalGeneration.from_pretrained(folder).eval()
    model.config.classifier_temperature = None
    _, processor, dataset, _ = tiny_data
    validation = training.ProcessedSplit(dataset["validation"], processor, with_answers=False)
    raw = training.predict(model, validation, MdfMllmDataCollator(processor), 4)
    assert temperature == pytest.approx(fit_temperature(validation.label_ids, probabilities=raw), rel=1e-4)
    for row in saved["models"]:
        assert set(row["calibration"]) >= {"ece", "brier", "nll", "ci95", "reliability", "risk_coverage"}
    ours = saved["models"][0]["calibration"]
    scaled = saved["temperature_scaled"]["calibration"]
    assert scaled["nll"] != ours["nll"] and saved["temperature_scaled"]["disease"]["accuracy"] == saved["models"][0][
        "disease"]["accuracy"]  # a temperature moves the probabilities, never the answer
    results = json.loads((folder / "results.json").read_text())
    test_labels = dataset["test"]["label"]
    # results.json: the probabilities the exported model gives (its temperature applied), the raw ones beside them.
    assert results["classifier_temperature"] == temperature
    for key, row in (("raw_probabilities", ours), ("probabilities", scaled)):
        probabilities = np.asarray(results[key])
        assert row["ece"] == pytest.approx(calibration_scores(probabilities, test_labels, n_bootstrap=1)["ece"])
    card = (folder / "README.md").read_text()
    assert "| MDF-MLLM, temperature-scaled | " in card and f"T = {temperature:.3f}" in card
    for plot in ("reliability.png", "risk_coverage.png"):
        assert (folder / plot).is_file() and f"]({plot})" in card


def test_the_examples_are_test_photos_with_their_own_histories(main_job, tiny_data):
    folder = main_job["out"] / "mdf-mllm"
    histories = json.loads((folder / "examples" / "histories.json").read_text())
    test = tiny_data[2]["test"]
    card = (folder / "README.md").read_text()
    assert "## Examples from the test split" in card
    for name, text in histories.items():
        assert text in test["text"] and f"`examples/{name}` | {text or '(none)'} |" in card


def test_exported_model_reproduces_the_reported_predictions(main_job):
    from transformers import AutoModel

    folder = main_job["out"] / "mdf-mllm"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    front_matter = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    widget = front_matter["widget"][0]
    from PIL import Image

    inputs = processor(images=[Image.open(folder / widget["src"])], clinical_text=[widget["text"]])
    probabilities = model.classify(**inputs)[0]
    reported = {entry["label"]: entry["score"] for entry in widget["output"]}
    for label, score in zip(model.config.label_names, probabilities.tolist()):
        assert abs(reported[label] - score) < 1e-3


def test_make_base_writes_a_stock_mllama_that_plain_transformers_loads(made_base):
    assert sorted(p.name for p in made_base.iterdir()) == ["base"]
    config = json.loads((made_base / "base" / "config.json").read_text())
    assert config["model_type"] == "mllama" and "auto_map" not in config
    assert not list((made_base / "base").glob("*.py"))  # no remote code
    model = MllamaForConditionalGeneration.from_pretrained(made_base / "base")
    assert model.config.text_config.cross_attention_layers == [1, 3]
    processor = AutoProcessor.from_pretrained(made_base / "base")
    assert type(processor) is MllamaProcessor
    assert processor.chat_template == model_setup.BASE_CHAT_TEMPLATE
    # A pretrained base's cross-attention gates are open (ours were started at FROM_SCRATCH_GATE and trained).
    gates = [p.item() for n, p in model.named_parameters() if n.endswith("cross_attn_attn_gate")]
    assert all(abs(gate - model_setup.FROM_SCRATCH_GATE) < 0.1 for gate in gates)


TOY_ROW = "Toy reference (the training split's class prior)"


def test_a_reference_registered_once_reaches_every_report(main_job, tmp_path, monkeypatch):
    """A new row is one registration in comparison.REFERENCES: the main job scores it into comparison.md, .json (and
    the paired differences), the card, and the ablation gives it a row per seed; nothing else names it."""
    def toy(run, rows, texts):
        return np.tile(comparison.class_prior(run.dataset["train"]["label"], len(run.label_names)), (len(texts), 1))

    monkeypatch.setitem(comparison.REFERENCES, TOY_ROW, comparison.Reference(TOY_ROW, toy))
    out = tmp_path / "job"
    job.main([*TINY_JOB, "--num_train_epochs", "1", "--stage1_epochs", "1", "--baseline", "false", "--output_dir",
              str(out), "--base_model", str(main_job["base"]), "--probe_ladder", "false"])
    dataset = training.load_data(job.parse_arguments(TINY_JOB).data)
    train_labels, test_labels = np.array(dataset["train"]["label"]), np.array(dataset["test"]["label"])
    majority = np.bincount(train_labels, minlength=8).argmax()  # argmax of the prior: the first most frequent class
    saved = json.loads((out / "comparison.json").read_text())
    rows = {row["name"]: row for row in saved["models"]}
    assert list(rows) == ["MDF-MLLM", "U-Net alone (image only)", comparison.TEXT_ONLY, comparison.LATE_FUSION,
                          comparison.JOINT, TOY_ROW]
    assert rows[TOY_ROW]["disease"]["accuracy"] == pytest.approx((test_labels == majority).mean())
    assert TOY_ROW in saved["paired_differences"]["MDF-MLLM"]
    assert TOY_ROW not in saved["counterfactual_histories"]["summary"]  # it does not read the photo
    assert f"| {TOY_ROW} |" in (out / "comparison.md").read_text()
    assert f"| {TOY_ROW} |" in (out / "mdf-mllm" / "README.md").read_text()
    settings = job.parse_arguments([*TINY_JOB, "--stage1_epochs", "1", "--seeds", "2", "--output_dir",
                                    str(tmp_path / "ablation"), "--base_model", str(main_job["base"])])
    context = training.RunContext(settings, dataset, model_setup.base_processor(settings.model))
    runs = ablation.run_ablation(context, rows=ablation.default_rows(ablation.ROWS[1:2]), command="pytest")
    assert [(r["name"], r["seed"]) for r in runs] == [(name, seed) for seed in (0, 1) for name in (
        "U-Net alone (image only)", comparison.TEXT_ONLY, comparison.LATE_FUSION, comparison.JOINT, TOY_ROW)]
    expected = pytest.approx((test_labels == majority).mean())
    assert [r["accuracy"] for r in runs if r["name"] == TOY_ROW] == [expected] * 2
    assert f"| {TOY_ROW} | 2 |" in (tmp_path / "ablation" / "ablation.md").read_text()


def read_toy(root):
    """A toy source's reader: `<label>-<n>.png` photos, each its own case, no text."""
    from dataset_builder.sources import Record

    return [Record("toy", path.stem, path.stem.split("-")[0], image_path=str(path))
            for path in sorted(Path(root).glob("*.png"))], []


def test_a_source_registered_once_is_built_offered_and_trained_on(tmp_path, monkeypatch, capsys):
    """A new source is a reader and one registration: the builder reads it, the dataset CLI and the job offer it
    (its folder from --data_dir), the card names it, and the main job trains on it."""
    from dataset_builder import __main__ as dataset_cli, load, sources, synthetic

    folder = tmp_path / "toy"
    folder.mkdir()
    for n, example in enumerate(synthetic.generate(image_size=64, composition=synthetic.TINY_COMPOSITION)):
        Image.fromarray(example["image"]).save(folder / f"{example['label']}-{n}.png")
    toy = sources.Source("toy", read_toy, "<label>-<n>.png photos", has_text=False, official_split=False,
                         description="the toy photos")
    monkeypatch.setitem(sources.SOURCES, "toy", toy)
    monkeypatch.setenv("MDF_MLLM_DATA_CACHE", str(tmp_path / "cache"))
    data = load("toy", data_dir=str(folder))
    capsys.readouterr()
    assert sum(map(len, data.values())) == len(list(folder.glob("*.png"))) and set(data["train"]["source"]) == {"toy"}
    assert dataset_cli.parse_args(["build", "--source", "toy", "--data_dir", str(folder), "--out", "x"]).source == "toy"
    with pytest.raises(SystemExit):  # the job's --dataset toy needs its folder
        job.main(["--dataset", "toy"])
    assert capsys.readouterr().err == "train_hf.py: error: --dataset toy: needs --data_dir (the data folder)\n"
    out = tmp_path / "job"
    job.main(["--dataset", "toy", "--data_dir", str(folder), "--from_scratch", "--model_size", "tiny",
              "--num_train_epochs", "1", "--baseline", "false", "--per_device_train_batch_size", "8", "--n_bootstrap",
              "20", "--output_dir", str(out)])
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["models"][0]["name"] == "MDF-MLLM" and saved["models"][0]["num_items"] == len(data["test"])
    assert "Trained and evaluated on the toy photos." in (out / "mdf-mllm" / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_size", "big"], "--model_size: 'big' is not one of small, tiny"),
        # The 11B layout's Mllama is its checkpoint's: --base_model such a checkpoint gets its MDF sizes anyway.
        (["--model_size", "11b"], "--model_size: '11b' is not one of small, tiny"),
        (["--dataset", "foo"], "--dataset: 'foo' is not one of synthetic, all, fives, hrf, stonerounds, manifest"),
        (["--fusion_layers", "99:1"], "--fusion_layers: '99:1': layers must be among the cross-attention layers "
                                      "[1, 3, 5, 7], depths 1-4"),
        (["--fusion_layers", "3-1"], "--fusion_layers: expected 'layer:depth,...'"),
        (["--base_model", "./no/such/base"], "--base_model: no such file or folder: ./no/such/base"),
        (["--data_dir", "missing"], "--data_dir: no such file or folder: missing"),
        (["--model_sise", "tiny"], "unrecognized arguments: --model_sise tiny"),
        (["--stage1_optimizer", "Lion"], "--stage1_optimizer: 'Lion' is not one of AdamW, Adam, SGD"),
        (["--stage1_schedule", "cosine"], "--stage1_schedule: 'cosine' is not one of one_cycle, constant"),
        (["--stage1_flip", "1.5"], "--stage1_flip: got 1.5; accepts a finite number >= 0 and <= 1"),
    ],
)
def test_a_bad_option_exits_2_with_one_line_naming_it(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_hf.py: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_help_says_what_the_job_does_and_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.splitlines()[2].startswith("Fine-tune MDF-MLLM from a pretrained Llama 3.2 Vision")
    ours = [f for cls in (ModelArguments, DataArguments, RunArguments) for f in fields(cls)]
    ours += [f for f in fields(MdfTrainingArguments) if f.name in vars(MdfTrainingArguments)]
    assert [f.name for f in ours if not f.metadata.get("help")] == []
    assert "Train only MDF-MLLM" in text and "(default: outputs/run)" in " ".join(text.split())


def test_yaml_config_file_gives_the_same_arguments(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model_size": "tiny", "num_images": 40, "fusion_layers": "1:2,3:4", "seeds": 2}))
    settings = job.parse_arguments([str(path)])
    assert (settings.model.model_size, settings.data.num_images, settings.run.seeds) == ("tiny", 40, 2)
    assert model_setup.parse_fusion_layers(settings.model.fusion_layers) == {1: 2, 3: 4}
    assert settings.training.remove_unused_columns is False


def test_the_export_holds_no_stage_1_class_head(main_job):
    """The class head only trains the U-Net in stage 1: it is not part of the model, so nothing of it reaches the
    answer (the exported weights are exactly the model's own tensors; the head is a file of stage 1)."""
    from modeling_mdf_mllm import MdfMllmConfig, MdfMllmForConditionalGeneration

    folder = main_job["out"] / "mdf-mllm"
    config = MdfMllmConfig.from_pretrained(folder)
    exported = set(load_file(folder / "model.safetensors"))
    fresh = MdfMllmForConditionalGeneration(config).state_dict()
    assert len(exported) == len(fresh)  # tied or renamed keys aside, nothing beyond the model's own tensors
    assert not [key for key in exported if "class_head" in key]
    assert set(load_file(main_job["out"] / "stage1" / "class_head.safetensors")) == {"weight", "bias"}


def test_max_steps_bounds_every_training_loop_and_every_phase_still_runs(tmp_path, monkeypatch):
    """A smoke run (`--max_steps 2`): the base, stage 1 and both arms each take exactly 2 optimizer steps, and the
    scoring, references, counterfactual pass, probe ladder and export all still run."""
    from transformers import AutoModel

    steps, original_train, original_loss = {}, stages.train_model, stage1.loss

    def counting_train(model, *args, label=None, **kwargs):
        trainer = original_train(model, *args, label=label, **kwargs)
        # Optimizer steps, counted twice: the Trainer's own count, and the losses it logged (one per step here).
        steps[label] = (trainer.state.global_step, len([h for h in trainer.state.log_history if "loss" in h]))
        return trainer

    def counting_loss(*args, **kwargs):  # stage 1 computes one loss per optimizer step
        steps["stage 1"] = steps.get("stage 1", 0) + 1
        return original_loss(*args, **kwargs)

    monkeypatch.setattr(stages, "train_model", counting_train)
    monkeypatch.setattr(stage1, "loss", counting_loss)
    out, cache = tmp_path / "smoke", tmp_path / "cache"
    job.main([*TINY_JOB, *TINY_STAGES, "--max_steps", "2", "--output_dir", str(out), "--base_cache_dir", str(cache)])
    assert steps == {"base: stock Mllama (tiny)": (2, 2), "stage 1": 2, "stage 2: MDF-MLLM": (2, 2),
                     "stage 2: Mllama baseline": (2, 2)}
    saved = json.loads((out / "comparison.json").read_text())
    assert [row["name"] for row in saved["models"]] == ["MDF-MLLM", "Mllama baseline", "U-Net alone (image only)",
                                                        *comparison.REFERENCES]
    assert all(row["num_items"] == 8 for row in saved["models"])  # every test photo scored
    assert len(saved["counterfactual_histories"]["photos"]) == 8 and (out / "probe_ladder.md").is_file()
    model = AutoModel.from_pretrained(out / "mdf-mllm", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == saved["models"][0]["parameters"]
    assert "| max_steps | 2 |" in (out / "mdf-mllm" / "README.md").read_text()  # the card says it was a smoke run
    # The smoke base is cached under a key of its own: a full run never reuses it.
    (smoke_base,) = cache.glob("base-*")
    assert stages.base_cache_folder(job.parse_arguments([*TINY_JOB, *TINY_STAGES, "--base_cache_dir", str(cache)])
                                    ) != smoke_base
