"""classify(): exact against scoring each verbalizer in its own forward pass and against the K-fold cache copy it
replaced, with one copy of the prompt cache whatever the number of classes."""

import pytest
import torch
from conftest import LAYOUTS, TINY_MDF, make_inputs, move_off_init, tiny_mllama_config
from test_modeling import two_images

from configuration_mdf_mllm import MdfMllmConfig
from modeling_mdf_mllm import CACHE, MdfMllmForConditionalGeneration


# Shared prefixes ([5, 6, ...] twice, [5, 7, 1]), unequal lengths (1 to 4 tokens), a one-token verbalizer.
VERBALIZERS = [[5, 6, 1], [7, 1], [8, 9, 10, 1], [5, 7, 1], [5, 6, 11, 1], [12]]


@pytest.fixture(scope="module")
def model():
    """Layout b with two tiles per image, open gates."""
    config = MdfMllmConfig.from_mllama_config(tiny_mllama_config(**LAYOUTS["b"], max_num_tiles=2), **TINY_MDF)
    torch.manual_seed(0)
    mdf = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(mdf)
    return mdf


def prompts(config, layout):
    """Two left-padded prompts (the first by 3 tokens) whose image has two tiles in the first row, one in the second;
    `layout="two_images"` adds a second image seen by the last three tokens."""
    inputs = make_inputs(config, batch=2, length=10, image_at=4)
    inputs["input_ids"][0, :3] = config.text_config.pad_token_id
    inputs["attention_mask"][0, :3] = 0
    inputs["aspect_ratio_ids"][0] = 2  # [1, 2]: two tiles
    inputs["aspect_ratio_mask"][0, 0] = 1
    inputs["cross_attention_mask"][0, 4:, 0] = 1
    return two_images(inputs) if layout == "two_images" else inputs


def scores_one_by_one(model, inputs, verbalizers):
    """Each verbalizer appended to the prompt and scored in one full forward pass (FiLM on the prompt only)."""
    batch, length = inputs["input_ids"].shape
    scores = []
    for ids in verbalizers:
        answer = torch.tensor(ids).repeat(batch, 1)
        attention_mask = torch.nn.functional.pad(inputs["attention_mask"], (0, len(ids)), value=1)
        full = {
            **inputs,
            "input_ids": torch.cat([inputs["input_ids"], answer], 1),
            "attention_mask": attention_mask,
            "prompt_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, len(ids))),
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "cross_attention_mask": torch.cat(
                [inputs["cross_attention_mask"], inputs["cross_attention_mask"][:, -1:].expand(-1, len(ids), -1, -1)], 1
            ),
        }
        with torch.no_grad():
            logprobs = model(**full).logits[:, length - 1 : -1].float().log_softmax(-1)
        scores.append(logprobs.gather(-1, answer[..., None])[..., 0].sum(-1))
    return torch.stack(scores, 1)


