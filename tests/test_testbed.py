"""The fusion testbed: the synthetic StoneRounds-like part's phenocopies and overlapping histories, and the rows
that measure fusion (text only, late fusion, paired differences, counterfactual histories)."""

import hashlib
import re

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
        ("look", "normal"): ("normal", "retinitis_pigmentosa"),  # RP sine pigmento
        ("look", "amd"): ("amd", "stargardt"),  # late-onset Stargardt as geographic atrophy
        ("look", "best_disease"): ("amd", "best_disease"),  # adult-onset vitelliform lesion
        ("look", "large_cup"): ("glaucoma", "normal"),  # physiological cup vs early glaucoma
        ("history", "x_linked"): ("choroideremia", "retinitis_pigmentosa"),
        ("history", "central_blur"): ("best_disease", "stargardt"),
        ("history", "diabetes"): ("dr", "normal"),
        ("history", "glaucoma_family"): ("glaucoma", "normal"),
    }
    # No presentation is ambiguous twice: a shared look comes with a history only its label writes, a shared
    # history with a look that, among the labels writing it, only its label draws.
    for label, presentations in synthetic.PRESENTATIONS.items():
        for name, (look, history, _) in presentations.items():
            together = set(synthetic.LOOK_LABELS[look]) & set(synthetic.HISTORY_LABELS[history])
            assert together == {label}, (label, name, together)


@pytest.mark.parametrize("composition", [None, TINY_COMPOSITION], ids=["default", "tiny"])
def test_every_pair_is_in_every_split(composition):
    items, splits = split_plan(composition)
    for what, key, labels in pairs():
        for split in ("train", "validation", "test"):
            present = {i.label for i, s in zip(items, splits) if s == split and i.part == "stonerounds"
                       and (i.look if what == "look" else i.history) == key}
            assert present == set(labels), (what, key, split, present)


def test_every_stonerounds_case_has_a_history_and_fives_hrf_none():
    items = synthetic.plan(None, 0)
    stonerounds = [i for i in items if i.part == "stonerounds"]
    assert all(i.text.strip() for i in stonerounds)
    assert {i.label for i in stonerounds} == set(LABELS)  # acquired and normal cases too
    assert all(i.text == "" for i in items if i.part != "stonerounds")


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
    x_linked = [synthetic.clinical_case("x_linked", rng) for _ in range(20)]
    assert all(case["sex"] == "male" and "gene" not in case for case in x_linked)
    assert all(synthetic.clinical_case("x_linked_chm", rng)["gene"] == "CHM" for _ in range(5))


def test_dataset_seed_changes_photos_and_histories():
    first, other = synthetic.plan(None, 0), synthetic.plan(None, 1)
    assert [i.text for i in first] != [i.text for i in other]
    item = next(i for i in first if i.part == "stonerounds")
    assert not np.array_equal(synthetic.render(item, 32, 0)[0], synthetic.render(item, 32, 1)[0])


def test_fives_and_hrf_photos_are_unchanged():
    """The photos without text keep the pixels they had before the testbed (rendered by the code of 612babd)."""
    items = [i for i in synthetic.plan(None, 0) if i.part != "stonerounds"][::60]
    digest = hashlib.sha256()
    for item in items:
        image, mask = synthetic.render(item, 32, 0)
        digest.update(image.tobytes())
        digest.update(mask.tobytes())
        digest.update(repr((item.case_id, item.label, item.official_split, item.index)).encode())
    assert digest.hexdigest() == "11aa5e47352440d04a7dea161faeb176e637cf99db8ec0e580b3c8d1488f37bd"


def test_a_phenocopy_is_drawn_by_one_renderer():
    """A look is the label's only input to the picture: RP sine pigmento is drawn exactly as a normal eye."""
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    item = synthetic.SyntheticItem("stonerounds", 0, "retinitis_pigmentosa", "c", "", None, "sine_pigmento",
                                   "normal", "rod_cone_dystrophy")
    assert np.array_equal(synthetic.render(item, 32, 3)[0],
                          synthetic.render(synthetic.SyntheticItem("stonerounds", 0, "normal", "c", "", None), 32, 3)[0])
    large_cup = synthetic.render_fundus("large_cup", rng(), 64)[0]
    assert not np.array_equal(large_cup, synthetic.render_fundus("normal", rng(), 64)[0])


