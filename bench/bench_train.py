"""Train-step time of the small default MDF-MLLM against the plain Mllama of the same size, fp32 and bf16 autocast.

    python bench/bench_train.py

One step = forward + backward + AdamW step on a batch of 16 processed synthetic photos with their answers and vessel
masks. MDF-MLLM runs twice: with a vessel loss of 0.1 (the U-Net decoder runs) and with it off (the config's default
and the main job's stage 2: the decoder does not run). The six variants run interleaved, so the ratios compare runs that saw the
same machine load.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset_builder.synthetic import generate  # noqa: E402
from modeling_mdf_mllm import MdfMllmForConditionalGeneration  # noqa: E402
from processing_mdf_mllm import build_default_processor  # noqa: E402
from mdf_mllm.model_setup import small_default_config  # noqa: E402


BATCH, WARMUP, REPEATS = 16, 2, 7
MDF_WITH_SEG, MDF = "MDF-MLLM, vessel loss 0.1", "MDF-MLLM, vessel loss off (main job)"


def batch_of_photos(processor) -> dict:
    examples = list(generate(num_images=BATCH, image_size=256, seed=0))
    return processor(
        images=[e["image"] for e in examples],
        clinical_text=[e["text"] for e in examples],
        labels=[e["label"] for e in examples],
        vessel_masks=[e["vessel_mask"] for e in examples],
    )


def step_timer(model, inputs: dict, bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def measure() -> dict:
    torch.manual_seed(0)
    processor = build_default_processor()
    inputs = dict(batch_of_photos(processor))
    baseline_inputs = {k: v for k, v in inputs.items() if k not in ("unet_pixel_values", "vessel_mask")}
    kwargs = dict(verbalizer_token_ids=processor.verbalizer_token_ids)
    models = {
        MDF_WITH_SEG: (MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, seg_loss_weight=0.1,
                                                                            **kwargs)), inputs),
        MDF: (MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, seg_loss_weight=0.0, **kwargs)),
              inputs),
        "Mllama": (
            MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, fusion_layers={}, **kwargs)),
            baseline_inputs,
        ),
    }
    steps = {
        (name, precision): step_timer(model, batch, precision == "bf16")
        for name, (model, batch) in models.items()
        for precision in ("fp32", "bf16")
    }
    times = {key: [] for key in steps}
    for repeat in range(WARMUP + REPEATS):
        for key, step in steps.items():
            seconds = step()
            if repeat >= WARMUP:
                times[key].append(seconds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "medians": medians,
        "params": {name: sum(p.numel() for p in model.parameters()) for name, (model, _) in models.items()},
        "tokens": inputs["input_ids"].shape[1],
    }


def run() -> str:
    m = measure()
    t = m["medians"]
    rows = [
        "## Train step, small default config (2 CPU cores)",
        "",
        f"Batch {BATCH} synthetic photos (Mllama tile 112 px, U-Net 128 px, {m['tokens']} tokens), forward + "
        f"backward + AdamW; median of {REPEATS} steps after {WARMUP} warm-up, the six variants interleaved. "
        f"Parameters: MDF-MLLM {m['params'][MDF]:,}, Mllama {m['params']['Mllama']:,}.",
        "",
        "| | fp32 s/step | bf16 autocast s/step | bf16 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    for name in (MDF_WITH_SEG, MDF, "Mllama"):
        fp32, bf16 = t[(name, "fp32")], t[(name, "bf16")]
        rows.append(f"| {name} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f} |")
    for numerator, denominator in ((MDF_WITH_SEG, "Mllama"), (MDF, "Mllama"), (MDF_WITH_SEG, MDF)):
        rows.append(f"| **{numerator} / {denominator}** | {t[(numerator, 'fp32')] / t[(denominator, 'fp32')]:.2f} | "
                    f"{t[(numerator, 'bf16')] / t[(denominator, 'bf16')]:.2f} | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(run())
