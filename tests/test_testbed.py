"""The fusion testbed: the synthetic StoneRounds-like part's phenocopies and overlapping histories, and the rows
that measure fusion (text only, late fusion, paired differences, counterfactual histories)."""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

from configuration_mdf_mllm import DEFAULT_LABELS
from dataset_builder import TINY_COMPOSITION, builder, synthetic
from dataset_builder.sources import Record
from mdf_mllm import comparison, tables

LABELS = [name for name, _, _ in DEFAULT_LABELS]


def split_plan(composition=None, seed=0):
    """The planned items of a composition and the split the builder gives each (no photo rendered)."""
    items = synthetic.plan(None, seed, composition)
    records = [Record(f"synthetic_{i.part}", i.case_id, i.label, i.text, official_split=i.official_split,
                      synthetic=i) for i in items]
    return items, builder.assign_splits(records, seed)


def pairs():
    """Both sides of every phenocopy (one look, two labels) and overlapping history (one kind, two labels)."""
    found = []
    for look, labels in synthetic.LOOK_LABELS.items():
        if len(labels) > 1:
            found.append(("look", look, labels))
    for kind, labels in synthetic.HISTORY_LABELS.items():
        if len(labels) > 1:
            found.append(("history", kind, labels))
    return found


def test_the_design_has_the_clinical_pairs():
    """The pairs of the data documentation, each both ways: what the photo cannot tell apart, what the history
    cannot."""
    assert {(what, key): tuple(labels) for what, key, labels in pairs()} == {
        ("look", "narrow_vessels"): ("normal", "retinitis_pigmentosa"),  # RP sine pigmento, a hypertensive eye
        ("look", "ga_flecks"): ("amd", "stargardt"),  # late-onset Stargardt as atrophic AMD
        ("look", "best_disease"): ("amd", "best_disease"),  # adult-onset vitelliform lesion
        ("look", "large_cup"): ("glaucoma", "normal"),  # physiological cup vs early glaucoma
        ("look", "macular_atrophy"): ("best_disease", "stargardt"),  # Best late, Stargardt early
        ("look", "rp_moderate"): ("choroideremia", "retinitis_pigmentosa"),  # choroideremia early, RP later
        ("history", "male_night_blindness"): ("choroideremia", "retinitis_pigmentosa"),
        ("history", "x_linked_carrier"): ("choroideremia", "retinitis_pigmentosa"),
        ("history", "central_blur"): ("best_disease", "stargardt"),
        ("history", "adult_macular"): ("amd", "stargardt"),
        ("history", "diabetes"): ("dr", "normal"),
        ("history", "glaucoma_family"): ("glaucoma", "normal"),
    }


def stage_ages(label, name, look):
    """The ages at which a presentation draws `look` (its kind's ages; for a staged one, where the stage is it)."""
    own, kind, _ = synthetic.PRESENTATIONS[label][name]
    ages = {age for low, high in synthetic.HISTORIES[kind]["ages"] for age in range(low, high + 1)}
    return {age for age in ages if (synthetic.stage_look(label, age, name) if own == synthetic.STAGED else own) == look}


