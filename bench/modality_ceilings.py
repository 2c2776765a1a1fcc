"""What does each modality of the data carry? An image-only CNN, the text-only reference and their late fusion.

    python bench/modality_ceilings.py [--dataset_seed 0]

Read it as the ceiling of each modality before any model comparison (docs/data.md "The modality ceilings"): if an
image-only model already reads the photos that carry a history, the history cannot add anything measurable; if the
late fusion is well above both single references, the data asks a model to combine the two.

  CNN          4 stride-2 stages of two 3x3 convs (widths 16-32-64-128, GroupNorm, SiLU), average pool, linear head;
               the photo at --size px, --epochs epochs, AdamW one-cycle 1e-3, clip 1.0, class-balanced loss, mirror
  text only    mdf_mllm.comparison.TextOnly (TF-IDF + logistic regression), as the main job's row
  late fusion  mdf_mllm.comparison.late_fusion of the two, as the main job's row (there: U-Net alone x text)

Prints accuracy over all test photos, over those with a history and over those without.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builder import load  # noqa: E402
from mdf_mllm.comparison import TextOnly, class_prior, has_history, late_fusion, subset_accuracies  # noqa: E402


def photos(split, size: int) -> torch.Tensor:
    xs = [np.asarray(row["image"].convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for row in split]
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()


def cnn(num_classes: int) -> nn.Module:
    layers, width = [], 3
    for out in (16, 32, 64, 128):
        layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU(),
                   nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def image_only(x_train, y_train, x_test, num_classes: int, epochs: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    model = cnn(num_classes)
    counts = torch.bincount(y_train, minlength=num_classes).float()
    weight = counts.sum() / (num_classes * counts.clamp(min=1))  # the few inherited photos count as much as the rest
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3,
                                                   total_steps=epochs * ((len(x_train) + 31) // 32))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(x_train), 32):
            batch = order[start:start + 32]
            x = x_train[batch]
            x = torch.where((torch.rand(len(batch)) < 0.5)[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), y_train[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x_test[b:b + 64]).softmax(-1) for b in range(0, len(x_test), 64)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=256, help="synthetic photo side (the main job's)")
    parser.add_argument("--size", type=int, default=128, help="the CNN's input side (the main job's U-Net's)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    data = load("synthetic", image_size=args.image_size, seed=args.dataset_seed)
    train, test = data["train"], data["test"]
    num_classes = len(train.features["label"].names)
    y_train, y_test = np.array(train["label"]), np.array(test["label"])
    p_image = image_only(photos(train, args.size), torch.tensor(y_train), photos(test, args.size), num_classes,
                         args.epochs, args.seed)
    p_text = TextOnly(train["text"], y_train, num_classes).probabilities(test["text"])
    rows = {"CNN (image only)": p_image, "text only": p_text,
            "late fusion, CNN x text": late_fusion(p_image, p_text, class_prior(y_train, num_classes))}
    history = has_history(test["text"])
    print(f"dataset seed {args.dataset_seed}: test {len(y_test)} photos, {history.sum()} with a history; CNN at "
          f"{args.size} px, {args.epochs} epochs\n")
    print("| reference | with a history | without | all |\n|---|---:|---:|---:|")
    for name, probabilities in rows.items():
        scores = subset_accuracies(probabilities.argmax(1), y_test, history)
        print(f"| {name} | " + " | ".join(f"{scores[s]['accuracy']:.3f}" for s in
                                          ("with_history", "without_history", "all")) + " |")
    print(f"\n[{time.time() - start:.0f} s]")


if __name__ == "__main__":
    main()
