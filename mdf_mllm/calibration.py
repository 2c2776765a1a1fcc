"""Calibration of class probabilities, as a clinician reads them: is a stated confidence the accuracy that comes with
it, and what accuracy is left when the model answers only the photos it is surest of.

Every function takes class probabilities (N, K), rows summing to 1, and true label ids (N,); numpy only.

- Expected calibration error (ECE): the photos in 15 equal-width bins (lower, upper] of their top-label confidence
  (the probability of the predicted class); the bins' |accuracy - mean confidence|, weighted by their share of photos.
- Brier score: the mean over photos of sum_k (p_k - [k = y])^2 (0 best, 2 worst).
- Negative log-likelihood (NLL): the mean of -log p_y, with p_y clipped to >= EPS so that one zero costs -log EPS
  rather than an infinite mean.
- 95% intervals: percentile bootstrap over the photos, drawn as `comparison.paired_difference` draws them
  (`np.random.default_rng(seed).integers(0, N, (n_bootstrap, N))`), so that with the same seed every row and every
  paired difference (model A minus model B on the same resampled photos) reads the same resamples as the accuracy's.
- Temperature scaling: one T > 0 fitted on the validation split, minimising the NLL of softmax(log p / T), which is
  softmax(z / T) of the logits z; T > 1 softens over-confident probabilities, and the predicted class never changes.
- Risk-coverage: the accuracy when the model answers only its most confident 100/90/80/70% of photos.
"""

import numpy as np

