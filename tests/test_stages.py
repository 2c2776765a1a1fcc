"""mdf_mllm/stages.py: the cached base and its key, the counterfactual pass, the temperature."""

import copy
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_JOB
from dataset_builder import synthetic
from mdf_mllm import comparison, stages, main_job as job
from mdf_mllm.job import DataArguments, MdfTrainingArguments


def test_the_cached_base_is_made_once_per_setting(tmp_path, monkeypatch):
    made = []

    def fake_make_base(settings, folder, dataset=None):
        made.append(folder)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(stages, "make_base", fake_make_base)
    settings = job.parse_arguments([*TINY_JOB, "--base_cache_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    first = stages.cached_base(settings, None)
    assert stages.cached_base(settings, None) == first and len(made) == 1
    other = stages.cached_base(settings.replace(run={"base_epochs": 9}), None)
    assert other != first and len(made) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({Path(first).name, Path(other).name})


def test_the_base_key_changes_with_every_setting_the_base_trains_with(tmp_path):
    """Each data setting, each Trainer setting but those that only say where and how a run writes, logs or reports,
    the layout and the base's epochs: a change to any of them is another base (a stale base is a wrong result)."""
    settings = job.parse_arguments([*TINY_JOB, "--base_cache_dir", str(tmp_path)])
    key = stages.base_cache_folder(settings)
    assert " at 0x" not in repr(stages.base_settings(settings))  # the same key in every process and run

    def changed(part: str, name: str, value=None) -> Path:
        # The attribute set on a copy, without the dataclass's checks: any value of another repr is "another value".
        copied = copy.copy(getattr(settings, part))
        object.__setattr__(copied, name, ("changed", name) if value is None else value)
        return stages.base_cache_folder(replace(settings, **{part: copied}))

    reporting = {f.name for f in fields(MdfTrainingArguments) if f.name in stages.NOT_TRAINING or
                 f.name.startswith(stages.NOT_TRAINING_PREFIXES)}
    assert {"max_grad_norm", "gradient_accumulation_steps", "seed", "learning_rate"}.isdisjoint(reporting)
    for part, arguments in (("data", DataArguments), ("training", MdfTrainingArguments)):
        for f in fields(arguments):
            if f.init and f.name not in reporting:
                assert changed(part, f.name) != key, f"--{f.name} is not in the base's key"
    assert changed("model", "model_size", "small") != key and changed("run", "base_epochs", 9.0) != key
    for name in sorted(reporting):
        assert changed("training", name) == key, f"--{name} changes the base's key"
    # What the base does not read: stage 1, stage 2's model settings.
    assert changed("run", "stage1_learning_rate", 0.5) == changed("model", "fusion_layers", "1:1") == key


class TextReader(torch.nn.Module):
    """A stand-in classifier whose answer is the sum of the prompt's token ids modulo K: any other text, another
    answer (almost always)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter

    def classify(self, input_ids, attention_mask, **_):
        return torch.nn.functional.one_hot((input_ids * attention_mask).sum(1) % self.num_classes,
                                           self.num_classes).float()


def test_counterfactual_table_on_a_tiny_model():
    """The main job's counterfactual histories on a tiny model: every photo gets the history its look calls for,
    each recorded answer is what the model says to that photo and history (classified here one at a time), and the
    summary is the share of those answers."""
    from conftest import TINY_MDF, move_off_init, tiny_mllama_config
    from configuration_mdf_mllm import MdfMllmConfig
    from dataset_builder import load
    from mdf_mllm import stages, main_job, training
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration
    from processing_mdf_mllm import MdfMllmDataCollator, build_default_processor

    processor = build_default_processor(image_size=28, unet_image_size=32)
    base = tiny_mllama_config(vocab_size=processor.tokenizer.convert_tokens_to_ids("<|image|>"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(processor.tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(base, **TINY_MDF, image_token_index=base.image_token_index)
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    model.config.verbalizer_token_ids = processor.verbalizer_token_ids
    settings = main_job.parse_arguments(["--num_images", "120", "--eval_batch_size", "4"])
    dataset = load("synthetic", num_images=120, image_size=64, seed=0)  # a phenocopy and an age-dependent photo in test
    collator = MdfMllmDataCollator(processor)
    test = training.ProcessedSplit(dataset["test"], processor, with_answers=False)
    reader = TextReader(len(names := dataset["test"].features["label"].names))
    models = [comparison.Result(name, training.predict(m, test, collator, 4), None, model=m)
              for name, m in (("tiny", model), ("reader", reader))]
    own = models[0].predictions
    table = stages.counterfactual(training.RunContext(settings, dataset, processor), models)
    photos, age_swaps = table["photos"][:len(test)], table["photos"][len(test):]
    assert [p["case_id"] for p in photos] == dataset["test"]["case_id"]
    planned = {(i.case_id, i.label): i for i in synthetic.plan(120, 0)}
    looks = {key: i.look or i.label for key, i in planned.items()}
    for photo, label in zip(photos, dataset["test"]["label"]):
        look = looks[(photo["case_id"], names[label])]
        # A phenocopy whenever another label draws the look with a history of its own for it.
        shared = synthetic.counterfactual_history(names[label], look)[0] == "phenocopy"
        assert shared <= (len(synthetic.LOOK_LABELS[look]) > 1)
        assert photo["kind"] == ("phenocopy" if shared else "photo decides")
        writers = synthetic.HISTORY_LABELS[photo["history"]]
        assert photo["points_to"] == writers
        if shared:  # the twin's own history: only the twin writes it, and the twin draws this look
            assert len(writers) == 1 and writers[0] in synthetic.LOOK_LABELS[look] and writers[0] != names[label]
        else:  # no label that draws this look writes it
            assert not set(writers) & {names[label], *synthetic.LOOK_LABELS[look]}
    assert {p["kind"] for p in photos} == {"phenocopy", "photo decides"}
    # Each swapped answer, one photo at a time, from the photo and the history kind recorded for it.
    rng = np.random.default_rng(0)
    for index, photo in enumerate(photos):
        text = synthetic.case_text(synthetic.clinical_case(photo["history"], rng))
        example = dataset["test"][index]
        inputs = processor(images=[example["image"]], clinical_text=[text])
        batch = collator([{key: value[0] for key, value in inputs.items()}])
        with torch.no_grad():
            answer = model.classify(**{k: v for k, v in batch.items() if k != "vessel_mask"}).argmax(-1).item()
        assert photo["answers"]["tiny"] == [names[own[index]], names[answer]]
        # The reader's answer is a function of the prompt's tokens alone: it shows the swapped history was read.
        assert photo["answers"]["reader"][1] == names[reader.classify(**batch).argmax(-1).item()]
    assert any(p["answers"]["reader"][0] != p["answers"]["reader"][1] for p in photos)
    rows = {row["group"]: row for row in table["summary"]["tiny"]}
    phenocopies = [p for p in photos if p["kind"] == "phenocopy"]
    follows = np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in phenocopies])
    assert rows["all phenocopy photos"]["n"] == len(phenocopies)
    assert rows["all phenocopy photos"]["follows"] == pytest.approx(follows)
    decided = [p for p in photos if p["kind"] == "photo decides"]
    changed = np.mean([p["answers"]["tiny"][0] != p["answers"]["tiny"][1] for p in decided])
    assert rows["all photo decides photos"]["changed"] == pytest.approx(changed)
    misled = np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in decided])
    assert rows["all photo decides photos"]["follows"] == pytest.approx(misled)
    # The age swaps: each age-dependent test photo once more, its own text with the other label's age, in order.
    tested = [i for i, flag in enumerate(dataset["test"]["age_dependent"]) if flag]
    assert tested and [p["case_id"] for p in age_swaps] == [dataset["test"][i]["case_id"] for i in tested]
    rng = np.random.default_rng([0, 1])
    for index, photo in zip(tested, age_swaps):
        example = dataset["test"][index]
        item = planned[(example["case_id"], names[example["label"]])]
        text, twin = synthetic.age_swapped_history(item.label, item.look, example["text"], rng, item.history)
        assert photo["kind"] == "age swap" and photo["points_to"] == [twin] != [item.label]
        inputs = processor(images=[example["image"]], clinical_text=[text])
        batch = collator([{key: value[0] for key, value in inputs.items()}])
        with torch.no_grad():
            answer = model.classify(**{k: v for k, v in batch.items() if k != "vessel_mask"}).argmax(-1).item()
        assert photo["answers"]["tiny"] == [names[own[index]], names[answer]]
        assert photo["answers"]["reader"][1] == names[reader.classify(**batch).argmax(-1).item()]  # the text read
    swapped = rows["all age swap photos"]
    assert swapped["n"] == len(tested) and swapped["follows"] == pytest.approx(
        np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in age_swaps]))


class Oracle(torch.nn.Module):
    """A stand-in classifier that knows each photo (by its pixels' sum): right on every other photo it was given,
    wrong on the rest, with a logit of 1, 2 or 3 over the other classes (a confidence that differs between photos),
    scaled by its config's temperature as classify() scales (softmax(z / T))."""

    def __init__(self, splits, num_classes: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter
        self.config = type("Config", (), {"classifier_temperature": None})()
        photos = [(self.key(item["unet_pixel_values"]), label) for split in splits
                  for item, label in zip(split.items, split.label_ids)]
        self.logits = {key: (1.0 + n % 3) * np.eye(num_classes)[(label + n % 2) % num_classes]
                       for n, (key, label) in enumerate(photos)}

    @staticmethod
    def key(pixels) -> float:
        return round(float(pixels.double().sum()), 2)

    def classify(self, unet_pixel_values, **_):
        logits = torch.tensor(np.stack([self.logits[self.key(pixels)] for pixels in unet_pixel_values]))
        return (logits / (self.config.classifier_temperature or 1.0)).softmax(-1).float()


def test_the_temperature_is_fitted_on_the_validation_prompts_and_saved_in_the_config():
    from dataset_builder import load
    from mdf_mllm import stages, main_job, training
    from mdf_mllm.calibration import apply_temperature, fit_temperature
    from processing_mdf_mllm import build_default_processor

    processor = build_default_processor(image_size=28, unet_image_size=32)
    settings = main_job.parse_arguments(["--num_images", "60", "--eval_batch_size", "4", "--n_bootstrap", "20"])
    dataset = load("synthetic", num_images=60, image_size=64, seed=0)
    run = training.RunContext(settings, dataset, processor)
    validation = training.ProcessedSplit(dataset["validation"], processor, with_answers=False)
    model = Oracle([validation, run.splits["test"]])
    ours = run.scored("ours", training.predict(model, run.splits["test"], run.collator, 4))
    ours.model = model
    calibrated = stages.calibrate(run, ours)
    # By hand: the validation photos' logits as the oracle draws them, the NLL's minimum.
    expected = fit_temperature(validation.label_ids, logits=np.stack(
        [(1.0 + n % 3) * np.eye(8)[(label + n % 2) % 8] for n, label in enumerate(validation.label_ids)]))
    assert 0.06 < expected < 19 and calibrated.temperature == pytest.approx(expected, rel=1e-6)
    assert model.config.classifier_temperature == calibrated.temperature  # classify() now answers with it
    assert calibrated.probabilities == pytest.approx(apply_temperature(expected, probabilities=ours.probabilities))
    assert calibrated.name == "ours, temperature-scaled" and calibrated.accuracy() == ours.accuracy()


def test_stage_2_starts_from_the_stage1_unet_with_its_projector_reading_standardised_skips(tiny_data, tmp_path,
                                                                                             monkeypatch):
    """start_from_stage1 loads the stage-1 U-Net and standardises the projector on the training photos, a batch at a
    time: each fused depth's first Linear then gives what it gave before on (s - mu_c) / sigma_c, with mu_c and
    sigma_c (the between-photo spread of the channel's per-photo average) computed here from all photos at once. A
    second model of the same run (the probe ladder's start, an ablation row) reuses the averages: no photo again."""
    from safetensors.torch import save_file

    from mdf_mllm import training
    from mdf_mllm.model_setup import build_model

    model_args, processor, dataset, splits = tiny_data
    settings = job.parse_arguments([*TINY_JOB, "--eval_batch_size", "3"])  # 28 photos: batches of 3, one short
    run = training.RunContext(settings, dataset, processor, processed={False: splits})
    trained = build_model(model_args, processor).model.unet
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    weights = str(tmp_path / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, weights)
    photos = len(splits["train"])
    pixels = run.collator([splits["train"][i] for i in range(photos)])["unet_pixel_values"]
    with torch.no_grad():
        skips = trained.encode(pixels, None)
    for model_number in range(2):
        model = build_model(model_args, processor)
        projector = model.model.unet_projector
        before = copy.deepcopy(projector)
        stages.start_from_stage1(run.with_job(settings), model, weights, photos=photos)
        if model_number == 0:  # the second must not read a photo
            monkeypatch.setattr(stages, "photo_averages", lambda *args: pytest.fail("photo averages computed twice"))
        for name, value in trained.state_dict().items():
            torch.testing.assert_close(model.model.unet.state_dict()[name], value, rtol=0, atol=0)
        with torch.no_grad():
            for depth in projector.depths:
                skip = skips[depth - 1]
                averages = skip.mean((2, 3))
                standardised = ((skip - averages.mean(0)[:, None, None])
                                / averages.std(0).clamp(min=1e-3)[:, None, None])
                first, old_first = projector.projections[str(depth)][0], before.projections[str(depth)][0]
                torch.testing.assert_close(first(projector.patchify(skip)),
                                           old_first(projector.patchify(standardised)), atol=1e-3, rtol=1e-4)
