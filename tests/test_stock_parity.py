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


def test_a_static_cache_has_one_fixed_size_layer_per_decoder_layer_as_stock():
    from transformers.cache_utils import StaticLayer

    from modeling_mdf_mllm import vision_tokens_per_image
    from test_modeling import two_images

    stock, mdf = stock_and_mdf("a")
    inputs = two_images(make_inputs(mdf.config))
    caches = []
    for model, model_inputs in ((stock, {k: v for k, v in inputs.items() if k != "unet_pixel_values"}), (mdf, inputs)):
        with torch.no_grad():
            out = model.generate(**model_inputs, max_new_tokens=2, cache_implementation="static",
                                 return_dict_in_generate=True)
        caches.append(out.get("cache", out.get("past_key_values")))
    stock_cache, cache = caches
    assert len(cache.layers) == len(stock_cache.layers) == mdf.config.text_config.num_hidden_layers
    assert all(isinstance(layer, StaticLayer) for layer in cache.layers) and cache.is_compileable  # no recompiles
    vision = 2 * vision_tokens_per_image(mdf.config)  # two images
    unet = 2 * mdf.config.fusion_grid**2
    for index, (layer, stock_layer) in enumerate(zip(cache.layers, stock_cache.layers)):
        expected = list(stock_layer.keys.shape)
        if index in mdf.config.fusion_layers:  # the U-Net branch's tokens in front of the vision tokens
            assert expected[2] == vision
            expected[2] += unet
        assert list(layer.keys.shape) == expected == list(layer.values.shape), index


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


FROZEN_GATES = "U-Net gates frozen"


def peft_model(config_or_factory, caplog):
    """A tiny MDF-MLLM with open gates wrapped by peft; whether `train()` warned about frozen gates."""
    from peft import get_peft_model

    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    config = config_or_factory(mdf) if callable(config_or_factory) else config_or_factory
    model = get_peft_model(mdf, config)
    caplog.clear()
    model.train()
    model.train()
    return model, [record.getMessage() for record in caplog.records if FROZEN_GATES in record.getMessage()]


def test_mdf_lora_config_trains_every_mdf_parameter_gates_and_tau_included(caplog):
    model, warnings = peft_model(lambda mdf: mdf.mdf_lora_config(r=4), caplog)
    assert warnings == []
    mdf_parameters = {n: p for n, p in model.named_parameters() if "unet" in n and "original_module" not in n}
    assert all(p.requires_grad for p in mdf_parameters.values())
    base = {n for n, _ in stock_and_mdf("a")[1].named_parameters() if "unet" in n}
    assert len(mdf_parameters) == len(base)  # one trained copy of each
    assert any("key_projection" in n for n in mdf_parameters)
    assert not any("key_projection.lora_" in n for n, _ in model.named_parameters())
    assert any("self_attn.q_proj.lora_A" in n for n, _ in model.named_parameters())
    inputs = make_inputs(model.config)
    labels = inputs["input_ids"].masked_fill(torch.arange(9) < 6, -100)
    model(**inputs, labels=labels).loss.backward()
    for suffix in ("unet_attn.modules_to_save.default.gate", "unet_attn.modules_to_save.default.logit_scale"):
        trained = [p for n, p in model.named_parameters() if n.endswith(suffix)]
        assert len(trained) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), suffix
    # The forward pass reads the trained copies: closing their gates removes the U-Net from the logits.
    other = {**inputs, "unet_pixel_values": torch.randn_like(inputs["unet_pixel_values"])}
    model.eval()
    assert (logits(model, inputs) - logits(model, other)).abs().max() > 1e-4
    for name, p in model.named_parameters():
        if name.endswith("modules_to_save.default.gate"):
            p.data.zero_()
    torch.testing.assert_close(logits(model, inputs), logits(model, other), atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_a_generic_lora_config_warns_once_that_the_unet_gates_are_frozen(targets, caplog):
    from peft import LoraConfig

    model, warnings = peft_model(LoraConfig(r=4, target_modules=targets), caplog)
    gates = [p for n, p in model.named_parameters() if n.endswith("unet_attn.gate")]
    assert len(gates) == 2 and not any(p.requires_grad for p in gates)
    assert warnings == ["Training MDF-MLLM with 2 of its 2 U-Net gates frozen: a frozen gate fixes how much its layer "
                        "reads the U-Net (nothing while it is closed, i.e. the baseline). A generic PEFT config freezes "
                        "every MDF parameter; use get_peft_model(model, model.mdf_lora_config(r=...))."]
    if targets != "all-linear":  # the U-Net branch's projections are not caught by a generic list
        assert not any("key_projection.lora_" in n or "value_projection.lora_" in n for n, _ in model.named_parameters())


def test_full_fine_tuning_does_not_warn(caplog):
    _, mdf = stock_and_mdf("a")
    caplog.clear()
    mdf.train()
    assert not [r for r in caplog.records if FROZEN_GATES in r.getMessage()]


@pytest.mark.parametrize("fusion_layers", [None, {}], ids=["mdf", "baseline"])
def test_accelerate_fsdp_auto_wrap_without_a_class_list_wraps_every_layer(fusion_layers):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from conftest import mdf_config
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration

    kwargs = {} if fusion_layers is None else {"fusion_layers": fusion_layers}
    model = MdfMllmForConditionalGeneration(mdf_config("b", **kwargs))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules decide
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    text, vision = model.config.text_config, model.config.vision_config
    expected = [f"model.language_model.layers.{i}" for i in range(text.num_hidden_layers)] + [
        f"model.vision_model.{encoder}.layers.{i}"
        for encoder, count in (("transformer", vision.num_hidden_layers), ("global_transformer", vision.num_global_layers))
        for i in range(count)
    ]
    assert sorted(wrapped) == sorted(expected)
    fsdp1 = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap")
    fsdp1.set_auto_wrap_policy(model)  # FSDP1's path raises on a class the model lacks
    assert {cls.__name__ for cls in fsdp1.auto_wrap_policy.keywords["transformer_layer_cls"]} == set(
        model._no_split_modules
    )
