"""The rows of a comparison and what is computed across them.

Every model or reference scored on the test photos is one `Result` (name, class probabilities per photo, metrics,
timings), which every table, plot and the model card read. Beside the trained models (MDF-MLLM, the baseline, the
U-Net alone of stage 1), the references read one modality each or both without a language model. Each is registered
once in `REFERENCES` (`@reference`), in the order of the rows; the main job, its counterfactual pass, the ablation,
the tables, the card and comparison.json all iterate it:

- text only: TF-IDF over word 1-2 grams of the clinical text (an empty text is the token "notext") and a logistic
  regression, fitted on the training split;
- late fusion: the U-Net alone's and the text-only reference's class probabilities multiplied and divided by the
  class prior of the training split (two independent pieces of evidence), renormalised.

A comparison also holds the paired bootstrap of accuracy differences (the same resampled photos for both models) and
the counterfactual-history table (does the answer follow a swapped history where only the history decides, and
stay where the photo decides?).
"""

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mdf_mllm.metrics import classification_report

UNET_ALONE = "U-Net alone (image only)"  # the stage-1 U-Net and class head: what the photo alone gives
TEXT_ONLY = "Text only (TF-IDF + logistic regression)"
LATE_FUSION = "Late fusion (U-Net alone x text only / prior)"


@dataclass
class Result:
    """One row of a comparison: a model or a reference scored on the test photos.

    `probabilities`: (N, K) class probabilities per test photo; `report`: `classification_report` of their argmax
    plus "subsets" (`subset_accuracies`) (both None on the processes of a distributed run that do not evaluate);
    `train_seconds`, `parameters`: None for a reference that has none; `gate_history`: the U-Net gates logged while
    training (MDF-MLLM only); `model`, `trainer`: the trained model and its `Trainer`, where there are some;
    `weights`, `losses`: the file a stage wrote its trained weights to and its loss per epoch (stage 1's U-Net).
    """

    name: str
    probabilities: np.ndarray | None
    report: dict | None
    train_seconds: float | None = None
    parameters: int | None = None
    gate_history: list[dict] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    trainer: Any = field(default=None, repr=False)
    weights: str | None = None
    losses: list[float] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.probabilities).argmax(-1)

    def accuracy(self, subset: str = "all") -> float | None:
        return self.report["subsets"][subset]["accuracy"]

    def results_json(self) -> dict:
        """The report and the class probabilities per test photo (an export's results.json)."""
        return {**self.report, "probabilities": np.asarray(self.probabilities).tolist()}

    def as_json(self) -> dict:
        """Everything but the probabilities (comparison.json)."""
        extra = {key: getattr(self, key) for key in ("train_seconds", "parameters") if getattr(self, key) is not None}
        return {"name": self.name, **extra, **self.report, "gate_history": self.gate_history}


def score(name: str, probabilities, labels, has_history, label_names, disease_types, n_bootstrap: int = 1000,
          items: list[dict] | None = None, **timings) -> Result:
    """The `Result` of class probabilities (N, K) against the true label ids (N,); `has_history` (N,) bools say
    which photos carry a clinical history; `timings`: `train_seconds`, `parameters`, `gate_history`."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(-1)
    report = classification_report(labels, predictions.tolist(), label_names, disease_types, n_bootstrap=n_bootstrap,
                                   items=items, probabilities=probabilities)
    report["subsets"] = subset_accuracies(predictions, labels, has_history)
    return Result(name, probabilities, report, **timings)


def subset_accuracies(predictions, labels, has_history) -> dict[str, dict]:
    """{"all" | "with_history" | "without_history": {"n", "accuracy" (None for an empty subset)}}."""
    right = np.asarray(predictions) == np.asarray(labels)
    has_history = np.asarray(has_history, dtype=bool)
    masks = {"all": np.ones_like(has_history), "with_history": has_history, "without_history": ~has_history}
    return {name: {"n": int(mask.sum()), "accuracy": float(right[mask].mean()) if mask.any() else None}
            for name, mask in masks.items()}


def has_history(texts) -> np.ndarray:
    return np.array([bool(text and text.strip()) for text in texts], dtype=bool)


# ----------------------------------------------------------------------------------------------------------------------
# The references


@dataclass(frozen=True)
class Reference:
    """A row of the comparison that trains no language model.

    `probabilities(run, rows, texts)`: (N, K) class probabilities of the run's test photos (`run`: the
    `training.RunContext`; `rows`: {name: `Result`} of the rows scored before it; `texts`: the photos' histories, their
    own or, in the counterfactual pass, swapped ones); `needs`: the rows it reads, without which it is left out (the
    U-Net alone where a job has no stage 1); `reads_photo`: whether it sees the photo, so that the counterfactual
    table asks it too (a reference that reads the history only follows any history, trivially).
    """

    name: str
    probabilities: Callable[[Any, dict[str, Result], list[str]], np.ndarray]
    needs: tuple[str, ...] = ()
    reads_photo: bool = False


REFERENCES: dict[str, Reference] = {}


def reference(name: str, needs: tuple[str, ...] = (), reads_photo: bool = False):
    """Register the decorated `probabilities(run, rows, texts)` as the reference row `name` (after those before)."""
    def register(probabilities):
        REFERENCES[name] = Reference(name, probabilities, needs, reads_photo)
        return probabilities
    return register


def references(run, rows: dict[str, Result]) -> list[Result]:
    """Every registered reference that has the rows it needs, scored on the run's test photos, in registry order."""
    rows, texts = dict(rows), run.dataset["test"]["text"]
    for ref in REFERENCES.values():
        if all(name in rows for name in ref.needs):
            rows[ref.name] = run.scored(ref.name, ref.probabilities(run, rows, texts))
    return [rows[name] for name in REFERENCES if name in rows]


