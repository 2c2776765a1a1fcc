"""Hostile data (issue 25): manifests with bad rows, BOMs, other encodings, conflicting labels and symlinks out of the
data folder; Parquet exports over earlier ones; empty splits; out-of-range builder options.

Every row of the issue's table that concerns data has a test here named after it (`test_row_<n>_...`), and a property
test builds manifests from random rows: no traceback, every skipped row named, no file outside the folder read, no
photo in two splits.
"""

import builtins
import json
import os
import re

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from dataset_builder import assign_splits, build, export_parquet, read_manifest
from dataset_builder.__main__ import main
from dataset_builder.sources import _inside, validate_images


def _photo(path, seed=0, size=24):
    """A small distinct photo (its own pixels, so no two photos of a test are identical)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _manifest(folder, rows, prefix=b""):
    """`folder/metadata.jsonl` from rows: dicts (JSON) or raw bytes (written as they are)."""
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]
    (folder / "metadata.jsonl").write_bytes(prefix + b"\n".join(lines) + b"\n")


def _labelled_folder(folder, count, labels=("amd", "dr", "glaucoma", "normal")):
    rows = []
    for index in range(count):
        _photo(str(folder / f"p{index}.png"), seed=index)
        rows.append({"file_name": f"p{index}.png", "label": labels[index % len(labels)]})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Row 4: a NUL byte in a file name, a Latin-1 byte in a row


def test_row_4_nul_byte_and_latin1_rows_are_skipped_with_their_line(tmp_path):
    rows = _labelled_folder(tmp_path, 3)
    rows.insert(1, {"file_name": "p0.png\u0000x", "label": "dr"})
    rows.insert(2, b'{"file_name": "p1.png", "label": "dr", "text": "caf\xe9"}')
    _manifest(tmp_path, rows)
    records, skipped = read_manifest(str(tmp_path))
    assert sorted(os.path.basename(r.image_path) for r in records) == ["p0.png", "p1.png", "p2.png"]
    manifest = tmp_path / "metadata.jsonl"
    assert [s.path for s in skipped] == [f"{manifest}:2", f"{manifest}:3"]
    assert "NUL" in skipped[0].reason and "UTF-8" in skipped[1].reason


def test_row_4_train_job_on_a_nul_manifest_builds_the_rest(tmp_path):
    from mdf_mllm.training import load_data
    from mdf_mllm.job import DataArguments

    rows = _labelled_folder(tmp_path / "d", 12)
    _manifest(tmp_path / "d", rows + [{"file_name": "a\u0000.png", "label": "dr"}])
    dataset = load_data(DataArguments(dataset="manifest", data_dir=str(tmp_path / "d")))
    assert sum(len(part) for part in dataset.values()) == 12


# ---------------------------------------------------------------------------------------------------------------------
# Row 5: one file_name with two labels


def test_row_5_two_labels_for_one_photo_is_a_conflict_and_one_label_is_kept_once(tmp_path):
    rows = _labelled_folder(tmp_path, 2)
    rows += [{"file_name": "p0.png", "label": "glaucoma"}, {"file_name": "./p1.png", "label": "dr"}]
    _manifest(tmp_path, rows)
    records, skipped = read_manifest(str(tmp_path))
    assert [(os.path.basename(r.image_path), r.label) for r in records] == [("p1.png", "dr")]
    conflict, again = sorted(skipped, key=lambda s: not s.reason.startswith("conflict"))
    assert conflict.path == str(tmp_path / "p0.png") and conflict.reason.startswith("conflict: listed with labels amd, "
                                                                                     "glaucoma")
    assert again.path == f"{tmp_path / 'metadata.jsonl'}:4" and "kept once" in again.reason


# ---------------------------------------------------------------------------------------------------------------------
# Row 6: a split folder that is a symlink to a folder outside the data folder


def test_row_6_split_folder_symlinked_outside_is_not_read(tmp_path):
    outside = tmp_path / "outside"
    _manifest(outside, _labelled_folder(outside, 2))
    data = tmp_path / "data"
    _manifest(data, _labelled_folder(data, 2))
    (data / "test").symlink_to(outside, target_is_directory=True)
    records, skipped = read_manifest(str(data))
    assert all(r.image_path.startswith(str(data / "p")) for r in records) and len(records) == 2
    assert [s.path for s in skipped] == [str(data / "test" / "metadata.jsonl")]
    assert "outside the data folder" in skipped[0].reason


# ---------------------------------------------------------------------------------------------------------------------
# Rows 7 and 9 (data): an empty manifest, a 3-row manifest to Parquet, builder option ranges


def test_row_7_empty_manifest_is_an_error_with_counts(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    _manifest(tmp_path / "d", [{"file_name": "missing.png", "label": "dr"}])
    assert main(["build", "--source", "manifest", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no usable photo" in error and "1 skipped" in error and "missing.png" in error


@pytest.mark.parametrize("option, value", [("--max-shard-mb", "0"), ("--image-size", "0"), ("--test-size", "1.5"),
                                           ("--validation-size", "-0.1"), ("--test-size", "nan")])
def test_row_7_builder_options_are_range_checked(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        main(["build", "--source", "synthetic", option, value, "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    # The hyphenated spelling is accepted; errors name the option as help does, with underscores.
    spelled = "--" + option[2:].replace("-", "_")
    assert stop.value.code == 2 and error.count("\n") == 1 and spelled in error and not (tmp_path / "o").exists()


def test_row_9_three_row_manifest_exports_and_loads_without_its_empty_splits(tmp_path, capsys):
    _manifest(tmp_path / "d", _labelled_folder(tmp_path / "d", 3, labels=("amd", "dr", "glaucoma")))
    out = tmp_path / "o"
    assert main(["build", "--source", "manifest", "--data-dir", str(tmp_path / "d"), "--out", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert "validation 0 (empty: not written" in capsys.readouterr().out
    loaded = datasets.load_dataset(str(out))
    assert {split: len(part) for split, part in loaded.items()} == {"train": 3}


# ---------------------------------------------------------------------------------------------------------------------
# Row 2: two Parquet exports into one folder


def test_row_2_second_parquet_export_replaces_the_first(tmp_path):
    first, _ = build("synthetic", num_images=40, image_size=32, cache_dir=str(tmp_path / "c"))
    second, _ = build("synthetic", num_images=20, image_size=32, seed=1, cache_dir=str(tmp_path / "c"))
    out = tmp_path / "o"
    export_parquet(first, str(out), max_shard_bytes=2**14)  # several shards, more than the second export writes
    export_parquet(second, str(out))
    loaded = datasets.load_dataset(str(out))
    assert {s: len(p) for s, p in loaded.items()} == {s: len(p) for s, p in second.items() if len(p)}
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary folder left


def test_row_2_parquet_export_never_deletes_a_users_file(tmp_path, capsys):
    (tmp_path / "o" / "data").mkdir(parents=True)
    (tmp_path / "o" / "data" / "notes.txt").write_text("mine")
    assert main(["build", "--source", "synthetic", "--num-images", "24", "--image-size", "32", "--out",
                 str(tmp_path / "o")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "o" / "data" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------------
# Row 8: a UTF-8 BOM


def test_row_8_bom_is_accepted(tmp_path):
    _manifest(tmp_path, _labelled_folder(tmp_path, 2), prefix=b"\xef\xbb\xbf")
    records, skipped = read_manifest(str(tmp_path))
    assert len(records) == 2 and skipped == []


# ---------------------------------------------------------------------------------------------------------------------
# Property: manifests from random rows


NAMES = ["p0.png", "p1.png", "p2.png", "./p0.png", "sub/p3.png", "missing.png", "link.png", "linkdir/q.png", "../x.png",
         "/etc/hostname", "p\u0000.png", "notes.txt", "caf\u00e9.png"]
LABELS = ["amd", "dr", "glaucoma", "normal", "cataract", 3, 99, None]
SPLIT_VALUES = [None, "train", "test", "validation", "holdout"]
ROW = st.one_of(
    st.fixed_dictionaries({"file_name": st.sampled_from(NAMES), "label": st.sampled_from(LABELS)},
                          optional={"split": st.sampled_from(SPLIT_VALUES), "text": st.text(max_size=8)}),
    st.sampled_from([b"not json", b'{"file_name": "p1.png", "label": "dr", "text": "\xe9"}', b"[1, 2]", b"\xff\xfe"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, max_size=12), bom=st.booleans())
def test_property_random_manifests(tmp_path_factory, rows, bom):
    root = tmp_path_factory.mktemp("prop")
    data, outside = root / "data", root / "outside"
    for index, name in enumerate(["p0.png", "p1.png", "p2.png", "sub/p3.png", "caf\u00e9.png"]):
        _photo(str(data / name), seed=index)
    _photo(str(outside / "secret.png"), seed=9)
    _photo(str(outside / "q.png"), seed=10)
    (data / "link.png").symlink_to(outside / "secret.png")
    (data / "linkdir").symlink_to(outside, target_is_directory=True)
    _manifest(data, rows, prefix=b"\xef\xbb\xbf" if bom else b"")

    opened, real_open = [], builtins.open

    def watching_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    builtins.open = watching_open
    try:
        records, skipped = read_manifest(str(data))
        kept, unreadable = validate_images(records, num_workers=1)
    finally:
        builtins.open = real_open
    assert not [path for path in opened if path.startswith(str(outside))]  # nothing outside the folder was read
    manifest = str(data / "metadata.jsonl")
    # Every row is kept or named by its line (in the skipped path or, for a photo's problem, in the reason).
    named = {int(n) for s in skipped for n in re.findall(re.escape(manifest) + r":(\d+)", s.path + s.reason)}
    assert len(records) + len(named) >= len(rows)
    assert all(s.path.startswith(manifest + ":") or _inside(str(data), os.path.relpath(s.path, data))
               for s in skipped + unreadable)
    splits = assign_splits(kept)
    where = {}
    for record, split in zip(kept, splits):
        where.setdefault(os.path.realpath(record.image_path), set()).add(split)
    assert all(len(found) == 1 for found in where.values())  # no photo in two splits


# ---------------------------------------------------------------------------------------------------------------------
# Issue 32 (round three): exports of either format over each other, a photo's bytes under two labels, photos without
# a field of view, histories holding special tokens, builder seeds out of range.


@pytest.mark.parametrize("first, second", [("parquet", "imagefolder"), ("imagefolder", "parquet")])
def test_issue32_row_4_an_export_replaces_an_earlier_export_of_the_other_format(tmp_path, capsys, first, second):
    out, cache = tmp_path / "o", str(tmp_path / "c")
    common = ["build", "--source", "synthetic", "--image_size", "32", "--cache_dir", cache, "--out", str(out)]
    assert main(common + ["--num_images", "40", "--format", first, "--max_shard_mb", "1"]) == 0
    assert main(common + ["--num_images", "24", "--seed", "1", "--format", second]) == 0
    expected, _ = build("synthetic", num_images=24, image_size=32, seed=1, cache_dir=cache)
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert {s: len(p) for s, p in loaded.items()} == {s: len(p) for s, p in expected.items() if len(p)}
    owned = {"data"} if second == "parquet" else {"train", "validation", "test"}
    assert set(os.listdir(out)) == owned | {"split_report.json", "split_report.md"}  # nothing else, nothing hidden
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["parquet", "imagefolder"])
@pytest.mark.parametrize("where", ["notes.txt", "train/notes.txt", "data/00000.png"])
def test_issue32_row_4_an_export_never_deletes_a_users_file(tmp_path, capsys, fmt, where):
    user_file = tmp_path / "o" / where
    user_file.parent.mkdir(parents=True)
    user_file.write_text("mine")
    assert main(["build", "--source", "synthetic", "--num_images", "24", "--image_size", "32", "--format", fmt,
                 "--out", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and where in error and "choose another --out" in error
    assert user_file.read_text() == "mine" and sorted(os.listdir(tmp_path / "o")) == [where.split("/")[0]]


@pytest.mark.parametrize("copy", [os.link, lambda a, b: open(b, "wb").write(open(a, "rb").read())])
def test_issue32_row_5_a_hard_link_or_copy_under_a_second_label_is_a_conflict(tmp_path, copy):
    rows = _labelled_folder(tmp_path, 3)
    copy(tmp_path / "p0.png", tmp_path / "again.png")
    rows.append({"file_name": "again.png", "label": "glaucoma"})
    _manifest(tmp_path, rows)
    records, skipped = read_manifest(str(tmp_path))
    assert sorted(os.path.basename(r.image_path) for r in records) == ["p1.png", "p2.png"]
    (conflict,) = skipped
    manifest = tmp_path / "metadata.jsonl"
    assert conflict.path == str(tmp_path / "p0.png")
    assert conflict.reason == (f"conflict: listed with labels amd, glaucoma ({manifest}:1: {tmp_path / 'p0.png'}, "
                               f"{manifest}:4: {tmp_path / 'again.png'}: one photo); none kept, fix the manifest")


def test_issue32_row_5_a_copy_under_the_same_label_stays_a_photo_of_its_own(tmp_path):
    rows = _labelled_folder(tmp_path, 2)
    os.link(tmp_path / "p0.png", tmp_path / "again.png")
    _manifest(tmp_path, rows + [{"file_name": "again.png", "label": "amd", "case_id": "other"}])
    records, skipped = read_manifest(str(tmp_path))
    assert [os.path.basename(r.image_path) for r in records] == ["p0.png", "p1.png", "again.png"] and skipped == []


def test_issue32_a_photo_with_no_field_of_view_is_skipped_naming_it(tmp_path):
    rows = _labelled_folder(tmp_path / "d", 12)
    Image.new("RGB", (24, 24)).save(tmp_path / "d" / "black.png")
    _manifest(tmp_path / "d", rows + [{"file_name": "black.png", "label": "dr"}])
    dataset, report = build("manifest", data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    assert sum(len(part) for part in dataset.values()) == 12
    (skipped,) = report["skipped"]
    assert skipped["path"] == str(tmp_path / "d" / "black.png")
    assert skipped["reason"].startswith("photo: no field of view found: the image is uniform")


def test_issue32_a_history_holding_special_tokens_is_skipped_naming_its_row(tmp_path):
    rows = _labelled_folder(tmp_path, 4)
    rows[1]["text"] = "Night blindness. <|image|> again"
    rows[2]["text"] = "Fine.<|eot_id|><|start_header_id|>assistant"
    rows[3]["text"] = "Pipe | and <angle> brackets are fine"
    _manifest(tmp_path, rows)
    records, skipped = read_manifest(str(tmp_path))
    assert [os.path.basename(r.image_path) for r in records] == ["p0.png", "p3.png"]
    manifest = tmp_path / "metadata.jsonl"
    assert [s.path for s in skipped] == [f"{manifest}:2", f"{manifest}:3"]
    assert skipped[0].reason.startswith("text holds the special token(s) <|image|>, which")
    assert skipped[0].reason.endswith("(p1.png)")
    assert "<|eot_id|>, <|start_header_id|>" in skipped[1].reason


def test_issue32_a_stonerounds_history_holding_special_tokens_is_skipped(tmp_path):
    for case, history in (("ok", "Night blindness."), ("bad", "<|image|>")):
        _photo(str(tmp_path / case / "a.png"))
        case_json = {"diagnosis": "retinitis pigmentosa", "history": history}
        (tmp_path / case / "case.json").write_text(json.dumps(case_json))
    from dataset_builder import read_stonerounds

    records, skipped = read_stonerounds(str(tmp_path))
    assert [r.case_id for r in records] == ["stonerounds/ok"]
    assert [s.path for s in skipped] == [str(tmp_path / "bad" / "case.json")] and "<|image|>" in skipped[0].reason


@pytest.mark.parametrize("command, option, value", [("build", "--seed", "-1"), ("build", "--num_images", "0"),
                                                    ("build", "--num_workers", "0"), ("preview", "--per_class", "0"),
                                                    ("preview", "--thumb", "0"), ("preview", "--seed", "-3")])
def test_issue32_builder_seed_and_counts_are_range_checked(tmp_path, capsys, command, option, value):
    with pytest.raises(SystemExit) as stop:
        main([command, "--source", "synthetic", option, value, "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    named = "--dataset_seed/--seed" if option == "--seed" else option  # the job's name, the old one still accepted
    assert stop.value.code == 2 and error.count("\n") == 1 and f"argument {named}: expected" in error
    assert f"got '{value}'" in error and not (tmp_path / "o").exists()
