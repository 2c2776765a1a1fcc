"""4-bit (QLoRA) loading through model_setup.build_model: NF4 base, MDF modules / projector / lm_head in full
precision."""

import pytest
import torch

from conftest import make_inputs, require_module


bnb = require_module("bitsandbytes", "pip install 'mdf-mllm[quantization]'")

from modeling_mdf_mllm import MdfMllmForConditionalGeneration, is_mdf_parameter  # noqa: E402
from processing_mdf_mllm import MdfMllmProcessor  # noqa: E402
from mdf_mllm.model_setup import UsageError, build_model  # noqa: E402
from mdf_mllm.job import ModelArguments  # noqa: E402


KEPT = ("lm_head", "multi_modal_projector")  # base modules QLoRA keeps out of 4-bit, besides the MDF modules


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: without PEFT's wrapper prefix and its trained copy's infix."""
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")


@pytest.fixture(scope="module")
def qlora(model_folder):
    """The tiny exported checkpoint loaded as `--load_in_4bit --lora --bf16` loads a base."""
    processor = MdfMllmProcessor.from_pretrained(model_folder)
    return build_model(ModelArguments(base_model=model_folder, lora=True, load_in_4bit=True), processor, bf16=True)


def test_base_linear_layers_are_nf4_and_the_rest_full_precision(qlora, model_folder):
    plain = MdfMllmForConditionalGeneration.from_pretrained(model_folder)
    base_linears = {name for name, module in plain.named_modules() if type(module) is torch.nn.Linear
                    and not is_mdf_parameter(name, plain) and not name.endswith(KEPT)}
    assert len(base_linears) > 20
    quantized = {}
    for name, module in qlora.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):  # under LoRA the 4-bit layer is the adapter's `base_layer`
            quantized[name.removesuffix(".base_layer")] = module
    assert set(quantized) == base_linears
    for module in quantized.values():
        state = module.weight.quant_state
        assert module.weight.dtype == torch.uint8 and not module.weight.requires_grad
        assert (state.quant_type, state.nested, module.compute_dtype) == ("nf4", True, torch.bfloat16)

    parameters = dict(qlora.named_parameters())
    mdf = {plain_name(name): p for name, p in parameters.items() if is_mdf_parameter(name, qlora) and p.requires_grad}
    assert set(mdf) == {name for name, _ in plain.named_parameters() if is_mdf_parameter(name, plain)}
    for name, p in mdf.items():
        assert p.dtype == torch.float32, name
    for name in KEPT:
        weight = parameters[f"base_model.model.{name}.weight" if name == "lm_head" else
                            f"base_model.model.model.{name}.weight"]
        assert weight.dtype == torch.float32 and weight.shape == plain.get_submodule(
            name if name == "lm_head" else f"model.{name}").weight.shape
    trainable = {name for name, p in parameters.items() if p.requires_grad and not is_mdf_parameter(name, qlora)}
    assert trainable and all("lora_" in name for name in trainable)


def test_one_training_step_changes_the_mdf_modules_and_not_the_4bit_base(qlora):
    config = qlora.config
    inputs = make_inputs(config, length=12)
    inputs["labels"] = inputs["input_ids"].masked_fill(torch.arange(12) < 8, -100)
    trainable = {name: p for name, p in qlora.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    frozen = {name: p.detach().clone() for name, p in qlora.named_parameters() if p.dtype == torch.uint8}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    qlora.train()
    loss = qlora(**inputs).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # Every parameter the loss reaches moves; the U-Net branch of each fused layer and its encoder all do.
    reached = {name for name, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    changed = {name for name, p in trainable.items() if not torch.equal(p, before[name])}
    assert changed == reached
    changed = {plain_name(name) for name in changed}
    for layer in (1, 3):
        assert {f"model.language_model.layers.{layer}.unet_attn.{name}" for name in ("gate", "logit_scale")} <= changed
    for part in ("model.unet.stages.0.0.weight", "model.unet.film.0.mlp.2.weight", "model.unet_projector.projections",
                 "lora_B"):
        assert any(part in name for name in changed), part
    assert all(torch.equal(p, frozen[name]) for name, p in qlora.named_parameters() if p.dtype == torch.uint8)


@pytest.mark.parametrize("change", [dict(lora=False), dict(base_model=None)])
def test_4bit_needs_lora_and_a_base(change):
    arguments = {"base_model": "base", "lora": True, "load_in_4bit": True, **change}
    with pytest.raises(UsageError, match="--load_in_4bit: needs --lora and a base checkpoint"):
        build_model(ModelArguments(**arguments), processor=None)
