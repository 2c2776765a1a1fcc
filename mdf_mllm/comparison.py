"""The rows of a comparison and what is computed across them.

Every model or reference scored on the test photos is one `Result` (name, class probabilities per photo, metrics,
timings), which every table, plot and the model card read. Beside the trained models (MDF-MLLM, the baseline, the
U-Net alone of stage 1), the references read one modality each or both without a language model. Each is registered
once in `REFERENCES` (`@reference`), in the order of the rows; the main job, its counterfactual pass, the ablation,
the tables, the card and comparison.json all iterate it:

- text only: TF-IDF over word 1-2 grams of the clinical text (an empty text is the token "notext") and a logistic
  regression, fitted on the training split;
- late fusion: the U-Net alone's and the text-only reference's class probabilities multiplied and divided by the
  class prior of the training split (two independent pieces of evidence), renormalised;
- joint reference: a logistic regression that reads the U-Net alone's class probabilities, their products with the
  age bins parsed from the text (what a look means may change with the age) and the history's vector (the text-only
  reference's class probabilities, out of fold on the training split; the age bin; whether there is a history),
  fitted on the training split: photo and history read together, without a language model.

Every row is scored on all test photos, those with a history, those without and the age-dependent ones
(`SUBSETS`), with its calibration (`calibration.calibration_report`).

A comparison also holds the paired bootstrap of accuracy differences (the same resampled photos for both models) and
the counterfactual-history table (does the answer follow a swapped history where only the history decides, and
stay where the photo decides?).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mdf_mllm.calibration import calibration_report
from mdf_mllm.metrics import classification_report

UNET_ALONE = "U-Net alone (image only)"  # the stage-1 U-Net and class head: what the photo alone gives
TEXT_ONLY = "Text only (TF-IDF + logistic regression)"
LATE_FUSION = "Late fusion (U-Net alone x text only / prior)"
JOINT = "Joint reference (U-Net alone x age x history)"
# The subsets every row is scored on: {name: the photos it holds, from `has_history` and `age_dependent` (N,) bools}.
SUBSETS = {
    "all": lambda history, age: np.ones_like(history),
    "with_history": lambda history, age: history,
    "without_history": lambda history, age: ~history,
    "age_dependent": lambda history, age: age,
}


@dataclass
class Result:
    """One row of a comparison: a model or a reference scored on the test photos.

    `probabilities`: (N, K) class probabilities per test photo; `report`: `classification_report` of their argmax
    plus "subsets" (`subset_accuracies`) (both None on the processes of a distributed run that do not evaluate);
    `train_seconds`, `parameters`: None for a reference that has none; `gate_history`: the U-Net gates logged while
    training (MDF-MLLM only); `model`, `trainer`: the trained model and its `Trainer`, where there are some;
    `weights`, `losses`: the file a stage wrote its trained weights to and its loss per epoch (stage 1's U-Net);
    `train_probabilities`: (N_train, K) class probabilities of the training photos, for a reference that learns from
    this row (the U-Net alone's, which the joint reference reads); `temperature`: the temperature a row's
    probabilities were scaled with (fitted on the validation photos), None for raw ones.
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
    train_probabilities: np.ndarray | None = field(default=None, repr=False)
    temperature: float | None = None

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
        extra = {key: getattr(self, key) for key in ("train_seconds", "parameters", "temperature")
                 if getattr(self, key) is not None}
        return {"name": self.name, **extra, **self.report, "gate_history": self.gate_history}


def score(name: str, probabilities, labels, has_history, label_names, disease_types, n_bootstrap: int = 1000,
          items: list[dict] | None = None, age_dependent=None, **timings) -> Result:
    """The `Result` of class probabilities (N, K) against the true label ids (N,); `has_history` (N,) bools say
    which photos carry a clinical history, `age_dependent` (N,) bools (default none) which are age-dependent;
    `timings`: `train_seconds`, `parameters`, `gate_history`. The report holds "subsets" (`subset_accuracies`) and
    "calibration" (`calibration.calibration_report`)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(-1)
    report = classification_report(labels, predictions.tolist(), label_names, disease_types, n_bootstrap=n_bootstrap,
                                   items=items, probabilities=probabilities)
    report["subsets"] = subset_accuracies(predictions, labels, has_history, age_dependent)
    report["calibration"] = calibration_report(probabilities, labels, n_bootstrap)
    return Result(name, probabilities, report, **timings)


def subset_masks(has_history, age_dependent=None) -> dict[str, np.ndarray]:
    """{subset name: (N,) bools} of `SUBSETS`."""
    history = np.asarray(has_history, dtype=bool)
    age = np.zeros_like(history) if age_dependent is None else np.asarray(age_dependent, dtype=bool)
    return {name: select(history, age) for name, select in SUBSETS.items()}


def subset_accuracies(predictions, labels, has_history, age_dependent=None) -> dict[str, dict]:
    """{subset name (`SUBSETS`): {"n", "accuracy" (None for an empty subset)}}."""
    right = np.asarray(predictions) == np.asarray(labels)
    return {name: {"n": int(mask.sum()), "accuracy": float(right[mask].mean()) if mask.any() else None}
            for name, mask in subset_masks(has_history, age_dependent).items()}


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


AGE_BINS = (17, 30, 50, 66)  # bins from 0, 17, 30, 50, 66: the ages at which the synthetic looks change stage
AGE = re.compile(r"\b(\d{1,3})-year-old\b")


def age_bin(text: str | None) -> int | None:
    """The bin (0 .. len(AGE_BINS)) of the age a history writes as "<age>-year-old"; None where it writes none."""
    found = AGE.search(text or "")
    return int(np.searchsorted(AGE_BINS, int(found.group(1)), side="right")) if found else None


def history_vector(texts, text_probabilities) -> np.ndarray:
    """(N, K + len(AGE_BINS) + 3): the text-only reference's class probabilities, the age bin parsed from
    "<age>-year-old", one-hot (its last column: no age written), and 1 where there is a history."""
    ages = np.zeros((len(texts), len(AGE_BINS) + 2))
    for row, text in enumerate(texts):
        written = age_bin(text)
        ages[row, -1 if written is None else written] = 1
    return np.concatenate([np.asarray(text_probabilities, dtype=np.float64), ages, has_history(texts)[:, None]], 1)


def joint_features(image_probabilities, history) -> np.ndarray:
    """What the joint reference reads: the image's class probabilities (N, K), their products with the age bins of
    `history` (`history_vector`; so that what a look means may change with the age) and the history's vector."""
    image_probabilities, history = np.asarray(image_probabilities), np.asarray(history)
    ages = history[:, image_probabilities.shape[1]:-1]
    products = (image_probabilities[:, :, None] * ages[:, None, :]).reshape(len(history), -1)
    return np.concatenate([image_probabilities, products, history], 1)


def out_of_fold_text(texts, labels, num_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """The text-only reference's class probabilities of each training text from a `TextOnly` fitted without its fold
    (so that the joint reference learns how far the text reference is right on texts it has not seen)."""
    labels = np.asarray(labels)
    probabilities = np.zeros((len(texts), num_classes))
    order = np.random.default_rng(seed).permutation(len(texts))
    for fold in np.array_split(order, min(folds, len(texts))):
        rest = np.setdiff1d(order, fold)
        model = TextOnly([texts[i] for i in rest], labels[rest], num_classes)
        probabilities[fold] = model.probabilities([texts[i] for i in fold])
    return probabilities


class Joint:
    """The joint reference: a logistic regression (C=1, lbfgs: deterministic) on `joint_features` of the image
    reference's class probabilities of the training photos and the history's vector of their texts."""

    def __init__(self, image_probabilities, texts, labels, num_classes: int, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        self.num_classes = num_classes
        history = history_vector(texts, out_of_fold_text(texts, labels, num_classes, seed=seed))
        self.classifier = LogisticRegression(C=1.0, max_iter=5000).fit(joint_features(image_probabilities, history),
                                                                      np.asarray(labels))

    def probabilities(self, image_probabilities, text_probabilities, texts) -> np.ndarray:
        """(N, K) class probabilities; a class the training split lacks gets 0."""
        features = joint_features(image_probabilities, history_vector(texts, text_probabilities))
        probabilities = np.zeros((len(texts), self.num_classes))
        probabilities[:, self.classifier.classes_] = self.classifier.predict_proba(features)
        return probabilities


@reference(JOINT, needs=(UNET_ALONE,), reads_photo=True)
def joint_reference(run, rows: dict[str, Result], texts) -> np.ndarray:
    unet_alone, train = rows[UNET_ALONE], run.dataset["train"]
    # Fitted once per U-Net alone (an ablation has one per seed).
    key = (JOINT, np.asarray(unet_alone.train_probabilities).tobytes())
    fitted = run.fit(key, lambda: Joint(unet_alone.train_probabilities, train["text"], train["label"],
                                        len(run.label_names), run.job.training.seed))
    return fitted.probabilities(unet_alone.probabilities, text_only(run, rows, texts), texts)


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
                       seed: int = 0, age_dependent=None) -> dict[str, dict]:
    """{other's name: {subset name (`SUBSETS`): paired_difference}} of `ours` minus each other."""
    labels, masks = np.asarray(labels), subset_masks(history, age_dependent)
    right = lambda result: result.predictions == labels  # noqa: E731
    return {other.name: {subset: paired_difference(right(ours)[mask], right(other)[mask], n_bootstrap, seed)
                         for subset, mask in masks.items()}
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