def test_a_shared_look_with_a_shared_history_is_separated_by_the_age():
    """Where look and history kind are both shared, the labels draw that look at ages that do not overlap (the age
    decides), and exactly these cells are the age-dependent ones; elsewhere a shared look comes with a history only
    its label writes, a shared history with a look only its label draws."""
    cells = {}
    for label, presentations in synthetic.PRESENTATIONS.items():
        for name, (_, kind, _) in presentations.items():
            for look in synthetic.presentation_looks(label, name):
                cells.setdefault((look, kind), {}).setdefault(label, set()).update(stage_ages(label, name, look))
    shared = {cell: ages for cell, ages in cells.items() if len(ages) > 1}
    assert sorted(shared) == [("ga_flecks", "adult_macular"), ("macular_atrophy", "central_blur"),
                              ("rp_moderate", "male_night_blindness")]
    for (look, kind), ages in cells.items():
        first, *others = ages.values()
        assert all(not first & other for other in others), (look, kind)
        assert all(synthetic.is_age_dependent(label, look, kind) == (len(ages) > 1) for label in ages)
    # Best disease after 30, Stargardt disease before 17; choroideremia before 18, RP from 18 to 49; late-onset
    # Stargardt disease before 66, AMD from 66.
    assert max(shared["macular_atrophy", "central_blur"]["stargardt"]) == 16
    assert min(shared["macular_atrophy", "central_blur"]["best_disease"]) == 35
    assert max(shared["rp_moderate", "male_night_blindness"]["choroideremia"]) == 16
    assert shared["rp_moderate", "male_night_blindness"]["retinitis_pigmentosa"] == set(range(20, 50))
    assert shared["ga_flecks", "adult_macular"] == {"stargardt": set(range(45, 66)), "amd": set(range(66, 89))}
    # An uninformative history (the age and sex only) leaves the age to decide where the ages do not overlap.
    assert synthetic.is_age_dependent("amd", "best_disease", "uninformative")  # vitelliform: AMD 66+, Best < 30
    assert not synthetic.is_age_dependent("normal", "large_cup", "uninformative")  # the ages overlap
    assert not synthetic.is_age_dependent("dr", "dr", "uninformative")  # no other label draws it


@pytest.mark.parametrize("composition", [None, TINY_COMPOSITION], ids=["default", "tiny"])
def test_every_pair_is_in_every_split(composition):
    items, splits = split_plan(composition)
    planned = {(i.look if what == "look" else i.history) for i in items for what in ("look", "history")}
    for what, key, labels in pairs():
        if composition is TINY_COMPOSITION and key not in planned:
            assert key == "x_linked_carrier"  # the tiny set leaves the carriers out
            continue
        if key == "x_linked_carrier":  # 2 % of the part: a carrier's test case may come without its history
            continue
        for split in ("train", "validation", "test") if composition is TINY_COMPOSITION else ("train", "test"):
            present = {i.label for i, s in zip(items, splits) if s == split and i.part == "stonerounds"
                       and (i.look if what == "look" else i.history) == key}
            assert set(labels) <= present, (what, key, split, present)  # (and a misleading history's label)
    dependent = [(i.label, s) for i, s in zip(items, splits) if i.age_dependent]
    for split in ("train", "validation", "test"):  # both labels of every age-dependent look
        assert {label for label, s in dependent if s == split} >= {"best_disease", "stargardt", "choroideremia",
                                                                   "retinitis_pigmentosa", "amd"}, split


def stonerounds_cases(composition=None, seeds=(0, 1, 2)):
    """One item per StoneRounds-like case (the first photo) over `seeds`."""
    cases = {}
    for seed in seeds:
        for item in synthetic.plan(None, seed, composition):
            if item.part == "stonerounds":
                cases.setdefault((seed, item.case_id), item)
    return list(cases.values())


def share(items, predicate):
    return np.mean([bool(predicate(item)) for item in items])


def near(items, predicate, rate):
    """Whether the share of `items` meeting `predicate` is within 3 binomial standard errors of `rate`."""
    return abs(share(items, predicate) - rate) <= 3 * np.sqrt(rate * (1 - rate) / len(items))


def rate(label, sentence):
    return next(r for r, text in synthetic.COMORBIDITY[label] if text == sentence)


