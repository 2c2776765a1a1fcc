"""Stage 1's recipe: the class head on standardised pooled skips (`--stage1_standardise`), folded into one linear
layer once trained."""

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import mdf_config
from mdf_mllm import main_job, stage1
from modeling_mdf_mllm import MdfMllmUNet

make_class_head = stage1.make_class_head  # what train_unet calls, recorded by a test


class Photos(torch.utils.data.Dataset):
    """A split of random U-Net views with labels, as stage 1 reads a `ProcessedSplit`."""

    def __init__(self, count: int, size: int, num_classes: int):
        generator = torch.Generator().manual_seed(0)
        self.items = [{"unet_pixel_values": torch.randn(3, size, size, generator=generator)} for _ in range(count)]
        self.label_ids = [i % num_classes for i in range(count)]
        self.has_masks = False

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(items):
    return {"unet_pixel_values": torch.stack([item["unet_pixel_values"] for item in items])}


def test_a_folded_head_gives_the_standardised_heads_logits():
    torch.manual_seed(0)
    head = stage1.make_class_head(6, 3, standardised=True, device="cpu")
    norm, linear = head
    norm.running_mean.normal_(), norm.running_var.uniform_(0.01, 4.0)
    x = torch.randn(5, 6)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    # By hand: each feature less its running mean, over its running standard deviation, then the linear layer.
    expected = ((x - norm.running_mean) / (norm.running_var + norm.eps).sqrt()) @ weight.T + bias
    torch.testing.assert_close(head.eval()(x), expected)
    one = stage1.folded(head)
    assert isinstance(one, torch.nn.Linear) and set(one.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(one(x), expected)
    plain = stage1.make_class_head(6, 3, standardised=False, device="cpu")
    assert isinstance(plain, torch.nn.Linear) and stage1.folded(plain) is plain


@pytest.mark.parametrize("standardise", [True, False])
def test_stage_1_trains_the_head_its_setting_names_and_writes_it_folded(tmp_path, monkeypatch, standardise):
    # 17 photos in batches of 8: the last batch of each epoch holds one photo, which a batch norm cannot standardise.
    torch.manual_seed(0)
    unet, photos = MdfMllmUNet(mdf_config()), Photos(17, 32, 3)
    settings = main_job.parse_arguments(["--per_device_train_batch_size", "8", "--stage1_epochs", "2",
                                         "--stage1_standardise", str(standardise)])
    heads = []
    monkeypatch.setattr(stage1, "make_class_head", lambda *a, **k: heads.append(make_class_head(*a, **k)) or heads[-1])
    stage1.train_unet(settings, unet, 3, photos, collate, tmp_path)
    (head,) = heads
    saved = torch.nn.Linear(sum(unet.widths), 3)
    saved.load_state_dict(load_file(tmp_path / "class_head.safetensors"))
    with torch.no_grad():
        pooled = stage1.pooled_skips(unet.eval(), collate(photos.items)["unet_pixel_values"])[1]
        if standardise:
            norm = head[0]
            # Every batch of two photos or more updated the statistics (2 per epoch); the batch of one did not.
            assert norm.num_batches_tracked.item() == 2 * (math.ceil(17 / 8) - 1)
            assert (norm.running_var < 0.9).all()  # moved off its start (1) towards the pooled skips' small spread
            standardised = (pooled - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
            expected = standardised @ head[1].weight.T + head[1].bias  # the linear layer as it trained, unfolded
        else:
            assert isinstance(head, torch.nn.Linear)
            expected = head(pooled)
        torch.testing.assert_close(saved(pooled), expected, rtol=1e-4, atol=1e-4)


def test_the_main_job_standardises_the_head_by_default_and_the_negation_keeps_the_raw_head():
    # On by default: the raw head stalled on two of the five runs of docs/results.md, the standardised one on none.
    assert main_job.parse_arguments([]).run.stage1_standardise is True
    assert main_job.parse_arguments([]).run.stage1_epochs == 6
    assert main_job.parse_arguments(["--no_stage1_standardise"]).run.stage1_standardise is False


def test_the_recipe_report_names_each_recipes_worst_run():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import stage1_recipes

    def row(loss, validation, test, seconds):
        return {"loss": loss, "validation": validation, "test": test, "seconds": seconds, "epochs": 6}

    results = {(0, 0): {"a": row(0.2, 0.9, 0.8, 10.0), "b": row(1.4, 0.4, 0.3, 30.0)},
               (1, 0): {"a": row(0.5, 0.7, 0.9, 20.0), "b": row(0.3, 0.8, 0.9, 50.0)}}
    text = stage1_recipes.section(results, {"a": "--stage1_epochs 6", "b": ""}, "python bench/stage1_recipes.py")
    assert "| 1 | 0 | b | 6 | 0.300 | 0.800 | 0.900 | 50 |" in text
    # Worst loss is the highest, worst accuracy the lowest; mean test over the runs.
    assert "| a | 0.500 | 0.700 | 0.800 | 0.850 | 15 |" in text
    assert "| b | 1.400 | 0.400 | 0.300 | 0.600 | 40 |" in text
    assert "- b: `(the defaults)`" in text
