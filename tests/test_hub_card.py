"""The exported repository as the Hub sees it: a model card whose metadata names no local path (a local base is
described in the text), the Endpoints handler shipped beside it, and --push_to_hub checked before training."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from PIL import Image, ImageDraw

from configuration_mdf_mllm import DEFAULT_LABELS
from mdf_mllm import comparison, export, model_card, stages, main_job as job
from mdf_mllm.model_setup import BASE_RECORD_FILE
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from processing_mdf_mllm import MdfMllmProcessor


LLAMA = "meta-llama/Llama-3.2-11B-Vision-Instruct"


def strings(value):
    """Every string anywhere in a parsed YAML value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.fixture(scope="module")
def exported(model_folder):
    """What write_repository needs, from the tiny exported model, with a stand-in trainer and a two-photo test set."""
    names = [name for name, _, _ in DEFAULT_LABELS]
    ours = comparison.score("MDF-MLLM", [[0.9] + [0.1 / 7] * 7, [0.0] * 4 + [1.0] + [0.0] * 3], [0, 4],
                            [True, False], names, [kind for _, _, kind in DEFAULT_LABELS], n_bootstrap=10)
    photo = Image.new("RGB", (32, 32))
    ImageDraw.Draw(photo).ellipse((2, 2, 29, 29), fill=(150, 60, 20))  # a field of view, as a fundus photo has
    test = datasets.Dataset.from_list([
        {"image": photo, "label": label, "text": text, "vessel_mask": None, "case_id": case, "file_name": f"{case}.png"}
        for label, text, case in ((0, "Routine check.", "a"), (4, "", "b"))])
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"train_runtime": 1.0}]), train_dataset=[0, 1, 2],
                              args=SimpleNamespace(num_train_epochs=1, max_steps=-1, per_device_train_batch_size=2,
                                                   learning_rate=1e-3, bf16=False, seed=0))
    ours.model, ours.trainer = MdfMllmForConditionalGeneration.from_pretrained(model_folder), trainer
    return dict(processor=MdfMllmProcessor.from_pretrained(model_folder), ours=ours, dataset={"test": test})


def write(exported, folder: Path, base_model: str | None) -> Path:
    settings = job.parse_arguments([]).replace(model={"base_model": base_model})
    export.write_repository(settings, folder, exported["ours"], exported["processor"], exported["dataset"])
    return folder


def made_here(tmp_path: Path) -> str:
    """A base folder as `train_hf.py --make_base` leaves it (its record; the weights play no part in the card)."""
    base = tmp_path / "cache" / "base-0123456789abcdef"
    base.mkdir(parents=True)
    (base / BASE_RECORD_FILE).write_text(json.dumps({"model_size": "small", "epochs": 4.0, "dataset": "synthetic"}))
    return str(base)


def other_local(tmp_path: Path) -> str:
    base = tmp_path / "models" / "Llama-3.2-11B-Vision-Instruct"
    base.mkdir(parents=True)
    return str(base)


