"""Nothing the user kept is deleted (export and output folders); nothing pickled is loaded (every model loader)."""

import importlib.util
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from conftest import export_tiny_model
from mdf_mllm import export, main_job
from pipeline_mdf_mllm import load_pipeline, require_safetensors

TINY = ["--model_size", "tiny", "--num_images", "40", "--image_size", "64"]


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys) -> str:
    """The job's one-line error for `argv`, checked to exit 2 before any training."""
    with pytest.raises(SystemExit) as exit_info:
        main_job.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_hf.py: error: ")
    return err


def earlier_export(folder):
    """A folder as an earlier export leaves it: config.json of an MDF-MLLM, its files listed in the manifest."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "mdf_mllm"}))
    (folder / "examples").mkdir()
    (folder / "examples" / "normal.png").write_bytes(b"png")
    (folder / export.EXPORT_MANIFEST).write_text(json.dumps({"files": ["config.json", "examples/normal.png"]}))
    return folder


@pytest.mark.parametrize("where", ["a folder of the user's", "the working directory"])
def test_an_export_dir_holding_the_users_files_is_refused_before_training(where, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "models").mkdir()
    (folder / "models" / "config.json").write_text("{}")
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    export_dir = str(folder) if where == "a folder of the user's" else "."
    err = refused([*TINY, "--export_dir", export_dir, "--output_dir", str(tmp_path / "out")], capsys)
    assert "holds files an export did not write (models/config.json, thesis.txt)" in err
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_an_earlier_export_is_replaced_only_with_overwrite_export(tmp_path, capsys):
    folder = earlier_export(tmp_path / "mdf-mllm")
    err = refused([*TINY, "--export_dir", str(folder), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"--export_dir: {folder} holds an earlier export; --overwrite_export replaces it" in err
    assert export.export_dir_problem(folder, overwrite=True) is None
    (folder / "notes.txt").write_text("mine")  # an earlier export plus a file of the user's: never replaced
    before = snapshot(folder)
    err = refused([*TINY, "--export_dir", str(folder), "--overwrite_export", "--output_dir", str(tmp_path / "o")],
                  capsys)
    assert "holds files an export did not write (notes.txt)" in err and snapshot(folder) == before


def fake_repository(job, folder, *args, **kwargs):
    (folder / "config.json").write_text(json.dumps({"model_type": "mdf_mllm"}))
    (folder / "model.safetensors").write_bytes(b"weights")


def export_job(folder, *options):
    """A job whose export goes to `folder`."""
    return main_job.parse_arguments(["--export_dir", str(folder), *options])


def test_overwrite_export_replaces_an_earlier_export_with_the_usual_permissions(tmp_path, monkeypatch):
    folder = earlier_export(tmp_path / "mdf-mllm")
    monkeypatch.setattr(export, "write_repository", fake_repository)
    old_umask = os.umask(0o027)
    try:
        assert export.export(export_job(folder, "--overwrite_export"), *[None] * 3) == folder
    finally:
        os.umask(old_umask)
    assert snapshot(folder) == {"config.json": b'{"model_type": "mdf_mllm"}', "model.safetensors": b"weights",
                                export.EXPORT_MANIFEST: b'{\n "files": [\n  "config.json",\n  "model.safetensors"\n ]\n}\n'}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750  # 0o777 & ~umask, not mkdtemp's 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mdf-mllm"]  # nothing left beside it
    export.export(export_job(folder, "--overwrite_export"), *[None] * 3)  # and the new export is replaceable in turn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mdf-mllm"]


def test_files_that_appear_during_training_are_kept_and_the_export_goes_beside_them(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mdf-mllm"
    folder.mkdir()
    (folder / "draft.md").write_text("written while the job trained")
    monkeypatch.setattr(export, "write_repository", fake_repository)
    written = export.export(export_job(folder), *[None] * 3)
    assert written == tmp_path / "mdf-mllm-1" and (written / "model.safetensors").is_file()
    assert snapshot(folder) == {"draft.md": b"written while the job trained"}
    assert "the export goes to" in capsys.readouterr().out


def test_checkpoints_of_another_run_in_output_dir_stop_the_job_and_stay(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "baseline" / "checkpoint-57").mkdir(parents=True)
    (out / "baseline" / "checkpoint-57" / "trainer_state.json").write_text("{}")
    before = snapshot(out)
    err = refused([*TINY, "--output_dir", str(out)], capsys)
    assert f"--output_dir: {out / 'baseline' / 'checkpoint-57'} is a checkpoint of an earlier run" in err
    assert "--resume_from_checkpoint latest" in err and snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------------------
# Weights are read as safetensors only


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """An export whose weights were converted to pytorch_model.bin (a pickle), with no safetensors file left."""
    folder = tmp_path_factory.mktemp("pickled") / "model"
    export_tiny_model(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    return folder


def test_require_safetensors_names_the_pickle(pickled_model, tmp_path):
    with pytest.raises(ValueError, match=f"^{pickled_model / 'pytorch_model.bin'}: weights stored as a pickle"):
        require_safetensors(str(pickled_model))
    both = tmp_path / "both"
    shutil.copytree(pickled_model, both)
    (both / "model.safetensors").write_bytes(b"")
    require_safetensors(str(both))  # a safetensors file is there: that is what loads
    require_safetensors("org/hub-model")  # a Hub id: from_pretrained(use_safetensors=True) decides


def test_only_trainer_checkpoint_folders_are_removed(tmp_path):
    from mdf_mllm.training import remove_checkpoints

    for name in ("checkpoint-5", "checkpoint-12", "checkpoint-best"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-notes.txt").write_text("mine")
    assert [p.name for p in remove_checkpoints(str(tmp_path))] == ["checkpoint-5", "checkpoint-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best", "checkpoint-notes.txt"]


def test_the_pipeline_loader_refuses_a_pickle_even_when_asked_to_load_one(pickled_model, monkeypatch):
    # load_pipeline is also what the demo and the CLI load with.
    with pytest.raises(ValueError, match="pytorch_model.bin: weights stored as a pickle"):
        load_pipeline(str(pickled_model))
    calls = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(args))  # never reached
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_pipeline(str(pickled_model), model_kwargs={"use_safetensors": False})  # not even when asked
    assert calls == []


def test_the_cli_refuses_a_pickle_in_one_line(pickled_model, tmp_path, capsys):
    from skimage import data
    from PIL import Image

    from mdf_mllm.cli import main

    photo = tmp_path / "retina.png"
    Image.fromarray(data.retina()).resize((256, 256)).save(photo)
    for command in (["predict", str(photo)], ["explain", str(photo), "--out", str(tmp_path / "map.png")]):
        assert main([*command, "--model", str(pickled_model)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{pickled_model / 'pytorch_model.bin'}: weights stored as a pickle" in err
    assert not (tmp_path / "map.png").exists()


def test_train_hf_refuses_a_pickled_base_before_training(pickled_model, tmp_path, capsys):
    err = refused(["--base_model", str(pickled_model), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"--base_model: {pickled_model / 'pytorch_model.bin'}: weights stored as a pickle" in err


def test_the_endpoint_handler_and_automodel_load_safetensors_only(pickled_model):
    from transformers import AutoModel

    from mdf_mllm.handler import EndpointHandler

    message = f"{pickled_model / 'pytorch_model.bin'}: weights stored as a pickle"
    with pytest.raises(ValueError, match=message):  # the exported remote code refuses it itself
        AutoModel.from_pretrained(pickled_model, trust_remote_code=True, use_safetensors=False)
    with pytest.raises(ValueError, match=message):
        EndpointHandler(str(pickled_model))


# ---------------------------------------------------------------------------------------------------------------------
# Issue 32: the package's programs treat a model folder as weights, config and processor; their messages keep the
# reason.


@pytest.fixture(scope="module")
def fundus_file(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "retina.png"
    Image.fromarray(data.retina()).resize((64, 64)).save(path)
    return str(path)


def predict_json(folder, photo, capsys) -> tuple[int, list | str]:
    """`mdf-mllm predict --json`'s exit status, and its predictions (exit 0) or what it wrote on stderr."""
    from mdf_mllm.cli import main

    code = main(["predict", photo, "--model", str(folder), "--json", "--text", "Night blindness."])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_issue32_cli_and_demo_never_run_code_an_edited_auto_map_names(model_folder, fundus_file, tmp_path, capsys):
    from conftest import injected_export

    folder = injected_export(model_folder, tmp_path, listed=True)
    code, predictions = predict_json(folder, fundus_file, capsys)
    assert not (tmp_path / "marker").exists()
    assert (code, predictions) == predict_json(model_folder, fundus_file, capsys) and code == 0
    if importlib.util.find_spec("gradio") is not None:
        from mdf_mllm.demo import build_demo

        build_demo(str(folder))
        assert not (tmp_path / "marker").exists()


def test_issue32_cli_names_the_missing_modules_of_an_incomplete_folder(model_folder, fundus_file, tmp_path, capsys):
    from safetensors.torch import save_file

    folder = shutil.copytree(model_folder, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".unet." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    code, err = predict_json(folder, fundus_file, capsys)
    assert code == 2 and err.count("\n") == 1 and "See the original errors" not in err
    assert "whose MDF tensors do not match the model: missing in ['model.unet'], unexpected in []" in err


def test_issue32_cli_wrong_typed_config_field_is_one_line_with_its_reason(model_folder, fundus_file, tmp_path,
                                                                           capsys):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"fusion_grid": "2"}))
    assert predict_json(folder, fundus_file, capsys) == (2,
        f"mdf-mllm: error: --model {folder}: cannot load the model (StrictDataclassFieldValidationError: Validation "
        "error for field 'fusion_grid': TypeError: Field 'fusion_grid' expected int, got str (value: '2'))\n")
