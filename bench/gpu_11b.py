"""The 11B layout on one GPU, bf16, random weights: a LoRA training step and a classify() forward, MDF-MLLM and plain
Mllama side by side. One prepared script for a lent GPU machine (at most ~8 minutes on an H200):

    python bench/gpu_11b.py                    # prints a Markdown section for bench/REPORT.md
    python bench/gpu_11b.py --layout tiny      # the same code path on the CPU in seconds (a smoke test)

Per model: step time (median), text tokens/s, peak GPU memory, achieved TFLOP/s against the forward FLOPs of
bench/scale_11b.py (x3 for forward + backward, the usual convention; gradient checkpointing recomputes on top).
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_mdf_mllm import MdfMllmConfig  # noqa: E402
from modeling_mdf_mllm import MdfMllmForConditionalGeneration  # noqa: E402
from scale_11b import TEXT_TOKENS, llama_32_11b_vision_config  # noqa: E402
from mdf_mllm.model_setup import with_lora  # noqa: E402
from mdf_mllm.job import ModelArguments  # noqa: E402


BATCH, CLASSIFY_BATCH, WARMUP, REPEATS = 4, 16, 2, 5


def tiny_layout():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_MDF, tiny_mllama_config

    return tiny_mllama_config(), TINY_MDF


def batch(config, size: int, device, unet: bool, answers: bool) -> dict:
    vision, text = config.vision_config, config.text_config
    ids = torch.randint(0, text.vocab_size, (size, TEXT_TOKENS), device=device)
    ids[:, 1] = config.image_token_index
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        cross_attention_mask=torch.ones(size, TEXT_TOKENS, 1, vision.max_num_tiles, dtype=torch.long, device=device),
        pixel_values=torch.randn(size, 1, vision.max_num_tiles, 3, vision.image_size, vision.image_size, device=device),
        # A square photo fills a 2x2 tile grid where the layout has one (1-based index into the supported ratios).
        aspect_ratio_ids=torch.full((size, 1), 1 + vision.supported_aspect_ratios.index(
            [2, 2] if [2, 2] in vision.supported_aspect_ratios else [1, 1]), device=device),
        aspect_ratio_mask=torch.ones(size, 1, vision.max_num_tiles, dtype=torch.long, device=device),
    )
    if unet:
        side = config.unet_config["image_size"]
        inputs["unet_pixel_values"] = torch.randn(size, 3, side, side, device=device)
    if answers:
        inputs["labels"] = ids.masked_fill(torch.arange(TEXT_TOKENS, device=device) < TEXT_TOKENS - 8, -100)
    return inputs


def timed(fn, device) -> float:
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(WARMUP):
        once()
    return statistics.median(once() for _ in range(REPEATS))


def measure(name, config, device, dtype, flops_per_sample) -> dict:
    unet = bool(getattr(config, "fusion_layers", None))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = MdfMllmForConditionalGeneration(config).to(dtype)
    model.gradient_checkpointing_enable()
    model = with_lora(model, ModelArguments(lora=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    train_inputs = batch(config, BATCH, device, unet, answers=True)

    def step():
        model.train()
        model(**train_inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed(step, device)
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    model.eval()
    verbalizers = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21]] * 2
    classify_inputs = batch(config, CLASSIFY_BATCH, device, unet, answers=False)
    with torch.no_grad():
        classify_s = timed(lambda: model.base_model.model.classify(**classify_inputs, verbalizer_ids=verbalizers), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "name": name,
        "step_s": step_s,
        "tokens_per_s": BATCH * TEXT_TOKENS / step_s,
        "tflops": 3 * flops_per_sample * BATCH / step_s / 1e12,
        "peak_train_gib": peak_train,
        "classify_s": classify_s,
        "classify_items_per_s": CLASSIFY_BATCH / classify_s,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["11b", "tiny"], default="11b")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.layout == "11b":
        from scale_11b import measure as scale

        base_config, mdf_kwargs = llama_32_11b_vision_config(), {}
        flops = scale()
        flops = {"mdf": flops["mdf_forward_flops"], "base": flops["base_forward_flops"]}
    else:
        base_config, mdf_kwargs = tiny_layout()
        flops = {"mdf": 0.0, "base": 0.0}
    mdf_config = MdfMllmConfig.from_mllama_config(base_config, **mdf_kwargs)
    base_config = MdfMllmConfig.from_mllama_config(base_config, **mdf_kwargs, fusion_layers={})
    torch.manual_seed(0)
    rows = [
        measure("MDF-MLLM", mdf_config, device, dtype, flops["mdf"]),
        measure("Mllama", base_config, device, dtype, flops["base"]),
    ]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"## 11B layout on {gpu}, bf16, random weights ({datetime.date.today()})",
        "",
        f"LoRA (rank 16, text attention + MLP; MDF modules fully trained) with gradient checkpointing, batch {BATCH} "
        f"x (1 image of 4 tiles of 560 px + {TEXT_TOKENS} text tokens), AdamW; classify(): batch {CLASSIFY_BATCH}, "
        f"8 verbalizers. Medians of {REPEATS} after {WARMUP} warm-up. TFLOP/s = 3 x forward FLOPs (bench/scale_11b.py)"
        " / step time.",
        "",
        "| model | step s | text tokens/s | TFLOP/s | peak GiB (train) | classify() s | items/s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
            f"{r['peak_train_gib']:.1f} | {r['classify_s']:.3f} | {r['classify_items_per_s']:.1f} | {r['peak_gib']:.1f} |"
        )
    lines.append(f"\nMDF / Mllama step time: {rows[0]['step_s'] / rows[1]['step_s']:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