def scores_with_the_cache_repeated(model, inputs, verbalizers):
    """The method classify() replaced: the prompt cache repeated K times, the verbalizers as B*K padded rows."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    cross_attention_mask = inputs["cross_attention_mask"]
    batch, num_classes, length = input_ids.shape[0], len(verbalizers), max(map(len, verbalizers))
    answers = torch.zeros(num_classes, length, dtype=torch.long)
    answer_mask = torch.zeros(num_classes, length, dtype=attention_mask.dtype)
    for k, ids in enumerate(verbalizers):
        answers[k, : len(ids)] = torch.tensor(ids)
        answer_mask[k, : len(ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prompt = model(**inputs, position_ids=position_ids, use_cache=True)
        last = torch.full((batch,), input_ids.shape[1] - 1)
        scores = prompt.logits[:, -1].float().log_softmax(-1)[:, answers[:, 0]]
        cache = prompt[CACHE]
        cache.batch_repeat_interleave(num_classes)
        step = model(
            input_ids=answers[:, :-1].repeat(batch, 1),
            attention_mask=torch.cat(
                [attention_mask.repeat_interleave(num_classes, 0), answer_mask[:, :-1].repeat(batch, 1)], 1
            ),
            position_ids=position_ids[:, -1:].repeat_interleave(num_classes, 0) + torch.arange(1, length),
            cross_attention_mask=cross_attention_mask[torch.arange(batch), last][:, None]
            .repeat_interleave(num_classes, 0)
            .expand(-1, length - 1, -1, -1),
            use_cache=True,
            **{CACHE: cache},
        )
    logprobs = step.logits.float().log_softmax(-1).gather(-1, answers[:, 1:].repeat(batch, 1)[..., None])[..., 0]
    return scores + (logprobs * answer_mask[:, 1:].repeat(batch, 1)).sum(-1).view(batch, num_classes)


@pytest.mark.parametrize("layout", ["tiles", "two_images"])
def test_classify_equals_scoring_each_verbalizer_alone_and_the_repeated_cache(model, layout):
    inputs = prompts(model.config, layout)
    probabilities = model.classify(**inputs, verbalizer_ids=VERBALIZERS)
    assert probabilities.shape == (2, len(VERBALIZERS))
    one_by_one = scores_one_by_one(model, inputs, VERBALIZERS)
    repeated = scores_with_the_cache_repeated(model, inputs, VERBALIZERS)
    torch.testing.assert_close(repeated, one_by_one, atol=1e-5, rtol=0)  # the references agree
    # In log space: the probabilities of a random model are dominated by one class, which would hide errors in the
    # others' scores.
    for reference in (one_by_one, repeated):
        torch.testing.assert_close(probabilities, reference.softmax(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(probabilities.log(), reference.log_softmax(-1), atol=1e-5, rtol=0)


def test_a_right_padded_prompt_scores_as_the_same_prompt_left_padded(model):
    left = prompts(model.config, "tiles")  # row 0: 3 pad tokens, then 7 real ones
    right = {key: value.clone() for key, value in left.items()}
    for key in ("input_ids", "attention_mask", "cross_attention_mask"):
        right[key][0] = left[key][0].roll(-3, dims=0)  # the same 7 tokens first, the pads after them
    assert right["attention_mask"][0].tolist() == [1] * 7 + [0] * 3
    expected = scores_one_by_one(model, left, VERBALIZERS).log_softmax(-1)
    actual = model.classify(**right, verbalizer_ids=VERBALIZERS).log()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_one_token_verbalizers_need_no_second_pass(model):
    inputs = prompts(model.config, "tiles")
    verbalizers = [[5], [7], [12]]
    probabilities = model.classify(**inputs, verbalizer_ids=verbalizers)
    reference = scores_one_by_one(model, inputs, verbalizers).log_softmax(-1)
    torch.testing.assert_close(probabilities.log(), reference, atol=1e-5, rtol=0)


def test_the_prompt_cache_is_not_copied_per_class(model):
    """The cache after classify(): batch B in every layer, the cross-attention and U-Net slots as long as one
    prompt's, and the self-attention layers longer by the packed answer tokens only, whatever the number of classes."""
    inputs = prompts(model.config, "tiles")
    caches = []
    handle = model.model.register_forward_hook(lambda module, args, output: caches.append(output[CACHE]))
    sizes = {}
    try:
        for verbalizers in (VERBALIZERS[:2], VERBALIZERS):
            caches.clear()
            model.classify(**inputs, verbalizer_ids=verbalizers)
            assert len(caches) == 2 and caches[0] is caches[1]  # the prompt's cache, extended in place
            sizes[len(verbalizers)] = [(layer.keys.shape, layer.values.shape) for layer in caches[0].layers]
    finally:
        handle.remove()
    text = model.config.text_config
    vision = model.config.vision_config
    cross_length = vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)
    for num_classes, layers in sizes.items():
        packed = sum(len(ids) - 1 for ids in (VERBALIZERS[:2] if num_classes == 2 else VERBALIZERS))
        assert len(layers) == text.num_hidden_layers  # one entry per decoder layer, as Mllama's
        for index, (keys, values) in enumerate(layers):  # shapes (batch, heads, length, head_dim)
            assert keys == values and keys[0] == 2, index
            if index in model.config.fusion_layers:  # the U-Net branch's G^2 tokens of one image, then the vision's
                assert keys[2] == model.config.fusion_grid**2 + cross_length
            elif index in text.cross_attention_layers:
                assert keys[2] == cross_length
            else:
                assert keys[2] == inputs["input_ids"].shape[1] + packed
    cross = [i for i in range(len(sizes[2])) if i in text.cross_attention_layers]
    assert [sizes[2][i] for i in cross] == [sizes[len(VERBALIZERS)][i] for i in cross]


def test_classify_without_verbalizers_names_the_argument(model):
    inputs = prompts(model.config, "tiles")
    assert model.config.verbalizer_token_ids is None
    for verbalizers in (None, [[5], []]):
        with pytest.raises(ValueError, match="verbalizer_ids: pass processor.verbalizer_token_ids"):
            model.classify(**inputs, verbalizer_ids=verbalizers)


def test_a_config_temperature_gives_the_calibrated_probabilities_and_is_saved(model, tmp_path):
    """With `classifier_temperature` T, classify() returns softmax(log p / T), p the probabilities of scoring each
    verbalizer alone, on the packed pass and on the one-token path; T survives save_pretrained / from_pretrained."""
    inputs = prompts(model.config, "tiles")
    verbalizers = {"packed": VERBALIZERS, "one token": [[5], [7], [12]]}
    raw = {name: model.classify(**inputs, verbalizer_ids=ids) for name, ids in verbalizers.items()}
    log_p = {name: scores_one_by_one(model, inputs, ids).log_softmax(-1) for name, ids in verbalizers.items()}
    expected = {name: (log_p[name] / 2.5).softmax(-1) for name in verbalizers}
    try:
        model.config.classifier_temperature = 2.5
        for name, ids in verbalizers.items():
            calibrated = model.classify(**inputs, verbalizer_ids=ids)
            torch.testing.assert_close(calibrated, expected[name], atol=1e-5, rtol=0)
            torch.testing.assert_close(calibrated.log(), expected[name].log(), atol=1e-5, rtol=0)
            assert (calibrated.argmax(-1) == raw[name].argmax(-1)).all()
            assert (calibrated - raw[name]).abs().max() > 1e-2  # the temperature did change them
        model.save_pretrained(tmp_path)
    finally:
        model.config.classifier_temperature = None
    loaded = MdfMllmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.classifier_temperature == 2.5
    torch.testing.assert_close(loaded.classify(**inputs, verbalizer_ids=VERBALIZERS), expected["packed"], atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(model.classify(**inputs, verbalizer_ids=VERBALIZERS), raw["packed"], atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_and_finite_names_the_field(temperature):
    with pytest.raises(ValueError, match="classifier_temperature: expected a positive finite number or None"):
        MdfMllmConfig.from_mllama_config(tiny_mllama_config(**LAYOUTS["b"]), **TINY_MDF,
                                         classifier_temperature=temperature)
