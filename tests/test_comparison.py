"""mdf_mllm/comparison.py: the reference rows (text only, late fusion, joint), the subsets every row reports, paired
differences, the counterfactual summary."""

import numpy as np
import pytest

from mdf_mllm import comparison, tables


def test_text_only_is_tfidf_and_logistic_regression():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = ["night blindness uncle", "central blur reading", "", "night blindness father", "central blur"]
    labels = [1, 2, 0, 1, 2]
    test = ["night blindness", "", "reading blur"]
    probabilities = comparison.TextOnly(train, labels, num_classes=4).probabilities(test)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    fill = lambda texts: [t or "notext" for t in texts]  # noqa: E731
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(vectorizer.fit_transform(fill(train)), labels)
    expected = classifier.predict_proba(vectorizer.transform(fill(test)))
    assert probabilities.shape == (3, 4) and np.all(probabilities[:, 3] == 0)  # class 3 never seen in training
    np.testing.assert_allclose(probabilities[:, :3], expected, rtol=1e-12)
    assert probabilities.argmax(1).tolist() == [1, 0, 2]


def test_late_fusion_by_hand():
    image = np.array([[0.6, 0.4, 0.0], [0.5, 0.25, 0.25]])
    text = np.array([[0.2, 0.8, 0.0], [0.1, 0.1, 0.8]])
    prior = np.array([0.5, 0.25, 0.25])
    # Photo 1: 0.6*0.2/0.5 = 0.24, 0.4*0.8/0.25 = 1.28, 0 -> / 1.52. Photo 2: 0.1, 0.1, 0.8 -> / 1.0.
    expected = np.array([[0.24 / 1.52, 1.28 / 1.52, 0.0], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(comparison.late_fusion(image, text, prior), expected, rtol=1e-12)
    # A class absent from the training split (prior 0) gets 0, not a division by zero: 0.1, 0.05, 0 -> / 0.15.
    np.testing.assert_allclose(comparison.late_fusion(image, text, np.array([0.5, 0.5, 0.0]))[1],
                               [2 / 3, 1 / 3, 0.0], rtol=1e-12)
    assert comparison.class_prior([0, 0, 1, 2], 3).tolist() == [0.5, 0.25, 0.25]


def test_paired_interval_by_hand():
    # Two models right on the same 30 of 40 photos; A also on 4 more: A is never worse on any resample of photos.
    right_b = np.arange(40) < 30
    right_a = right_b | (np.arange(40) >= 36)
    result = comparison.paired_difference(right_a, right_b, n_bootstrap=500, seed=3)
    rows = np.random.default_rng(3).integers(0, 40, size=(500, 40))
    differences = right_a[rows].mean(1) - right_b[rows].mean(1)  # both models on the same resampled photos
    assert result["n"] == 40 and result["difference"] == pytest.approx(0.1)
    assert result["ci95"] == pytest.approx(np.percentile(differences, [2.5, 97.5]).tolist())
    assert result["ci95"][0] > 0
    # Resampling the two models' photos independently (unpaired) would put 0 inside the interval.
    other = np.random.default_rng(4).integers(0, 40, size=(500, 40))
    assert np.percentile(right_a[rows].mean(1) - right_b[other].mean(1), 2.5) < 0
    with pytest.raises(ValueError, match="both models must score the same photos"):
        comparison.paired_difference(right_a, right_b[:4])


def result(name, predictions, labels, history, num_classes=3, age_dependent=None):
    probabilities = np.eye(num_classes)[predictions] * 0.9 + 0.1 / num_classes
    return comparison.score(name, probabilities, labels, history, ["a", "b", "c"], ["normal", "acquired", "inherited"],
                            n_bootstrap=50, age_dependent=age_dependent)


def test_rows_report_accuracy_on_every_subset_and_the_tables_read_them():
    labels = [0, 1, 2, 2, 1, 0]
    history = [True, True, True, False, False, False]
    age = [False, True, False, True, False, False]
    ours = result("MDF-MLLM", [0, 1, 2, 2, 0, 0], labels, history, age_dependent=age)
    other = result("Text only", [0, 1, 1, 0, 1, 1], labels, history, age_dependent=age)
    assert ours.report["subsets"] == {"all": {"n": 6, "accuracy": 5 / 6}, "with_history": {"n": 3, "accuracy": 1.0},
                                      "without_history": {"n": 3, "accuracy": 2 / 3},
                                      "age_dependent": {"n": 2, "accuracy": 1.0}}
    assert other.accuracy("with_history") == pytest.approx(2 / 3) and other.accuracy() == pytest.approx(0.5)
    assert other.accuracy("age_dependent") == 0.5
    differences = comparison.paired_differences(ours, [other], labels, history, n_bootstrap=50, age_dependent=age)
    assert differences["Text only"]["all"]["difference"] == pytest.approx(5 / 6 - 0.5)
    assert differences["Text only"]["with_history"]["difference"] == pytest.approx(1 / 3)
    assert differences["Text only"]["with_history"]["n"] == 3
    assert differences["Text only"]["age_dependent"] == {"n": 2, "difference": 0.5, "ci95": pytest.approx(
        comparison.paired_difference([1, 1], [1, 0], 50)["ci95"])}
    markdown = tables.comparison_markdown([ours, other], differences)
    row = next(line for line in markdown.splitlines() if line.startswith("| Text only |"))
    assert row.split(" | ")[2:5] == ["0.667", "0.333", "0.500"]  # with a history, without, age-dependent
    paired = next(line for line in markdown.splitlines() if line.startswith("| Text only | +"))
    assert paired.startswith(f"| Text only | {5 / 6 - 0.5:+.3f} (") and f"| {1 / 3:+.3f} (" in paired
    assert paired.split(" | ")[4].startswith("+0.500 (")  # the age-dependent photos' column
    # Every row's calibration on all photos: here each photo's top probability is 0.9 + 0.1 / 3.
    assert ours.report["calibration"]["ece"] == pytest.approx(abs(5 / 6 - (0.9 + 0.1 / 3)))
    assert "parameters" not in ours.as_json() and "probabilities" not in ours.as_json()


def test_counterfactual_summary_by_hand():
    groups = ["stargardt as amd", "stargardt as amd", "amd as amd", "dr", "dr", "dr"]
    kinds = ["phenocopy"] * 3 + ["photo decides"] * 3
    points_to = [[1], [1], [2], [1, 4], [1, 4], [1, 4]]
    original = [2, 2, 1, 3, 3, 0]
    swapped = [1, 2, 2, 3, 4, 0]
    rows = comparison.counterfactual_summary(groups, kinds, points_to, original, swapped)
    assert rows == [
        {"group": "stargardt as amd", "kind": "phenocopy", "n": 2, "follows": 0.5, "changed": 0.5},
        {"group": "amd as amd", "kind": "phenocopy", "n": 1, "follows": 1.0, "changed": 1.0},
        {"group": "dr", "kind": "photo decides", "n": 3, "follows": pytest.approx(1 / 3),
         "changed": pytest.approx(1 / 3)},
        {"group": "all phenocopy photos", "kind": "phenocopy", "n": 3, "follows": pytest.approx(2 / 3),
         "changed": pytest.approx(2 / 3)},
        {"group": "all photo decides photos", "kind": "photo decides", "n": 3, "follows": pytest.approx(1 / 3),
         "changed": pytest.approx(1 / 3)},
    ]
    table = tables.counterfactual_table({"MDF-MLLM": rows})
    assert "| **all phenocopy photos** | phenocopy | 3 | 0.667 / 0.667 |" in table


def test_history_vector_and_joint_features_by_hand():
    texts = ["12-year-old male. Blur.", "17-year-old female.", "66-year-old male.", "", "Seen in clinic."]
    text_probabilities = np.array([[0.25, 0.75]] * 5)
    history = comparison.history_vector(texts, text_probabilities)
    # Columns: 2 text probabilities, age bins 0-16, 17-29, 30-49, 50-65, 66+, no age; history present.
    assert history.tolist() == [[0.25, 0.75, 1, 0, 0, 0, 0, 0, 1], [0.25, 0.75, 0, 1, 0, 0, 0, 0, 1],
                                [0.25, 0.75, 0, 0, 0, 0, 1, 0, 1], [0.25, 0.75, 0, 0, 0, 0, 0, 1, 0],
                                [0.25, 0.75, 0, 0, 0, 0, 0, 1, 1]]
    image = np.array([[0.9, 0.1]] * 5)
    features = comparison.joint_features(image, history)
    # Each class's probability times each age bin (class-major), between the image and the history.
    assert features[0].tolist() == [0.9, 0.1, 0.9, 0, 0, 0, 0, 0, 0.1, 0, 0, 0, 0, 0, *history[0]]
    assert features[2, 2:14].tolist() == [0, 0, 0, 0, 0.9, 0, 0, 0, 0, 0, 0.1, 0]


def age_xor(count: int, offset: int):
    """Photos of two looks, the U-Net leaning 0.8 / 0.2 to the class a look means in a child: a child's look P is
    class 0 and an adult's class 1, look Q the other way round; the histories differ only by the age."""
    looks = np.arange(count) % 2
    adult = (np.arange(count) // 2) % 2
    ages = np.where(adult, 40 + (np.arange(count) + offset) % 9, 6 + (np.arange(count) + offset) % 9)
    texts = [f"{age}-year-old male. Gradual central blur over the past 2 years." for age in ages]
    image = np.where(looks[:, None] == 0, [[0.8, 0.2]], [[0.2, 0.8]])
    return image, texts, looks ^ adult


def test_the_joint_reference_reads_the_age_with_the_photo_where_late_fusion_cannot():
    """An XOR of look and age: neither the image (0.8 for the child's class), nor the text (the same sentence with
    ages half of each class), nor their product decides; the age bins times the image's probabilities do. The
    fitted model is the logistic regression of the hand-made features (an independent fit), and deterministic."""
    from sklearn.linear_model import LogisticRegression

    image, texts, labels = age_xor(48, 0)
    test_image, test_texts, test_labels = age_xor(24, 3)
    joint = comparison.Joint(image, texts, labels, 2)
    text = comparison.TextOnly(texts, labels, 2).probabilities(test_texts)
    predicted = joint.probabilities(test_image, text, test_texts)
    assert (predicted.argmax(1) == test_labels).all()
    assert np.allclose(predicted.sum(1), 1)
    fused = comparison.late_fusion(test_image, text, comparison.class_prior(labels, 2))
    assert (fused.argmax(1) == test_labels).mean() <= 0.6
    # The same fit by hand: out-of-fold text probabilities, the age bins, the products, a logistic regression.
    folds = np.array_split(np.random.default_rng(0).permutation(48), 5)
    oof = np.zeros((48, 2))
    for fold in folds:
        rest = np.setdiff1d(np.arange(48), fold)
        oof[fold] = comparison.TextOnly([texts[i] for i in rest], labels[rest], 2).probabilities(
            [texts[i] for i in fold])
    bins = lambda ts: np.array([[a < 17, 17 <= a < 30, 30 <= a < 50, 50 <= a < 66, a >= 66, False, True]  # noqa: E731
                                for a in (int(t.split("-")[0]) for t in ts)], dtype=float)
    by_hand = lambda p, q, ts: np.concatenate([p, (p[:, :, None] * bins(ts)[:, None, :6]).reshape(len(p), -1),  # noqa: E731
                                               q, bins(ts)], 1)
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(by_hand(image, oof, texts), labels)
    assert predicted == pytest.approx(reference.predict_proba(by_hand(test_image, text, test_texts)), abs=1e-6)
    again = comparison.Joint(image, texts, labels, 2).probabilities(test_image, text, test_texts)
    assert np.array_equal(again, predicted)
