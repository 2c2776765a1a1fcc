"""mdf_mllm/training.py: the phase clock, the Trainer's optimizer groups and gates, checkpoints."""

from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback

from conftest import mdf_config
from mdf_mllm import model_setup, main_job as job, training
from modeling_mdf_mllm import (MdfMllmFiLM, MdfMllmForConditionalGeneration, MdfMllmUNet, MdfMllmUnetCrossAttention,
                               MdfMllmUnetProjector)
from processing_mdf_mllm import MdfMllmDataCollator


def test_phases_time_each_phase_once_and_leave_nested_ones_out_of_the_outer(monkeypatch):
    ticks = iter([0, 1, 3, 4, 5, 9, 10, 20, 22, 30, 30])
    monkeypatch.setattr(training, "clock", ticks.__next__)
    phases = training.Phases()  # starts at 0
    with phases("outer"):  # 1..10, less the 1 + 4 of the two inside it
        with phases("inner"):  # 3..4
            pass
        with phases.scoped("seed 0")("inner"):  # 5..9
            pass
    with phases("inner"):  # 20..22, added to the first "inner"
        pass
    assert phases.as_json() == {"phases": {"outer": 4, "inner": 3, "seed 0: inner": 4}, "wall_seconds": 30,
                                "other_seconds": 19}
    assert phases.markdown().splitlines()[2:] == [
        "| outer | 4.0 | 13% |", "| inner | 3.0 | 10% |", "| seed 0: inner | 4.0 | 13% |",
        "| (outside every phase) | 19.0 | 63% |", "| wall | 30.0 | 100% |"]


class GradientRecorder(TrainerCallback):
    def __init__(self):
        self.gate_grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gate_grads.append({k: b.gate.grad.item() for k, b in training.unet_branches(model).items()})


@pytest.mark.parametrize("lora, rates", [(False, {"mdf": 1e-2, "gate": 5e-2}), (True, {"mdf": 1e-2})],
                         ids=["full-own-gate-rate", "lora"])
def test_gates_get_gradients_and_open_and_mdf_parameters_have_their_own_learning_rate(made_base, tiny_data, tmp_path,
                                                                                       lora, rates):
    model_args, processor, _, splits = tiny_data
    # Flamingo's closed gates: the gate is the only branch tensor with a gradient at step 1, and must get one.
    model_args = replace(model_args, base_model=str(made_base / "base"), lora=lora, lora_rank=4, unet_gate_start=0.0)
    model = model_setup.build_model(model_args, processor)
    args = job.parse_arguments(["--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size",
                                "8", "--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", "0"]).training
    recorder = GradientRecorder()
    trainer = training.train_model(model, splits, MdfMllmDataCollator(processor), args, callbacks=[recorder],
                             learning_rates=rates)
    assert len(recorder.gate_grads) == 3 and all(grad != 0 for step in recorder.gate_grads for grad in step.values())
    assert all(abs(gate) > 1e-3 for gate in training.gate_values(model)["gates"].values())
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    by_rate, decay = {}, {}
    for group in trainer.optimizer.param_groups:
        by_rate.setdefault(group["initial_lr"], set()).update(names[id(p)] for p in group["params"])
        decay.update({names[id(p)]: group["weight_decay"] for p in group["params"]})
    gates = {n for n in names.values() if n.endswith(".gate") and "unet_attn" in n}
    mdf = {n for n in names.values() if ".unet" in n} - (gates if "gate" in rates else set())
    assert len(gates) == 2 and len(mdf) > 50
    assert by_rate == {1e-3: set(names.values()) - mdf - (gates if "gate" in rates else set()), 1e-2: mdf,
                       **({5e-2: gates} if "gate" in rates else {})}
    assert all(decay[n] == 0.0 for n in gates)  # weight decay would pull the gates shut


def test_open_gates_with_zero_values_train_the_branch_from_the_first_step(made_base, tiny_data, tmp_path):
    # A closed gate gives every branch tensor a zero gradient; a zero value projection behind an open gate gets one
    # at once, and the gate's own gradient (the branch's output) follows from the second step.
    model_args, processor, _, splits = tiny_data
    model_args = replace(model_args, base_model=str(made_base / "base"), unet_gate_start=0.5)
    model = model_setup.build_model(model_args, processor)
    args = job.parse_arguments(["--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size",
                                "8", "--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", "0"]).training
    recorder = GradientRecorder()
    keys = {k: b.key_projection.weight.clone() for k, b in training.unet_branches(model).items()}
    training.train_model(model, splits, MdfMllmDataCollator(processor), args, callbacks=[recorder])
    assert [set(step.values()) == {0.0} for step in recorder.gate_grads] == [True, False]
    for layer, branch in training.unet_branches(model).items():
        assert branch.value_projection.weight.abs().min() > 0
        assert not torch.equal(branch.key_projection.weight, keys[layer])


