"""Real widths on this CPU: a slice of the 11B layout (every width real, few layers), MDF-MLLM and Mllama side by side
(forward, full and LoRA forward + backward, classify() over 8 classes, generate() of 8 tokens), then the same slice
loaded in 4-bit (QLoRA) against the run's dtype, and the 40-layer memory extrapolated from it.

    OMP_NUM_THREADS=1 python bench/real_width.py --dtype float32   # prints a Markdown section for bench/REPORT.md
    python bench/real_width.py --smoke                              # small widths: checks that every row runs
    python bench/real_width.py --repeats 3                          # interleaved repetitions, medians (default 1)

dtype: bf16 by default only on a CPU with bf16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo), else fp32. On
an AVX2-only CPU PyTorch's bf16 conv2d takes a slow path (68x fp32 for one 3x3 conv of 32 channels at 512 px: each
MDF-MLLM call then spends ~8 minutes in the U-Net) and bf16 matmul ~4x fp32. fp32 doubles the weights (~8 GiB for the
slice; a full fwd+bwd adds as much in gradients). The 4-bit load computes in bf16 whatever --dtype says (build_model).

The slice: text width 4096, 32 heads over 8 KV heads, vocab 128,256, two self-attention and two cross-attention
layers (both fused); vision width 1280 at 560 px with 4 tiles, one local and one global layer, projector 7680 -> 4096;
U-Net at S 512 with its default widths, grid 16, projector_dim 256. Mllama is the same class with `fusion_layers={}`
(no U-Net; tests/test_stock_parity.py checks it computes what stock Mllama computes); both share one copy of the base
weights. Inputs: one image of 4 tiles, TEXT_TOKENS text tokens that all see it, the last 8 of them the answer in the training calls.

The vision tower and projector (6,404 tokens of 4 tiles; the same module and the same work for both models) run once,
measured on their own; every model row then replays their output, so its figures are what the model adds on top.

Peak memory: glibc is set to return every block of 256 KiB or more to the system when freed, the kernel's peak-RSS
counter (VmHWM) is reset before each call (/proc/self/clear_refs), and the figure is the peak RSS during the call
minus the RSS before it: the activations, gradients and caches the call holds at its worst moment, the weights not
included (they are resident before). The 4-bit / full-precision comparison loads the saved slice in a fresh process
each through build_model (--lora [--load_in_4bit] [--bf16]), as a user's job does, and reports whole-process RSS.
"""

import argparse
import ctypes
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MllamaConfig

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from configuration_mdf_mllm import MdfMllmConfig  # noqa: E402
from gpu_11b import batch  # noqa: E402
from modeling_mdf_mllm import MdfMllmForConditionalGeneration  # noqa: E402
from processing_mdf_mllm import build_default_processor  # noqa: E402
from mdf_mllm.model_setup import build_model, open_gates, with_lora  # noqa: E402
from mdf_mllm.job import ModelArguments  # noqa: E402
from mdf_mllm.tables import memory_table_11b  # noqa: E402
from scale_11b import llama_32_11b_vision_config, measure as count_11b  # noqa: E402


GIB = 2**30
CROSS_LAYERS = [1, 3]
NEW_TOKENS = 8
# Text is cheap next to the 6,404 vision tokens every cross-attention layer projects; two shared cores limit the rest.
TEXT_TOKENS = 32
ANSWER_TOKENS = 8


# ----------------------------------------------------------------------------------------------------------------------
# Memory


def _rss() -> dict[str, float]:
    """{"VmRSS": bytes, "VmHWM": bytes} of this process."""
    status = Path("/proc/self/status").read_text()
    return {key: int(kib) * 1024 for key, kib in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", status)}


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: big blocks go back to the system when freed, so RSS follows them


def measured(fn) -> tuple[float, float, object]:
    """(seconds, peak RSS above the RSS before the call in bytes, result) of fn()."""
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss()["VmRSS"]
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, _rss()["VmHWM"] - before, result


def storage_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (4-bit weights at their packed size, quantisation
    statistics included)."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for sub in module.modules():  # bitsandbytes keeps absmax and the double-quantisation statistics on the weight
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in nested)
    return total


# ----------------------------------------------------------------------------------------------------------------------
# The slice