def test_histories_come_as_a_clinic_writes_them():
    """The rates of docs/data.md: declared within the literature's range, and drawn at them (three seeds of the
    default set, within 3 standard errors); FIVES- and HRF-like photos without text."""
    clinic, comorbidity = synthetic.CLINIC, synthetic.COMORBIDITY
    assert 0.10 <= clinic["missing"] + clinic["uninformative"] <= 0.20 and 0 < clinic["misleading"] <= 0.05
    assert 0.15 <= rate("dr", "Blurred central vision for some months.") <= 0.25  # DMO: a fifth of DR
    assert rate("amd", "Treated hypertension.") >= 0.5 and 0.15 <= rate("amd", "Type 2 diabetes, diet controlled.")
    assert 0.25 <= 1 - clinic["raised_iop"]["glaucoma"] <= 0.4 and 0.02 <= clinic["raised_iop"]["normal"] <= 0.1
    cases = stonerounds_cases()
    of = lambda label: [c for c in cases if c.label == label and c.history not in ("", "uninformative")  # noqa: E731
                        and label in synthetic.HISTORY_LABELS[c.history]]
    assert near(cases, lambda c: c.text == "", clinic["missing"])
    assert near(cases, lambda c: c.history == "uninformative", clinic["uninformative"])
    assert {c.label for c in cases if c.text == ""} == set(LABELS)  # inherited ones too
    misleading = [c for c in cases if c.history and c.history != "uninformative"
                  and c.label not in synthetic.HISTORY_LABELS[c.history]]
    assert near(cases, lambda c: c in misleading, clinic["misleading"])
    assert misleading and all("Gene:" not in c.text for c in misleading)
    for label, sentences in comorbidity.items():
        for share_, sentence in sentences:
            assert near(of(label), lambda c: sentence.format(Pos="His") in c.text or sentence.format(Pos="Her")
                        in c.text, share_), (label, sentence)
    iop = lambda c: int(re.search(r"IOP (\d+) and", c.text).group(1))  # noqa: E731
    written = [c for c in cases if c.text and c.history != "uninformative"]
    assert all(re.search(r"IOP \d+ and \d+ mmHg\.", c.text) for c in written)  # always recorded
    assert near(of("glaucoma"), lambda c: iop(c) >= 22, clinic["raised_iop"]["glaucoma"])  # the rest: NTG
    assert near(of("normal"), lambda c: iop(c) >= 22, clinic["raised_iop"]["normal"])  # ocular hypertension
    assert near(written, lambda c: any(s in c.text for s in synthetic.NONSPECIFIC), clinic["nonspecific"])
    assert 0.35 <= share(of("amd"), lambda c: "smoker" not in c.text) <= 0.65  # never-smokers are common
    rp = of("retinitis_pigmentosa")
    assert 0.08 <= share(rp, lambda c: "maternal" in c.text or c.presentation == "carrier") <= 0.22  # X-linked
    carriers = [c for c in cases if c.presentation == "carrier"]
    assert {c.label for c in carriers} == {"choroideremia", "retinitis_pigmentosa"}
    assert all(c.text.split(".")[0].endswith("female") for c in carriers if c.history == "x_linked_carrier")
    items = synthetic.plan(None, 0)
    assert all(i.text == "" for i in items if i.part != "stonerounds")


@pytest.mark.parametrize("composition", [None, TINY_COMPOSITION], ids=["default", "tiny"])
def test_ages_onsets_pronouns_and_pressures_agree(composition):
    """No onset at or after the age, no duration longer than the life, no "her" for a man or "his" for a woman,
    a measured (varying) blood pressure, the look of a staged presentation the stage at the written age."""
    cases = stonerounds_cases(composition)
    pressures = set()
    for case in cases:
        found = re.match(r"(\d+)-year-old (male|female)\. ", case.text)
        if not found:
            assert case.text in ("",) or case.history == "uninformative" or case.history not in (
                synthetic.HISTORY_LABELS), case.text
            continue
        age, sex = int(found.group(1)), found.group(2)
        for onset in re.findall(r"(?:since|at) age (\d+)", case.text):
            assert int(onset) < age, case.text
        for years in re.findall(r"(?:past|for) (\d+) years", case.text):
            assert int(years) <= age - 3, case.text
        assert not re.search(r"\b[Hh]er\b" if sex == "male" else r"\b[Hh]is\b", case.text), case.text
        pressures.update(re.findall(r"BP (\d+/\d+)", case.text))
        look = synthetic.PRESENTATIONS[case.label][case.presentation][0]
        if look == synthetic.STAGED and case.history in (synthetic.PRESENTATIONS[case.label][case.presentation][1],
                                                         "uninformative"):
            assert case.look == synthetic.stage_look(case.label, age, case.presentation), case
    assert len(pressures) >= (20 if composition is None else 5)


