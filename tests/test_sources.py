"""dataset_builder/sources.py: the readers of each on-disk layout, on the tiny fake trees of every layout (conftest.py)."""

import json
import os

import pytest

from conftest import STONEROUNDS_TEXTS, _save, _synthetic
from dataset_builder import read_fives, read_hrf, read_manifest, read_stonerounds, resolve_label


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
