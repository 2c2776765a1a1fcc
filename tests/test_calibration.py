"""Calibration (mdf_mllm/calibration.py and its plots): each score against a case computed by hand or by an
independent formula here."""

import math

import numpy as np
import pytest

from mdf_mllm import calibration, comparison, plots
from test_reporting import assert_png, figures  # noqa: F401 (a fixture)

# Five photos, three classes. Top-label confidence (bin of 15 equal-width bins (lower, upper]) and right?:
# 1.0 (bin 14) yes, 0.95 (bin 14) no, 0.9 (bin 13) yes, 0.5 (bin 7) no, 0.62 (bin 9) yes.
HAND = np.array([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.08, 0.3, 0.62]])
HAND_LABELS = np.array([0, 1, 0, 2, 2])


def random_rows(seed: int, n: int = 40, k: int = 4, sharpness: float = 3.0):
    """Probabilities of a noisy model (the true class favoured) and the true labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = sharpness * rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 2.0
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), labels


def test_expected_calibration_error_by_hand():
    # Bins: 14 holds 1.0 (right) and 0.95 (wrong): |1/2 - 1.95/2|; 13: |1 - 0.9|; 7: |0 - 0.5|; 9: |1 - 0.62|;
    # weighted by 2/5, 1/5, 1/5, 1/5.
    expected = 2 / 5 * abs(0.5 - 0.975) + (0.1 + 0.5 + 0.38) / 5
    assert expected == pytest.approx(0.386)
    assert calibration.expected_calibration_error(HAND, HAND_LABELS) == pytest.approx(expected, abs=1e-12)


def test_reliability_bins_by_hand():
    bins = calibration.reliability_bins(HAND, HAND_LABELS)
    assert len(bins) == 15 and bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    assert [b["upper"] - b["lower"] for b in bins] == pytest.approx([1 / 15] * 15)
    filled = {index: (b["n"], b["accuracy"], b["confidence"]) for index, b in enumerate(bins) if b["n"]}
    assert filled == {14: (2, 0.5, pytest.approx(0.975)), 13: (1, 1.0, 0.9), 7: (1, 0.0, 0.5), 9: (1, 1.0, 0.62)}
    assert all(b["accuracy"] is None and b["confidence"] is None for b in bins if not b["n"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_calibration_error_equals_a_loop_over_bins(seed):
    probabilities, labels = random_rows(seed, n=200, k=5)
    confidence, right = probabilities.max(-1), probabilities.argmax(-1) == labels
    expected = 0.0
    for lower, upper in zip(np.arange(15) / 15, np.arange(1, 16) / 15):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            expected += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected, abs=1e-12)


def test_brier_score_by_hand():
    # Per photo sum_k (p_k - [k = y])^2: 0; 0.95^2 + 0.95^2; 0.1^2 + 2 * 0.05^2; 0.2^2 + 0.5^2 + 0.7^2;
    # 0.08^2 + 0.3^2 + 0.38^2.
    expected = (0 + 1.805 + 0.015 + 0.78 + 0.2408) / 5
    assert calibration.brier_score(HAND, HAND_LABELS) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.56816)


def test_negative_log_likelihood_by_hand_and_a_zero_probability_is_finite():
    expected = -(math.log(1.0) + math.log(0.05) + math.log(0.9) + math.log(0.3) + math.log(0.62)) / 5
    assert calibration.negative_log_likelihood(HAND, HAND_LABELS) == pytest.approx(expected, abs=1e-12)
    # The first photo's true class given probability 0: it costs -log(EPS), not an infinite mean.
    wrong = HAND_LABELS.copy()
    wrong[0] = 1
    expected_zero = expected + (-math.log(calibration.EPS) - 0) / 5
    assert calibration.negative_log_likelihood(HAND, wrong) == pytest.approx(expected_zero, abs=1e-12)


@pytest.mark.parametrize(("probabilities", "labels", "message"), [
    (HAND[0], HAND_LABELS[:1], r"probabilities must be \(N, K\) and labels \(N,\)"),
    (HAND, HAND_LABELS[:4], r"probabilities must be \(N, K\) and labels \(N,\)"),
    (HAND * 2, HAND_LABELS, "each row must sum to 1; row 0 sums to 2.0000"),
    (np.where(HAND == 0.2, np.nan, HAND), HAND_LABELS, "every entry must be a finite number >= 0"),
    (HAND, [0, 1, 0, 2, 3], r"labels must be integer label ids in \[0, 3\)"),
    (HAND, [0.0, 1, 0, 2, 2], r"labels must be integer label ids in \[0, 3\)"),
])
def test_bad_input_names_the_field(probabilities, labels, message):
    for score in (calibration.expected_calibration_error, calibration.brier_score,
                  calibration.negative_log_likelihood, calibration.risk_coverage):
        with pytest.raises(ValueError, match=message):
            score(probabilities, labels)


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def resampled(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """The resamples `comparison.paired_difference` draws (its accuracy intervals pair with these)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


