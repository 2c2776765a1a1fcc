"""What does each modality of the data carry? An image-only CNN, the text-only reference, their late fusion, and the
joint reference that reads photo and history together.

    python bench/modality_ceilings.py [--dataset_seed 0]

Read it as the ceiling of each modality before any model comparison (docs/data.md "The modality ceilings"): if an
image-only model already reads the photos that carry a history, the history cannot add anything measurable; if the
late fusion is well above both single references, the data asks a model to combine the two.

  CNN          4 stride-2 stages of two 3x3 convs (widths 16-32-64-128, GroupNorm, SiLU), average pool, linear head;
               the photo at --size px, --epochs epochs, AdamW one-cycle 1e-3, clip 1.0, class-balanced loss, mirror
  text only    mdf_mllm.comparison.TextOnly (TF-IDF + logistic regression), as the main job's row
  late fusion  mdf_mllm.comparison.late_fusion of the two, as the main job's row (there: U-Net alone x text)
  joint        a small network (64 hidden units, scikit-learn's MLPClassifier) that reads the CNN's class
               probabilities, their products with the age bins (what a look means may change with the age) and the
               history's vector (`joint_features`, the main job's joint row's features); fitted on the training
               photos' out-of-fold CNN probabilities (3 folds, the same recipe) and applied to the test photos' mean
               probabilities of those three CNNs, so that it meets the CNNs it learnt from. The history's vector
               (mdf_mllm.comparison.history_vector): the text-only reference's class probabilities (out of fold, 5
               folds, on the training split; fitted on all of it for the test split), the age parsed from
               "<age>-year-old" as one of comparison.AGE_BINS (or "no age") and whether there is a history at all.

Prints accuracy over all test photos, over those with a history, those without, and the age-dependent subset (the
`age_dependent` field: a look two labels draw at ages that never overlap, with a history both write or an
uninformative one, so that only the age read with the photo decides).
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
from mdf_mllm.comparison import (TextOnly, class_prior, has_history, history_vector, joint_features,  # noqa: E402
                                  late_fusion, out_of_fold_text)


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


def train_cnn(x_train, y_train, x_test, num_classes: int, epochs: int, seed: int) -> np.ndarray:
    """The image-only CNN's class probabilities on `x_test`, trained on `x_train`."""
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


def out_of_fold_photos(x_train, y_train, x_test, num_classes: int, epochs: int, seed: int,
                       folds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The CNN's class probabilities for each training photo from a CNN trained without its fold, and for each test
    photo the mean of those CNNs': the joint reference learns from the first and meets the second, CNNs of one kind
    (trained on the same share of the photos) on photos they did not see."""
    train_probabilities, test_probabilities = np.zeros((len(x_train), num_classes)), 0
    order = np.random.default_rng(seed).permutation(len(x_train))
    for fold in np.array_split(order, folds):
        rest = torch.from_numpy(np.setdiff1d(order, fold))
        both = train_cnn(x_train[rest], y_train[rest], torch.cat([x_train[torch.from_numpy(fold)], x_test]),
                         num_classes, epochs, seed)
        train_probabilities[fold] = both[:len(fold)]
        test_probabilities = test_probabilities + both[len(fold):] / folds
    return train_probabilities, test_probabilities


def joint_reference(p_image_oof, h_train, y_train, p_image, h_test, seed: int = 0) -> np.ndarray:
    """A small two-layer network (64 hidden units) on `joint_features`, fitted on the training photos' out-of-fold
    image probabilities."""
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier((64,), alpha=1e-3, max_iter=3000, random_state=seed).fit(
        joint_features(p_image_oof, h_train), y_train)
    probabilities = np.zeros_like(p_image)
    probabilities[:, model.classes_] = model.predict_proba(joint_features(p_image, h_test))
    return probabilities


def look_readers(train, test, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An ideal photo reader, for the design alone: each photo's look (from the generator's plan) read as the
    training split's label frequencies of that look; (out-of-fold-like training probabilities: the same, as a
    look's frequencies do not overfit; test probabilities)."""
    from dataset_builder import synthetic

    looks = {(item.case_id, item.label): item.look or item.label for item in synthetic.plan(None, seed)}
    names = train.features["label"].names

    def of(split):
        return [synthetic.LOOKS.index(looks[(case, names[label])]) for case, label in zip(split["case_id"],
                                                                                        split["label"])]

    counts = np.full((len(synthetic.LOOKS), num_classes), 0.1)
    np.add.at(counts, (of(train), np.array(train["label"])), 1)
    frequencies = counts / counts.sum(1, keepdims=True)
    return frequencies[of(train)], frequencies[of(test)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=256, help="synthetic photo side (the main job's)")
    parser.add_argument("--size", type=int, default=128, help="the CNN's input side (the main job's U-Net's)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", action="store_true", help="add the rows of an ideal photo reader (synthetic "
                        "set): the design's ceilings apart from the CNN's skill")
    args = parser.parse_args()
    start = time.time()
    data = load("synthetic", image_size=args.image_size, seed=args.dataset_seed)
    train, test = data["train"], data["test"]
    num_classes = len(train.features["label"].names)
    y_train, y_test = np.array(train["label"]), np.array(test["label"])
    p_text = TextOnly(train["text"], y_train, num_classes).probabilities(test["text"])
    h_train = history_vector(train["text"], out_of_fold_text(train["text"], y_train, num_classes))
    h_test = history_vector(test["text"], p_text)
    x_train, x_test, labels = photos(train, args.size), photos(test, args.size), torch.tensor(y_train)
    p_image = train_cnn(x_train, labels, x_test, num_classes, args.epochs, args.seed)
    p_oof, p_folds = out_of_fold_photos(x_train, labels, x_test, num_classes, args.epochs, args.seed)
    p_joint = joint_reference(p_oof, h_train, y_train, p_folds, h_test, args.seed)
    rows = {"CNN (image only)": p_image, "text only": p_text,
            "late fusion, CNN x text": late_fusion(p_image, p_text, class_prior(y_train, num_classes)),
            "joint reference": p_joint}
    if args.looks:
        look_train, look_test = look_readers(train, test, args.dataset_seed, num_classes)
        rows["look known (ideal image reader)"] = look_test
        rows["late fusion, look x text"] = late_fusion(look_test, p_text, class_prior(y_train, num_classes))
        rows["joint, look x history"] = joint_reference(look_train, h_train, y_train, look_test, h_test, args.seed)
    subsets = {"with a history": has_history(test["text"])}
    subsets["without"] = ~subsets["with a history"]
    subsets["age-dependent"] = np.array(test["age_dependent"], dtype=bool)
    subsets["all"] = np.ones(len(y_test), dtype=bool)
    print(f"dataset seed {args.dataset_seed}: test {len(y_test)} photos, " + ", ".join(
        f"{mask.sum()} {name}" for name, mask in subsets.items() if name != "all") +
        f"; CNN at {args.size} px, {args.epochs} epochs\n")
    print("| reference | " + " | ".join(subsets) + " |\n|---|" + "---:|" * len(subsets))
    for name, probabilities in rows.items():
        right = probabilities.argmax(1) == y_test
        print(f"| {name} | " + " | ".join(f"{right[mask].mean():.3f}" if mask.any() else "-"
                                          for mask in subsets.values()) + " |")
    print(f"\n[{time.time() - start:.0f} s]")


if __name__ == "__main__":
    main()
