"""mdf_mllm/guards.py: train_hf.py as a hostile user tries it (issue 32): every numeric option in its range, options
that must agree, paths read and written, the checkpoint resumed, one job per output folder, a full disk. Each mistake
is one line and exit status 2 before any work (the job's `run` is replaced by one that fails the test if reached)."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mdf_mllm import export, guards, main_job as job


@pytest.fixture
def no_work(monkeypatch):
    """The job's work replaced: reaching it means the options were accepted. Returns the jobs it was given."""
    started = []

    def run(settings, phases=None):
        started.append(settings)

    monkeypatch.setattr(job, "run", run)
    return started


def refused(argv, capsys) -> str:
    """The one line `job.main(argv)` prints as it exits 2."""
    with pytest.raises(SystemExit) as stop:
        job.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("train_hf.py: error: "), err
    return err.strip()


@pytest.mark.parametrize("argv, message", [
    (["--fusion_grid", "-1"], "--fusion_grid: got -1; accepts a whole number >= 1"),
    (["--fusion_grid", "100"], "--fusion_grid 100: the MDF config refuses it: unet_config.image_size: 128 must be "
                               "divisible by fusion_grid * 8 = 800"),
    (["--unet_image_size", "7"], "--unet_image_size: got 7; accepts a whole number >= 16"),
    (["--model_size", "tiny", "--unet_image_size", "40"],
     "--unet_image_size 40: the MDF config refuses it: unet_config.image_size: 40 must be divisible by fusion_grid"),
    (["--dataset_seed", "-1"], "--dataset_seed: got -1; accepts a whole number >= 0 and <= 4294967295"),
    (["--seed", "-1"], "--seed: got -1; accepts a whole number >= 0 and <= 4294967295"),
    (["--n_bootstrap", "0"], "--n_bootstrap: got 0; accepts a whole number >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps: got 0; accepts a whole number >= 1"),
    (["--logging_steps", "0"], "--logging_steps: got 0.0; accepts a finite number > 0"),
    (["--adam_beta1", "nan"], "--adam_beta1: got nan; accepts a finite number >= 0 and < 1"),
    (["--adam_epsilon", "-1"], "--adam_epsilon: got -1.0; accepts a finite number > 0"),
    (["--lora", "--lora_rank", "0"], "--lora_rank: got 0; accepts a whole number >= 1"),
    (["--seg_loss_weight", "-1"], "--seg_loss_weight: got -1.0; accepts a finite number >= 0"),
    (["--stage1_epochs", "-1"], "--stage1_epochs: got -1.0; accepts a finite number > 0"),
    (["--unet_gate_start", "nan"], "--unet_gate_start: got nan; accepts a finite number >= -10 and <= 10"),
    (["--max_steps", "0"], "--max_steps: got 0; accepts a whole number >= 1 or -1"),
    (["--model_size", "tiny", "--num_images", "3"], "--num_images: got 3, which splits into train 3, validation 0, "
                                                     "test 0; training needs photos in train and test (accepts 16 or "
                                                     "more with --dataset_seed 0)"),
    (["--fusion_layers", ""], "--fusion_layers: expected 'layer:depth,...' such as '3:1,8:1' (or 'none': plain "
                              "Mllama), got ''"),
    (["--fusion_layers", "1:1,1:2"], "--fusion_layers: got '1:1,1:2', which gives layer 1 more than one depth"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_bad_option_is_one_line_and_exit_2_before_any_work(argv, message, tmp_path, capsys, no_work):
    line = refused([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert message in line
    assert no_work == [] and not (tmp_path / "out").exists()


def test_a_yaml_file_is_checked_against_the_same_ranges(tmp_path, capsys, no_work):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "adam_beta2": 1.5}))
    assert refused([str(path)], capsys).endswith("--adam_beta2: got 1.5; accepts a finite number >= 0 and < 1")
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "eval_strategy": "steps", "eval_steps": 0}))
    assert "--eval_steps: got 0; accepts a finite number > 0" in refused([str(path)], capsys)


def test_a_settings_file_that_cannot_be_read_or_is_no_mapping_is_one_line(tmp_path, capsys, no_work):
    missing = tmp_path / "missing.yaml"
    assert refused([str(missing)], capsys).endswith(f"error: {missing}: No such file or directory")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- --seed\n- '3'\n")
    assert refused([str(listed)], capsys).endswith("expected the options as a mapping (option: value), got list")
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 3,')
    assert f"error: {broken}: Expecting property name" in refused([str(broken)], capsys)