def test_latest_checkpoint_skips_a_half_written_one(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert training.resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-6")
    with pytest.raises(ValueError, match="checkpoint-9 is not a complete checkpoint"):
        training.resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def expected_kind(name: str) -> str:
    """The recipe's optimizer group of a parameter, read off its name here (not through training.parameter_kinds)."""
    if "unet_attn" in name and name.endswith(".gate"):
        return "gate"
    if ".unet.film." in name:
        return "film"
    if ".unet." in name:
        return "unet"
    return "mdf" if "unet_projector" in name or "unet_attn" in name else "base"


def test_the_recipes_optimizer_groups_hold_each_module_at_its_rate(made_base, tiny_data, tmp_path):
    """Default recipe: base 1e-3, projector and branches 3e-3, gates at that rate without decay, FiLM 3e-4, and the
    stage-1 U-Net frozen (in no group, bit-identical after training)."""
    model_args, processor, _, splits = tiny_data
    model_args = replace(model_args, base_model=str(made_base / "base"))
    model = model_setup.build_model(model_args, processor)
    unet = {k: v.clone() for k, v in model.model.unet.state_dict().items() if not k.startswith("film.")}
    film = {k: v.clone() for k, v in model.model.unet.film.state_dict().items()}
    args = job.parse_arguments(["--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size",
                                "8", "--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", "0"]).training
    trainer = training.train_model(model, splits, MdfMllmDataCollator(processor), args,
                             learning_rates=model_args.learning_rates())
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            seen[names[id(param)]] = (group["initial_lr"], group["weight_decay"])
    rate = {"base": 1e-3, "mdf": 3e-3, "gate": 3e-3, "film": 3e-4}
    decayed = set(trainer.get_decay_parameter_names(model))  # the Trainer's own rule: no decay on biases and norms
    # The FiLM of the stages below the deepest fused depth does not run: frozen by the model, in no group.
    idle = {names[id(p)] for module in model.model.idle_unet_modules() for p in module.parameters()}
    assert idle and all(expected_kind(n) in ("unet", "film") for n in idle)
    expected = {n: (rate[expected_kind(n)], 0.01 if n in decayed and expected_kind(n) != "gate" else 0.0)
                for n in names.values() if expected_kind(n) != "unet" and n not in idle}
    assert seen == expected
    assert {expected_kind(n) for n in seen} == {"base", "mdf", "gate", "film"}
    assert all(torch.equal(v, model.model.unet.state_dict()[k]) for k, v in unet.items())
    assert not all(torch.equal(v, model.model.unet.film.state_dict()[k]) for k, v in film.items())


def rate_kinds_by_class(model) -> dict[str, str]:
    """Each parameter's learning-rate kind, read here from the class of the module holding it (not through
    modeling_mdf_mllm.MDF_KINDS): FiLM, the rest of the U-Net, a branch's gate, the projector and the branches' other
    weights, the base."""
    kinds = {}
    for module in model.modules():
        if isinstance(module, MdfMllmUNet):
            film = {id(p) for m in module.modules() if isinstance(m, MdfMllmFiLM) for p in m.parameters()}
            kinds.update({id(p): "film" if id(p) in film else "unet" for p in module.parameters()})
        elif isinstance(module, MdfMllmUnetProjector):
            kinds.update({id(p): "mdf" for p in module.parameters()})
        elif isinstance(module, MdfMllmUnetCrossAttention):
            kinds.update({id(p): "gate" if p is module.gate else "mdf" for p in module.parameters()})
    return {name: kinds.get(id(p), "base") for name, p in model.named_parameters()}


@pytest.mark.parametrize("options, unset", [
    ([], ()),  # the recipe: gates at the MDF modules' rate, the U-Net frozen
    (["--mdf_learning_rate", "2e-3", "--gate_learning_rate", "5e-2", "--unet_learning_rate", "4e-4",
      "--film_learning_rate", "7e-4"], ()),  # every kind a rate of its own
    (["--mdf_learning_rate", "2e-3"], ("unet", "film")),  # gates, FiLM and U-Net at the MDF modules' rate
    (["--gate_learning_rate", "5e-2"], ("mdf", "unet", "film")),  # no MDF rate: FiLM and U-Net at the base's
], ids=["recipe", "every-rate-its-own", "mdf-rate-only", "mdf-unset"])
def test_each_parameter_trains_at_the_rate_its_option_sets(options, unset, tmp_path):
    settings = job.parse_arguments([*options, "--learning_rate", "1e-3", "--eval_strategy", "no", "--output_dir",
                                    str(tmp_path)])
    model_args = replace(settings.model, **{f"{kind}_learning_rate": None for kind in unset})
    own = {"gate": model_args.gate_learning_rate, "film": model_args.film_learning_rate,
           "unet": model_args.unet_learning_rate, "mdf": model_args.mdf_learning_rate, "base": None}
    mdf_rate = 1e-3 if own["mdf"] is None else own["mdf"]

    def expected(kind):  # a kind without a rate: the MDF modules' rate, theirs the base's
        return own[kind] if own[kind] is not None else 1e-3 if kind in ("mdf", "base") else mdf_rate

    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(mdf_config())
    kinds = rate_kinds_by_class(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # the idle FiLM is frozen by the model
    trainer = training.MdfTrainer(model=model, args=settings.training, learning_rates=model_args.learning_rates())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = trainer.create_optimizer().param_groups
    rates = {names[id(p)]: group["lr"] for group in groups for p in group["params"]}
    assert {kinds[n] for n in trainable} == {"base", "mdf", "gate", "unet", "film"}
    assert rates == {n: expected(kinds[n]) for n in trainable if expected(kinds[n]) != 0}
    decays = {group["weight_decay"] for group in groups for p in group["params"] if kinds[names[id(p)]] == "gate"}
    assert decays == {0.0}  # no weight decay pulls a gate shut
    assert not any(p.requires_grad for n, p in model.named_parameters() if expected(kinds[n]) == 0)