@pytest.mark.parametrize("composition", [None, TINY_COMPOSITION], ids=["default", "tiny"])
def test_a_two_photo_case_shows_each_eye_once(composition):
    cases = {}
    for item in synthetic.plan(None, 0, composition):
        cases.setdefault(item.case_id, []).append(item)
    two = [photos for photos in cases.values() if len(photos) == 2]
    assert all(sorted(i.eye for i in photos) == ["left", "right"] for photos in two)
    assert len(two) > (50 if composition is None else -1)
    # The disc (the brightest spot) lies right of the image centre in a right eye, left in a left one.
    for eye in ("right", "left"):
        image = synthetic.render_fundus("normal", np.random.default_rng(3), 64, eye=eye)[0].sum(-1)
        column = np.unravel_index(image.argmax(), image.shape)[1]
        assert (column > 32) == (eye == "right"), eye


def auc(scores, positive):
    """Probability that a positive's score exceeds a negative's (ties half)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    difference = scores[positive][:, None] - scores[~positive][None, :]
    return float(np.mean((difference > 0) + 0.5 * (difference == 0)))


@pytest.mark.parametrize("composition", [None, TINY_COMPOSITION], ids=["default", "tiny"])
def test_no_field_but_photo_and_history_separates_a_pair(composition):
    """Within every phenocopy pair and overlapping history, neither the case id's number, the file's number, the
    position in the set, the split nor the source tells the two labels apart (the labels used to be numbered in
    order: AUC 1.0)."""
    items, splits = split_plan(composition)
    split_code = {"train": 0, "validation": 1, "test": 2}
    fields = {"case id": lambda i, k: int(re.search(r"(\d+)$", i.case_id).group(1)),
              "file name": lambda i, k: i.number, "order": lambda i, k: k, "split": lambda i, k: split_code[splits[k]],
              "source": lambda i, k: synthetic.PAPER_SOURCES.index(i.part)}
    deviations = {name: [] for name in fields}
    for what, key, (first, second) in pairs():
        members = [(k, i) for k, i in enumerate(items) if (i.look if what == "look" else i.history) == key
                   and i.label in (first, second)]
        if not members:
            continue
        sizes = sorted(Counter(i.label for _, i in members).values())
        for name, field in fields.items():
            value = auc([field(i, k) for k, i in members], [i.label == first for _, i in members])
            deviations[name].append(abs(value - 0.5))
            if sizes[0] >= 8:  # a pair this large is never separated perfectly by chance
                assert 0 < value < 1, (what, key, name, value)
    # Separated labels would give 0.5 everywhere; chance gives about 0.1-0.15 on average.
    for name, found in deviations.items():
        assert len(found) >= 10 and np.mean(found) < 0.25, (name, found)
    assert max(deviations["source"] + deviations["split"]) <= (0.25 if composition is None else 0), deviations
    assert all(i.case_id.startswith("synthetic_") and str(i.number) not in ("", "-1") for i in items)
    numbers = {part: sorted(i.number for i in items if i.part == part) for part in synthetic.PAPER_SOURCES}
    assert all(found == list(range(len(found))) for found in numbers.values())


def test_few_histories_carry_a_word_only_one_label_writes():
    """No phrase decides a label by itself unless a clinic's would: fewer than a fifth of the written histories (of
    three seeds; gene results aside) hold a word that only one label ever writes (before this design: 49 %)."""
    cases = [c for c in stonerounds_cases() if c.text]
    words = lambda text: set(re.findall(r"[a-z]{3,}", re.sub(r"Gene: \w+\.", "", text).lower()))  # noqa: E731
    writers = {}
    for case in cases:
        for word in words(case.text):
            writers.setdefault(word, set()).add(case.label)
    unique = {word for word, labels in writers.items() if len(labels) == 1}
    assert share(cases, lambda c: words(c.text) & unique) < 0.2


def test_no_history_names_a_diagnosis():
    """Histories are written as a clinician would, not as labels: no class name or verbalizer (or its distinctive
    word) appears in any history of any kind, seed or label."""
    words = {name.replace("_", " ") for name in LABELS} | {verbalizer for _, verbalizer, _ in DEFAULT_LABELS}
    words |= {"amd", "retinopathy", "pigmentosa", "stargardt", "best", "vitelliform", "normal", "glaucoma",
              "degeneration", "dystrophy"}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, words))) + r")\b", re.IGNORECASE)
    for seed in (0, 1, 2):
        texts = {i.text for i in synthetic.plan(None, seed) if i.text}
        named = sorted({match for text in texts for match in pattern.findall(text)})
        assert named == []


def test_histories_and_genes_as_a_clinic_writes_them():
    rng = np.random.default_rng(0)
    for kind, spec in synthetic.HISTORIES.items():
        cases = [synthetic.clinical_case(kind, rng) for _ in range(30)]
        genes = {case.get("gene") for case in cases} - {None}
        listed = {gene for _, gene in spec["family"]} - {None}
        assert genes <= listed and (bool(genes) == (spec["gene"] > 0)), kind
        assert all(case["history"] and case["age"] >= 5 for case in cases)
    # X-linked: always a male, never a gene in the overlapping kind (testing pending), always CHM once tested.
    x_linked = [synthetic.clinical_case("male_night_blindness", rng) for _ in range(20)]
    assert all(case["sex"] == "male" and "gene" not in case for case in x_linked)
    assert all(synthetic.clinical_case("x_linked_chm", rng)["gene"] == "CHM" for _ in range(5))


def test_dataset_seed_changes_photos_and_histories():
    first, other = synthetic.plan(None, 0), synthetic.plan(None, 1)
    assert [i.text for i in first] != [i.text for i in other]
    item = next(i for i in first if i.part == "stonerounds")
    assert not np.array_equal(synthetic.render(item, 32, 0)[0], synthetic.render(item, 32, 1)[0])


def test_fives_and_hrf_photos_are_unchanged():
    """The photos without text keep the pixels they had before (digest computed with the code of fe56dd8, over the
    photos in planned order): numbering and order are shuffled, each photo's own rendering is not."""
    items = sorted((i for i in synthetic.plan(None, 0) if i.part != "stonerounds"),
                   key=lambda i: (i.part != "fives", i.index))[::60]
    digest = hashlib.sha256()
    for item in items:
        image, mask = synthetic.render(item, 32, 0)
        digest.update(image.tobytes())
        digest.update(mask.tobytes())
        digest.update(item.label.encode())
    assert digest.hexdigest() == "644e7263a209b32b99c1b4fd47633a79d78889659359e321ff38560607ff9e07"


