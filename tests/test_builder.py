"""dataset_builder/builder.py and its command line: the `all` data set (labels, texts, masks, grouping, splits, split
report), the cache, the exports; on the tiny fake trees of every layout (conftest.py)."""

import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import STONEROUNDS_CASES, STONEROUNDS_TEXTS
from dataset_builder import TINY_COMPOSITION, assign_splits, build, export_imagefolder, export_parquet, load
from dataset_builder.__main__ import main
from dataset_builder.sources import LABEL_TYPES, Record


@pytest.fixture(scope="module")
def built_all(trees, tmp_path_factory):
    paths, _ = trees
    cache = str(tmp_path_factory.mktemp("cache"))
    return build("all", **paths, cache_dir=cache, num_workers=2)


def _rows(dataset: datasets.DatasetDict) -> list[dict]:
    return [row for split in ("train", "validation", "test") for row in dataset[split]]


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
