"""MDF-MLLM behaves like the stock Mllama users know: the same logits with closed U-Net gates for every prompt layout,
generation whatever the cache, several images, generic PEFT configs, FSDP auto-wrap, transformers versions."""

import pytest
import torch
from conftest import LAYOUTS, make_inputs, move_off_init
from test_modeling import logits, stock_and_mdf


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("image_at", [0, 5])  # 5: after a chat header, <|begin_of_text|><|start_header_id|>user...
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_closed_unet_gates_give_the_stock_model_for_every_prompt_layout(layout, image_at, attn):
    stock, mdf = stock_and_mdf(layout, attn)  # stock cross-attention gates open
    inputs = make_inputs(mdf.config, image_at=image_at)
    expected = logits(stock, {k: v for k, v in inputs.items() if k != "unet_pixel_values"})
    for seed in (1, 2):
        inputs["unet_pixel_values"] = torch.randn_like(inputs["unet_pixel_values"]) * seed * 10
        torch.testing.assert_close(logits(mdf, inputs), expected, atol=1e-5, rtol=0)


def generate_scores(model, inputs, **options):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, **options
        )
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_scores_are_the_same_with_a_dynamic_a_static_or_no_cache(padded):
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config, length=8, image_at=3)
    if padded:  # left padding of the first prompt
        inputs["input_ids"][0, :2] = mdf.config.text_config.pad_token_id
        inputs["attention_mask"][0, :2] = 0
    sequences, scores = generate_scores(mdf, inputs)
    for options in (dict(use_cache=False), dict(cache_implementation="static")):
        other_sequences, other_scores = generate_scores(mdf, inputs, **options)
        assert torch.equal(other_sequences, sequences), options
        torch.testing.assert_close(other_scores, scores, atol=1e-6, rtol=0)
    # The FiLM context is the prompt alone: the last step equals one forward pass over prompt + generated tokens
    # whose prompt_mask covers the prompt only.
    length = inputs["input_ids"].shape[1]
    generated = sequences.shape[1] - length
    full = {
        **inputs,
        "input_ids": sequences[:, :-1],
        "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, generated - 1), value=1),
        "prompt_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, generated - 1)),
        "cross_attention_mask": torch.cat(
            [inputs["cross_attention_mask"], inputs["cross_attention_mask"][:, -1:].expand(-1, generated - 1, -1, -1)], 1
        ),
        "position_ids": (torch.nn.functional.pad(inputs["attention_mask"], (0, generated - 1), value=1).cumsum(-1) - 1)
        .clamp(min=0),
    }
    torch.testing.assert_close(logits(mdf, full)[:, -1], scores[:, -1], atol=1e-5, rtol=0)


def test_generate_with_closed_unet_gates_is_the_stock_model_after_a_chat_header():
    stock, mdf = stock_and_mdf("b")
    inputs = make_inputs(mdf.config, image_at=5)
    stock_sequences, stock_scores = generate_scores(stock, {k: v for k, v in inputs.items() if k != "unet_pixel_values"})
    sequences, scores = generate_scores(mdf, inputs, cache_implementation="static")
    assert torch.equal(sequences, stock_sequences)
    torch.testing.assert_close(scores, stock_scores, atol=1e-5, rtol=0)


def test_generate_with_two_images_is_the_same_with_a_dynamic_a_static_or_no_cache():
    from test_modeling import two_images

    _, mdf = stock_and_mdf("b")
    move_off_init(mdf)
    inputs = two_images(make_inputs(mdf.config))
    sequences, scores = generate_scores(mdf, inputs)
    for options in (dict(use_cache=False), dict(cache_implementation="static")):
        other_sequences, other_scores = generate_scores(mdf, inputs, **options)
        assert torch.equal(other_sequences, sequences), options
        torch.testing.assert_close(other_scores, scores, atol=1e-6, rtol=0)
