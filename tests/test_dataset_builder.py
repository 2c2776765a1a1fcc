"""dataset_builder: readers of each on-disk layout, splits, split report, exports and the synthetic generator.

Tiny fake trees of every layout are made from real pixels (`skimage.data.retina()` at 64 px) and synthetic ones, with
real masks, a corrupt file, a zero-byte file, an unknown suffix and a StoneRounds case with three images.
"""

import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from dataset_builder import (
    TINY_COMPOSITION,
    assign_splits,
    build,
    export_imagefolder,
    export_parquet,
    load,
    plan,
    read_fives,
    read_hrf,
    read_manifest,
    read_stonerounds,
    render_fundus,
    resolve_label,
)
from dataset_builder.__main__ import main
from dataset_builder.sources import LABEL_TYPES, Record
from dataset_builder.synthetic import DEFAULT_COMPOSITION, scale_composition


SIZE = 64
LABELS = ["normal", "amd", "dr", "glaucoma", "retinitis_pigmentosa", "stargardt", "choroideremia", "best_disease"]


def _retina() -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.retina()).resize((SIZE, SIZE), Image.BILINEAR))


def _synthetic(label: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return render_fundus(label, np.random.default_rng(seed), SIZE)


_SEEDS = iter(range(1000, 2000))  # every fake photo its own seed, so the only duplicate is the planted one


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _truncated_png(path):
    _save(path, _synthetic("dr", 99)[0])
    with open(path, "rb") as f:
        head = f.read()[:200]
    with open(path, "wb") as f:
        f.write(head)


def make_fives(root) -> dict:
    """FIVES tree: train (Groud-truth spelling) and test (Ground truth); returns expected {case_id: label}."""
    expected = {}
    for split, folder, names in (
        ("train", "Groud truth", ["1_A", "2_D", "3_G", "4_N", "7_A", "8_D", "9_G", "10_N"]),
        ("test", "Ground truth", ["1_A", "2_N"]),
    ):
        for k, stem in enumerate(names):
            label = {"A": "amd", "D": "dr", "G": "glaucoma", "N": "normal"}[stem[-1]]
            image, mask = _synthetic(label, next(_SEEDS))
            if (split, stem) in (("train", "4_N"), ("test", "2_N")):
                image = _retina()  # the same photo in train and test: a duplicate the report must list
            _save(os.path.join(root, split, "Original", f"{stem}.png"), image)
            _save(os.path.join(root, split, folder, f"{stem}.png"), mask)
            expected[f"fives/{split}/{stem}"] = label
    _truncated_png(os.path.join(root, "train", "Original", "5_D.png"))
    open(os.path.join(root, "test", "Original", "3_G.png"), "wb").close()  # zero bytes
    with open(os.path.join(root, "train", "Original", "notes.txt"), "w") as f:
        f.write("not an image")
    _save(os.path.join(root, "train", "Original", "6_X.png"), _retina())  # unknown class letter
    return expected


def make_hrf(root) -> dict:
    """HRF tree under all/, upper-case .JPG for DR, TIFF vessel masks; 5 patients x (h, dr, g)."""
    expected = {}
    for patient in range(1, 6):
        for suffix, label, ext in (("h", "normal", "jpg"), ("dr", "dr", "JPG"), ("g", "glaucoma", "jpg")):
            stem = f"{patient:02d}_{suffix}"
            image, mask = _synthetic(label, next(_SEEDS))
            _save(os.path.join(root, "all", "images", f"{stem}.{ext}"), image, format="JPEG", quality=95)
            _save(os.path.join(root, "all", "manual1", f"{stem}.tif"), mask)
            _save(os.path.join(root, "all", "mask", f"{stem}_mask.tif"), (mask * 0 + 255).astype(np.uint8))
            expected[stem] = (label, f"hrf/{patient:02d}")
    return expected


STONEROUNDS_CASES = {
    # case_id: (case.json, number of images)
    "rp_1": ({"diagnosis": "Retinitis pigmentosa", "age": 34, "sex": "male", "history": "Night blindness.",
              "gene": "RHO"}, 3),
    "rp_2": ({"diagnosis": "retinitis_pigmentosa", "history": "Field loss."}, 1),
    "rp_3": ({"diagnosis": "RETINITIS PIGMENTOSA", "age": 20}, 1),
    "stgd_1": ({"diagnosis": "Stargardt disease", "age": 12, "sex": "female", "gene": "ABCA4"}, 2),
    "chm_1": ({"diagnosis": "Choroideremia", "sex": "male"}, 1),
    "best_1": ({"diagnosis": "Best vitelliform macular dystrophy", "history": "Yolk lesion.", "gene": "BEST1"}, 1),
    "coats_1": ({"diagnosis": "Coats disease"}, 1),  # unknown: skipped and reported
}
STONEROUNDS_TEXTS = {
    "rp_1": "34-year-old male. Night blindness. Gene: RHO.",
    "rp_2": "Field loss.",
    "rp_3": "Age 20.",
    "stgd_1": "12-year-old female. Gene: ABCA4.",
    "chm_1": "Sex: male.",
    "best_1": "Yolk lesion. Gene: BEST1.",
}


def make_stonerounds(root) -> None:
    for case_id, (case, num_images) in STONEROUNDS_CASES.items():
        folder = os.path.join(root, case_id)
        os.makedirs(folder)
        with open(os.path.join(folder, "case.json"), "w") as f:
            json.dump(case, f)
        label = resolve_label(case["diagnosis"]) or "normal"
        for eye in range(num_images):
            _save(os.path.join(folder, f"image_{eye}.png"), _synthetic(label, next(_SEEDS))[0])


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths = {name: str(root / name) for name in ("fives", "hrf", "stonerounds")}
    expected = {"fives": make_fives(paths["fives"]), "hrf": make_hrf(paths["hrf"])}
    make_stonerounds(paths["stonerounds"])
    return paths, expected


@pytest.fixture(scope="module")
def built_all(trees, tmp_path_factory):
    paths, _ = trees
    cache = str(tmp_path_factory.mktemp("cache"))
    return build("all", **paths, cache_dir=cache, num_workers=2)


def _rows(dataset: datasets.DatasetDict) -> list[dict]:
    return [row for split in ("train", "validation", "test") for row in dataset[split]]


# ---------------------------------------------------------------------------------------------------------------------
# Readers.


@pytest.mark.parametrize(
    "diagnosis, label",
    [("Retinitis pigmentosa", "retinitis_pigmentosa"), ("Stargardt disease", "stargardt"), ("AMD", "amd"),
     ("best_disease", "best_disease"), ("Diabetic  Retinopathy", "dr"), ("healthy", "normal"), ("Coats", None)],
)
def test_resolve_label_is_case_insensitive_on_name_and_verbalizer(diagnosis, label):
    assert resolve_label(diagnosis) == label


def test_fives_reader_labels_masks_official_split_and_skips(trees):
    paths, expected = trees
    records, skipped = read_fives(paths["fives"])
    assert {r.case_id: r.label for r in records} == {**expected["fives"], "fives/train/5_D": "dr",
                                                     "fives/test/3_G": "glaucoma"}
    assert {r.case_id: r.official_split for r in records}["fives/test/1_A"] == "test"
    train_mask = [r.mask_path for r in records if r.case_id == "fives/train/1_A"][0]
    assert train_mask == os.path.join(paths["fives"], "train", "Groud truth", "1_A.png")
    reasons = {os.path.relpath(s.path, paths["fives"]): s.reason for s in skipped}
    assert set(reasons) == {os.path.join("train", "Original", name) for name in ("notes.txt", "6_X.png")}
    assert "suffix '.txt'" in reasons[os.path.join("train", "Original", "notes.txt")]


def test_hrf_reader_handles_all_folder_uppercase_jpg_and_patient_groups(trees):
    paths, expected = trees
    records, skipped = read_hrf(paths["hrf"])
    got = {os.path.splitext(os.path.basename(r.image_path))[0]: (r.label, r.case_id) for r in records}
    assert got == expected["hrf"] and skipped == []
    dr = [r for r in records if r.image_path.endswith("01_dr.JPG")][0]
    assert dr.mask_path.endswith(os.path.join("all", "manual1", "01_dr.tif")) and dr.text == ""


def test_stonerounds_reader_texts_cases_and_unknown_diagnosis(trees):
    paths, _ = trees
    records, skipped = read_stonerounds(paths["stonerounds"])
    assert {r.case_id.split("/")[1]: r.text for r in records} == STONEROUNDS_TEXTS
    assert sum(r.case_id == "stonerounds/rp_1" for r in records) == 3
    assert [(os.path.relpath(s.path, paths["stonerounds"]), s.reason) for s in skipped] == [
        (os.path.join("coats_1", "case.json"), "unknown diagnosis 'Coats disease'")
    ]


def test_manifest_reader_rows_masks_and_bad_rows(tmp_path):
    image, mask = _synthetic("amd", 5)
    _save(str(tmp_path / "a.png"), image)
    _save(str(tmp_path / "a_mask.png"), mask)
    rows = [
        {"file_name": "a.png", "label": "Age-related macular degeneration", "text": "Drusen.", "case_id": "p1",
         "mask_file_name": "a_mask.png"},
        {"file_name": "missing.png", "label": "dr"},
        {"file_name": "a.png", "label": "cataract"},
        "not json",
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    records, skipped = read_manifest(str(tmp_path))
    assert [(r.label, r.text, r.case_id, r.mask_path) for r in records] == [
        ("amd", "Drusen.", "p1", str(tmp_path / "a_mask.png"))
    ]
    reasons = [s.reason for s in skipped]
    assert reasons[0].startswith("file not found") and reasons[1].startswith("unknown label 'cataract'")
    assert skipped[2].path == f"{tmp_path / 'metadata.jsonl'}:4"


@pytest.mark.parametrize("reader", [read_fives, read_hrf, read_stonerounds, read_manifest])
def test_missing_or_empty_data_dir_is_a_clear_error(reader, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        reader(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*is empty"):
        reader(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------------
# The `all` dataset: labels, texts, masks, grouping, splits, report.


def test_all_dataset_labels_texts_and_types(built_all, trees):
    dataset, _ = built_all
    paths, expected = trees
    names = dataset["train"].features["label"].names
    types = dataset["train"].features["disease_type"].names
    rows = _rows(dataset)
    fives = {r["case_id"]: names[r["label"]] for r in rows if r["source"] == "fives"}
    assert fives == expected["fives"]  # the corrupt 5_D and zero-byte 3_G are gone
    hrf = sorted((r["case_id"], names[r["label"]]) for r in rows if r["source"] == "hrf")
    assert hrf == sorted((case, label) for label, case in expected["hrf"].values())
    stone = {r["case_id"].split("/")[1]: r["text"] for r in rows if r["source"] == "stonerounds"}
    assert stone == STONEROUNDS_TEXTS
    assert all(types[r["disease_type"]] == LABEL_TYPES[names[r["label"]]] for r in rows)
    assert all(r["text"] == "" for r in rows if r["source"] != "stonerounds")


def test_examples_keep_their_file_name_relative_to_the_data_folder(built_all, trees):
    dataset, _ = built_all
    paths, expected = trees
    rows = _rows(dataset)
    fives = {r["case_id"]: r["file_name"] for r in rows if r["source"] == "fives"}
    assert fives == {case: os.path.join(case.split("/")[1], "Original", case.split("/")[2] + ".png")
                     for case in expected["fives"]}
    hrf = sorted(r["file_name"] for r in rows if r["source"] == "hrf")
    assert hrf == sorted(os.path.join("all", "images", f"{stem}.{'JPG' if stem.endswith('dr') else 'jpg'}")
                         for stem in expected["hrf"])
    stone = sorted(r["file_name"] for r in rows if r["source"] == "stonerounds")
    assert stone == sorted(os.path.join(case, f"image_{eye}.png") for case, (_, count) in STONEROUNDS_CASES.items()
                           for eye in range(count) if case != "coats_1")
    # The name opens the very photo of the example.
    row = rows[0]
    with Image.open(os.path.join(paths[row["source"]], row["file_name"])) as photo:
        assert np.array_equal(np.asarray(photo.convert("RGB")), np.asarray(row["image"].convert("RGB")))


def test_all_dataset_masks_are_the_files_pixels(built_all, trees):
    dataset, _ = built_all
    paths, _ = trees
    rows = {r["case_id"]: r for r in _rows(dataset) if r["source"] == "fives"}
    written = Image.open(os.path.join(paths["fives"], "train", "Groud truth", "2_D.png"))
    assert np.array_equal(np.asarray(rows["fives/train/2_D"]["vessel_mask"]), np.asarray(written))
    hrf = [np.asarray(r["vessel_mask"]).tobytes() for r in _rows(dataset) if r["case_id"] == "hrf/03"]
    tifs = [os.path.join(paths["hrf"], "all", "manual1", f"03_{s}.tif") for s in ("h", "dr", "g")]
    assert sorted(hrf) == sorted(np.asarray(Image.open(t)).tobytes() for t in tifs)
    assert all(r["vessel_mask"] is None for r in _rows(dataset) if r["source"] == "stonerounds")


def test_all_dataset_groups_cases_and_keeps_fives_official_split(built_all):
    dataset, _ = built_all
    case_splits = {}
    for split in ("train", "validation", "test"):
        for row in dataset[split]:
            assert row["split"] == split
            case_splits.setdefault((row["source"], row["case_id"]), set()).add(split)
    assert all(len(s) == 1 for s in case_splits.values())
    fives = {case: split for (source, case), (split,) in case_splits.items() if source == "fives"}
    assert {case for case, split in fives.items() if split == "test"} == {"fives/test/1_A", "fives/test/2_N"}
    # HRF: 5 patients -> round(5 * 0.2) = 1 to test; StoneRounds: the 3-case RP stratum gives one case to test.
    hrf_test = {case for (source, case), (split,) in case_splits.items() if source == "hrf" and split == "test"}
    assert len(hrf_test) == 1
    rp_test = [c for (s, c), (sp,) in case_splits.items() if c.startswith("stonerounds/rp_") and sp == "test"]
    assert len(rp_test) == 1
    assert len(dataset["validation"]) > 0


def test_split_report_counts_skipped_and_duplicates(built_all, trees):
    dataset, report = built_all
    paths, _ = trees
    names = dataset["train"].features["label"].names
    counts = {}
    for row in _rows(dataset):
        counts.setdefault(row["source"], {}).setdefault(names[row["label"]], {"train": 0, "validation": 0, "test": 0})
        counts[row["source"]][names[row["label"]]][row["split"]] += 1
    assert report["counts"] == counts
    assert report["totals"] == {split: len(dataset[split]) for split in ("train", "validation", "test")}
    skipped = {os.path.relpath(s["path"], os.path.dirname(paths["fives"])): s["reason"] for s in report["skipped"]}
    assert set(skipped) == {
        os.path.join("fives", "train", "Original", p) for p in ("notes.txt", "6_X.png", "5_D.png")
    } | {os.path.join("fives", "test", "Original", "3_G.png"), os.path.join("stonerounds", "coats_1", "case.json")}
    assert skipped[os.path.join("fives", "test", "Original", "3_G.png")] == "empty file (0 bytes)"
    assert skipped[os.path.join("fives", "train", "Original", "5_D.png")].startswith("unreadable image")
    assert report["num_skipped"] == 5 and report["cases_in_several_splits"] == []
    (duplicate,) = report["duplicates_across_splits"]
    assert sorted(os.path.relpath(i["path"], paths["fives"]) for i in duplicate["images"]) == [
        os.path.join("test", "Original", "2_N.png"), os.path.join("train", "Original", "4_N.png")
    ]
    assert "test" in duplicate["splits"]


def test_build_is_cached_and_seeded(built_all, trees, tmp_path):
    dataset, report = built_all
    paths, _ = trees
    again, report_again = build("all", **paths, cache_dir=str(tmp_path), num_workers=1)
    assert report_again == report
    assert again["test"]["case_id"] == dataset["test"]["case_id"]
    other = build("all", **paths, cache_dir=str(tmp_path), seed=1)[1]
    assert other["seed"] == 1 and other["totals"] == report["totals"]  # same per-stratum counts, other cases
    assert other["counts"]["fives"] == report["counts"]["fives"]


# ---------------------------------------------------------------------------------------------------------------------
# Exports.


def test_parquet_export_round_trips_through_load_dataset(built_all, tmp_path):
    dataset, _ = built_all
    paths = export_parquet(dataset, str(tmp_path / "out"))
    assert len(paths) == 3
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))
    for split in ("train", "validation", "test"):
        assert loaded[split].features == dataset[split].features
        for column in ("label", "disease_type", "text", "source", "case_id", "split"):
            assert loaded[split][column] == dataset[split][column]
        assert np.array_equal(np.asarray(loaded[split][0]["image"]), np.asarray(dataset[split][0]["image"]))


def test_imagefolder_export_reads_back_with_same_splits(built_all, tmp_path):
    dataset, _ = built_all
    export_imagefolder(dataset, str(tmp_path / "folder"))
    again = load("manifest", data_dir=str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"))
    for split in ("train", "validation", "test"):
        key = lambda d: sorted(zip(d["case_id"], d["label"], d["text"], d["source"]))  # noqa: E731
        assert key(again[split]) == key(dataset[split])
    plain = datasets.load_dataset(str(tmp_path / "folder"), cache_dir=str(tmp_path / "hf"))
    assert plain["test"].num_rows == dataset["test"].num_rows and "vessel_mask" in plain["test"].features


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic set.


def test_synthetic_is_identical_for_a_seed_and_different_for_another(tmp_path):
    first = load("synthetic", composition=TINY_COMPOSITION, image_size=SIZE, cache_dir=str(tmp_path / "a"))
    second = load("synthetic", composition=TINY_COMPOSITION, image_size=SIZE, cache_dir=str(tmp_path / "b"))
    other = load("synthetic", composition=TINY_COMPOSITION, image_size=SIZE, seed=1, cache_dir=str(tmp_path / "a"))
    for split in ("train", "test"):
        assert second[split]["case_id"] == first[split]["case_id"] and second[split]["text"] == first[split]["text"]
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(first[split]["image"], second[split]["image"]))
    assert not np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(other["train"][0]["image"]))
    assert sum(len(first[s]) for s in first) == 89
    # Stable generated file names: unique, the same in every build of the plan, shared by both seeds' plans.
    names = [name for split in first for name in first[split]["file_name"]]
    assert len(set(names)) == 89 and all(name.startswith("synthetic_") and name.endswith(".jpg") for name in names)
    assert names == [name for split in second for name in second[split]["file_name"]]
    assert "synthetic_fives_00000.jpg" in names and "synthetic_stonerounds_00000.jpg" in names
    # The age-dependent tag travels with each photo (and only the synthetic set's cases carry it).
    tagged = {(i.case_id, i.label) for i in plan(None, 0, TINY_COMPOSITION) if i.age_dependent}
    names_of = first["train"].features["label"].names
    found = {(row["case_id"], names_of[row["label"]]) for split in first for row in
             first[split].select_columns(["case_id", "label", "age_dependent"]) if row["age_dependent"]}
    assert found == tagged and len(tagged) == 24
    mask = np.asarray(first["train"][0]["vessel_mask"])
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}


def test_cache_key_changes_with_the_generators_source(tmp_path, monkeypatch):
    import hashlib

    from dataset_builder import builder, synthetic

    expected = hashlib.blake2b(digest_size=8)
    for path in (synthetic.__file__, builder.__file__.replace("builder.py", "sources.py"), builder.__file__):
        with open(path, "rb") as f:
            expected.update(f.read())
    assert builder.code_digest() == expected.hexdigest()

    def cache_dir():
        return builder.make_builder("synthetic", composition=TINY_COMPOSITION, cache_dir=str(tmp_path)).cache_dir

    before = cache_dir()
    assert cache_dir() == before  # a key, not a random name
    changed = tmp_path / "synthetic.py"
    with open(synthetic.__file__, encoding="utf-8") as f:
        changed.write_text(f.read().replace("NOISE_SIGMA = (0.005, 0.02)", "NOISE_SIGMA = (0.005, 0.03)"))
    monkeypatch.setattr(builder, "CODE_FILES", [str(changed), *builder.CODE_FILES[1:]])
    assert cache_dir() != before


def test_default_composition_mirrors_the_paper():
    items = plan()
    assert len(items) == 1305
    by_part = {part: [i for i in items if i.part == part] for part in ("fives", "hrf", "stonerounds")}
    assert [len(v) for v in by_part.values()] == [800, 45, 460]
    assert {i.label for i in by_part["fives"]} == {"normal", "amd", "dr", "glaucoma"}
    assert sum(i.official_split == "test" for i in by_part["fives"]) == 200
    assert all(i.text == "" for i in by_part["fives"] + by_part["hrf"])
    # Most photos have a history, acquired and normal ones too; about a tenth of cases none (tests/test_testbed.py)
    assert 0.8 <= np.mean([bool(i.text) for i in by_part["stonerounds"]]) <= 0.95
    cases = {}
    for item in by_part["stonerounds"]:
        cases.setdefault(item.case_id, []).append(item)
    assert any(len(v) == 2 for v in cases.values()) and all(len({i.text for i in v}) == 1 for v in cases.values())
    assert sum(scale_composition(100).get(p, {}).get(l, 0) for p in DEFAULT_COMPOSITION for l in LABELS) == 100


def test_disease_signs_show_in_colour_statistics():
    """Signs are visible at 128 px: Best disease's yolk makes the macula yellow; choroideremia bares white sclera."""
    def stats(label):
        values = []
        for seed in range(4):
            image = render_fundus(label, np.random.default_rng(seed), 128)[0].astype(float)
            yellow = image[..., 1] - image[..., 2]
            values.append((yellow.max(), (image.min(-1) > 150).mean()))
        return np.mean(values, 0)

    normal, best, choroideremia = stats("normal"), stats("best_disease"), stats("choroideremia")
    assert best[0] > normal[0] + 30
    assert choroideremia[1] > normal[1] + 0.05


# ---------------------------------------------------------------------------------------------------------------------
# CLI.


def test_cli_build_and_preview(tmp_path, capsys):
    out = tmp_path / "syn"
    code = main(["build", "--source", "synthetic", "--num-images", "24", "--image-size", "32", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    report = json.loads((out / "split_report.json").read_text())
    assert sum(report["totals"].values()) == 24 and (out / "split_report.md").read_text().startswith("# Split report")
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert sum(loaded[s].num_rows for s in loaded) == 24
    assert main(["preview", "--source", "synthetic", "--per-class", "2", "--thumb", "32",
                 "--out", str(tmp_path / "sheet.png")]) == 0
    assert Image.open(tmp_path / "sheet.png").size[1] == 8 * (32 + 4)
    assert main(["build", "--source", "fives", "--data-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_assign_splits_respects_official_splits_and_groups():
    records = [Record("s", f"c{i // 2}", "dr" if i % 4 < 2 else "normal", image_path=f"{i}.png") for i in range(40)]
    records += [Record("f", "f1", "amd", official_split="test"), Record("f", "f2", "amd", official_split="train")]
    splits = assign_splits(records, seed=3)
    assert splits[-2] == "test" and splits[-1] in ("train", "validation")
    assert all(splits[i] == splits[i + 1] for i in range(0, 40, 2))  # two images per case
    assert [splits[i] for i in range(0, 40, 2)].count("test") == 4  # 2 strata x round(10 * 0.2)
    assert assign_splits(records, seed=3) == splits and assign_splits(records, seed=4) != splits


def test_synthetic_lesion_mask_marks_the_disease_signs_only():
    import numpy as np

    from dataset_builder.synthetic import render_fundus

    plain = render_fundus("dr", np.random.default_rng(1), 128)
    image, vessels, lesions = render_fundus("dr", np.random.default_rng(1), 128, return_lesions=True)
    assert np.array_equal(plain[0], image) and np.array_equal(plain[1], vessels)  # same photo, same randomness
    assert lesions.dtype == bool and lesions.shape == (128, 128) and lesions.sum() > 0
    assert render_fundus("normal", np.random.default_rng(1), 128, return_lesions=True)[2].sum() == 0


def test_labels_and_source_names_are_written_once():
    """The label space comes from configuration_mdf_mllm.DEFAULT_LABELS and the paper's sources from one tuple,
    shared by the builder, the synthetic set and the CLI; the synthetic parts' seeds keep their numbers."""
    from configuration_mdf_mllm import DEFAULT_LABELS
    from dataset_builder import builder, sources, synthetic
    from dataset_builder import __main__ as cli

    assert sources.LABEL_NAMES == [name for name, _, _ in DEFAULT_LABELS]
    assert builder.LABEL_NAMES is synthetic.LABEL_NAMES is cli.LABEL_NAMES is sources.LABEL_NAMES
    assert builder.LABEL_TYPES is sources.LABEL_TYPES
    assert builder.CONFIG_NAMES == ("fives", "hrf", "stonerounds", "manifest", "synthetic", "all")
    assert builder.PAPER_SOURCES is synthetic.PAPER_SOURCES is sources.PAPER_SOURCES
    assert set(sources.PAPER_SOURCES) <= set(sources.SOURCES)
    assert synthetic._PART_IDS == {"fives": 0, "hrf": 1, "stonerounds": 2}  # each part's random stream
    with pytest.raises(ValueError, match="parts must be fives/hrf/stonerounds"):
        next(synthetic.generate(composition={"drive": {"normal": 1}}))
