"""Classification metrics with bootstrap CIs, from the package's own `evaluate` module (`fundus_metrics/`, shipped
as package data), loaded from disk so that evaluation runs offline."""

import functools
import sys
from pathlib import Path

import numpy as np

from configuration_mdf_mllm import DISEASE_TYPES

METRIC_PATH = Path(__file__).resolve().parent / "fundus_metrics"
LEVELS = ("disease", "type")
CI_METRICS = ("accuracy", "macro_f1")
BOOTSTRAP_CHUNK = 256  # resamples drawn at once: bounds memory to CHUNK x num_items indices


@functools.lru_cache(maxsize=1)
def load_fundus_metric():
    """The repository's `evaluate` metric module, loaded from its folder (no Hub access)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def _metric_functions():
    """The python module behind the loaded metric, whose array functions serve the bootstrap."""
    return sys.modules[type(load_fundus_metric()).__module__]


def _label_arrays(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"y_true and y_pred must be non-empty, 1-D and equal in length, got {y_true.shape} and {y_pred.shape}"
        )
    for field, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{field} must hold label ids in [0, {num_classes}), got {values.min()}..{values.max()}")
    return y_true, y_pred


def type_ids(disease_types: list[str]) -> np.ndarray:
    """Index into `DISEASE_TYPES` of each label id's disease type. `(num_labels,)` ints."""
    unknown = sorted(set(disease_types) - set(DISEASE_TYPES))
    if unknown:
        raise ValueError(f"disease_types: {unknown} not in {DISEASE_TYPES}")
    return np.array([DISEASE_TYPES.index(t) for t in disease_types], dtype=np.int64)


def bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_bootstrap: int, seed: int
) -> dict[str, list[float]]:
    """Percentile 95% intervals of accuracy and macro F1 over `n_bootstrap` resamples of the items (with replacement).

    The same seed draws the same resamples, so the disease and type levels of one report share them.
    """
    functions = _metric_functions()
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in CI_METRICS}
    for start in range(0, n_bootstrap, BOOTSTRAP_CHUNK):
        rows = rng.integers(0, len(y_true), size=(min(BOOTSTRAP_CHUNK, n_bootstrap - start), len(y_true)))
        scores = functions.summary_scores(functions.confusion_matrix(y_true[rows], y_pred[rows], num_classes))
        for name in CI_METRICS:
            samples[name].append(scores[name])
    return {name: np.percentile(np.concatenate(values), [2.5, 97.5]).tolist() for name, values in samples.items()}


def misclassified_items(y_true, y_pred, label_names, items: list[dict], probabilities=None) -> list[dict]:
    """The test items the model got wrong, in item order, so that a user can open those photos.

    Args:
        y_true, y_pred: `(num_items,)` label ids.
        label_names: name of each label id.
        items: one dict per item, in the order of `y_true`, with its `case_id` and `file_name` (the photo's path
            relative to the data folder).
        probabilities: `(num_items, num_labels)` class probabilities, or None.

    Returns:
        `[{"index", "case_id", "file_name", "truth", "prediction", "probability"}]`: `index` is the item's position,
        truth and prediction are label names, `probability` the one given to the (wrong) prediction (None without
        `probabilities`).
    """
    if len(items) != len(y_true):
        raise ValueError(f"items has {len(items)} entries, y_true {len(y_true)}: one item per test example")
    for index, item in enumerate(items):
        missing = sorted({"case_id", "file_name"} - set(item))
        if missing:
            raise ValueError(f"items[{index}] has no {missing}; each item needs 'case_id' and 'file_name'")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(y_true), len(label_names)):
            raise ValueError(
                f"probabilities must have shape (num_items, num_labels) = {(len(y_true), len(label_names))}, "
                f"got {probabilities.shape}"
            )
    return [
        {
            "index": int(index),
            "case_id": items[index]["case_id"],
            "file_name": items[index]["file_name"],
            "truth": label_names[y_true[index]],
            "prediction": label_names[y_pred[index]],
            "probability": None if probabilities is None else float(probabilities[index, y_pred[index]]),
        }
        for index in np.flatnonzero(y_true != y_pred)
    ]


def classification_report(
    y_true,
    y_pred,
    label_names,
    disease_types,
    n_bootstrap=1000,
    seed=0,
    items: list[dict] | None = None,
    probabilities=None,
) -> dict:
    """Disease- and type-level metrics with bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true, y_pred: `(num_items,)` label ids in `[0, len(label_names))`.
        label_names: name of each label id.
        disease_types: disease type (one of `DISEASE_TYPES`) of each label id.
        items: optional, one `{"case_id", "file_name", ...}` per item: the report then lists the misclassified ones.
        probabilities: optional `(num_items, num_labels)` class probabilities, for the misclassified list.

    Returns:
        `{"num_items", "bootstrap": {...}, "disease": metrics, "type": metrics}`, where metrics is the metric module's
        output plus `ci95: {"accuracy": [low, high], "macro_f1": [low, high]}`; with `items`, also `"misclassified"`
        (see `misclassified_items`).
    """
    label_names = list(label_names)
    if len(disease_types) != len(label_names):
        raise ValueError(f"disease_types has {len(disease_types)} entries, label_names {len(label_names)}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    y_true, y_pred = _label_arrays(y_true, y_pred, len(label_names))
    type_of_label = type_ids(disease_types)
    levels = {
        "disease": (y_true, y_pred, label_names),
        "type": (type_of_label[y_true], type_of_label[y_pred], list(DISEASE_TYPES)),
    }
    report = {
        "num_items": int(len(y_true)),
        "bootstrap": {"method": "percentile", "confidence": 0.95, "n_resamples": n_bootstrap, "seed": seed},
    }
    if items is not None:
        report["misclassified"] = misclassified_items(y_true, y_pred, label_names, items, probabilities)
    for level, (references, predictions, names) in levels.items():
        scores = load_fundus_metric().compute(predictions=predictions, references=references, label_names=names)
        scores["ci95"] = bootstrap_ci(references, predictions, len(names), n_bootstrap, seed)
        report[level] = scores
    return report
