"""Fundus classification metrics as an `evaluate` module held in the repository.

`evaluate.load("accuracy")` fetches its script from the Hub; this module is loaded from disk instead, so it works
with `HF_HUB_OFFLINE=1` / `HF_EVALUATE_OFFLINE=1` and no network:

    metric = evaluate.load("/abs/path/to/mdf_mllm/fundus_metrics")
    metric.compute(predictions=[0, 2, 1], references=[0, 1, 1], label_names=["normal", "amd", "dr"])

Definitions (sklearn's conventions, so the numbers match `sklearn.metrics` with `zero_division=0`):

- `confusion_matrix[i][j]`: items whose true class is `i` and predicted class is `j`, over all `num_classes` classes.
- Macro precision / recall / F1 average over the classes that occur in `references` or `predictions` (sklearn's
  default `labels=None`): a class absent from both says nothing about the classifier and is skipped. A present class
  whose score has a zero denominator (e.g. recall of a class only ever predicted) counts as 0.
- Per class, a score whose denominator is zero is reported as `None` rather than NaN: sensitivity (recall) when the
  class has no true items, specificity when every item belongs to the class, precision when the class is never
  predicted, F1 when the class is absent from both.

Only numpy is imported: `evaluate` checks that every library a module script imports is installed.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy, macro F1 / precision / recall, per-class sensitivity and specificity, and the confusion
matrix of a single-label multi-class classifier (MDF-MLLM's retinal disease and disease-type predictions)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, in `[0, num_classes)`.
    references (`list[int]`): true class ids, in `[0, num_classes)`.
    num_classes (`int`, *optional*): number of classes; defaults to `len(label_names)`, then to the config name
        (an integer or comma-separated label names), then to `max(label) + 1`.
    label_names (`list[str]`, *optional*): class names used as keys of `per_class`; default `"0"`, `"1"`, ...
Returns:
    accuracy (`float`), macro_f1 (`float`), macro_precision (`float`), macro_recall (`float`),
    per_class (`dict[str, dict]`): sensitivity, specificity, precision, f1 (`float` or `None`), support (`int`),
    confusion_matrix (`list[list[int]]`): rows are true classes, columns predicted classes,
    num_classes (`int`), label_names (`list[str]`).
Examples:
    >>> metric = evaluate.load("mdf_mllm/fundus_metrics")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.6666666666666666
"""


def confusion_matrix(references: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs. references, predictions: `(..., n)` ints -> `(..., num_classes, num_classes)`.

    Leading dimensions are batch dimensions (e.g. bootstrap resamples); each gets its own matrix.
    """
    batch_shape = references.shape[:-1]
    batch_offset = np.arange(int(np.prod(batch_shape)), dtype=np.int64).reshape(*batch_shape, 1) * num_classes**2
    flat = (batch_offset + references * num_classes + predictions).ravel()
    counts = np.bincount(flat, minlength=int(np.prod(batch_shape)) * num_classes**2)
    return counts.reshape(*batch_shape, num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with NaN where the denominator is zero (NaN marks 'undefined', never leaks out)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class scores from confusion matrices `(..., K, K)`, each `(..., K)`; NaN where undefined."""
    true_positive = np.diagonal(matrix, axis1=-2, axis2=-1).astype(np.float64)
    support = matrix.sum(axis=-1)  # true items per class
    predicted = matrix.sum(axis=-2)  # predicted items per class
    total = matrix.sum(axis=(-2, -1))[..., None]
    true_negative = total - support - predicted + true_positive
    return {
        "sensitivity": _safe_divide(true_positive, support),
        "specificity": _safe_divide(true_negative, total - support),
        "precision": _safe_divide(true_positive, predicted),
        "f1": _safe_divide(2 * true_positive, support + predicted),
        "support": support,
        "present": (support + predicted) > 0,
    }


def summary_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro scores from confusion matrices `(..., K, K)`, each `(...)`.

    Macro averages run over classes present in references or predictions; undefined present scores count as 0.
    """
    scores = class_scores(matrix)
    present = scores["present"]
    num_present = np.maximum(present.sum(axis=-1), 1)

    def macro(name):
        return np.where(present, np.nan_to_num(scores[name], nan=0.0), 0.0).sum(axis=-1) / num_present

    correct = np.diagonal(matrix, axis1=-2, axis2=-1).sum(axis=-1)
    return {
        "accuracy": correct / np.maximum(matrix.sum(axis=(-2, -1)), 1),
        "macro_f1": macro("f1"),
        "macro_precision": macro("precision"),
        "macro_recall": macro("sensitivity"),
    }


PER_CLASS_SCORES = ("sensitivity", "specificity", "precision", "f1")


def _optional_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FundusMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _label_names_from_config(self) -> list[str] | None:
        """`config_name` may carry the classes: an integer count or comma-separated names."""
        if self.config_name == "default":
            return None
        if self.config_name.isdigit():
            return [str(i) for i in range(int(self.config_name))]
        return self.config_name.split(",")

    def _compute(self, predictions, references, num_classes=None, label_names=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("fundus_metrics: predictions and references are empty")
        label_names = list(label_names) if label_names is not None else self._label_names_from_config()
        if num_classes is None and label_names is not None:
            num_classes = len(label_names)
        if num_classes is None:
            num_classes = int(max(predictions.max(), references.max())) + 1
        if label_names is None:
            label_names = [str(i) for i in range(num_classes)]
        if len(label_names) != num_classes:
            raise ValueError(f"fundus_metrics: label_names has {len(label_names)} names but num_classes={num_classes}")
        for field, values in (("predictions", predictions), ("references", references)):
            if values.min() < 0 or values.max() >= num_classes:
                raise ValueError(
                    f"fundus_metrics: {field} must lie in [0, {num_classes}), got {values.min()}..{values.max()}"
                )

        matrix = confusion_matrix(references, predictions, num_classes)
        per_class_scores = class_scores(matrix)
        per_class = {
            name: {
                **{key: _optional_float(per_class_scores[key][i]) for key in PER_CLASS_SCORES},
                "support": int(per_class_scores["support"][i]),
            }
            for i, name in enumerate(label_names)
        }
        return {
            **{key: float(value) for key, value in summary_scores(matrix).items()},
            "per_class": per_class,
            "confusion_matrix": matrix.tolist(),
            "num_classes": num_classes,
            "label_names": label_names,
        }
