"""MDF-MLLM under the expectations transformers' own model tests put on Mllama, side by side with the stock
`MllamaForConditionalGeneration` on the same inputs: U-Net gates closed (the stock model's logits, tokens and cache
layout), gates open (cached, uncached, static, compiled, tuple and dict outputs agree), loading, labels, and no
trainable parameter without a gradient."""

import pytest
import torch
from conftest import make_inputs, mdf_config, move_off_init, tiny_mllama_config
from safetensors.torch import load_file, save_file
from transformers import MllamaForConditionalGeneration, MllamaModel

from configuration_mdf_mllm import MdfMllmConfig
from modeling_mdf_mllm import CACHE, MdfMllmForConditionalGeneration, MdfMllmModel, vision_tokens_per_image
from test_modeling import stock_and_mdf


def without_unet(inputs):
    return {key: value for key, value in inputs.items() if key != "unet_pixel_values"}


def generated(model, inputs, **options):
    """Greedy tokens and per-step scores (B, steps, V)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4, output_scores=True,
                             return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.scores, 1)


def assert_same_generation(actual, expected, atol=1e-5):
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Gates closed: the stock model


def test_closed_gates_give_stock_logits_and_a_stock_cache_layout():
    stock, mdf = stock_and_mdf("a")
    inputs = make_inputs(mdf.config)
    with torch.no_grad():
        expected = stock(**without_unet(inputs), use_cache=True)
        actual = mdf(**inputs, use_cache=True)
    assert torch.equal(actual.logits, expected.logits)
    cache, stock_cache = actual[CACHE], expected[CACHE]
    assert len(cache.layers) == len(stock_cache.layers) == mdf.config.text_config.num_hidden_layers
    unet_tokens = mdf.config.fusion_grid**2  # one image per sample
    for index, (layer, stock_layer) in enumerate(zip(cache.layers, stock_cache.layers)):
        if index in mdf.config.fusion_layers:  # [U-Net tokens; the stock vision tokens]
            assert layer.keys.shape[2] == unet_tokens + vision_tokens_per_image(mdf.config)
            keys, values = layer.keys[:, :, unet_tokens:], layer.values[:, :, unet_tokens:]
        else:
            keys, values = layer.keys, layer.values
        assert torch.equal(keys, stock_layer.keys) and torch.equal(values, stock_layer.values), index


@pytest.mark.parametrize("options", [{}, {"cache_implementation": "static"}, {"num_beams": 2}],
                         ids=["dynamic", "static", "beam-search"])
def test_closed_gates_generate_the_stock_tokens(options):
    stock, mdf = stock_and_mdf("b")
    inputs = make_inputs(mdf.config, image_at=5)
    # Decoding steps attend over the cache entry with the U-Net tokens masked out: equal up to float rounding.
    assert_same_generation(generated(mdf, inputs, **options), generated(stock, without_unet(inputs), **options))


def test_closed_gates_generate_from_inputs_embeds_as_stock():
    stock, mdf = stock_and_mdf("a")
    inputs = make_inputs(mdf.config)
    embeds = {"inputs_embeds": mdf.get_input_embeddings()(inputs.pop("input_ids")).detach()}
    for options in ({}, {"cache_implementation": "static"}):
        assert_same_generation(generated(mdf, {**inputs, **embeds}, **options),
                               generated(stock, {**without_unet(inputs), **embeds}, **options))


@pytest.mark.parametrize("options", [{"prompt_lookup_num_tokens": 2}, "assistant"], ids=["prompt-lookup", "assistant"])
def test_assisted_decoding_gives_plain_greedy_tokens_as_on_stock(options):
    # Text only: with an image, stock Mllama's own assisted decoding fails (DynamicCache.crop cuts the vision keys of
    # the cross-attention layers by the rejected draft tokens, transformers 5.22-5.24), and MDF-MLLM the same way.
    stock, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config, batch=1)
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    for model in (stock, mdf):
        assisted = {"assistant_model": model} if options == "assistant" else options
        assert torch.equal(generated(model, text, **assisted)[0], generated(model, text)[0]), type(model).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Gates open: consistency


@pytest.fixture(scope="module")
def open_mdf():
    torch.manual_seed(0)
    _, mdf = stock_and_mdf("b")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config, length=8, image_at=3)
    inputs["input_ids"][0, :2] = mdf.config.text_config.pad_token_id  # left padding of the first prompt
    inputs["attention_mask"][0, :2] = 0
    return mdf, inputs, generated(mdf, inputs)


@pytest.mark.parametrize("options", [{"use_cache": False}, {"cache_implementation": "static"}],
                         ids=["no-cache", "static"])
def test_open_gates_generate_the_same_with_any_cache(open_mdf, options):
    mdf, inputs, dynamic = open_mdf
    assert_same_generation(generated(mdf, inputs, **options), dynamic, atol=1e-6)


def test_open_gates_generate_the_same_from_inputs_embeds(open_mdf):
    mdf, inputs, dynamic = open_mdf
    embeds = mdf.get_input_embeddings()(inputs["input_ids"]).detach()
    tokens, scores = generated(mdf, {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": embeds})
    length = inputs["input_ids"].shape[1]
    assert_same_generation((tokens, scores), (dynamic[0][:, length:], dynamic[1]), atol=1e-6)


def test_a_compiled_static_cache_forward_compiles_once_and_generates_the_eager_tokens(open_mdf):
    from transformers import CompileConfig

    mdf, inputs, _ = open_mdf
    eager = generated(mdf, inputs, cache_implementation="static")
    # The "eager" backend traces the whole graph (fullgraph) without code generation: seconds on a CPU.
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # an input that changes per step recompiles: an error
        compiled = generated(mdf, inputs, cache_implementation="static", compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert_same_generation(compiled, eager, atol=1e-6)
    torch._dynamo.reset()


def test_tuple_outputs_hold_what_dict_outputs_hold_on_every_model_class(open_mdf):
    mdf, inputs, _ = open_mdf
    labels = inputs["input_ids"].masked_fill(torch.arange(8) < 5, -100)
    size = mdf.config.unet_config["image_size"]
    vessel_mask = (torch.rand(2, 1, size, size) > 0.8).float()
    base = MdfMllmModel(mdf.config).eval()
    base.load_state_dict(mdf.model.state_dict())
    with torch.no_grad():
        for model, extra in ((mdf, {"labels": labels, "vessel_mask": vessel_mask}), (base, {})):
            as_dict = model(**inputs, **extra)
            as_tuple = model(**inputs, **extra, return_dict=False)
            assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
            for field, value in zip(as_dict.keys(), as_tuple):
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, as_dict[field]), field
    assert as_dict.vessel_logits is None and "vessel_logits" not in as_dict  # the base model ran no decoder
    mdf.config.return_dict = False  # tuples by default (torchscript and old code set it)
    try:
        with torch.no_grad():
            as_tuple = mdf(**inputs)
    finally:
        mdf.config.return_dict = True
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], mdf(**inputs).logits)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def test_a_base_model_checkpoint_loads_into_the_generation_model_with_only_the_head_missing_as_stock(tmp_path):
    MllamaModel(tiny_mllama_config()).save_pretrained(tmp_path / "stock")
    _, stock_info = MllamaForConditionalGeneration.from_pretrained(tmp_path / "stock", output_loading_info=True)
    base = MdfMllmModel(mdf_config("a"))
    base.save_pretrained(tmp_path / "mdf")
    mdf, info = MdfMllmForConditionalGeneration.from_pretrained(tmp_path / "mdf", output_loading_info=True)
    assert set(info["missing_keys"]) == set(stock_info["missing_keys"]) == {"lm_head.weight"}
    assert torch.isfinite(mdf.lm_head.weight).all() and 0 < mdf.lm_head.weight.abs().max() < 1  # initialised
    loaded = mdf.model.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in base.state_dict().items())


def test_a_base_model_checkpoint_missing_another_base_weight_is_still_an_error(tmp_path):
    MdfMllmModel(mdf_config("a")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["language_model.model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"base weights did not load.*model\.language_model\.norm\.weight"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path)


def resaved_without(folder, prefix):
    weights = load_file(folder / "model.safetensors")
    kept = {key: value for key, value in weights.items() if not key.startswith(prefix)}
    assert len(kept) < len(weights)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: resaved_without(folder, "model.unet."), r"missing in \['model\.unet'\]"),
        (lambda folder: resaved_without(folder, "model.unet_projector.projections.3"),
         r"missing in \['model\.unet_projector'\]"),
        (lambda folder: resaved_without(folder, "language_model.model.layers.3.unet_attn."),
         r"missing in \['model\.language_model\.layers\.3\.unet_attn'\]"),
    ],
    ids=["unet", "projector", "branch"],
)
def test_an_mdf_checkpoint_missing_mdf_tensors_is_an_error_naming_them(tmp_path, damage, message):
    MdfMllmForConditionalGeneration(mdf_config("a")).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path}: an MDF-MLLM checkpoint .*{message}"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path)


def test_an_mdf_checkpoint_with_other_mdf_tensors_is_an_error(tmp_path):
    MdfMllmForConditionalGeneration(mdf_config("a")).save_pretrained(tmp_path)
    # Fewer fused layers than the checkpoint holds: its layer-3 branch is unexpected.
    with pytest.raises(ValueError, match=r"unexpected in \['model\.language_model\.layers\.3\.unet_attn', 'model\.unet_projector'\]"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path, fusion_layers={1: 1})
    # Another U-Net width: every U-Net tensor has another shape.
    with pytest.raises(ValueError, match=r"wrong shape \[.*unet\.stages"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path, unet_config={**mdf_config().unet_config,
                                                                               "base_channels": 8})


# ----------------------------------------------------------------------------------------------------------------------
# Labels


def test_the_users_labels_win_and_survive_a_round_trip(tmp_path):
    for kwargs, names in (({"num_labels": 5}, [f"LABEL_{i}" for i in range(5)]), ({"num_labels": 2}, ["LABEL_0", "LABEL_1"]),
                          ({"id2label": {0: "cat", 1: "dog", 2: "owl"}}, ["cat", "dog", "owl"])):
        config = MdfMllmConfig(**kwargs)
        assert config.num_labels == len(names) and config.label_names == names and config.verbalizers == names
        config.save_pretrained(tmp_path)
        assert MdfMllmConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    default = MdfMllmConfig()  # nobody asked: the MDF label set
    assert default.num_labels == 8 and default.label_names[0] == "normal" and default.disease_types[0] == "normal"
    from_mllama = MdfMllmConfig.from_mllama_config(tiny_mllama_config())  # Mllama's generic LABEL_0/LABEL_1
    assert from_mllama.label_names == default.label_names


# ----------------------------------------------------------------------------------------------------------------------
# Every trainable parameter gets a gradient


DECODER = ("model.unet.bottleneck", "model.unet.upsample", "model.unet.decoder", "model.unet.vessel_head")


@pytest.mark.parametrize(
    "kwargs, frozen",
    [
        ({"seg_loss_weight": 0.0}, {*DECODER, "model.unet.stages.3", "model.unet.film.3"}),
        ({"seg_loss_weight": 0.0, "fusion_layers": {1: 1}},
         {*DECODER, *(f"model.unet.{part}.{k}" for part in ("stages", "film") for k in (1, 2, 3))}),
        ({"seg_loss_weight": 0.1}, set()),  # the vessel loss runs the decoder, which reads every depth
    ],
    ids=["no-vessel-loss", "depth-1-only", "vessel-loss"],
)
def test_every_trainable_parameter_gets_a_gradient_in_the_configured_mode(kwargs, frozen):
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(mdf_config("a", **kwargs)).train()
    move_off_init(model)
    model.gradient_checkpointing_enable()
    inputs = make_inputs(model.config)
    labels = inputs["input_ids"].masked_fill(torch.arange(9) < 6, -100)
    if kwargs["seg_loss_weight"]:
        size = model.config.unet_config["image_size"]
        inputs["vessel_mask"] = (torch.rand(2, 1, size, size) > 0.8).float()
    model(**inputs, labels=labels).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert [name for name, p in trainable.items() if p.grad is None] == []
    not_trainable = {name for name, p in model.named_parameters() if not p.requires_grad}
    # Exactly the parts that do not run: one level below the U-Net, a stage's or FiLM layer's index included.
    modules = {".".join(name.split(".")[:4 if name.split(".")[2] in ("stages", "film") else 3]) for name in not_trainable}
    assert modules == frozen


def test_weights_tied_to_one_that_loaded_are_not_missing():
    from modeling_mdf_mllm import _tied_to_loaded

    model = MdfMllmForConditionalGeneration(mdf_config("a"))
    # Mllama ties nothing itself; a model whose head is its input embedding (as tie_word_embeddings ties elsewhere).
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    assert _tied_to_loaded(model, {"lm_head.weight"}) == {"lm_head.weight"}
    both = {"lm_head.weight", "model.language_model.embed_tokens.weight"}
    assert _tied_to_loaded(model, both) == set()  # neither loaded: both missing
    assert _tied_to_loaded(model, {"model.language_model.norm.weight"}) == set()


def test_from_pretrained_keeps_the_idle_unet_parts_frozen(tmp_path):
    model = MdfMllmForConditionalGeneration(mdf_config("a", seg_loss_weight=0.0))
    model.save_pretrained(tmp_path)
    reloaded = MdfMllmForConditionalGeneration.from_pretrained(tmp_path)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and {name for name, p in reloaded.named_parameters() if not p.requires_grad} == frozen