def test_a_phenocopy_is_drawn_by_one_renderer():
    """A look is the label's only input to the picture: Best disease's atrophic stage is drawn exactly as
    Stargardt disease's early one."""
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    best = synthetic.SyntheticItem("stonerounds", 0, "best_disease", "c", "", None, "central_blur", "macular_atrophy")
    stargardt = synthetic.SyntheticItem("stonerounds", 0, "stargardt", "c", "", None, "typical", "macular_atrophy")
    assert np.array_equal(synthetic.render(best, 32, 3)[0], synthetic.render(stargardt, 32, 3)[0])
    for look in ("large_cup", "macular_atrophy", "narrow_vessels", "rp_moderate"):
        assert not np.array_equal(synthetic.render_fundus(look, rng(), 64)[0],
                                  synthetic.render_fundus("normal", rng(), 64)[0]), look


def test_counterfactual_histories_point_where_the_design_says():
    assert synthetic.counterfactual_history("stargardt", "ga_flecks") == ("phenocopy", "elderly_macular", "amd")
    assert synthetic.counterfactual_history("retinitis_pigmentosa", "narrow_vessels") == (
        "phenocopy", "hypertension", "normal")
    assert synthetic.counterfactual_history("stargardt", "macular_atrophy") == (
        "phenocopy", "dominant_macular", "best_disease")
    assert synthetic.counterfactual_history("retinitis_pigmentosa", "rp_moderate") == (
        "phenocopy", "x_linked_chm", "choroideremia")
    assert synthetic.counterfactual_history("dr") == ("photo decides", "juvenile_macular", None)
    assert synthetic.counterfactual_history("stargardt") == ("photo decides", "male_night_blindness", None)
    # Late-onset Stargardt disease's history for this look is one AMD writes too (the age decides): none points.
    assert synthetic.counterfactual_history("amd", "ga_flecks") == ("photo decides", "male_night_blindness", None)


# ----------------------------------------------------------------------------------------------------------------------
# The rows


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


