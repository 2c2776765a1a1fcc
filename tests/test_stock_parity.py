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