# --smoke: every width small but the vocabulary (the verbalizers' ids) and the U-Net, to check that every row runs.
SMOKE_VISION = {"hidden_size": 64, "attention_heads": 2, "intermediate_size": 128, "vision_output_dim": 384,
                "image_size": 112}
SMOKE_TEXT = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512}


def default_dtype() -> tuple[str, str]:
    """(dtype, why): bf16 where the CPU has bf16 instructions, else fp32 (bf16 matmul and conv2d take a slow path)."""
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    if flags:
        return "bfloat16", f"the CPU has {', '.join(sorted(flags))}"
    return "float32", "the CPU has neither avx512_bf16 nor amx_bf16, so bf16 matmul and conv2d take a slow path"


def slice_config(fused: bool, smoke: bool = False) -> MdfMllmConfig:
    """The 11B layout with 2 self- + 2 cross-attention text layers and 1 local + 1 global vision layer."""
    real = llama_32_11b_vision_config()
    vision = {**real.vision_config.to_dict(), "num_hidden_layers": 1, "num_global_layers": 1,
              # five intermediate outputs as in the 11B (vision_output_dim 7680), all from the one local layer
              "intermediate_layers_indices": [0] * 5, **(SMOKE_VISION if smoke else {})}
    text = {**real.text_config.to_dict(), "num_hidden_layers": 4, "cross_attention_layers": CROSS_LAYERS,
            **(SMOKE_TEXT if smoke else {})}
    base = MllamaConfig(vision_config=vision, text_config=text, image_token_index=real.image_token_index)
    return MdfMllmConfig.from_mllama_config(base, **({} if fused else {"fusion_layers": {}}))