def test_options_in_range_are_accepted(tmp_path, no_work):
    job.main(["--model_size", "tiny", "--num_images", "16", "--fusion_layers", "1:1,3:4", "--fusion_grid", "1",
              "--unet_gate_start", "-2", "--output_dir", str(tmp_path / "out")])
    (settings,) = no_work
    assert (settings.data.num_images, settings.model.fusion_grid) == (16, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Paths read and written


def truncated_base(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    save_file({"weight": torch.ones(64, 64)}, folder / "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])  # a copy cut short
    return folder / "model.safetensors"


def test_a_truncated_base_is_refused_naming_the_file(tmp_path, capsys, no_work):
    weights = truncated_base(tmp_path / "base")
    size = weights.stat().st_size
    line = refused(["--base_model", str(tmp_path / "base"), "--output_dir", str(tmp_path / "out")], capsys)
    assert line.endswith(f"--base_model: {weights}: truncated ({size} bytes of the {size + 100} its header lists): "
                         "copy it again")


def test_a_hub_id_while_offline_is_refused(tmp_path, capsys, no_work, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = refused(["--base_model", "meta-llama/Llama-3.2-11B-Vision-Instruct", "--output_dir", str(tmp_path / "o")],
                   capsys)
    assert "--base_model: meta-llama/Llama-3.2-11B-Vision-Instruct is neither a local folder nor in the Hub cache, " \
           "and HF_HUB_OFFLINE is set" in line


def test_make_base_where_base_is_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "base").write_text("notes")
    line = refused(["--make_base", "--output_dir", str(tmp_path / "out")], capsys)
    assert f"--make_base: {tmp_path / 'out' / 'base'} is a file" in line
    assert (tmp_path / "out" / "base").read_text() == "notes"


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder files cannot be created in: permissions for a user, and the answer of a read-only mount where
    permissions do not bind (root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    make = guards.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(guards.tempfile, "mkstemp", mkstemp)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("option", ["--output_dir", "--export_dir"])
def test_a_read_only_output_or_export_folder_is_refused_before_training(option, read_only, tmp_path, capsys,
                                                                       no_work):
    paths = {"--output_dir": str(tmp_path / "out"), "--export_dir": str(tmp_path / "export"),
             option: str(read_only / "run")}
    line = refused([arg for pair in paths.items() for arg in pair], capsys)
    assert line.endswith(f"{option}: cannot write in {read_only} (Read-only file system)")


def test_disk_full_is_one_line_naming_the_resumable_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def run(settings, phases=None):  # training ends with a complete checkpoint; the next save runs out of space
        (out / "checkpoint-4").mkdir(parents=True)
        (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
        (out / "checkpoint-8").mkdir()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoint-8" / "model.safetensors"))

    monkeypatch.setattr(job, "run", run)
    with pytest.raises(SystemExit) as stop:
        job.main(["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    written = out / "checkpoint-8" / "model.safetensors"
    assert err == (f"train_hf.py: error: no space left on the device writing {written}; the export is written whole or "
                   "not at all; the incomplete checkpoint-8 was removed; the finished training's checkpoint "
                   f"{out / 'checkpoint-4'} is kept: free some space and resume it with --resume_from_checkpoint "
                   "latest\n")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", guards.RUN_RECORD]  # the lock is gone too


def test_a_full_disk_is_recognised_as_each_writer_reports_it(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    rust = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')  # safetensors' save_file, which save_pretrained calls
    torch_save = RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                              "data/0: file write failed")  # torch.save (the optimizer's state), which names no cause
    assert guards.out_of_space(OSError(errno.ENOSPC, "full")) and guards.out_of_space(rust, tmp_path)
    assert not guards.out_of_space(OSError(errno.EACCES, "denied")) and not guards.out_of_space(ValueError("x"))
    assert not guards.out_of_space(torch_save, tmp_path)  # this disk has room: another cause
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    assert guards.out_of_space(torch_save, tmp_path / "out")


def test_an_atomic_write_that_runs_out_of_space_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "comparison.md"
    guards.atomic_write_text(path, "earlier\n")

    def full(temporary):
        temporary.write_text("lat")  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as error:
        guards.atomic_write(path, full)
    assert guards.out_of_space(error.value)
    assert path.read_text() == "earlier\n" and [p.name for p in tmp_path.iterdir()] == ["comparison.md"]
    guards.atomic_write_text(path, "later\n")
    assert path.read_text() == "later\n" and [p.name for p in tmp_path.iterdir()] == ["comparison.md"]


def test_the_comparison_is_written_atomically(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(export.guards, "atomic_write_text", lambda path, text: written.append(path.name))
    monkeypatch.setattr(export, "comparison_markdown", lambda *args: "table")
    ours = SimpleNamespace(name="MDF-MLLM", as_json=dict, trainer=None)
    export.write_comparison([ours], {}, {}, tmp_path, [])
    assert written == ["comparison.md", "comparison.json"] and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# One job per output folder


def test_a_second_job_on_an_output_folder_is_refused_naming_the_first(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    with guards.OutputLock(out):
        holder = json.loads((out / guards.LOCK_FILE).read_text())
        line = refused(["--output_dir", str(out)], capsys)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert f"--output_dir: {out} is in use by another job (pid {os.getpid()} on {socket.gethostname()}, started " \
           f"{holder['started']}; its lock: {out / guards.LOCK_FILE})" in line
    assert no_work == [] and not (out / guards.LOCK_FILE).exists()


def test_the_lock_names_the_job_while_it_runs_and_goes_when_it_ends(tmp_path, monkeypatch):
    out, seen = tmp_path / "out", []
    monkeypatch.setattr(job, "run", lambda settings, phases=None: seen.append(
        json.loads((out / guards.LOCK_FILE).read_text())))
    job.main(["--output_dir", str(out)])
    assert seen[0]["pid"] == os.getpid() and not (out / guards.LOCK_FILE).exists()

    def fails(settings, phases=None):
        raise guards.UsageError("a mistake found while running")

    monkeypatch.setattr(job, "run", fails)
    with pytest.raises(SystemExit):
        job.main(["--output_dir", str(out)])
    assert not (out / guards.LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_line_saying_so(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / guards.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                    "started": "2026-01-01 00:00:00"}))
    job.main(["--output_dir", str(out)])
    assert len(no_work) == 1
    assert f"taking over the lock of a job that no longer runs (pid {gone.pid} on {socket.gethostname()}, started " \
           "2026-01-01 00:00:00)" in capsys.readouterr().out
    assert not (out / guards.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------------------------------
# Resume


def checkpoint_of(argv, out: Path, fusion_layers: dict) -> Path:
    """A complete checkpoint folder of a run of `argv` in `out`, as far as the resume check reads it."""
    out.mkdir(parents=True)
    guards.record_run(job.parse_arguments([*argv, "--output_dir", str(out)]))
    checkpoint = out / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "mdf_mllm", "fusion_layers": fusion_layers}))
    return checkpoint


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, capsys, no_work):
    other = checkpoint_of(["--fusion_layers", "3:4", "--dataset_seed", "7"], tmp_path / "other", {"3": 4})
    line = refused(["--resume_from_checkpoint", str(other), "--output_dir", str(tmp_path / "out")], capsys)
    assert line.endswith(f"--resume_from_checkpoint {other}: {other} is of a run with other settings: --fusion_layers "
                         "'3:4' (this run: None), --dataset_seed 7 (this run: 0); resume it with its own settings, "
                         "or start a new run in another --output_dir")
    line = refused(["--resume_from_checkpoint", str(other), "--fusion_layers", "1:1", "--output_dir",
                    str(tmp_path / "out")], capsys)
    assert f"{other} fuses layers {{3: 4}}, this run --fusion_layers '1:1'" in line


def test_latest_checks_the_interrupted_runs_settings(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    checkpoint_of(["--dataset_seed", "7"], out, {"3": 4})
    line = refused(["--resume_from_checkpoint", "latest", "--output_dir", str(out)], capsys)
    assert "--dataset_seed 7 (this run: 0)" in line
    job.main(["--resume_from_checkpoint", "latest", "--dataset_seed", "7", "--output_dir", str(out)])
    assert len(no_work) == 1  # its own settings: resumed


def test_a_baseline_checkpoint_given_to_the_mdf_arm_is_refused(tmp_path, capsys, no_work):
    baseline = checkpoint_of([], tmp_path / "run" / "baseline", {})
    line = refused(["--resume_from_checkpoint", str(baseline), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"{baseline} is not an MDF-MLLM checkpoint (a baseline's, or no model at all)" in line


def test_a_truncated_checkpoint_is_refused(tmp_path, capsys, no_work):
    checkpoint = checkpoint_of([], tmp_path / "run", {"3": 4})
    (checkpoint / "model.safetensors").write_bytes(truncated_base(tmp_path / "cut").read_bytes())
    line = refused(["--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"{checkpoint / 'model.safetensors'}: truncated" in line


def test_a_second_job_is_told_of_the_first_before_anything_about_its_checkpoints(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    with guards.OutputLock(out):
        (out / "checkpoint-3").mkdir()  # the first job's, while it trains
        line = refused(["--output_dir", str(out)], capsys)
    assert f"--output_dir: {out} is in use by another job (pid {os.getpid()}" in line


def test_an_incomplete_checkpoint_is_refused_before_any_work(tmp_path, capsys, no_work):
    checkpoint = checkpoint_of([], tmp_path / "run", {"3": 4})
    (checkpoint / "trainer_state.json").unlink()
    line = refused(["--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")], capsys)
    assert line.endswith(f"--resume_from_checkpoint: {checkpoint} is not a complete checkpoint (no trainer_state.json)")


NO_OFFSETS = (40).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}'.ljust(40)


@pytest.mark.parametrize("content", [b"", b"garbage", NO_OFFSETS], ids=["empty", "no header", "header without offsets"])
def test_a_safetensors_file_that_is_not_one_is_named(content, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert guards.safetensors_problem(path).startswith(f"{path}: not a readable safetensors file (")
