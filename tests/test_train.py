"""train_hf.py: the main job end to end on a tiny config, the export, resume after a kill, the real-base path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

import train_hf
from conftest import ROOT, launch_two_cpu_processes, tiny_mllama_config


TINY_JOB = [
    "--model_size", "tiny",
    "--num_images", "40",
    "--image_size", "64",
    "--per_device_train_batch_size", "8",
    "--n_bootstrap", "50",
    "--logging_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The main job (MDF-MLLM and the Mllama baseline) on 40 synthetic 64 px photos, one epoch each."""
    out = tmp_path_factory.mktemp("job")
    train_hf.main([*TINY_JOB, "--num_train_epochs", "1", "--output_dir", str(out), "--export_dir", str(out / "export")])
    return out


def test_main_job_compares_mdf_with_the_baseline(main_job):
    rows = json.loads((main_job / "comparison.json").read_text())
    assert [row["name"] for row in rows] == ["MDF-MLLM", "Mllama baseline"]
    mdf, baseline = rows
    assert mdf["parameters"] > baseline["parameters"]
    for row in rows:
        assert row["num_items"] == 10  # the test split of 40 photos
        assert 0 <= row["disease"]["accuracy"] <= 1
        low, high = row["disease"]["ci95"]["accuracy"]
        assert low <= row["disease"]["accuracy"] <= high
    table = (main_job / "comparison.md").read_text()
    assert "| MDF-MLLM |" in table and "| Mllama baseline |" in table


def test_export_is_a_complete_hub_repository(main_job):
    folder = main_job / "export"
    names = set(os.listdir(folder))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_mdf_mllm.py",
        "modeling_mdf_mllm.py",
        "processing_mdf_mllm.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
        "results.json",
        "training_curve.png",
        "confusion_matrix_disease.png",
    } <= names
    config = json.loads((folder / "config.json").read_text())
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    assert len(config["verbalizer_token_ids"]) == 8
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    assert front_matter["pipeline_tag"] == "image-text-to-text"
    results = json.loads((folder / "results.json").read_text())
    accuracies = [m["value"] for m in front_matter["model-index"][0]["results"][0]["metrics"]]
    assert results["disease"]["accuracy"] in accuracies
    for widget in front_matter["widget"]:
        assert (folder / widget["src"]).is_file()
    assert not [name for name in os.listdir(main_job) if name.startswith(".export-")]  # no staging left behind