def relative_local(tmp_path: Path) -> str:
    """`--base_model models/base` run from tmp_path (the test's working folder): shaped like a Hub id, but a folder."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    return "models/base"


@pytest.mark.parametrize(
    "make_base, metadata, origin, table",
    [
        (made_here, None, "a local base, a stock Mllama of this repository's small layout, trained from scratch by "
         "`train_hf.py --make_base` for 4 epochs on the synthetic data (no pretrained weights)",
         "local folder base-0123456789abcdef"),
        (other_local, None, "a local base, the Mllama checkpoint in a folder named `Llama-3.2-11B-Vision-Instruct`",
         "local folder Llama-3.2-11B-Vision-Instruct"),
        (relative_local, None, "a local base, the Mllama checkpoint in a folder named `base`", "local folder base"),
        (lambda tmp_path: LLAMA, LLAMA, f"`{LLAMA}`", LLAMA),
    ],
    ids=["made-by-make_base", "other-local-folder", "relative-local-folder", "hub-id"],
)
def test_card_metadata_is_valid_and_no_field_holds_a_local_path(exported, tmp_path, monkeypatch, make_base, metadata,
                                                                origin, table):
    monkeypatch.chdir(tmp_path)
    base = make_base(tmp_path)
    folder = write(exported, tmp_path / "export", base)
    card_text = (folder / "README.md").read_text()
    meta = yaml.safe_load(card_text.split("---\n")[1])
    data = ModelCardData(**meta)  # raises on metadata the Hub's parser rejects
    assert data.to_dict() == meta
    assert ModelCard.load(folder / "README.md").data.to_dict() == meta
    assert meta.get("base_model") == metadata
    if metadata is not None:
        validate_repo_id(meta["base_model"])
    for value in strings(meta):
        assert not os.path.isabs(value) and str(tmp_path) not in value, value
    assert str(tmp_path) not in card_text  # nowhere in the public card, text and tables included
    assert f"This model was fine-tuned from {origin}: every Mllama weight" in card_text
    assert f"| base_model | {table} |" in card_text


def test_every_export_ships_the_endpoints_handler_and_the_card_says_how_to_call_it(exported, tmp_path):
    folder = write(exported, tmp_path / "export", None)
    assert (folder / "handler.py").read_bytes() == export.HANDLER_SOURCE.read_bytes()
    card = (folder / "README.md").read_text()
    assert "the repository's `handler.py` (a custom handler) serves it" in card
    assert '"parameters": {"clinical_text": "...", "top_k": 3, "check_fundus": true}}' in card
    (folder / "handler.py").unlink()  # a card beside no handler does not mention one
    model_card.write_model_card(folder, None, metrics_report=exported["ours"].report, datasets=["synthetic"],
                               training_args_summary={})
    assert "handler.py" not in (folder / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# --push_to_hub


TINY = ["--model_size", "tiny", "--num_images", "40", "--image_size", "64"]


def exits_2_before_training(argv, monkeypatch, capsys) -> str:
    def refuse(*args):
        raise AssertionError("the job started")

    monkeypatch.setattr(job, "run", refuse)
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_hf.py: error: --push_to_hub: ")
    return err


def test_push_to_hub_offline_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    err = exits_2_before_training([*TINY, "--push_to_hub", "--hub_model_id", "me/mdf", "--output_dir",
                                   str(tmp_path / "out")], monkeypatch, capsys)
    assert "HF_HUB_OFFLINE is set, so nothing can be pushed" in err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_usable_token_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    def no_token(self, token=None):
        raise LocalTokenNotFoundError("Token is required to call the /whoami-v2 endpoint.\nSee the docs.")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", no_token)
    err = exits_2_before_training([*TINY, "--push_to_hub", "--output_dir", str(tmp_path)], monkeypatch, capsys)
    assert err.endswith("the Hub cannot be used (LocalTokenNotFoundError: Token is required to call the /whoami-v2 "
                        "endpoint.)\n")
    err = exits_2_before_training([*TINY, "--push_to_hub", "--make_base", "--output_dir", str(tmp_path)],
                                  monkeypatch, capsys)
    assert "pushes the exported MDF model, which --make_base and --ablation do not write" in err


def test_the_job_pushes_its_export_not_the_trainers_checkpoints(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, name, **kw: calls.append(("create", name, kw)) or RepoUrl(
        f"https://huggingface.co/{name if '/' in name else 'me/' + name}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))

    class Stop(Exception):
        pass

    def first_training_args(settings, dataset):
        calls.append(("trainers get push_to_hub", settings.training.push_to_hub))
        raise Stop

    monkeypatch.setattr(stages, "cached_base", first_training_args)  # where the first Trainer would start
    with pytest.raises(Stop):
        job.main([*TINY, "--push_to_hub", "--output_dir", str(tmp_path / "run-7")])
    assert calls == [("trainers get push_to_hub", False)]
    settings = job.parse_arguments(["--output_dir", str(tmp_path / "run-7"), "--hub_private_repo", "true"])
    assert job.push_export(settings, tmp_path / "export") == "me/run-7"
    settings = settings.replace(training={"hub_model_id": "lab/mdf-mllm", "hub_private_repo": None})
    assert job.push_export(settings, tmp_path / "export") == "lab/mdf-mllm"
    upload = {"repo_id": "me/run-7", "folder_path": tmp_path / "export",
              "commit_message": "MDF-MLLM export from train_hf.py"}
    assert calls[1:] == [("create", "run-7", {"private": True, "exist_ok": True}), ("upload", upload),
                         ("create", "lab/mdf-mllm", {"private": None, "exist_ok": True}),
                         ("upload", {**upload, "repo_id": "lab/mdf-mllm"})]
