"""mdf_mllm/probe_ladder.py: the rungs it reads, the probes, its table."""

import numpy as np
import torch

from mdf_mllm.probe_ladder import ladder_features, ladder_table, probe_accuracy, selected
from processing_mdf_mllm import MdfMllmDataCollator


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