def test_a_failed_export_keeps_the_previous_model_and_leaves_nothing_behind(main_job, monkeypatch):
    folder = main_job / "export"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}

    def crash_half_way(staging, *args):
        (staging / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_hf, "write_repository", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        train_hf.export(None, None, None, None, None, None, None, str(folder))
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    assert not [name for name in os.listdir(main_job) if name.startswith(".export")]


def test_exported_model_reproduces_the_reported_predictions(main_job):
    from transformers import AutoModel, AutoProcessor

    folder = main_job / "export"
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


def test_yaml_config_file_gives_the_same_arguments(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model_size": "tiny", "num_images": 40, "fusion_layers": "1:2,3:4", "seeds": 2}))
    model_args, data_args, job_args, training_args = train_hf.parse_arguments([str(path)])
    assert (model_args.model_size, data_args.num_images, job_args.seeds) == ("tiny", 40, 2)
    assert train_hf.parse_fusion_layers(model_args.fusion_layers) == {1: 2, 3: 4}
    assert training_args.remove_unused_columns is False


def test_bad_fusion_spec_names_the_argument():
    with pytest.raises(ValueError, match="--fusion_layers"):
        train_hf.parse_fusion_layers("3-1")


KILL_AT_STEP = textwrap.dedent(
    """
    import os, signal, sys
    import transformers
    import train_hf

    step, when = int(os.environ["KILL_AT_STEP"]), os.environ["KILL_WHEN"]

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    class Kill(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if when == "step_end" and state.global_step == step:
                kill()

        def on_save(self, args, state, control, **kwargs):
            if when == "after_save" and state.global_step == step:
                kill()

    original_init, original_save_rng = transformers.Trainer.__init__, transformers.Trainer._save_rng_state

    def init_with_kill(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Kill())

    def save_rng_then_maybe_die(self, output_dir):
        # Dies half-way through writing a checkpoint: weights and optimizer written, trainer_state.json not.
        if when == "mid_save" and self.state.global_step == step:
            kill()
        original_save_rng(self, output_dir)

    transformers.Trainer.__init__ = init_with_kill
    transformers.Trainer._save_rng_state = save_rng_then_maybe_die
    train_hf.main(sys.argv[1:])
    """
)


def run_job(out: Path, *extra: str, kill_at: int = -1, when: str = "after_save") -> subprocess.CompletedProcess:
    script = out.parent / "kill_at_step.py"
    script.write_text(KILL_AT_STEP)
    args = [*TINY_JOB, "--baseline", "False", "--max_steps", "9", "--save_strategy", "steps", "--save_steps", "3",
            "--eval_strategy", "no", "--output_dir", str(out), "--export_dir", str(out / "export"), *extra]
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "KILL_WHEN": when, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_job(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out / "export" / "model.safetensors")


@pytest.mark.parametrize(
    "kill_at, when, resumes_from",
    [(3, "after_save", 3), (5, "step_end", 3), (6, "mid_save", 3)],
    ids=["after-a-checkpoint", "between-checkpoints", "while-writing-a-checkpoint"],
)
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path, uninterrupted, kill_at, when, resumes_from):
    out = tmp_path / "run"
    killed = run_job(out, kill_at=kill_at, when=when)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "export").exists()
    resumed = run_job(out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if when == "mid_save":
        assert f"skipping incomplete checkpoint {out / 'checkpoint-6'}" in resumed.stdout
    assert f"resuming from {out / f'checkpoint-{resumes_from}'}\n" in resumed.stdout
    actual = load_file(out / "export" / "model.safetensors")
    assert uninterrupted.keys() == actual.keys()
    assert all(torch.equal(uninterrupted[key], actual[key]) for key in uninterrupted)


def test_latest_checkpoint_skips_a_half_written_one(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert train_hf.resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-6")
    with pytest.raises(ValueError, match="checkpoint-9 is not a complete checkpoint"):
        train_hf.resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def test_real_base_path_loads_every_weight_of_a_mllama_checkpoint(tmp_path):
    """--base_model with a local Llama 3.2 Vision stand-in: its weights, tokenizer and image settings are used."""
    from processing_mdf_mllm import build_tokenizer

    tokenizer = build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    config = tiny_mllama_config(vocab_size=image_id)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    base = MllamaForConditionalGeneration(config)
    base.save_pretrained(tmp_path / "base")
    image_processor = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=1)
    MllamaProcessor(image_processor, tokenizer).save_pretrained(tmp_path / "base")
    model_args = train_hf.ModelArguments(
        base_model=str(tmp_path / "base"), unet_image_size=32, fusion_grid=2, lora=True, lora_rank=4
    )
    processor = train_hf.base_processor(model_args)
    assert processor.image_processor.size == {"height": 28, "width": 28}
    assert processor.image_processor.unet_image_size == 32
    model = train_hf.build_model(model_args, processor)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any(".unet." in name for name in trainable) and any("unet_attn" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)
    merged = train_hf.unwrap(model)
    base_weights = base.state_dict()
    assert all(torch.equal(base_weights[key], merged.state_dict()[key]) for key in base_weights)


def test_accelerate_launch_shards_the_small_model_over_two_cpu_processes(tmp_path):
    """configs/fsdp_cpu.yaml: FSDP2 over 2 gloo processes; the main process gathers, evaluates and exports."""
    command = [
        "--config_file", str(ROOT / "configs" / "fsdp_cpu.yaml"), str(ROOT / "train_hf.py"),
        *TINY_JOB, "--num_train_epochs", "1", "--baseline", "False",
        "--output_dir", str(tmp_path), "--export_dir", str(tmp_path / "export"),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = launch_two_cpu_processes(command, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MDF-MLLM: trained with FSDP over 2 process(es)" in result.stdout
    gathered = load_file(tmp_path / "final-model" / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert gathered.keys() == exported.keys() and all(torch.equal(gathered[k], exported[k]) for k in gathered)