class TextOnly:
    """The text-only reference: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression (C=10), fitted on the
    training texts; an empty text is the token "notext", so "no history" is evidence too."""

    def __init__(self, texts, labels, num_classes: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.num_classes = num_classes
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        features = self.vectorizer.fit_transform(self._filled(texts))
        self.classifier = LogisticRegression(C=10.0, max_iter=2000).fit(features, np.asarray(labels))

    @staticmethod
    def _filled(texts) -> list[str]:
        return [text if text and text.strip() else "notext" for text in texts]

    def probabilities(self, texts) -> np.ndarray:
        """(N, K) class probabilities; a class the training split lacks gets 0."""
        probabilities = np.zeros((len(texts), self.num_classes))
        features = self.vectorizer.transform(self._filled(texts))
        probabilities[:, self.classifier.classes_] = self.classifier.predict_proba(features)
        return probabilities


def class_prior(labels, num_classes: int) -> np.ndarray:
    """(K,) class frequencies of `labels`."""
    return np.bincount(np.asarray(labels), minlength=num_classes) / len(labels)


def late_fusion(image_probabilities, text_probabilities, prior) -> np.ndarray:
    """p(c | photo) p(c | text) / p(c), renormalised over c: (N, K). A class the prior lacks gets 0."""
    prior = np.asarray(prior, dtype=np.float64)
    fused = np.asarray(image_probabilities) * np.asarray(text_probabilities)
    fused = np.divide(fused, prior, out=np.zeros_like(fused), where=prior > 0)
    return fused / np.maximum(fused.sum(-1, keepdims=True), np.finfo(float).tiny)


@reference(TEXT_ONLY)
def text_only(run, rows: dict[str, Result], texts) -> np.ndarray:
    train = run.dataset["train"]
    fitted = run.fit(TEXT_ONLY, lambda: TextOnly(train["text"], train["label"], len(run.label_names)))
    return fitted.probabilities(texts)


@reference(LATE_FUSION, needs=(UNET_ALONE,), reads_photo=True)
def late_fusion_of_the_run(run, rows: dict[str, Result], texts) -> np.ndarray:
    prior = class_prior(run.dataset["train"]["label"], len(run.label_names))
    return late_fusion(rows[UNET_ALONE].probabilities, text_only(run, rows, texts), prior)


# ----------------------------------------------------------------------------------------------------------------------
# Paired differences


def paired_difference(right_a, right_b, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B on the same photos, with the percentile 95% interval over `n_bootstrap`
    resamples of the photos (each resample scores both models on the same photos): {"n", "difference", "ci95"}."""
    right_a, right_b = np.asarray(right_a, dtype=np.float64), np.asarray(right_b, dtype=np.float64)
    if len(right_a) != len(right_b):
        raise ValueError(f"paired difference: {len(right_a)} and {len(right_b)} photos; both models must score "
                         "the same photos")
    if not len(right_a):
        return {"n": 0, "difference": None, "ci95": None}
    rows = np.random.default_rng(seed).integers(0, len(right_a), size=(n_bootstrap, len(right_a)))
    differences = right_a[rows].mean(1) - right_b[rows].mean(1)
    return {"n": len(right_a), "difference": float(right_a.mean() - right_b.mean()),
            "ci95": np.percentile(differences, [2.5, 97.5]).tolist()}


def paired_differences(ours: Result, others: list[Result], labels, history, n_bootstrap: int = 1000,
                       seed: int = 0) -> dict[str, dict]:
    """{other's name: {"all": paired_difference, "with_history": paired_difference}} of `ours` minus each other."""
    labels, history = np.asarray(labels), np.asarray(history, dtype=bool)
    right = lambda result: result.predictions == labels  # noqa: E731
    return {other.name: {subset: paired_difference(right(ours)[mask], right(other)[mask], n_bootstrap, seed)
                         for subset, mask in (("all", np.ones_like(history)), ("with_history", history))}
            for other in others}


# ----------------------------------------------------------------------------------------------------------------------
# Counterfactual histories


def counterfactual_summary(groups: list[str], kinds: list[str], points_to: list[list[int]], original,
                           swapped) -> list[dict]:
    """Per group of swapped-history photos (then one total per kind): how often the answer with the swapped history
    is a label that history points to ("follows"), and how often it differs from the answer to the photo's own
    input ("changed").

    Args:
        groups, kinds: per photo, its group's name and kind ("phenocopy" or "photo decides").
        points_to: per photo, the label ids the swapped history is written for (a phenocopy's twin; for a photo
            that decides, the labels of the misleading history, none of which draws the photo).
        original, swapped: per photo, the predicted label id with its own input and with the swapped history.

    Returns:
        `[{"group", "kind", "n", "follows", "changed"}]`.
    """
    original, swapped = np.asarray(original), np.asarray(swapped)
    follows = np.array([answer in labels for answer, labels in zip(swapped.tolist(), points_to)])

    def row(name: str, kind: str, mask: np.ndarray) -> dict:
        return {"group": name, "kind": kind, "n": int(mask.sum()), "follows": float(follows[mask].mean()),
                "changed": float((swapped[mask] != original[mask]).mean())}

    rows = [row(group, kinds[groups.index(group)], np.array([g == group for g in groups]))
            for group in dict.fromkeys(groups)]
    rows += [row(f"all {kind} photos", kind, np.array([k == kind for k in kinds])) for kind in dict.fromkeys(kinds)]
    return rows
