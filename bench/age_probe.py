"""Where is the age lost? Linear probes of the age written in the history, rung by rung of a trained MDF-MLLM.

    python bench/age_probe.py EXPORT [job options, e.g. --dataset_seed 0]   # EXPORT: the main job's mdf-mllm folder

On the synthetic set the meaning of some looks changes with the age (docs/data.md, the age-dependent subset), so a
model that fuses must carry the age from the history to where it meets the photo. For every StoneRounds-like photo
whose history writes "<age>-year-old", a standardised logistic regression learns the age bin (`comparison.AGE_BINS`)
from each rung's features on the training photos and is scored on the test photos:
  FiLM context     the mean prompt embedding c that conditions the U-Net (FiLM)
  (a)/(b)/(c)/(d)  the probe ladder's rungs (`probe_ladder.ladder_features`): FiLM-conditioned skips, the projected
                   U-Net tokens, each fused layer's U-Net branch at the answer position, the last hidden state
  photo alone      the skips of the photo without FiLM: what the photo itself says of the age (the disease's stage)
A rung that reads the age no better than "photo alone" has not taken it from the history. Prints a Markdown table.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdf_mllm.comparison import AGE_BINS, age_bin  # noqa: E402
from mdf_mllm.main_job import parse_arguments  # noqa: E402
from mdf_mllm.probe_ladder import ladder_features, probe_accuracy  # noqa: E402
from mdf_mllm.stage1 import pooled_skips  # noqa: E402
from mdf_mllm.training import ProcessedSplit, load_data  # noqa: E402
from modeling_mdf_mllm import MdfMllmForConditionalGeneration  # noqa: E402
from processing_mdf_mllm import MdfMllmDataCollator, MdfMllmProcessor  # noqa: E402


def age_bins(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the texts that write an age, and its bin (`comparison.age_bin`)."""
    bins = [age_bin(text) for text in texts]
    rows = np.array([i for i, written in enumerate(bins) if written is not None])
    return rows, np.array([bins[i] for i in rows], dtype=int)


@torch.no_grad()
def context_features(model, items: list[dict], collator, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The FiLM context c (N, D) of each prompt and the skips of the photo alone, average-pooled (N, sum C_k)."""
    inner, context, alone = model.model, [], []
    for start in range(0, len(items), batch_size):
        batch = collator(items[start:start + batch_size])
        prompt = batch["attention_mask"] * (batch["labels"] == -100)
        context.append(inner.text_context(batch["input_ids"], None, prompt))
        alone.append(pooled_skips(inner.unet, batch["unet_pixel_values"].to(model.dtype))[1])
    return {"FiLM context": torch.cat(context).float().numpy(), "photo alone (no FiLM)": torch.cat(alone).float().numpy()}


def main(argv: list[str]) -> None:
    export, options = argv[0], argv[1:]
    job = parse_arguments(["--output_dir", "/tmp/age_probe", *options])
    dataset = load_data(job.data)
    processor = MdfMllmProcessor.from_pretrained(export, trust_remote_code=True)
    model = MdfMllmForConditionalGeneration.from_pretrained(export, trust_remote_code=True).eval()
    collator = MdfMllmDataCollator(processor)
    features, targets = {}, {}
    for name in ("train", "test"):
        # With their answers, so that the prompt is what precedes the answer (as the probe ladder reads it).
        split = ProcessedSplit(dataset[name], processor, with_answers=True)
        rows, targets[name] = age_bins(list(dataset[name]["text"]))
        items = [split[int(i)] for i in rows]
        features[name] = {**context_features(model, items, collator), **ladder_features(model, items, collator)}
    majority = np.bincount(targets["train"]).argmax()
    print(f"Age bin (bins from 0, {', '.join(map(str, AGE_BINS))}) from each rung; train photos "
          f"{len(targets['train'])} -> test photos {len(targets['test'])}; the majority bin scores "
          f"{(targets['test'] == majority).mean():.3f}.\n")
    print("| rung | age-bin probe accuracy |\n|---|---:|")
    for rung in features["train"]:
        accuracy = probe_accuracy(features["train"][rung], targets["train"], features["test"][rung], targets["test"])
        print(f"| {rung} | {accuracy:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