SCORES = {"ece": calibration.expected_calibration_error, "brier": calibration.brier_score,
          "nll": calibration.negative_log_likelihood}


def test_bootstrap_intervals_equal_a_loop_over_the_comparisons_resamples():
    probabilities, labels = random_rows(3, n=30)
    report = calibration.calibration_scores(probabilities, labels, n_bootstrap=60, seed=7)
    rows = resampled(30, 60, 7)
    assert report["n"] == 30
    for metric, score in SCORES.items():
        assert report[metric] == score(probabilities, labels)
        samples = [score(probabilities[r], labels[r]) for r in rows]
        np.testing.assert_allclose(report["ci95"][metric], np.percentile(samples, [2.5, 97.5]), atol=1e-12)
        assert report["ci95"][metric][0] <= report[metric] <= report["ci95"][metric][1]
    # The accuracy's paired difference reads the same resamples.
    right = (probabilities.argmax(-1) == labels).astype(float)
    accuracy = comparison.paired_difference(right, np.zeros(30), n_bootstrap=60, seed=7)
    np.testing.assert_allclose(accuracy["ci95"], np.percentile(right[rows].mean(1), [2.5, 97.5]))


def test_paired_difference_scores_both_models_on_the_same_resamples():
    probabilities, labels = random_rows(4, n=30)
    softer = calibration.apply_temperature(2.5, probabilities=probabilities)
    differences = calibration.paired_calibration_difference(probabilities, softer, labels, n_bootstrap=50, seed=3)
    rows = resampled(30, 50, 3)
    for metric, score in SCORES.items():
        assert differences[metric]["n"] == 30
        assert differences[metric]["difference"] == pytest.approx(score(probabilities, labels) - score(softer, labels))
        samples = [score(probabilities[r], labels[r]) - score(softer[r], labels[r]) for r in rows]
        np.testing.assert_allclose(differences[metric]["ci95"], np.percentile(samples, [2.5, 97.5]), atol=1e-12)
    itself = calibration.paired_calibration_difference(probabilities, probabilities, labels, n_bootstrap=50)
    assert all(d["difference"] == 0 and d["ci95"] == [0, 0] for d in itself.values())
    with pytest.raises(ValueError, match="n_bootstrap must be >= 1, got 0"):
        calibration.calibration_scores(probabilities, labels, n_bootstrap=0)


# ----------------------------------------------------------------------------------------------------------------------
# Temperature


# Two classes, every photo p = (0.9, 0.1), three of four labelled 0. NLL(T) is minimal where the scaled probability of
# class 0, sigmoid(ln 9 / T), equals the share 3/4: ln 9 / T = logit(3/4) = ln 3, so T = 2, and the scaled
# probabilities are (3/4, 1/4).
TWO_CLASS = np.array([[0.9, 0.1]] * 4)
TWO_CLASS_LABELS = np.array([0, 0, 0, 1])


