"""MDF-MLLM model: the fusion's effects, its inputs and their errors, loading, export and configuration."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LAYOUTS, TINY_MDF, make_inputs, mdf_config, move_off_init, tiny_mllama_config
from safetensors.torch import load_file, save_file
from transformers import MllamaForConditionalGeneration

from configuration_mdf_mllm import MdfMllmConfig, default_fusion_layers
from modeling_mdf_mllm import MdfMllmForConditionalGeneration, is_mdf_parameter


def stock_and_mdf(layout, attn="sdpa", **mdf_kwargs):
    """A random stock Mllama with non-zero cross-attention gates, and an MDF-MLLM holding the same base weights."""
    stock = MllamaForConditionalGeneration(tiny_mllama_config(**LAYOUTS[layout])).eval()
    move_off_init(stock, value=0.7)
    mdf = MdfMllmForConditionalGeneration(mdf_config(layout, **mdf_kwargs)).eval()
    result = mdf.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_mdf_parameter(key, mdf) for key in result.missing_keys)
    stock.set_attn_implementation(attn)
    mdf.set_attn_implementation(attn)
    return stock, mdf


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_zero_unet_gate_is_the_baseline_with_text_before_the_image(layout):
    _, mdf = stock_and_mdf(layout)
    baseline = MdfMllmForConditionalGeneration(mdf_config(layout, fusion_layers={})).eval()
    baseline.load_state_dict(mdf.state_dict(), strict=False)
    inputs = make_inputs(mdf.config, image_at=3)
    torch.testing.assert_close(logits(mdf, inputs), logits(baseline, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("masking", ["reference", "transformers"])
def test_text_before_the_image_reads_no_unet_token_and_in_reference_mode_no_vision_token(masking):
    _, mdf = stock_and_mdf("a", pre_image_text_masking=masking)
    move_off_init(mdf)
    inputs = make_inputs(mdf.config, image_at=4)
    reference = logits(mdf, inputs)
    for key in ("pixel_values", "unet_pixel_values"):
        changed = logits(mdf, {**inputs, key: torch.randn_like(inputs[key])})
        if key == "unet_pixel_values" or masking == "reference":
            torch.testing.assert_close(changed[:, :4], reference[:, :4], atol=0, rtol=0)
        else:  # stock transformers: text before the image attends uniformly to the image tokens
            assert (changed[:, :4] - reference[:, :4]).abs().max() > 1e-4, key
        assert (changed[:, 4:] - reference[:, 4:]).abs().max() > 1e-4, key


def test_open_gates_let_the_unet_change_the_logits():
    _, mdf = stock_and_mdf("b")
    inputs = make_inputs(mdf.config, image_at=0)
    other = {**inputs, "unet_pixel_values": torch.randn_like(inputs["unet_pixel_values"])}
    torch.testing.assert_close(logits(mdf, inputs), logits(mdf, other), atol=1e-6, rtol=0)  # closed gates
    move_off_init(mdf)
    assert (logits(mdf, inputs) - logits(mdf, other)).abs().max() > 1e-3


def test_prompt_text_steers_the_unet_through_film():
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    captured = []
    mdf.model.unet_projector.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    inputs = make_inputs(mdf.config)
    logits(mdf, inputs)
    other_text = inputs["input_ids"].clone()
    other_text[:, 5:] = (other_text[:, 5:] + 7) % (mdf.config.text_config.vocab_size - 3) + 3
    logits(mdf, {**inputs, "input_ids": other_text})
    logits(mdf, inputs)
    assert len(captured[0]) == max(mdf.config.fusion_layers.values())  # the depths that run without a vessel loss
    for depth in range(len(captured[0])):
        assert (captured[0][depth] - captured[1][depth]).abs().max() > 1e-4, depth
        torch.testing.assert_close(captured[0][depth], captured[2][depth], atol=0, rtol=0)


def test_one_backward_pass_reaches_every_new_parameter():
    _, mdf = stock_and_mdf("a", seg_loss_weight=0.1)  # a vessel loss: the config's default has none
    move_off_init(mdf)
    mdf.train()
    inputs = make_inputs(mdf.config)
    labels = inputs["input_ids"].masked_fill(torch.arange(9) < 6, -100)
    size = mdf.config.unet_config["image_size"]
    vessel_mask = (torch.rand(2, 1, size, size) > 0.8).float()
    output = mdf(**inputs, labels=labels, vessel_mask=vessel_mask)
    assert output.vessel_logits.shape == (2, 1, size, size)
    output.loss.backward()
    new = {name: p for name, p in mdf.named_parameters() if is_mdf_parameter(name, mdf)}
    assert len(new) > 50
    without_gradient = [name for name, p in new.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []


def test_segmentation_loss_is_weighted_by_the_config():
    _, mdf = stock_and_mdf("a", seg_loss_weight=0.1)  # a vessel loss: the config's default has none
    inputs = make_inputs(mdf.config)
    size = mdf.config.unet_config["image_size"]
    vessel_mask = (torch.rand(2, 1, size, size) > 0.8).float()
    with torch.no_grad():
        output = mdf(**inputs, vessel_mask=vessel_mask)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(output.vessel_logits, vessel_mask)
    torch.testing.assert_close(output.loss, mdf.config.seg_loss_weight * bce)


def test_a_zero_segmentation_weight_skips_the_decoder():
    _, mdf = stock_and_mdf("a")
    mdf.config.seg_loss_weight = 0.0
    inputs = make_inputs(mdf.config)
    size = mdf.config.unet_config["image_size"]
    calls = []
    mdf.model.unet.vessel_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        output = mdf(**inputs, vessel_mask=torch.ones(2, 1, size, size))
        plain = mdf(**inputs)
    assert calls == [] and output.vessel_logits is None
    torch.testing.assert_close(output.logits, plain.logits, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    mdf.train()
    inputs = make_inputs(mdf.config)
    labels = inputs["input_ids"].masked_fill(torch.arange(9) < 6, -100)

    def gradients():
        mdf.zero_grad()
        mdf(**inputs, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in mdf.named_parameters() if p.grad is not None}

    plain = gradients()
    mdf.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_bf16_forward_is_finite_and_close_to_fp32():
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config)
    reference = logits(mdf, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = logits(mdf, inputs)
    half = logits(mdf.to(torch.bfloat16), inputs)
    for result in (autocast, half):
        assert torch.isfinite(result).all()
        assert (result.float() - reference).abs().max() < 0.1


def two_images(inputs):
    """The same inputs with a second 1-tile image per sample, seen by the last three text tokens."""
    cross_attention_mask = torch.nn.functional.pad(inputs["cross_attention_mask"], (0, 0, 0, 1))
    cross_attention_mask[:, -3:, 1] = 1
    return {
        **inputs,
        "pixel_values": torch.cat([inputs["pixel_values"], torch.randn_like(inputs["pixel_values"])], 1),
        "aspect_ratio_ids": inputs["aspect_ratio_ids"].repeat(1, 2),
        "aspect_ratio_mask": inputs["aspect_ratio_mask"].repeat(1, 2, 1),
        "cross_attention_mask": cross_attention_mask,
        "unet_pixel_values": torch.stack([inputs["unet_pixel_values"], torch.randn_like(inputs["unet_pixel_values"])], 1),
    }


def cross_attention_states(mdf, inputs):
    """What the vision tower and projector give for `inputs`' images, as `cross_attention_states`."""
    with torch.no_grad():
        return mdf.model.multi_modal_projector(
            mdf.model.vision_model(
                pixel_values=inputs["pixel_values"],
                aspect_ratio_ids=inputs["aspect_ratio_ids"],
                aspect_ratio_mask=inputs["aspect_ratio_mask"],
            ).last_hidden_state
        ).reshape(inputs["input_ids"].shape[0], -1, mdf.config.text_config.hidden_size)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda inputs: inputs.pop("unet_pixel_values"), "unet_pixel_values: MDF-MLLM needs one U-Net view per image"),
        (lambda inputs: inputs.update(unet_pixel_values=inputs["unet_pixel_values"][:, :, :16, :16]),
         r"unet_pixel_values: expected shape \(2, \[num_images,\] 3, 32, 32\), got \(2, 3, 16, 16\)"),
        (lambda inputs: inputs.update(unet_pixel_values=inputs["unet_pixel_values"][:1]),
         r"unet_pixel_values: expected shape \(2, "),
        (lambda inputs: inputs.update(unet_pixel_values=inputs["unet_pixel_values"][:, None].repeat(1, 2, 1, 1, 1)),
         r"unet_pixel_values: 2 U-Net view\(s\) per sample for 1 image\(s\)"),
        (lambda inputs: [inputs.pop(key) for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")],
         "unet_pixel_values: given without pixel_values or cross_attention_states"),
        (lambda inputs: inputs.update(prompt_mask=inputs["attention_mask"][:, :4]),
         r"prompt_mask: expected shape \(batch, sequence_length\) = \(2, 9\), got \(2, 4\)"),
    ],
)
def test_inconsistent_unet_inputs_are_a_clear_error_naming_the_argument(change, message):
    _, mdf = stock_and_mdf("a")
    inputs = make_inputs(mdf.config)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        mdf(**inputs)


