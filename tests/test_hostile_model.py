"""Hostile runs, folders and uploads (issue 25): a run that diverges, non-finite weights, user mistakes of train_hf.py
and mdf-mllm, `--make_base` over a user's folder, the quiet start, the demo's uploads and examples.

Each test is named after the row of the issue's table it pins (`test_row_<n>_...`).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

from mdf_mllm import stages, main_job as job
from mdf_mllm.cli import main as cli


TINY_JOB = ["--model_size", "tiny", "--num_images", "40", "--image_size", "64", "--no_stage1", "--max_steps", "2",
            "--disable_tqdm", "true", "--n_bootstrap", "10", "--no_probe_ladder"]


def one_line_error(capsys, *fragments) -> str:
    """The error line a command ended with (progress bars may come before it), which holds every fragment."""
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.endswith("\n"), error
    line = error.splitlines()[-1].split("\r")[-1]
    assert ": error: " in line, error
    for fragment in fragments:
        assert fragment in line, error
    return line


@pytest.fixture
def fundus_png(tmp_path):
    path = tmp_path / "fundus.png"
    Image.fromarray(skdata.retina()).resize((96, 96)).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Row 1: a run that diverges is not a model


def test_row_1_infinite_learning_rate_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        job.main([*TINY_JOB, "--learning_rate", "inf", "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    one_line_error(capsys, "--learning_rate", "inf")


def test_row_1_a_run_that_diverges_stops_and_caches_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        job.main([*TINY_JOB, "--learning_rate", "1e39", "--output_dir", str(tmp_path / "out"), "--base_cache_dir",
                  str(cache)])
    assert stop.value.code == 1
    error = one_line_error(capsys, "base: stock Mllama (tiny): diverged at step")
    assert "nothing was exported or cached" in error
    assert not list(cache.glob("base-*")) and not (tmp_path / "out" / "mdf-mllm").exists()


@pytest.fixture
def nan_model(model_folder, tmp_path):
    """A copy of the tiny export with one weight NaN, as a diverged run would have left it."""
    folder = shutil.copytree(model_folder, tmp_path / "nan-model")
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_row_1_loaders_refuse_non_finite_weights(nan_model, fundus_png, capsys):
    assert cli(["predict", fundus_png, "--model", nan_model, "--json"]) == 2
    one_line_error(capsys, "hold NaN or inf")
    from pipeline_mdf_mllm import load_pipeline

    with pytest.raises(ValueError, match="weight tensors hold NaN or inf"):
        load_pipeline(nan_model)


def test_row_1_predict_json_never_prints_nan(model_folder, fundus_png, capsys, monkeypatch):
    from mdf_mllm import cli as cli_module

    nan_answer = [{"label": "amd", "score": float("nan"), "disease_type": "acquired"}]
    monkeypatch.setattr(cli_module, "load", lambda args: lambda images, **kwargs: [nan_answer] * len(images))
    assert cli(["predict", fundus_png, "--model", model_folder, "--json"]) == 2
    assert "NaN" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Row 7: user mistakes, one line and exit status 2, before training


@pytest.mark.parametrize("arguments, fragment", [
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--dataset", "manifest"], "needs --data_dir"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--output_dir", "FILE"], "is a file"),
])
def test_row_7_train_hf_mistakes_are_one_line_before_training(arguments, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "make_base", lambda *args, **kwargs: pytest.fail("trained before the check"))
    (tmp_path / "FILE").write_text("mine")
    arguments = [str(tmp_path / "FILE") if a == "FILE" else a for a in arguments]
    output = [] if "--output_dir" in arguments else ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        job.main([*TINY_JOB, *output, *arguments])
    assert stop.value.code == 2
    one_line_error(capsys, fragment)
    assert (tmp_path / "FILE").read_text() == "mine"


def test_row_7_train_hf_on_an_empty_manifest_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "make_base", lambda *args, **kwargs: pytest.fail("trained on nothing"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metadata.jsonl").write_text('{"file_name": "gone.png", "label": "dr"}\n')
    with pytest.raises(SystemExit) as stop:
        job.main([*TINY_JOB, "--dataset", "manifest", "--data_dir", str(tmp_path / "d"), "--output_dir",
                  str(tmp_path / "out")])
    assert stop.value.code == 2
    one_line_error(capsys, "no usable photo", "1 skipped")


@pytest.fixture
def broken_models(model_folder, tmp_path):
    """Copies of the tiny export: a truncated model.safetensors, `fusion_grid: "eight"`, a string threshold."""
    folders = {}
    for name in ("truncated", "grid", "threshold"):
        folders[name] = shutil.copytree(model_folder, tmp_path / name)
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((folders["grid"] / "config.json").read_text())
    (folders["grid"] / "config.json").write_text(json.dumps({**config, "fusion_grid": "eight"}))
    settings = json.loads((folders["threshold"] / "processor_config.json").read_text())
    settings["image_processor"]["fundus_threshold"] = "0.5"
    (folders["threshold"] / "processor_config.json").write_text(json.dumps(settings))
    return {name: str(folder) for name, folder in folders.items()}


@pytest.mark.parametrize("broken, fragment", [("truncated", "cannot load the model"),
                                              ("grid", "fusion_grid"), ("threshold", "fundus_threshold")])
def test_row_7_predict_on_a_broken_model_folder_is_one_line(broken_models, broken, fragment, fundus_png, capsys):
    assert cli(["predict", fundus_png, "--model", broken_models[broken]]) == 2
    one_line_error(capsys, fragment)


# ---------------------------------------------------------------------------------------------------------------------
# Row 13: --make_base never deletes a folder it did not make


def test_row_13_make_base_keeps_a_users_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "train_model", lambda *args, **kwargs: None)
    users = tmp_path / "base" / "training"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        job.main(["--make_base", *TINY_JOB, "--output_dir", str(tmp_path)])
    assert stop.value.code == 2
    one_line_error(capsys, "--make_base", "holds files a base did not write")
    assert (users / "notes.txt").read_text() == "mine"


def test_row_13_make_base_removes_only_its_own_scratch_folder(tmp_path, monkeypatch):
    """An earlier base (its record present) is replaced, and the training folder the base used is its own."""
    seen = []
    monkeypatch.setattr(stages, "train_model", lambda model, splits, collator, args, **kwargs: seen.append(args.output_dir))
    job.main(["--make_base", *TINY_JOB, "--output_dir", str(tmp_path)])
    (tmp_path / "base" / "training").mkdir()  # a folder of the user's beside the base, made afterwards
    job.main(["--make_base", *TINY_JOB, "--output_dir", str(tmp_path)])
    assert (tmp_path / "base" / "training").is_dir()
    assert all(os.path.basename(path).startswith(".training-") and not os.path.exists(path) for path in seen)


# ---------------------------------------------------------------------------------------------------------------------
# Row 14: a NaN TIFF, with no false hint


def test_row_14_nan_tiff_gets_no_false_hint(model_folder, tmp_path, capsys):
    path = str(tmp_path / "nan.tif")
    Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(path)
    assert cli(["predict", path, "--model", model_folder]) == 2
    assert "--no_fundus_check" not in one_line_error(capsys, "nan.tif")
    assert cli(["predict", path, "--model", model_folder, "--no_fundus_check"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Row 12: the quiet start


def test_row_12_loading_a_model_imports_neither_peft_nor_bitsandbytes(model_folder):
    script = ("import sys; from pipeline_mdf_mllm import load_pipeline; load_pipeline(sys.argv[1]); "
              "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, model_folder], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "kernels-community" not in result.stderr


def test_row_12_the_job_starts_quietly():
    """The Trainer imports peft (and so bitsandbytes) whenever it is installed: the job's start still says nothing
    about bitsandbytes' optional Hub kernel."""
    result = subprocess.run([sys.executable, "train_hf.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0 and "--dataset_seed" in result.stdout
    assert "kernels" not in result.stderr + result.stdout.split("usage:")[0]


# ---------------------------------------------------------------------------------------------------------------------
# Rows 11, 15, 16: the demo's uploads, what it says about the weights, its examples


def test_row_11_demo_says_what_is_wrong_with_a_bad_upload(tmp_path):
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import FileData

    from mdf_mllm.demo import UploadedPhoto

    junk = tmp_path / "photo.png"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(gr.Error, match="The upload is not an image this demo can read"):
        UploadedPhoto(type="pil").preprocess(FileData(path=str(junk), orig_name="photo.png"))


def test_rows_11_15_16_demo_limits_uploads_warns_and_offers_examples(model_folder, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from mdf_mllm import demo

    folder = shutil.copytree(model_folder, tmp_path / "model")
    (folder / "examples").mkdir()
    Image.fromarray(skdata.retina()).resize((64, 64)).save(folder / "examples" / "normal.png")
    (folder / "examples" / "histories.json").write_text(json.dumps({"normal.png": "Routine check."}))
    assert demo.example_photos(str(folder)) == [[str(folder / "examples" / "normal.png"), "Routine check."]]
    launched = {}
    monkeypatch.setattr(demo.gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, page=self))
    demo.main([str(folder)])
    assert launched["max_file_size"] == demo.MAX_FILE_SIZE
    config = launched["page"].get_config_file()
    kinds = {component["type"] for component in config["components"]}
    assert "dataset" in kinds  # gr.Examples
    text = json.dumps(config)
    assert "not for real eyes" in text


def test_row_15_card_section_measures_the_real_photos_and_says_what_the_weights_are_for(classifier):
    from mdf_mllm.real_photos import REAL_PHOTOS, real_photo_section

    section = real_photo_section(classifier.model, classifier.processor)
    assert "## What these weights answer on real photos" in section and "not for real eyes" in section
    rows = [line for line in section.splitlines() if line.startswith("| `skimage")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {call}" for _, call, _, _ in REAL_PHOTOS]
    assert all(len(row.split(" | ")[3].split(", ")) == 3 for row in rows)  # three answers with their scores



# ---------------------------------------------------------------------------------------------------------------------
# Issue 32: the model with its config's defaults, as transformers' own model tests build it


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_issue_32_with_the_configs_defaults_every_trainable_parameter_gets_a_gradient(checkpointing):
    # A trainable parameter without a gradient stops DDP with find_unused_parameters=False (the Trainer's setting
    # under gradient checkpointing). The vessel head trains only with a vessel loss and masks; the config's default
    # asks for none, as the job's does.
    from conftest import make_inputs, mdf_config
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration

    config = mdf_config("a")
    model = MdfMllmForConditionalGeneration(config).train()
    if checkpointing:  # as transformers' test_training_gradient_checkpointing runs it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = make_inputs(config)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_index, -100)
    model(**inputs, labels=labels).loss.backward()
    without = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert without == []
    assert config.seg_loss_weight == 0.0 == job.ModelArguments().seg_loss_weight
    assert not model.model.unet.vessel_head.weight.requires_grad  # idle, so frozen rather than left without gradient


def test_issue_32_generative_classes_name_generation_mixin_among_their_direct_bases():
    from transformers import GenerationMixin

    from modeling_mdf_mllm import MdfMllmForConditionalGeneration

    # transformers' test_inherits_generation_mixin: `GenerationMixin` in the class's own bases, not only inherited.
    assert GenerationMixin in MdfMllmForConditionalGeneration.__bases__


def test_issue_32_the_cross_attention_cache_layout_is_documented_with_its_formula():
    formula = "N_images * (G^2 + tiles * P)"
    for document in ("README.md", "docs/design.md"):
        text = (ROOT / document).read_text()
        assert formula in text and "fusion_grid" in text, document


def test_issue_32_a_checkpoint_state_dict_loads_as_saved_with_no_key_missing_or_unexpected(tmp_path):
    # What the Trainer's resume does with a checkpoint: model.safetensors as stored, through load_state_dict.
    from conftest import mdf_config
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration

    saved = MdfMllmForConditionalGeneration(mdf_config("a"))
    saved.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert not set(stored) <= set(saved.state_dict())  # stored in other names than the modules'
    torch.manual_seed(1)
    model = MdfMllmForConditionalGeneration(mdf_config("a"))
    result = model.load_state_dict(stored, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