def test_temperature_of_a_two_class_case_by_hand():
    assert calibration.fit_temperature(TWO_CLASS_LABELS, probabilities=TWO_CLASS) == pytest.approx(2.0, rel=1e-6)
    scaled = calibration.apply_temperature(2.0, probabilities=TWO_CLASS)
    np.testing.assert_allclose(scaled, [[0.75, 0.25]] * 4, atol=1e-15)
    # Logits (any shift per photo) give the same as the probabilities they stand for.
    logits = np.log(TWO_CLASS) + np.array([[5.0], [-3.0], [0.0], [100.0]])
    assert calibration.fit_temperature(TWO_CLASS_LABELS, logits=logits) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(calibration.apply_temperature(2.0, logits=logits), scaled, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_fitted_temperature_zeroes_the_nll_gradient(seed):
    """At the fitted T the derivative of the NLL in beta = 1/T, mean over photos of E_q[s] - s_y (q the scaled
    probabilities, s the log-probabilities), is 0; it is the first-order condition of the minimum, not the search."""
    probabilities, labels = random_rows(seed, n=300, k=5, sharpness=4.0)  # over-confident: T > 1
    temperature = calibration.fit_temperature(labels, probabilities=probabilities)
    log_p = np.log(probabilities)
    scaled = np.exp(log_p / temperature)
    scaled /= scaled.sum(-1, keepdims=True)
    gradient = ((scaled * log_p).sum(-1) - log_p[np.arange(len(labels)), labels]).mean()
    assert temperature > 1 and abs(gradient) < 1e-6
    # Scaling by T never changes the predicted class, and lowers the NLL.
    assert (scaled.argmax(-1) == probabilities.argmax(-1)).all()
    assert calibration.negative_log_likelihood(scaled, labels) < calibration.negative_log_likelihood(
        probabilities, labels)


def test_temperature_stops_at_its_bounds_and_zero_probabilities_stay_zero():
    # Every photo right: sharper is always better, so T reaches the lower bound.
    right = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    low = calibration.TEMPERATURE_BOUNDS[0]
    assert calibration.fit_temperature([0, 1], probabilities=right) == pytest.approx(low, rel=1e-6)
    assert calibration.fit_temperature([0, 1], probabilities=right, bounds=(0.5, 3)) == pytest.approx(0.5, rel=1e-6)
    # A class given 0 (one the training split lacks) keeps 0 at any T.
    scaled = calibration.apply_temperature(3.0, probabilities=[[0.5, 0.5, 0.0]])
    np.testing.assert_array_equal(scaled, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: calibration.apply_temperature(0.0, probabilities=TWO_CLASS), "temperature: expected a positive finite"),
    (lambda: calibration.apply_temperature(float("nan"), logits=TWO_CLASS), "temperature: expected a positive finite"),
    (lambda: calibration.apply_temperature(1.0), "pass exactly one of probabilities= and logits="),
    (lambda: calibration.fit_temperature([0], probabilities=TWO_CLASS[:1], logits=TWO_CLASS[:1]),
     "pass exactly one of probabilities= and logits="),
    (lambda: calibration.fit_temperature([0], probabilities=TWO_CLASS[:1], bounds=(0, 2)),
     r"bounds: expected 0 < low < high < inf, got \(0, 2\)"),
])
def test_temperature_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------------------------------
# Risk-coverage