def random_weights(model: nn.Module, dtype: torch.dtype, seed: int = 0) -> None:
    """Materialise a meta-device model in place: large matrices tiled from one random N(0, 0.02) pool (drawing 2
    billion normals would take minutes on two cores), everything else by the model's own initialisation."""
    model.to_empty(device="cpu")
    pool = (torch.randn(2**24 + 7, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.numel() > pool.numel():
                flat = module.weight.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    flat[start : start + pool.numel()] = pool[: flat.numel() - start]
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            else:
                model._init_weights(module)
    open_gates(model)  # trained gates are open: every branch contributes, as after fine-tuning


def build_pair(dtype: torch.dtype, smoke: bool = False) -> tuple[MdfMllmForConditionalGeneration,
                                                                 MdfMllmForConditionalGeneration]:
    """(MDF-MLLM, Mllama) in `dtype`, Mllama's weights being MDF-MLLM's own tensors (one copy in memory)."""
    models = []
    for fused in (True, False):
        with torch.device("meta"):
            models.append(MdfMllmForConditionalGeneration(slice_config(fused, smoke)).to(dtype))
    mdf, mllama = models
    random_weights(mdf, dtype)
    missing, _ = mllama.load_state_dict(mdf.state_dict(), strict=False, assign=True)
    assert not missing, missing
    for model in models:  # the rotary frequencies are computed buffers, which neither step above fills
        text = model.model.language_model
        text.rotary_emb = type(text.rotary_emb)(text.rotary_emb.config)
    return mdf.eval(), mllama.eval()


def slice_inputs(config) -> tuple[dict, dict]:
    """(prompt, training inputs): bench/gpu_11b.py's batch of one cut to TEXT_TOKENS, the last ANSWER_TOKENS the
    answer in the training inputs."""
    prompt = batch(config, 1, torch.device("cpu"), unet=True, answers=False)
    for key in ("input_ids", "attention_mask", "cross_attention_mask"):
        prompt[key] = prompt[key][:, :TEXT_TOKENS]
    answer = torch.arange(TEXT_TOKENS) >= TEXT_TOKENS - ANSWER_TOKENS
    return prompt, {**prompt, "labels": prompt["input_ids"].masked_fill(~answer, -100)}


class Replay(nn.Module):
    """Stands in for the vision tower or the projector: returns the output they computed once."""

    def __init__(self, output, **attributes):
        super().__init__()
        self.output = output
        self.__dict__.update(attributes)  # what the model reads off the module it stands in for

    def forward(self, *args, **kwargs):
        return self.output


def run_vision_once(mdf, inputs) -> dict:
    """Run the vision tower and projector once (timed, peak measured) and make every model replay their output."""
    vision, projector = mdf.model.vision_model, mdf.model.multi_modal_projector
    with torch.no_grad():
        seconds, peak, vision_out = measured(lambda: vision(
            pixel_values=inputs["pixel_values"].to(mdf.dtype), aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"]))
        projector_seconds, projector_peak, projected = measured(lambda: projector(vision_out.last_hidden_state))
    row = {"seconds": seconds + projector_seconds, "peak": max(peak, projector_peak),
           "tokens": vision_out.last_hidden_state.shape[-2] * vision_out.last_hidden_state.shape[-3]}
    return row, vision_out, projected


def replay_vision(model, vision_out, projected) -> None:
    vision = Replay(vision_out, num_patches=model.model.vision_model.num_patches)
    model.model.vision_model, model.model.multi_modal_projector = vision, Replay(projected)


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def step(model, inputs):
    """A call running forward + backward (no optimizer step) and returning the loss."""
    def run():
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach()

    return run


def operations(model, prompt, train_inputs, verbalizers) -> dict:
    """name -> a call to measure on `model` (the no-gradient ones in eval mode)."""
    def no_grad(fn):
        def call():
            model.eval()
            with torch.no_grad():
                return fn()
        return call

    return {
        "forward": no_grad(lambda: model(**prompt, use_cache=False).logits),
        "classify() 8 classes": no_grad(lambda: model.classify(**prompt, verbalizer_ids=verbalizers)),
        f"generate() {NEW_TOKENS} tokens": no_grad(lambda: model.generate(
            **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)),
        "full fwd+bwd (all parameters)": step(model, train_inputs),
    }


def finite(result) -> bool:
    return bool(torch.isfinite(result.float()).all())


def compare(models: dict, repeats: int, operations_of) -> dict:
    """Interleave the models over `repeats` rounds; {(model, op): {"seconds": median, "peak": max}}.

    `operations_of(model)` -> {op name: call}; every call's result must be finite."""
    ops = {name: operations_of(model) for name, model in models.items()}
    samples = {}
    for _ in range(repeats):
        for op in next(iter(ops.values())):
            for name, model in models.items():
                seconds, peak, result = measured(ops[name][op])
                model.zero_grad(set_to_none=True)
                assert finite(result), f"{name} {op}: non-finite output"
                samples.setdefault((name, op), []).append((seconds, peak))
                print(f"  {name:9s} {op:22s} {seconds:8.2f} s  {peak / GIB:6.2f} GiB", flush=True)
    return {key: {"seconds": statistics.median(s for s, _ in values), "peak": max(p for _, p in values)}
            for key, values in samples.items()}


def activation_bytes_per_layer(model, train_inputs) -> dict[str, float]:
    """One LoRA step: (loss, bytes autograd saved for backward per text layer of each kind ("self", "cross") and
    elsewhere ("rest"))."""
    layers = model.base_model.model.model.language_model.layers
    kind_of = {id(layer): "cross" if i in CROSS_LAYERS else "self" for i, layer in enumerate(layers)}
    current, totals = ["rest"], {"self": 0, "cross": 0, "rest": 0}
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations

    def enter(module, *_):
        current.append(kind_of[id(module)])

    def leave(module, *_):
        current.pop()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            totals[current[-1]] += storage.nbytes()
        return tensor

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = step(model, train_inputs)()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    per_layer = {"self": totals["self"] / (len(layers) - len(CROSS_LAYERS)), "cross": totals["cross"] / len(CROSS_LAYERS)}
    return loss, {**per_layer, "rest": totals["rest"]}


def layer_bytes(model) -> dict[str, float]:
    """Weight bytes of one text self-attention layer, one (fused) cross-attention layer, one vision layer (local and
    global averaged) and everything else."""
    text = model.model.language_model.layers
    vision = model.model.vision_model
    per = {"self": statistics.mean(storage_bytes(layer) for i, layer in enumerate(text) if i not in CROSS_LAYERS),
           "cross": statistics.mean(storage_bytes(text[i]) for i in CROSS_LAYERS)}
    vision_layers = [*vision.transformer.layers, *vision.global_transformer.layers]
    per["vision"] = statistics.mean(storage_bytes(layer) for layer in vision_layers)
    per["rest"] = (storage_bytes(model) - sum(storage_bytes(layer) for layer in text)
                   - sum(storage_bytes(layer) for layer in vision_layers))
    return per


# ----------------------------------------------------------------------------------------------------------------------
# 4-bit against bf16, each in a fresh process


def load_and_step(folder: str, load_in_4bit: bool, dtype: str) -> dict:
    """(child process) Load the saved slice through mdf_mllm.model_setup.build_model (in `dtype`; 4-bit computes in bf16) and run
    one LoRA step from the saved inputs."""
    start_rss = _rss()["VmRSS"]
    processor = build_default_processor()
    model_args = ModelArguments(base_model=folder, lora=True, load_in_4bit=load_in_4bit)
    load_seconds, _, model = measured(lambda: build_model(model_args, processor, bf16=dtype == "bfloat16"))
    loaded = _rss()["VmRSS"] - start_rss
    inputs = load_file(Path(folder) / "inputs.safetensors")
    # The vision states in the dtype the vision tower would give them: the model's (fp32 outside 4-bit under QLoRA).
    inputs["cross_attention_states"] = inputs["cross_attention_states"].to(model.get_input_embeddings().weight.dtype)
    seconds, peak, (loss, activations) = measured(lambda: activation_bytes_per_layer(model, inputs))
    return {"load_seconds": load_seconds, "loaded": loaded, "step_seconds": seconds, "step_peak": peak,
            "total_peak": loaded + peak, "loss": float(loss), "weights": layer_bytes(model.base_model.model),
            "activations": activations,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def in_child(folder: str, load_in_4bit: bool, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", folder, "--dtype", dtype] + (["--load_in_4bit"] if load_in_4bit
                                                                                 else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Report


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def extrapolate(child: dict, counts: dict) -> dict:
    """A LoRA step of the 40-layer model from the slice's per-layer figures: weights, trainable state, activations."""
    real = llama_32_11b_vision_config()
    n_cross = len(real.text_config.cross_attention_layers)
    n_self = real.text_config.num_hidden_layers - n_cross
    n_vision = real.vision_config.num_hidden_layers + real.vision_config.num_global_layers
    w, a = child["weights"], child["activations"]
    weights = w["rest"] + n_self * w["self"] + n_cross * w["cross"] + n_vision * w["vision"]
    activations = a["rest"] + n_self * a["self"] + n_cross * a["cross"]
    trainable = counts["mdf_params"] - counts["base_params"] + counts["lora_params"]
    state = 16 * trainable  # bf16/fp32 gradient, fp32 master copy and two Adam moments: counted as in the table
    return {"weights": weights, "activations": activations, "state": state, "total": weights + activations + state}


def report(vision_row, rows, children, extrapolated, run) -> str:
    """`run`: {"dtype", "why", "threads", "repeats", "smoke"}."""
    mdf, mllama, dtype = "MDF-MLLM", "Mllama", run["dtype"]
    lines = [
        f"## Real widths on this CPU (11B slice, {dtype}{', SMOKE widths' if run['smoke'] else ''})",
        "",
        "The 11B layout's widths with few layers (text 4096, 32 heads / 8 KV heads, vocab 128,256, 2 self- + 2 "
        "cross-attention layers, both fused; vision 1280 at 560 px x 4 tiles, 1 local + 1 global layer, projector "
        f"7680 -> 4096; U-Net S 512, base 32, grid 16, projector_dim 256), random {dtype} weights ({dtype}: "
        f"{run['why']}), one image and {TEXT_TOKENS} text tokens ({ANSWER_TOKENS} answer tokens in the training "
        f"calls), {run['threads']} thread(s); {'medians of ' + str(run['repeats']) if run['repeats'] > 1 else 'one run'}"
        " per figure, the models interleaved. Peak = RSS above the loaded weights (method in `bench/real_width.py`). "
        f"Vision tower + projector ({vision_row['tokens']:,} tokens), run once for both: "
        f"{vision_row['seconds']:.1f} s, peak {gib(vision_row['peak'])} GiB; the rows below replay their output, so "
        "the vision tower's and projector's gradients are not in the fwd+bwd rows. Full fwd+bwd: every other "
        "parameter requires grad; LoRA: PEFT's `mdf_lora_config()` adapters, the MDF modules training fully; "
        "fwd+bwd = forward and backward, no optimizer step.",
        "",
        "| call | MDF-MLLM s | Mllama s | MDF / Mllama time | MDF-MLLM peak GiB | Mllama peak GiB | MDF / Mllama peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in dict.fromkeys(op for _, op in rows):
        a, b = rows[(mdf, op)], rows[(mllama, op)]
        lines.append(f"| {op} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
                     f"{gib(a['peak'])} | {gib(b['peak'])} | {a['peak'] / max(b['peak'], 1):.2f} |")
    lines += ["", "| `classify()` 8 classes / one prompt forward | time | peak |", "|---|---:|---:|"]
    for name in (mdf, mllama):
        forward, classify = rows[(name, "forward")], rows[(name, "classify() 8 classes")]
        lines.append(f"| {name} | {classify['seconds'] / forward['seconds']:.2f} | "
                     f"{classify['peak'] / max(forward['peak'], 1):.2f} |")
    lines += [
        "",
        "Target: <= 1.2 for both.",
        "",
        f"### 4-bit (QLoRA) against {dtype}, the same slice",
        "",
        f"MDF-MLLM slice saved and loaded in a fresh process each by `build_model` with `--lora` ({dtype} base) or "
        "`--lora --load_in_4bit` (NF4 base, double quantisation, bf16 compute; `prepare_model_for_kbit_training`"
        " puts every weight left out of 4-bit in fp32: embeddings, lm_head, norms, projector, MDF modules). One LoRA "
        "step (forward + backward) from the replayed vision states. Activations: bytes autograd saved for backward.",
        "",
        f"| | {dtype} | 4-bit | 4-bit / {dtype} |",
        "|---|---:|---:|---:|",
    ]
    full, nf4 = children[dtype], children["4bit"]
    for label, key in (("process RSS after loading (GiB)", "loaded"), ("LoRA step peak above it (GiB)", "step_peak"),
                       ("whole-process peak (GiB)", "total_peak")):
        lines.append(f"| {label} | {gib(full[key])} | {gib(nf4[key])} | {nf4[key] / full[key]:.2f} |")
    for label, key, part in (("weights of one self-attention layer (MiB)", "weights", "self"),
                             ("weights of one fused cross-attention layer (MiB)", "weights", "cross"),
                             ("weights of one vision layer (MiB)", "weights", "vision"),
                             ("all other weights: embeddings, lm_head, vision stem, projector, U-Net (GiB)", "weights",
                              "rest"),
                             ("activations of one self-attention layer (MiB)", "activations", "self"),
                             ("activations of one fused cross-attention layer (MiB)", "activations", "cross"),
                             ("activations elsewhere: embeddings, lm_head, U-Net (MiB)", "activations", "rest")):
        scale = GIB if (key, part) == ("weights", "rest") else 2**20
        a, b = full[key][part], nf4[key][part]
        lines.append(f"| {label} | {a / scale:.1f} | {b / scale:.1f} | {b / max(a, 1):.2f} |")
    lines.append(f"| LoRA step time (s) | {full['step_seconds']:.1f} | {nf4['step_seconds']:.1f} | "
                 f"{nf4['step_seconds'] / full['step_seconds']:.2f} |")
    lines.append(f"| load time (s) | {full['load_seconds']:.1f} | {nf4['load_seconds']:.1f} | "
                 f"{nf4['load_seconds'] / full['load_seconds']:.2f} |")
    lines += [
        "",
        "### The 40-layer 11B extrapolated from the slice (LoRA / QLoRA step, batch 1)",
        "",
        "Weights: the slice's measured bytes per self-attention layer x 32, per fused cross-attention layer x 8, per "
        "vision layer x 40, plus the rest; activations: bytes autograd saved per text layer in the slice's LoRA step "
        "(no gradient checkpointing) x the same counts, plus the rest; trainable state: 16 B per trainable parameter "
        "(MDF modules + LoRA adapters, counted) as in the counted table. Counted: `mdf_mllm.tables.memory_table_11b`.",
        "",
        "| method | weights GiB | activations GiB | gradients + Adam GiB | total GiB | counted total GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, key, counted in ((f"LoRA ({dtype} base)", dtype, extrapolated["counted_lora"]),
                                 ("QLoRA (NF4 base)", "4bit", extrapolated["counted_qlora"])):
        e = extrapolated[key]
        lines.append(f"| {method} | {gib(e['weights'])} | {gib(e['activations'])} | {gib(e['state'])} | "
                     f"{gib(e['total'])} | {counted:.1f} |")
    return "\n".join(lines)


def counted_totals(counts: dict) -> tuple[float, float]:
    """The 1-GPU totals of LoRA and QLoRA in mdf_mllm.tables.memory_table_11b."""
    table = memory_table_11b(counts["base_params"], counts["mdf_params"] - counts["base_params"], counts["lora_params"])
    totals = {row.split("|")[1].strip(): float(row.split("|")[6]) for row in table.splitlines()
              if row.startswith("| LoRA") or row.startswith("| QLoRA")}
    return totals["LoRA"], totals["QLoRA"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dtype, why = default_dtype()
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=dtype,
                        help=f"weights and compute (default here: {dtype}, since {why})")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="small widths (vocabulary and U-Net real): every row runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--load_in_4bit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_and_step(args.child, args.load_in_4bit, args.dtype)))
        return
    run = {"dtype": args.dtype, "why": why if args.dtype == dtype else "chosen with --dtype",
           "threads": torch.get_num_threads(), "repeats": args.repeats, "smoke": args.smoke}
    print(f"dtype {args.dtype} ({run['why']}), {run['threads']} thread(s)", flush=True)

    start = time.perf_counter()
    mdf, mllama = build_pair(getattr(torch, args.dtype), args.smoke)
    print(f"built in {time.perf_counter() - start:.0f} s, RSS {gib(_rss()['VmRSS'])} GiB", flush=True)
    prompt, train_inputs = slice_inputs(mdf.config)
    vision_row, vision_out, projected = run_vision_once(mdf, prompt)
    print(f"vision tower + projector: {vision_row['seconds']:.1f} s, {gib(vision_row['peak'])} GiB", flush=True)

    with tempfile.TemporaryDirectory(prefix="real_width-") as folder:
        mdf.save_pretrained(folder)  # the real vision tower and projector, before they are replaced
        saved = {k: v for k, v in train_inputs.items() if k not in ("pixel_values", "aspect_ratio_ids",
                                                                    "aspect_ratio_mask")}
        # What Mllama's forward makes of the projector's output: (tiles, patches, hidden).
        states = projected.reshape(-1, projected.shape[-2], projected.shape[-1]).contiguous()
        save_file({**saved, "cross_attention_states": states}, Path(folder) / "inputs.safetensors")
        for model in (mdf, mllama):
            replay_vision(model, vision_out, projected)
        models = {"MDF-MLLM": mdf, "Mllama": mllama}
        verbalizers = build_default_processor().verbalizer_token_ids
        rows = compare(models, args.repeats, lambda model: operations(model, prompt, train_inputs, verbalizers))
        # Last: LoRA freezes the base weights, which the two models share.
        models = {name: with_lora(model, ModelArguments(lora=True)) for name, model in models.items()}
        rows.update(compare(models, args.repeats, lambda model: {"LoRA fwd+bwd": step(model, train_inputs)}))
        del models, mdf, mllama, model
        gc.collect()  # the parent's weights go before the children load theirs
        children = {}
        for key, load_in_4bit in ((args.dtype, False), ("4bit", True)):
            children[key] = in_child(folder, load_in_4bit, args.dtype)
            print(f"  {key}: {children[key]}", flush=True)
    counts = count_11b()
    lora_total, qlora_total = counted_totals(counts)
    extrapolated = {key: extrapolate(children[key], counts) for key in children}
    extrapolated.update(counted_lora=lora_total, counted_qlora=qlora_total)
    print(report(vision_row, rows, children, extrapolated, run))
    print(f"\n_real_width.py: {time.perf_counter() - start:.0f} s_")


if __name__ == "__main__":
    main()
