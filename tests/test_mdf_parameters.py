"""MDF parameters are found by module class (`modeling_mdf_mllm.mdf_parameter_kinds` and friends), not by name: the
optimizer groups, LoRA's modules_to_save, 4-bit loading, checkpoint loading, opening the gates and the probe ladder
still find every MDF module after its attribute is renamed, or fail loudly."""

import re

import pytest
import torch

from conftest import mdf_config
from mdf_mllm import model_setup, training
from modeling_mdf_mllm import (
    MdfMllmForConditionalGeneration,
    MdfMllmUnetCrossAttention,
    _modules_of,
    is_mdf_parameter,
    mdf_module_attributes,
    mdf_parameter_kinds,
    require_unquantized_mdf,
    unet_branches,
)


def old_parameter_kind(name: str) -> str:
    """The optimizer group as it was read off names before the kinds came from classes (the behaviour to keep)."""
    if re.search(r"unet_attn\.(modules_to_save\.default\.)?gate$", name):
        return "gate"
    if re.search(r"\.unet\.(modules_to_save\.default\.)?film\.", name):
        return "film"
    if re.search(r"\.unet\.", name):
        return "unet"
    return "mdf" if "unet" in name else "base"


def rename(parent: torch.nn.Module, old: str, new: str) -> None:
    """Re-register `parent.old` as `parent.new` (what renaming the attribute in the class would do)."""
    parent._modules[new] = parent._modules.pop(old)


def renamed_model():
    """A tiny MDF-MLLM whose U-Net, FiLM, projector and every U-Net branch hang under other attribute names, and the
    same model's parameters by identity -> their kind before the renaming."""
    model = MdfMllmForConditionalGeneration(mdf_config())
    before = {id(p): kind for name, p in model.named_parameters()
              for kind in [mdf_parameter_kinds(model).get(name, "base")]}
    inner = model.model
    rename(inner.unet, "film", "text_modulation")
    rename(inner, "unet", "retina")
    rename(inner, "unet_projector", "retina_tokens")
    for layer in inner.language_model.layers:
        if getattr(layer, "unet_depth", None) is not None:
            rename(layer, "unet_attn", "fundus_branch")
    return model, before


def test_kinds_of_every_mdf_parameter_match_the_old_name_rules_plain_and_under_lora():
    model = MdfMllmForConditionalGeneration(mdf_config())
    kinds = mdf_parameter_kinds(model)
    assert set(kinds.values()) == {"unet", "film", "projector", "branch", "gate", "tau"}
    assert training.parameter_kinds(model) == {name: old_parameter_kind(name) for name, _ in model.named_parameters()}
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, model.mdf_lora_config(r=2))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    new = training.parameter_kinds(lora)
    # The frozen originals under PEFT's wrapper never reach the optimizer; every trained parameter keeps its group.
    assert {name: new[name] for name in trainable} == {name: old_parameter_kind(name) for name in trainable}
    assert sum(kind == "gate" for name, kind in new.items() if name in trainable) == len(model.config.fusion_layers)


def test_lora_config_names_the_mdf_modules_in_the_order_it_always_did():
    pytest.importorskip("peft")
    model = MdfMllmForConditionalGeneration(mdf_config())
    assert mdf_module_attributes(model) == ["unet", "unet_projector", "unet_attn"]
    config = model.mdf_lora_config(r=2, modules_to_save=["lm_head"])
    assert list(config.modules_to_save) == ["unet", "unet_projector", "unet_attn", "lm_head"]


def test_renamed_attributes_are_still_found_everywhere():
    model, before = renamed_model()
    # Optimizer groups: the same parameters (by identity) in the same groups.
    kinds = training.parameter_kinds(model)
    old_group = {"projector": "mdf", "branch": "mdf", "tau": "mdf"}
    assert {id(p): kinds[name] for name, p in model.named_parameters()} == {
        key: old_group.get(kind, kind) for key, kind in before.items()}
    # LoRA's modules_to_save and the names checkpoint loading cuts keys at.
    assert mdf_module_attributes(model) == ["retina", "retina_tokens", "fundus_branch"]
    if pytest.importorskip("peft"):
        assert list(model.mdf_lora_config(r=2).modules_to_save) == ["retina", "retina_tokens", "fundus_branch"]
    # Checkpoint loading: which keys are MDF, and the modules named in its errors.
    keys = list(model.state_dict())
    mdf_keys = [key for key in keys if is_mdf_parameter(key, model)]
    assert len(mdf_keys) == sum(kind != "base" for kind in before.values())
    assert _modules_of(mdf_keys, mdf_module_attributes(model)) == [
        "model.language_model.layers.1.fundus_branch", "model.language_model.layers.3.fundus_branch", "model.retina",
        "model.retina_tokens"]
    # Gates: found, opened, and the freshly initialised branches opened over zero value projections.
    branches = unet_branches(model)
    assert list(branches) == [1, 3] and all(isinstance(b, MdfMllmUnetCrossAttention) for b in branches.values())
    model_setup.open_gates(model, 0.25)
    assert all(b.gate.item() == 0.25 for b in branches.values())
    model_setup.open_unet_branches(model, 0.5, [f"model.language_model.layers.{k}.fundus_branch.gate" for k in (3,)])
    assert branches[3].gate.item() == 0.5 and not branches[3].value_projection.weight.any()
    assert branches[1].gate.item() == 0.25 and branches[1].value_projection.weight.any()
    # The gate logger's (and the probe ladder's) branches.
    assert list(training.gate_values(model)["gates"]) == ["1", "3"]
    # 4-bit: a quantized MDF module is refused, whatever its name.
    require_unquantized_mdf(model)
    film = model.model.retina.text_modulation[0].mlp[0]
    film.weight = torch.nn.Parameter(film.weight.data.to(torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"MDF modules quantized: \['model\.retina'\]"):
        require_unquantized_mdf(model)


def test_a_renamed_gate_parameter_fails_loudly():
    model = MdfMllmForConditionalGeneration(mdf_config())
    branch = model.model.language_model.layers[1].unet_attn
    branch._parameters["g_u"] = branch._parameters.pop("gate")
    with pytest.raises(AttributeError, match="gate"):
        mdf_parameter_kinds(model)


def test_lora_targets_reaching_an_mdf_module_are_refused(monkeypatch):
    pytest.importorskip("peft")
    model = MdfMllmForConditionalGeneration(mdf_config())
    branch = model.model.language_model.layers[1]
    rename(branch.unet_attn, "key_projection", "k_proj")
    rename(branch, "unet_attn", "cross_attn_u")
    monkeypatch.setattr("modeling_mdf_mllm.LORA_TARGET_MODULES", r".*language_model.*\.(cross_attn\w*)\.(k_proj)")
    with pytest.raises(ValueError, match=r"matches MDF modules \['model\.language_model\.layers\.1\.cross_attn_u"):
        model.mdf_lora_config(r=2)