def test_risk_coverage_by_hand_in_any_photo_order():
    # Ten photos, confidence 0.99 down to 0.55, right: 1 1 1 0 1 1 0 1 0 0. Most confident 10: 6/10; 9: 6/9;
    # 8: 6/8; 7: 5/7.
    confidence = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55])
    right = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    probabilities = np.stack([confidence, 1 - confidence], -1)
    labels = np.where(right, 0, 1)
    expected = [(1.0, 10, 6 / 10, 0.55), (0.9, 9, 6 / 9, 0.6), (0.8, 8, 6 / 8, 0.65), (0.7, 7, 5 / 7, 0.7)]
    for order in (np.arange(10), np.random.default_rng(0).permutation(10)):
        table = calibration.risk_coverage(probabilities[order], labels[order])
        assert [(r["coverage"], r["n"], r["accuracy"], r["threshold"]) for r in table] == [
            (c, n, pytest.approx(a, abs=1e-15), t) for c, n, a, t in expected]


def test_risk_coverage_counts_the_fewest_photos_that_reach_the_coverage():
    probabilities, labels = random_rows(5, n=7)
    assert [r["n"] for r in calibration.risk_coverage(probabilities, labels)] == [7, 7, 6, 5]  # 6.3, 5.6, 4.9 up
    assert [r["n"] for r in calibration.risk_coverage(probabilities, labels, coverages=(0.01, 0.5))] == [1, 4]
    probabilities, labels = random_rows(5, n=100)
    assert calibration.risk_coverage(probabilities, labels, coverages=(0.55,))[0]["n"] == 55  # 0.55 * 100 = 55.000..01
    with pytest.raises(ValueError, match=r"coverages: each must be in \(0, 1\], got 0"):
        calibration.risk_coverage(probabilities, labels, coverages=(1.0, 0))


def test_ties_at_the_cut_count_at_their_mean_accuracy_in_any_order():
    # Confidence 0.9 (right), then three tied at 0.6 (right, wrong, wrong), then 0.5 (right). Answering 2 photos takes
    # the first and one of the tied three, right with probability 1/3: accuracy (1 + 1/3) / 2.
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1, 0])
    expected = [1.0, (1 + 1 / 3) / 2, (1 + 2 / 3) / 3, 2 / 4, 3 / 5]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 3, 4, 1]):
        curve = calibration.coverage_curve(probabilities[order], labels[order])
        np.testing.assert_allclose(curve["accuracy"], expected, atol=1e-15)
        np.testing.assert_allclose(curve["coverage"], [0.2, 0.4, 0.6, 0.8, 1.0])
        np.testing.assert_array_equal(curve["threshold"], [0.9, 0.6, 0.6, 0.6, 0.5])


def test_coverage_curve_without_ties_is_the_accuracy_of_the_top_k():
    probabilities, labels = random_rows(6, n=50)
    order = np.argsort(-probabilities.max(-1))
    right = (probabilities.argmax(-1) == labels)[order]
    curve = calibration.coverage_curve(probabilities, labels)
    np.testing.assert_allclose(curve["accuracy"], np.cumsum(right) / np.arange(1, 51), atol=1e-15)