class TextReader(torch.nn.Module):
    """A stand-in classifier whose answer is the sum of the prompt's token ids modulo K: any other text, another
    answer (almost always)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter

    def classify(self, input_ids, attention_mask, **_):
        return torch.nn.functional.one_hot((input_ids * attention_mask).sum(1) % self.num_classes,
                                           self.num_classes).float()


def test_counterfactual_table_on_a_tiny_model():
    """The main job's counterfactual histories on a tiny model: every photo gets the history its look calls for,
    each recorded answer is what the model says to that photo and history (classified here one at a time), and the
    summary is the share of those answers."""
    from conftest import TINY_MDF, move_off_init, tiny_mllama_config
    from configuration_mdf_mllm import MdfMllmConfig
    from dataset_builder import load
    from mdf_mllm import stages, main_job, training
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration
    from processing_mdf_mllm import MdfMllmDataCollator, build_default_processor

    processor = build_default_processor(image_size=28, unet_image_size=32)
    base = tiny_mllama_config(vocab_size=processor.tokenizer.convert_tokens_to_ids("<|image|>"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(processor.tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(base, **TINY_MDF, image_token_index=base.image_token_index)
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    model.config.verbalizer_token_ids = processor.verbalizer_token_ids
    settings = main_job.parse_arguments(["--num_images", "120", "--eval_batch_size", "4"])
    dataset = load("synthetic", num_images=120, image_size=64, seed=0)  # a phenocopy and an age-dependent photo in test
    collator = MdfMllmDataCollator(processor)
    test = training.ProcessedSplit(dataset["test"], processor, with_answers=False)
    reader = TextReader(len(names := dataset["test"].features["label"].names))
    models = [comparison.Result(name, training.predict(m, test, collator, 4), None, model=m)
              for name, m in (("tiny", model), ("reader", reader))]
    own = models[0].predictions
    table = stages.counterfactual(training.RunContext(settings, dataset, processor), models)
    photos, age_swaps = table["photos"][:len(test)], table["photos"][len(test):]
    assert [p["case_id"] for p in photos] == dataset["test"]["case_id"]
    planned = {(i.case_id, i.label): i for i in synthetic.plan(120, 0)}
    looks = {key: i.look or i.label for key, i in planned.items()}
    for photo, label in zip(photos, dataset["test"]["label"]):
        look = looks[(photo["case_id"], names[label])]
        # A phenocopy whenever another label draws the look with a history of its own for it.
        shared = synthetic.counterfactual_history(names[label], look)[0] == "phenocopy"
        assert shared <= (len(synthetic.LOOK_LABELS[look]) > 1)
        assert photo["kind"] == ("phenocopy" if shared else "photo decides")
        writers = synthetic.HISTORY_LABELS[photo["history"]]
        assert photo["points_to"] == writers
        if shared:  # the twin's own history: only the twin writes it, and the twin draws this look
            assert len(writers) == 1 and writers[0] in synthetic.LOOK_LABELS[look] and writers[0] != names[label]
        else:  # no label that draws this look writes it
            assert not set(writers) & {names[label], *synthetic.LOOK_LABELS[look]}
    assert {p["kind"] for p in photos} == {"phenocopy", "photo decides"}
    # Each swapped answer, one photo at a time, from the photo and the history kind recorded for it.
    rng = np.random.default_rng(0)
    for index, photo in enumerate(photos):
        text = synthetic.case_text(synthetic.clinical_case(photo["history"], rng))
        example = dataset["test"][index]
        inputs = processor(images=[example["image"]], clinical_text=[text])
        batch = collator([{key: value[0] for key, value in inputs.items()}])
        with torch.no_grad():
            answer = model.classify(**{k: v for k, v in batch.items() if k != "vessel_mask"}).argmax(-1).item()
        assert photo["answers"]["tiny"] == [names[own[index]], names[answer]]
        # The reader's answer is a function of the prompt's tokens alone: it shows the swapped history was read.
        assert photo["answers"]["reader"][1] == names[reader.classify(**batch).argmax(-1).item()]
    assert any(p["answers"]["reader"][0] != p["answers"]["reader"][1] for p in photos)
    rows = {row["group"]: row for row in table["summary"]["tiny"]}
    phenocopies = [p for p in photos if p["kind"] == "phenocopy"]
    follows = np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in phenocopies])
    assert rows["all phenocopy photos"]["n"] == len(phenocopies)
    assert rows["all phenocopy photos"]["follows"] == pytest.approx(follows)
    decided = [p for p in photos if p["kind"] == "photo decides"]
    changed = np.mean([p["answers"]["tiny"][0] != p["answers"]["tiny"][1] for p in decided])
    assert rows["all photo decides photos"]["changed"] == pytest.approx(changed)
    misled = np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in decided])
    assert rows["all photo decides photos"]["follows"] == pytest.approx(misled)
    # The age swaps: each age-dependent test photo once more, its own text with the other label's age, in order.
    tested = [i for i, flag in enumerate(dataset["test"]["age_dependent"]) if flag]
    assert tested and [p["case_id"] for p in age_swaps] == [dataset["test"][i]["case_id"] for i in tested]
    rng = np.random.default_rng([0, 1])
    for index, photo in zip(tested, age_swaps):
        example = dataset["test"][index]
        item = planned[(example["case_id"], names[example["label"]])]
        text, twin = synthetic.age_swapped_history(item.label, item.look, example["text"], rng, item.history)
        assert photo["kind"] == "age swap" and photo["points_to"] == [twin] != [item.label]
        inputs = processor(images=[example["image"]], clinical_text=[text])
        batch = collator([{key: value[0] for key, value in inputs.items()}])
        with torch.no_grad():
            answer = model.classify(**{k: v for k, v in batch.items() if k != "vessel_mask"}).argmax(-1).item()
        assert photo["answers"]["tiny"] == [names[own[index]], names[answer]]
        assert photo["answers"]["reader"][1] == names[reader.classify(**batch).argmax(-1).item()]  # the text read
    swapped = rows["all age swap photos"]
    assert swapped["n"] == len(tested) and swapped["follows"] == pytest.approx(
        np.mean([p["answers"]["tiny"][1] in p["points_to"] for p in age_swaps]))


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


def test_the_age_swap_moves_the_age_to_the_other_labels_stage_and_keeps_the_rest():
    text = "49-year-old female. Gradual central blur over the past 5 years; difficulty reading. IOP 19 and 17 mmHg."
    rng = np.random.default_rng(0)
    for _ in range(20):
        swapped, twin = synthetic.age_swapped_history("best_disease", "macular_atrophy", text, rng, "central_blur")
        age = int(swapped.split("-")[0])
        assert twin == "stargardt" and synthetic.stage_look("stargardt", age) == "macular_atrophy"
        assert 7 <= age <= 16  # the ages the central-blur history writes for a child
        assert swapped == (f"{age}-year-old female. Gradual central blur over the past {min(5, age - 3)} years; "
                           "difficulty reading. IOP 19 and 17 mmHg.")
    child = "6-year-old male. Poor vision in the dark since age 5 and progressive peripheral field loss."
    swapped, twin = synthetic.age_swapped_history("choroideremia", "rp_moderate", child, rng, "male_night_blindness")
    assert twin == "retinitis_pigmentosa" and 20 <= int(swapped.split("-")[0]) <= 49 and "since age 5 " in swapped
    back = synthetic.age_swapped_history("retinitis_pigmentosa", "rp_moderate", "30-year-old male. Since age 12.",
                                         rng, "male_night_blindness")
    assert back[1] == "choroideremia" and back[0] == f"{back[0].split('-')[0]}-year-old male. Since age " \
        f"{min(12, int(back[0].split('-')[0]) - 1)}."
    assert synthetic.age_swapped_history("dr", "dr", text, rng) is None  # no other label draws the look
    assert synthetic.age_swapped_history("stargardt", "macular_atrophy", "Seen in clinic.", rng) is None


def test_the_examples_are_own_histories_then_a_phenocopy_and_an_age_swap_pair():
    import datasets

    from mdf_mllm import export

    test = datasets.Dataset.from_dict({"label": [0, 0, 1, 2, 1], "text": ["", "own a", "own b", "own c", ""],
                                       "case_id": list("vwxyz"), "file_name": [f"{c}.png" for c in "vwxyz"]})
    counterfactual = {"photos": [
        {"case_id": "v", "file_name": "v.png", "kind": "photo decides", "text": "misleading", "points_to": ["b"]},
        {"case_id": "x", "file_name": "x.png", "kind": "phenocopy", "text": "twin's history", "points_to": ["c"]},
        {"case_id": "z", "file_name": "z.png", "kind": "phenocopy", "text": "twin of z", "points_to": ["a"]},
        {"case_id": "y", "file_name": "y.png", "kind": "age swap", "text": "older", "points_to": ["a"]}]}
    examples = export.example_inputs(test, counterfactual, ["a", "b", "c"], count=3)
    # The phenocopy: z, not shown yet, before x; the age swap: y, the only one, although shown.
    assert [(e["index"], e["text"]) for e in examples] == [(1, "own a"), (2, "own b"), (3, "own c"), (4, ""),
                                                           (4, "twin of z"), (3, "own c"), (3, "older")]
    assert examples[4]["title"] == "phenocopy: the same photo, a a history"
    assert examples[6]["title"] == "age swap: the same photo, the age of a's stage"
    # Without a counterfactual table (real data), only own histories; a class without one comes with none.
    assert [(e["index"], e["text"]) for e in export.example_inputs(test.select([0, 2]), {}, ["a", "b", "c"])] == [
        (1, "own b"), (0, "")]


class Oracle(torch.nn.Module):
    """A stand-in classifier that knows each photo (by its pixels' sum): right on every other photo it was given,
    wrong on the rest, with a logit of 1, 2 or 3 over the other classes (a confidence that differs between photos),
    scaled by its config's temperature as classify() scales (softmax(z / T))."""

    def __init__(self, splits, num_classes: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter
        self.config = type("Config", (), {"classifier_temperature": None})()
        photos = [(self.key(item["unet_pixel_values"]), label) for split in splits
                  for item, label in zip(split.items, split.label_ids)]
        self.logits = {key: (1.0 + n % 3) * np.eye(num_classes)[(label + n % 2) % num_classes]
                       for n, (key, label) in enumerate(photos)}

    @staticmethod
    def key(pixels) -> float:
        return round(float(pixels.double().sum()), 2)

    def classify(self, unet_pixel_values, **_):
        logits = torch.tensor(np.stack([self.logits[self.key(pixels)] for pixels in unet_pixel_values]))
        return (logits / (self.config.classifier_temperature or 1.0)).softmax(-1).float()


def test_the_temperature_is_fitted_on_the_validation_prompts_and_saved_in_the_config():
    from dataset_builder import load
    from mdf_mllm import stages, main_job, training
    from mdf_mllm.calibration import apply_temperature, fit_temperature
    from processing_mdf_mllm import build_default_processor

    processor = build_default_processor(image_size=28, unet_image_size=32)
    settings = main_job.parse_arguments(["--num_images", "60", "--eval_batch_size", "4", "--n_bootstrap", "20"])
    dataset = load("synthetic", num_images=60, image_size=64, seed=0)
    run = training.RunContext(settings, dataset, processor)
    validation = training.ProcessedSplit(dataset["validation"], processor, with_answers=False)
    model = Oracle([validation, run.splits["test"]])
    ours = run.scored("ours", training.predict(model, run.splits["test"], run.collator, 4))
    ours.model = model
    calibrated = stages.calibrate(run, ours)
    # By hand: the validation photos' logits as the oracle draws them, the NLL's minimum.
    expected = fit_temperature(validation.label_ids, logits=np.stack(
        [(1.0 + n % 3) * np.eye(8)[(label + n % 2) % 8] for n, label in enumerate(validation.label_ids)]))
    assert 0.06 < expected < 19 and calibrated.temperature == pytest.approx(expected, rel=1e-6)
    assert model.config.classifier_temperature == calibrated.temperature  # classify() now answers with it
    assert calibrated.probabilities == pytest.approx(apply_temperature(expected, probabilities=ours.probabilities))
    assert calibrated.name == "ours, temperature-scaled" and calibrated.accuracy() == ours.accuracy()