def test_counterfactual_histories_point_where_the_design_says():
    assert synthetic.counterfactual_history("stargardt", "amd") == ("phenocopy", "elderly_macular", "amd")
    assert synthetic.counterfactual_history("amd") == ("phenocopy", "late_onset_macular", "stargardt")
    assert synthetic.counterfactual_history("retinitis_pigmentosa", "normal") == ("phenocopy", "no_complaints",
                                                                                  "normal")
    assert synthetic.counterfactual_history("normal") == ("phenocopy", "rod_cone_dystrophy", "retinitis_pigmentosa")
    assert synthetic.counterfactual_history("dr") == ("photo decides", "juvenile_macular", None)
    assert synthetic.counterfactual_history("stargardt") == ("photo decides", "x_linked", None)


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


def result(name, predictions, labels, history, num_classes=3):
    probabilities = np.eye(num_classes)[predictions] * 0.9 + 0.1 / num_classes
    return comparison.score(name, probabilities, labels, history, ["a", "b", "c"], ["normal", "acquired", "inherited"],
                            n_bootstrap=50)


def test_rows_report_accuracy_with_and_without_a_history_and_the_tables_read_them():
    labels = [0, 1, 2, 2, 1, 0]
    history = [True, True, True, False, False, False]
    ours = result("MDF-MLLM", [0, 1, 2, 2, 0, 0], labels, history)
    other = result("Text only", [0, 1, 1, 0, 1, 1], labels, history)
    assert ours.report["subsets"] == {"all": {"n": 6, "accuracy": 5 / 6}, "with_history": {"n": 3, "accuracy": 1.0},
                                      "without_history": {"n": 3, "accuracy": 2 / 3}}
    assert other.accuracy("with_history") == pytest.approx(2 / 3) and other.accuracy() == pytest.approx(0.5)
    differences = comparison.paired_differences(ours, [other], labels, history, n_bootstrap=50)
    assert differences["Text only"]["all"]["difference"] == pytest.approx(5 / 6 - 0.5)
    assert differences["Text only"]["with_history"]["difference"] == pytest.approx(1 / 3)
    assert differences["Text only"]["with_history"]["n"] == 3
    markdown = tables.comparison_markdown([ours, other], differences)
    row = next(line for line in markdown.splitlines() if line.startswith("| Text only |"))
    assert row.split(" | ")[2:4] == ["0.667", "0.333"]  # with a history, without
    paired = next(line for line in markdown.splitlines() if line.startswith("| Text only | +"))
    assert paired.startswith(f"| Text only | {5 / 6 - 0.5:+.3f} (") and f"| {1 / 3:+.3f} (" in paired
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
    from mdf_mllm import stages, train, training
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
    settings = train.parse_arguments(["--num_images", "60", "--eval_batch_size", "4"])
    dataset = load("synthetic", num_images=60, image_size=64, seed=0)
    collator = MdfMllmDataCollator(processor)
    test = training.ProcessedSplit(dataset["test"], processor, with_answers=False)
    reader = TextReader(len(names := dataset["test"].features["label"].names))
    models = [comparison.Result(name, training.predict(m, test, collator, 4), None, model=m)
              for name, m in (("tiny", model), ("reader", reader))]
    own = models[0].predictions
    table = stages.counterfactual(training.RunContext(settings, dataset, processor), models)
    photos = table["photos"]
    assert [p["case_id"] for p in photos] == dataset["test"]["case_id"] and len(photos) == len(test)
    looks = {(i.case_id, i.label): i.look or i.label for i in synthetic.plan(60, 0)}
    for photo, label in zip(photos, dataset["test"]["label"]):
        look = looks[(photo["case_id"], names[label])]
        shared = len(synthetic.LOOK_LABELS[look]) > 1
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