def test_calibration_report_gathers_one_rows_scores():
    probabilities, labels = random_rows(7, n=30)
    report = calibration.calibration_report(probabilities, labels, n_bootstrap=20, seed=1)
    assert report == {**calibration.calibration_scores(probabilities, labels, 20, 1),
                      "reliability": calibration.reliability_bins(probabilities, labels),
                      "risk_coverage": calibration.risk_coverage(probabilities, labels)}
    assert report["risk_coverage"][0]["accuracy"] == pytest.approx((probabilities.argmax(-1) == labels).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Plots


def test_reliability_diagram_has_a_panel_per_row_with_its_bins(figures, tmp_path):  # noqa: F811
    rows = {"MDF-MLLM": HAND, "late fusion": random_rows(8, n=5, k=3)[0], "text only": HAND[::-1].copy(),
            "U-Net alone": np.full((5, 3), 1 / 3)}
    assert_png(plots.plot_reliability(rows, HAND_LABELS, tmp_path / plots.RELIABILITY_FILE))
    panels = figures[0].axes
    assert len(panels) == 6 and [p.axison for p in panels] == [True] * 4 + [False] * 2  # 2 x 3, two left empty
    for axes, (name, probabilities) in zip(panels, rows.items()):
        filled = [b for b in calibration.reliability_bins(probabilities, HAND_LABELS) if b["n"]]
        bars = axes.containers[0].patches
        assert [bar.get_height() for bar in bars] == [b["accuracy"] for b in filled]
        assert [bar.get_x() + bar.get_width() / 2 for bar in bars] == pytest.approx(
            [(b["lower"] + b["upper"]) / 2 for b in filled])
        assert [t.get_text() for t in axes.texts] == [str(b["n"]) for b in filled]
        ece = calibration.expected_calibration_error(probabilities, HAND_LABELS)
        assert axes.get_title() == f"{name}\nECE {ece:.3f}"
    assert panels[0].get_title() == "MDF-MLLM\nECE 0.386"
    with pytest.raises(ValueError, match="probabilities: no row to plot"):
        plots.plot_reliability({}, HAND_LABELS, tmp_path / "none.png")


def test_risk_coverage_plot_draws_each_rows_curve_and_table(figures, tmp_path):  # noqa: F811
    rows = {"MDF-MLLM": random_rows(9, n=20)[0], "baseline": random_rows(10, n=20)[0]}
    labels = random_rows(9, n=20)[1]
    assert_png(plots.plot_risk_coverage(rows, labels, tmp_path / plots.RISK_COVERAGE_FILE))
    (axes,) = figures[0].axes
    lines = axes.get_lines()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == list(rows)
    for index, (name, probabilities) in enumerate(rows.items()):
        curve, dots = lines[2 * index], lines[2 * index + 1]
        expected = calibration.coverage_curve(probabilities, labels)
        np.testing.assert_array_equal(curve.get_xdata(), expected["coverage"])
        np.testing.assert_array_equal(curve.get_ydata(), expected["accuracy"])
        table = calibration.risk_coverage(probabilities, labels)
        assert list(dots.get_xdata()) == list(calibration.COVERAGES)
        assert list(dots.get_ydata()) == [r["accuracy"] for r in table]
        assert curve.get_color() == dots.get_color()


def test_markdown_table_of_two_rows():
    def report(ece, brier, nll, accuracies):
        return {"n": 10, "ece": ece, "brier": brier, "nll": nll,
                "ci95": {"ece": [ece - 0.01, ece + 0.02], "brier": [brier - 0.1, brier + 0.1], "nll": [0.5, 2.0]},
                "risk_coverage": [{"coverage": c, "n": n, "accuracy": a, "threshold": 0.5}
                                  for c, n, a in zip(calibration.COVERAGES, (10, 9, 8, 7), accuracies)]}

    table = calibration.markdown_table({"MDF-MLLM": report(0.04, 0.2, 1.0, (0.9, 0.95, 1.0, 1.0)),
                                        "baseline": report(0.25, 0.8, 1.5, (0.6, 0.6, 0.625, 5 / 7))})
    assert table.split("\n\n")[0].splitlines() == [
        "| Row | ECE (95% CI) | Brier (95% CI) | NLL (95% CI) | Accuracy, most confident 100% (n = 10) | "
        "Accuracy, most confident 90% (n = 9) | Accuracy, most confident 80% (n = 8) | "
        "Accuracy, most confident 70% (n = 7) |",
        "|---|---|---|---|---:|---:|---:|---:|",
        "| MDF-MLLM | 0.040 (0.030 to 0.060) | 0.200 (0.100 to 0.300) | 1.000 (0.500 to 2.000) | 0.900 | 0.950 | "
        "1.000 | 1.000 |",
        "| baseline | 0.250 (0.240 to 0.270) | 0.800 (0.700 to 0.900) | 1.500 (0.500 to 2.000) | 0.600 | 0.600 | "
        "0.625 | 0.714 |",
    ]
    assert table.endswith(calibration.NOTE + "\n") and "15 equal-width bins" in calibration.NOTE