def test_two_images_with_one_unet_view_is_a_clear_error():
    _, mdf = stock_and_mdf("a")
    inputs = two_images(make_inputs(mdf.config))
    with pytest.raises(ValueError, match=r"unet_pixel_values: 1 U-Net view\(s\) per sample for 2 image\(s\)"):
        mdf(**{**inputs, "unet_pixel_values": inputs["unet_pixel_values"][:, 0]})


def test_cross_attention_states_need_the_unet_views_and_give_what_pixel_values_give():
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config)
    states = cross_attention_states(mdf, inputs)
    precomputed = {k: v for k, v in inputs.items() if k not in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    torch.testing.assert_close(logits(mdf, {**precomputed, "cross_attention_states": states}), logits(mdf, inputs))
    del precomputed["unet_pixel_values"]
    with pytest.raises(ValueError, match="unet_pixel_values: MDF-MLLM needs one U-Net view per image"):
        mdf(**precomputed, cross_attention_states=states)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class NotThisProject(MetaPathFinder):  # the exported folder must be enough
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"configuration_mdf_mllm", "modeling_mdf_mllm", "image_processing_mdf_mllm",
                                      "processing_mdf_mllm"}:
                raise ImportError(name)

    sys.meta_path.insert(0, NotThisProject())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    folder, inputs_file, out_file = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)).__name__ == type(model).__name__
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "mdf_mllm"
    with torch.no_grad():
        save_file({"logits": model(**load_file(inputs_file)).logits.contiguous()}, out_file)
    """
)


def test_export_loads_with_automodel_in_a_fresh_process(tmp_path):
    _, mdf = stock_and_mdf("a")
    move_off_init(mdf)
    folder = tmp_path / "exported"
    mdf.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "configuration_mdf_mllm.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_mdf_mllm.py",
    ]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    inputs = make_inputs(mdf.config)
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.st")],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    assert torch.equal(load_file(tmp_path / "out.st")["logits"], logits(mdf, inputs))


def test_plain_mllama_checkpoint_loads_with_exactly_the_new_keys_reported(tmp_path):
    stock = MllamaForConditionalGeneration(tiny_mllama_config())
    stock.save_pretrained(tmp_path)
    mdf, info = MdfMllmForConditionalGeneration.from_pretrained(
        tmp_path, unet_config=mdf_config().unet_config, fusion_grid=2, output_loading_info=True
    )
    assert mdf.config.model_type == "mdf_mllm"
    new_parameters = {name for name, _ in mdf.named_parameters() if is_mdf_parameter(name, mdf)}
    assert set(info["missing_keys"]) == new_parameters
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    stock_weights = stock.state_dict()
    assert all(torch.equal(stock_weights[key], mdf.state_dict()[key]) for key in stock_weights)
    # What transformers leaves uninitialised after from_pretrained shows up as huge values or NaN.
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in mdf.parameters())
    gates = [p for name, p in mdf.named_parameters() if name.endswith("unet_attn.gate")]
    assert len(gates) == 2 and all(torch.equal(g, torch.zeros(1)) for g in gates)
    assert all(torch.equal(f.mlp[-1].weight, torch.zeros_like(f.mlp[-1].weight)) for f in mdf.model.unet.film)


def test_checkpoint_missing_a_base_weight_is_an_error(tmp_path):
    MllamaForConditionalGeneration(tiny_mllama_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["language_model.lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"base weights did not load.*lm_head\.weight"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path, unet_config=mdf_config().unet_config, fusion_grid=2)


def test_checkpoint_of_the_wrong_shape_is_an_error(tmp_path):
    MllamaForConditionalGeneration(tiny_mllama_config(hidden_size=48)).save_pretrained(tmp_path)
    config = MdfMllmConfig.from_mllama_config(tiny_mllama_config(), unet_config=mdf_config().unet_config, fusion_grid=2)
    # The project's own message, naming the weight and both shapes (not transformers' pointer to its log report).
    with pytest.raises(ValueError, match=r"base weights did not load from .*wrong shape \[.*embed_tokens\.weight.*48"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path, config=config)


def test_default_fusion_map_of_the_11b_layout():
    config = MdfMllmConfig()
    assert config.fusion_layers == {3: 1, 8: 1, 13: 2, 18: 2, 23: 3, 28: 3, 33: 4, 38: 4}
    assert default_fusion_layers([1, 3]) == {1: 1, 3: 3}


def test_config_json_round_trip_keeps_integer_fusion_keys(tmp_path):
    config = mdf_config("b", fusion_layers={1: 2, 4: 4})
    config.save_pretrained(tmp_path)
    loaded = MdfMllmConfig.from_pretrained(tmp_path)
    assert loaded.fusion_layers == {1: 2, 4: 4}
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(fusion_layers={2: 1}), "fusion_layers: layer 2 is not a cross-attention layer"),
        (dict(fusion_layers={1: 0}), "fusion_layers: layer 1 maps to depth 0"),
        (dict(fusion_layers={1: 5}), "fusion_layers: layer 1 maps to depth 5"),
        (dict(fusion_grid=3), "unet_config.image_size: 32 must be divisible by fusion_grid"),
        (dict(verbalizers=["normal"] * 8), r"verbalizers: duplicate verbalizers \['normal'\]"),
        (dict(verbalizers=["a", "b"]), "verbalizers: 2 entries for 8 labels"),
        (dict(disease_types=["normal"] * 7 + ["viral"]), r"disease_types: \['viral'\]"),
        (dict(fusion_grid=0), "fusion_grid: expected a positive integer"),
        (dict(fusion_layers={1: 1.5}), "fusion_layers: expected integers"),
        (dict(unet_config={"image_size": 32, "depth": 5}), r"unet_config: unknown keys \['depth'\]"),
        (dict(unet_config={"image_size": 32, "base_channels": 0}), "unet_config.base_channels: expected a positive"),
        (dict(seg_loss_weight=float("nan")), "seg_loss_weight: expected a finite weight"),
        (dict(pre_image_text_masking="meta"), r"pre_image_text_masking: expected one of \('transformers', 'reference'\), got 'meta'"),
        (dict(verbalizers=["normal", ""] + [f"v{i}" for i in range(6)]), "verbalizers: every verbalizer must be"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mdf_config("a", **kwargs)


def test_mdf_fields_given_to_from_pretrained_are_merged_and_validated(tmp_path):
    MllamaForConditionalGeneration(tiny_mllama_config()).save_pretrained(tmp_path)
    config = MdfMllmConfig.from_pretrained(tmp_path, unet_config={"image_size": 64}, fusion_grid=2)
    assert config.unet_config == {"in_channels": 3, "base_channels": 32, "image_size": 64, "use_decoder": True}
    assert config.fusion_layers == {1: 1, 3: 3}
    with pytest.raises(ValueError, match="fusion_layers: layer 2 is not a cross-attention layer"):
        MdfMllmForConditionalGeneration.from_pretrained(tmp_path, fusion_layers={2: 1}, fusion_grid=2)


@pytest.mark.parametrize("key", ["pixel_values", "unet_pixel_values"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_a_clear_error(key, bad):
    _, mdf = stock_and_mdf("a")
    inputs = make_inputs(mdf.config)
    inputs[key][0, 0, 0] = bad
    with pytest.raises(ValueError, match=f"{key}: contains NaN or Inf"):
        mdf(**inputs)


def test_transformers_version_check_is_silent_in_range_warns_above_and_refuses_known_broken_releases():
    import warnings

    from configuration_mdf_mllm import MINIMUM_TRANSFORMERS, SUPPORTED_TRANSFORMERS, check_transformers_version

    assert SUPPORTED_TRANSFORMERS == (">=5.22", "<5.25")  # what CI tests: the oldest and the newest of the range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in ("5.22.0", "5.23.0", "5.24.3.dev0"):
            check_transformers_version(version)
    for version in ("5.25.0", "6.0.0"):
        with pytest.warns(UserWarning, match=rf"tested with transformers >=5.22,<5.25; transformers {version} is installed"):
            check_transformers_version(version)
    below = f"{MINIMUM_TRANSFORMERS}.0".split(".")
    below = f"{below[0]}.{int(below[1]) - 1}.9"
    for version in (below, "4.57.1"):
        with pytest.raises(ImportError, match=rf"needs transformers>={MINIMUM_TRANSFORMERS} .*{version} is installed"):
            check_transformers_version(version)


def test_no_split_modules_name_exactly_the_layer_classes_the_model_holds():
    _, mdf = stock_and_mdf("b", fusion_layers={1: 1})
    held = {type(module).__name__ for module in mdf.modules()}
    assert set(mdf._no_split_modules) <= held
    layers = {name for name in held if name.endswith(("DecoderLayer", "EncoderLayer"))}
    assert set(mdf._no_split_modules) == layers


def test_each_text_token_reads_the_unet_tokens_of_the_images_it_sees():
    _, mdf = stock_and_mdf("b")
    move_off_init(mdf)
    inputs = two_images(make_inputs(mdf.config, image_at=3))  # tokens 3..5 see image 1, tokens 6..8 both
    reference = logits(mdf, inputs)
    for image, sees_it in ((1, slice(6, None)), (0, slice(3, None))):
        views = inputs["unet_pixel_values"].clone()
        views[:, image] = torch.randn_like(views[:, image])
        changed = logits(mdf, {**inputs, "unet_pixel_values": views})
        torch.testing.assert_close(changed[:, : sees_it.start], reference[:, : sees_it.start], atol=0, rtol=0)
        assert (changed[:, sees_it] - reference[:, sees_it]).abs().amax(-1).min() > 1e-4, image  # every such token


def test_a_padded_second_image_changes_nothing():
    # Reference masking: in stock transformers' masking the text before the image attends uniformly to every vision
    # token, padding included, so a padded image changes the logits of the base model too.
    _, mdf = stock_and_mdf("a", pre_image_text_masking="reference")
    move_off_init(mdf)
    inputs = make_inputs(mdf.config)
    padded = two_images(inputs)
    padded["cross_attention_mask"][:, :, 1] = 0
    padded["aspect_ratio_ids"][:, 1] = 0
    padded["aspect_ratio_mask"][:, 1] = 0
    padded["unet_pixel_values"][:, 1] = 0
    torch.testing.assert_close(logits(mdf, padded), logits(mdf, inputs), atol=1e-5, rtol=0)


def test_segmentation_loss_covers_one_mask_per_unet_view():
    _, mdf = stock_and_mdf("a", seg_loss_weight=0.1)  # a vessel loss: the config's default has none
    one_image = make_inputs(mdf.config)
    inputs = two_images(one_image)
    size = mdf.config.unet_config["image_size"]
    vessel_mask = (torch.rand(2, 2, 1, size, size) > 0.8).float()
    with torch.no_grad():
        output = mdf(**inputs, vessel_mask=vessel_mask)
        one_view = mdf(**{**one_image, "unet_pixel_values": inputs["unet_pixel_values"][:, 1]}, vessel_mask=vessel_mask[:, 1])
    assert output.vessel_logits.shape == (2, 2, 1, size, size)
    torch.testing.assert_close(output.vessel_logits[:, 1], one_view.vessel_logits, atol=1e-6, rtol=0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(output.vessel_logits, vessel_mask)
    torch.testing.assert_close(output.loss, mdf.config.seg_loss_weight * bce)
    with pytest.raises(ValueError, match=r"vessel_mask: expected shape \(2, 2, 1, 32, 32\)"):
        mdf(**inputs, vessel_mask=vessel_mask[:, 0])


def test_segmentation_loss_leaves_out_zero_padded_views():
    _, mdf = stock_and_mdf("a", seg_loss_weight=0.1)  # a vessel loss: the config's default has none
    inputs = two_images(make_inputs(mdf.config))
    inputs["cross_attention_mask"][1, :, 1] = 0  # sample 1 has one image: its second view is padding
    inputs["unet_pixel_values"][1, 1] = 0
    size = mdf.config.unet_config["image_size"]
    vessel_mask = (torch.rand(2, 2, 1, size, size) > 0.8).float()
    vessel_mask[1, 1] = 0
    with torch.no_grad():
        output = mdf(**inputs, vessel_mask=vessel_mask)
    logits, masks = output.vessel_logits, vessel_mask
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real = [bce(logits[0, 0], masks[0, 0]), bce(logits[0, 1], masks[0, 1]), bce(logits[1, 0], masks[1, 0])]
    torch.testing.assert_close(output.loss, mdf.config.seg_loss_weight * sum(real) / 3)


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
