"""mdf_mllm/stages.py: the cached base and its key, the counterfactual pass, the temperature."""

import copy
from dataclasses import fields, replace
from pathlib import Path

from conftest import TINY_JOB
from mdf_mllm import stages, main_job as job
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