NUM_BINS = 15
EPS = 1e-12
COVERAGES = (1.0, 0.9, 0.8, 0.7)
METRICS = ("ece", "brier", "nll")
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _checked(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 probabilities and (N,) int64 labels, or a ValueError naming what is wrong."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0 or labels.shape != probabilities.shape[:1]:
        raise ValueError(f"probabilities must be (N, K) and labels (N,) with N >= 1, got {probabilities.shape} and "
                         f"{labels.shape}")
    if not np.isfinite(probabilities).all() or probabilities.min() < 0:
        raise ValueError("probabilities: every entry must be a finite number >= 0")
    sums = probabilities.sum(-1)
    if not np.allclose(sums, 1, atol=1e-3):
        raise ValueError(f"probabilities: each row must sum to 1; row {int(np.abs(sums - 1).argmax())} sums to "
                         f"{sums[np.abs(sums - 1).argmax()]:.4f}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(f"labels must be integer label ids in [0, {probabilities.shape[1]}), got {labels.dtype} "
                         f"{labels.min()}..{labels.max()}")
    return probabilities, labels.astype(np.int64)


def _per_photo(probabilities, labels, num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
    """Each photo's terms of the scores: top-label confidence, right (1.0 or 0.0), bin of its confidence, Brier and
    NLL terms; every score is a mean (or, for ECE, a binned sum) of these, which is what the bootstrap resamples."""
    probabilities, labels = _checked(probabilities, labels)
    rows = np.arange(len(labels))
    confidence = probabilities.max(-1)
    one_hot = np.eye(probabilities.shape[1])[labels]
    edges = np.linspace(0, 1, num_bins + 1)
    return {
        "confidence": confidence,
        "right": (probabilities.argmax(-1) == labels).astype(np.float64),
        "bin": np.digitize(confidence, edges[1:-1], right=True),  # bin b holds (edges[b], edges[b + 1]]
        "brier": ((probabilities - one_hot) ** 2).sum(-1),
        "nll": -np.log(np.maximum(probabilities[rows, labels], EPS)),
    }


def _scores(terms: dict, rows: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
    """ECE, Brier and NLL of the photos `rows` (R, n) picks (one resample per row): {metric: (R,)}.

    ECE = sum over bins of |sum of (right - confidence) in the bin| / n, the same as the bins' |accuracy - confidence|
    weighted by their share; the bins of all resamples are summed at once by offsetting resample r's by r * num_bins.
    """
    resamples, n = rows.shape
    bins = terms["bin"][rows] + num_bins * np.arange(resamples)[:, None]
    gaps = np.bincount(bins.ravel(), weights=(terms["right"] - terms["confidence"])[rows].ravel(),
                       minlength=resamples * num_bins).reshape(resamples, num_bins)
    return {"ece": np.abs(gaps).sum(-1) / n, "brier": terms["brier"][rows].mean(-1), "nll": terms["nll"][rows].mean(-1)}


def _all_photos(terms: dict) -> np.ndarray:
    return np.arange(len(terms["right"]))[None]


def expected_calibration_error(probabilities, labels, num_bins: int = NUM_BINS) -> float:
    terms = _per_photo(probabilities, labels, num_bins)
    return float(_scores(terms, _all_photos(terms), num_bins)["ece"][0])


def brier_score(probabilities, labels) -> float:
    return float(_per_photo(probabilities, labels)["brier"].mean())


def negative_log_likelihood(probabilities, labels) -> float:
    return float(_per_photo(probabilities, labels)["nll"].mean())


def _resamples(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def calibration_scores(probabilities, labels, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{"n", "ece", "brier", "nll", "ci95": {metric: [low, high]}}: the scores on all photos and their percentile 95%
    bootstrap intervals."""
    terms = _per_photo(probabilities, labels)
    point = _scores(terms, _all_photos(terms))
    samples = _scores(terms, _resamples(len(terms["right"]), n_bootstrap, seed))
    return {"n": len(terms["right"]), **{metric: float(point[metric][0]) for metric in METRICS},
            "ci95": {metric: np.percentile(samples[metric], [2.5, 97.5]).tolist() for metric in METRICS}}


def paired_calibration_difference(probabilities_a, probabilities_b, labels, n_bootstrap: int = 1000,
                                  seed: int = 0) -> dict[str, dict]:
    """{metric: {"n", "difference", "ci95"}}: A's score minus B's on the same photos, with the percentile 95% interval
    over resamples that score both on the same photos (lower is better for all three, so a negative difference
    favours A)."""
    a, b = _per_photo(probabilities_a, labels), _per_photo(probabilities_b, labels)
    n = len(a["right"])
    rows = _resamples(n, n_bootstrap, seed)
    point_a, point_b = _scores(a, _all_photos(a)), _scores(b, _all_photos(b))
    samples_a, samples_b = _scores(a, rows), _scores(b, rows)
    return {metric: {"n": n, "difference": float(point_a[metric][0] - point_b[metric][0]),
                     "ci95": np.percentile(samples_a[metric] - samples_b[metric], [2.5, 97.5]).tolist()}
            for metric in METRICS}


def calibration_report(probabilities, labels, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """One row's calibration: `calibration_scores` plus "reliability" (`reliability_bins`) and "risk_coverage"
    (`risk_coverage`), JSON-serialisable."""
    return {**calibration_scores(probabilities, labels, n_bootstrap, seed),
            "reliability": reliability_bins(probabilities, labels),
            "risk_coverage": risk_coverage(probabilities, labels)}


def reliability_bins(probabilities, labels, num_bins: int = NUM_BINS) -> list[dict]:
    """The reliability diagram: per equal-width confidence bin (lower, upper], {"lower", "upper", "n", "accuracy",
    "confidence"} (the accuracy and mean top-label confidence of its photos; None for an empty bin)."""
    terms = _per_photo(probabilities, labels, num_bins)
    edges = np.linspace(0, 1, num_bins + 1)
    bins = []
    for index in range(num_bins):
        inside = terms["bin"] == index
        mean = lambda values: float(values[inside].mean()) if inside.any() else None  # noqa: E731
        bins.append({"lower": float(edges[index]), "upper": float(edges[index + 1]), "n": int(inside.sum()),
                     "accuracy": mean(terms["right"]), "confidence": mean(terms["confidence"])})
    return bins


# ----------------------------------------------------------------------------------------------------------------------
# Temperature scaling


def _log_scores(probabilities, logits) -> np.ndarray:
    """Logits, or the log of probabilities (a zero stays -inf, so a class with probability 0 keeps it at any T)."""
    if (probabilities is None) == (logits is None):
        raise ValueError("pass exactly one of probabilities= and logits=")
    if logits is not None:
        return np.asarray(logits, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probabilities, dtype=np.float64))


def apply_temperature(temperature: float, *, probabilities=None, logits=None) -> np.ndarray:
    """softmax(log p / T) (or softmax(z / T) of logits z): (N, K) probabilities."""
    if not 0 < temperature < np.inf:
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    scaled = _log_scores(probabilities, logits) / temperature
    scaled = np.exp(scaled - scaled.max(-1, keepdims=True))
    return scaled / scaled.sum(-1, keepdims=True)


def fit_temperature(labels, *, probabilities=None, logits=None, bounds=TEMPERATURE_BOUNDS) -> float:
    """The T in `bounds` that minimises the NLL of softmax(log p / T) on these (validation) photos.

    The NLL is convex in 1/T, so it has one minimum along log T, found by golden-section search (to a relative 1e-8 or
    so: the NLL is flat at its minimum, and its values are exact to 1e-16).
    A T at a bound means the NLL still falls beyond it (e.g. T at the lower bound for a validation split the model
    gets all right: sharper is always better there).
    """
    if not 0 < bounds[0] < bounds[1] < np.inf:
        raise ValueError(f"bounds: expected 0 < low < high < inf, got {bounds!r}")
    scores = _log_scores(probabilities, logits)
    nll = lambda log_t: negative_log_likelihood(apply_temperature(np.exp(log_t), logits=scores), labels)  # noqa: E731
    low, high = np.log(bounds)
    golden = (np.sqrt(5) - 1) / 2
    left, right = high - golden * (high - low), low + golden * (high - low)
    nll_left, nll_right = nll(left), nll(right)
    while high - low > 1e-9:
        if nll_left <= nll_right:  # the minimum is not right of `right`
            high, right, nll_right = right, left, nll_left
            left = high - golden * (high - low)
            nll_left = nll(left)
        else:
            low, left, nll_left = left, right, nll_right
            right = low + golden * (high - low)
            nll_right = nll(right)
    return float(np.exp((low + high) / 2))


# ----------------------------------------------------------------------------------------------------------------------
# Risk-coverage


def coverage_curve(probabilities, labels) -> dict[str, np.ndarray]:
    """Accuracy when the model answers only its k most confident photos, for k = 1..N:
    {"coverage": k / N, "accuracy", "threshold": the lowest confidence answered}.

    Ties are broken by expectation, not by photo order: photos of equal confidence that straddle the cut count at
    their group's mean accuracy, i.e. the accuracy averaged over every order of the tied photos. The result is then
    the same for any order of the test photos (whose order could follow their labels).
    """
    terms = _per_photo(probabilities, labels)
    n = len(terms["right"])
    # Groups of equal confidence, the most confident first, and for each the photos and right answers before it.
    values, group_of_photo, counts = np.unique(-terms["confidence"], return_inverse=True, return_counts=True)
    group_right = np.bincount(group_of_photo, weights=terms["right"], minlength=len(values))
    before, right_before = np.cumsum(counts) - counts, np.cumsum(group_right) - group_right
    k = np.arange(1, n + 1)
    group = np.repeat(np.arange(len(values)), counts)  # the group of the k-th most confident photo
    right = right_before[group] + (k - before[group]) * group_right[group] / counts[group]
    return {"coverage": k / n, "accuracy": right / k, "threshold": -values[group]}


def risk_coverage(probabilities, labels, coverages=COVERAGES) -> list[dict]:
    """[{"coverage", "n", "accuracy", "threshold"}]: per coverage c, the accuracy on the n = ceil(c N) most confident
    photos (the fewest photos that make at least c of them; ties as in `coverage_curve`), and the lowest confidence
    answered."""
    curve = coverage_curve(probabilities, labels)
    table = []
    for coverage in coverages:
        if not 0 < coverage <= 1:
            raise ValueError(f"coverages: each must be in (0, 1], got {coverage!r}")
        # Rounded first: 0.55 * 100 is 55.00000000000001, which would answer 56.
        answered = max(1, int(np.ceil(round(coverage * len(curve["coverage"]), 6))))
        table.append({"coverage": coverage, "n": answered, "accuracy": float(curve["accuracy"][answered - 1]),
                      "threshold": float(curve["threshold"][answered - 1])})
    return table


# ----------------------------------------------------------------------------------------------------------------------
# The table


NOTE = (f"Expected calibration error (ECE): the test photos in {NUM_BINS} equal-width bins of the top-label "
        "confidence, the bins' |accuracy - mean confidence| weighted by their share of photos. Brier: the mean over "
        "photos of the squared distance between the probabilities and the one-hot true label, summed over classes. "
        "NLL: the mean of -log p(true class). Lower is better for all three; 95% CIs: percentile bootstrap over the "
        "photos. Accuracy on the most confident share: the model answers only the photos it gives the highest "
        "top-label probability; photos tied at the cut count at their mean accuracy.")


def _with_interval(report: dict, metric: str) -> str:
    low, high = report["ci95"][metric]
    return f"{report[metric]:.3f} ({low:.3f} to {high:.3f})"


def markdown_table(reports: dict[str, dict]) -> str:
    """Markdown table of rows' `calibration_report`s on the same photos (ECE, Brier, NLL with their 95% CIs and the
    accuracy at each coverage of the risk-coverage table), followed by `NOTE`."""
    coverages = next(iter(reports.values()))["risk_coverage"]
    lines = ["| Row | ECE (95% CI) | Brier (95% CI) | NLL (95% CI) | "
             + " | ".join(f"Accuracy, most confident {r['coverage']:.0%} (n = {r['n']})" for r in coverages) + " |",
             "|---|---|---|---|" + "---:|" * len(coverages)]
    for name, report in reports.items():
        cells = [_with_interval(report, metric) for metric in METRICS]
        cells += [f"{r['accuracy']:.3f}" for r in report["risk_coverage"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + NOTE + "\n"
