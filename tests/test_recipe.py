"""The training recipe's parts on tiny models: the U-Net's initialisation, the U-Net-alone row, the probe ladder."""

import copy
import errno
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import MllamaForConditionalGeneration

from conftest import TINY_MDF, move_off_init, tiny_mllama_config
from mdf_mllm import metrics, stage1, main_job as job, training
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from mdf_mllm.probe_ladder import ladder_features, ladder_table, probe_accuracy, selected
from processing_mdf_mllm import MdfMllmDataCollator, build_default_processor


def unet_convolutions(model):
    return [m for m in model.model.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]


def assert_pytorch_default_init(conv):
    # PyTorch's default: weight ~ U(-b, b) with b = 1/sqrt(fan_in) (Kaiming-uniform, a = sqrt 5), bias likewise.
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)
    bound = 1 / math.sqrt(fan_in)
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)


@pytest.mark.parametrize("path", ["from-config", "from-a-mllama-checkpoint"])
def test_unet_convolutions_start_at_pytorchs_default_not_transformers_normal(path, tmp_path):
    """transformers' N(0, 0.02) made every stage-1 Adam step move the convolutions four times as far relative to
    their size, and the class loss stalled; the vision tower keeps its own initialisation."""
    if path == "from-config":
        from configuration_mdf_mllm import MdfMllmConfig

        model = MdfMllmForConditionalGeneration(MdfMllmConfig.from_mllama_config(tiny_mllama_config(), **TINY_MDF))
        assert model.model.vision_model.patch_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)
    else:
        MllamaForConditionalGeneration(tiny_mllama_config()).save_pretrained(tmp_path)
        model = MdfMllmForConditionalGeneration.from_pretrained(tmp_path, **TINY_MDF)
    convolutions = unet_convolutions(model)
    assert len(convolutions) == 2 * 4 + 2 + 4 + 2 * 4 + 1  # encoder, bottleneck, up-sampling, decoder, vessel head
    big = [conv for conv in convolutions if conv.weight.numel() >= 500]
    assert big
    for conv in big:
        assert_pytorch_default_init(conv)


@pytest.fixture(scope="module")
def tiny():
    """A tiny MDF-MLLM with trained-looking gates, FiLM and value projections, its processor, and the 40-photo
    synthetic set's train split processed with and without answers."""
    from configuration_mdf_mllm import MdfMllmConfig
    from dataset_builder import load

    processor = build_default_processor(image_size=28, unet_image_size=32)
    tokenizer = processor.tokenizer
    base = tiny_mllama_config(vocab_size=tokenizer.convert_tokens_to_ids("<|image|>"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(base, **TINY_MDF, image_token_index=base.image_token_index)
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    for branch in training.unet_branches(model).values():
        torch.nn.init.normal_(branch.value_projection.weight, std=0.1)
    split = load("synthetic", num_images=40, image_size=64, seed=0)["train"]
    answered = training.ProcessedSplit(split, processor, with_answers=True)
    prompts = training.ProcessedSplit(split, processor, with_answers=False)
    return model, processor, answered, prompts


def test_the_ladder_reads_every_rung_at_the_answer_position_and_never_sees_the_answer(tiny):
    model, processor, answered, prompts = tiny
    collator = MdfMllmDataCollator(processor)
    items = [prompts[i] for i in range(len(prompts))]
    with_answers = ladder_features(model, [answered[i] for i in range(len(answered))], collator, batch_size=8)
    without = ladder_features(model, items, collator, batch_size=8)
    assert list(without) == ["(a) depth 1 skips", "(a) depth 2 skips", "(a) depth 3 skips", "(a) depth 4 skips",
                             "(b) U_1 tokens", "(b) U_3 tokens", "(c) layer 1 branch", "(c) layer 3 branch",
                             "(d) last hidden state"]
    for rung, features in without.items():  # a training item's prompt gives what the prompt alone gives
        assert features.shape[0] == len(items)
        np.testing.assert_allclose(with_answers[rung], features, atol=1e-5, err_msg=rung)
    # Independently: prompts are left-padded, so the answer position is the last column; FiLM reads the prompt.
    batch = collator(items)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]
        context = model.model.text_context(batch["input_ids"], None, batch["attention_mask"])
        skips = model.model.unet.encode(batch["unet_pixel_values"], context)
    np.testing.assert_allclose(without["(d) last hidden state"], hidden.numpy(), atol=1e-5)
    np.testing.assert_allclose(without["(a) depth 3 skips"], skips[2].mean((2, 3)).numpy(), atol=1e-5)
    assert np.abs(without["(c) layer 1 branch"]).max() > 0


def test_a_probe_reads_features_built_to_be_separable_and_not_unrelated_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    features = rng.normal(size=(400, 16))
    features[np.arange(400), labels] += 8.0  # class k lifts feature k far above the noise
    assert probe_accuracy(features[:200], labels[:200], features[200:], labels[200:]) == 1.0
    unrelated = rng.integers(0, 4, 400)
    assert probe_accuracy(features[:200], unrelated[:200], features[200:], unrelated[200:]) < 0.4


def test_ladder_table_puts_one_rung_per_row_and_one_model_per_column():
    table = ladder_table({"start": {"(a) x": 0.5, "(b) y": 0.25}, "end": {"(a) x": 0.875}}, chance=0.25)
    assert table == ("| rung | start | end |\n|---|---:|---:|\n| (a) x | 0.500 | 0.875 |\n| (b) y | 0.250 | – |\n\n"
                     "Linear-probe test accuracy; chance 0.25.")


def test_selected_keeps_the_acquired_classes_only(tiny):
    _, _, _, prompts = tiny
    names = ["normal", "amd", "dr", "glaucoma", "retinitis_pigmentosa", "stargardt", "choroideremia", "best_disease"]
    items, labels = selected(prompts, names)
    assert labels == [label for label in prompts.label_ids if label < 4] and len(items) == len(labels)
    assert 0 < len(labels) < len(prompts)


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
