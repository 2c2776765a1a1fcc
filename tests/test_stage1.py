"""mdf_mllm/stage1.py: the U-Net-alone row, stage 1's optimizer, schedule and flips, its weights' files."""

import copy
import errno
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mdf_mllm import metrics, stage1, main_job as job, training
from processing_mdf_mllm import MdfMllmDataCollator


def test_the_unet_alone_row_scores_the_stage_1_head_on_the_photos_alone(tiny, tmp_path):
    model, processor, _, prompts = tiny
    unet, config = model.model.unet, model.config
    torch.manual_seed(1)
    head = torch.nn.Linear(sum(unet.widths), 8)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, tmp_path / "class_head.safetensors")
    settings = job.parse_arguments(["--n_bootstrap", "20", "--eval_batch_size", "7"])
    # The same photos as train and test split: the row keeps the train photos' probabilities for the joint reference.
    run = training.RunContext(settings, None, processor, processed={False: {"train": prompts, "test": prompts}})
    row = stage1.unet_alone_result(run, unet, tmp_path)
    report = row.report
    # By hand, one photo at a time: pooled skips of the photo alone (no FiLM, whatever the prompt) -> head -> softmax.
    expected = []
    with torch.no_grad():
        for i in range(len(prompts)):
            x = prompts[i]["unet_pixel_values"][None]
            features, skips = x, []
            for stage in unet.stages:
                features = stage(features)
                skips.append(features.mean((2, 3)))
            expected.append(head(torch.cat(skips, 1)).softmax(-1)[0])
    expected = torch.stack(expected).numpy()
    np.testing.assert_allclose(row.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(row.train_probabilities, expected, atol=1e-5)
    truth, predicted = np.array(prompts.label_ids), expected.argmax(-1)
    assert row.name == "U-Net alone (image only)" and row.gate_history == []
    assert report["disease"]["accuracy"] == pytest.approx((predicted == truth).mean())
    for k, name in enumerate(config.label_names):
        sensitivity = report["disease"]["per_class"][name]["sensitivity"]
        assert sensitivity == (pytest.approx((predicted[truth == k] == k).mean()) if (truth == k).any() else None)
    kinds = metrics.type_ids(config.disease_types)
    assert report["type"]["accuracy"] == pytest.approx((kinds[predicted] == kinds[truth]).mean())
    encoder = sum(p.numel() for stage in unet.stages for p in stage.parameters())
    assert row.parameters == encoder + 8 * sum(unet.widths) + 8


@pytest.mark.parametrize("optimizer, schedule, flip", [("AdamW", "one_cycle", 0.5), ("SGD", "constant", 0.0),
                                                       ("Adam", "constant", 1.0)])
def test_stage_1_trains_with_the_optimizer_schedule_and_flips_its_settings_name(tiny, tmp_path, monkeypatch, optimizer,
                                                                               schedule, flip):
    model, processor, answered, _ = tiny
    settings = job.parse_arguments(["--per_device_train_batch_size", "8", "--stage1_epochs", "2", "--stage1_optimizer",
                                    optimizer, "--stage1_schedule", schedule, "--stage1_flip", str(flip)])
    made, rates, flips = [], [], []
    real_optimizer, real_mirrored = getattr(torch.optim, optimizer), stage1.mirrored

    class Recording(real_optimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, optimizer, Recording)
    monkeypatch.setattr(stage1, "mirrored", lambda batch: flips.append(1) or real_mirrored(batch))
    unet = copy.deepcopy(model.model.unet).train()
    stage1.train_unet(settings, unet, 8, answered, MdfMllmDataCollator(processor), tmp_path)
    steps = 2 * math.ceil(len(answered) / 8)
    assert len(made) == 1 and len(rates) == steps
    assert made[0].param_groups[0]["weight_decay"] == settings.training.weight_decay
    peak = settings.run.stage1_learning_rate
    if schedule == "constant":
        assert rates == [peak] * steps
    else:  # one cycle: warms up from peak / 25 to the peak, then anneals
        assert rates[0] == pytest.approx(peak / 25) and max(rates) <= peak and rates[-1] < rates[0]
    # The batches mirrored: none at 0, every one at 1, some at 0.5 (the same draws whatever the probability).
    assert len(flips) == {0.0: 0, 1.0: steps}.get(flip, len(flips)) and (flip != 0.5 or 0 < len(flips) < steps)


def test_stage_1_writes_its_weights_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    """A disk that runs full while stage 1 saves leaves the files of before, not half of a new one."""
    model, processor, answered, _ = tiny
    settings = job.parse_arguments(["--per_device_train_batch_size", "8", "--max_steps", "1"])
    for name in ("unet.safetensors", "class_head.safetensors"):
        (tmp_path / name).write_bytes(b"earlier")

    def full(tensors, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stage1, "save_file", full)
    unet = copy.deepcopy(model.model.unet).train()
    with pytest.raises(OSError):
        stage1.train_unet(settings, unet, 8, answered, MdfMllmDataCollator(processor), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"unet.safetensors": b"earlier",
                                                                    "class_head.safetensors": b"earlier"}
