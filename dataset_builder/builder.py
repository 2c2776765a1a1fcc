"""One `datasets` builder for FIVES, HRF, StoneRounds, labelled image folders and the synthetic set, its splits, its
split report and its exports (Parquet shards or an ImageFolder that `datasets.load_dataset` reads with no script).

`datasets` 4+ no longer runs loading scripts, so `MdfFundus` is instantiated directly (`load()` does it):

    >>> from dataset_builder import load
    >>> data = load("all", fives="FIVES", hrf="HRF", stonerounds="StoneRounds")   # or load("synthetic")
    >>> data["train"][0]["label"], data["train"].features["label"].names
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from configuration_mdf_mllm import DISEASE_TYPES
from mdf_mllm.messages import shown  # file names on one line in the report, as the CLI prints them

from . import synthetic
from .sources import (
    LABEL_NAMES,
    LABEL_TYPES,
    PAPER_SOURCES,
    SOURCES,
    SPLITS,
    Record,
    Skipped,
    default_num_workers,
    ordered_map,
    validate_images,
)


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "disease_type": datasets.ClassLabel(names=DISEASE_TYPES),
        "text": datasets.Value("string"),
        "source": datasets.Value("string"),
        "case_id": datasets.Value("string"),
        "file_name": datasets.Value("string"),
        "vessel_mask": datasets.Image(),
        "split": datasets.Value("string"),
        "age_dependent": datasets.Value("bool"),  # synthetic: the look and history another label shares but by age
    }
)
CONFIG_NAMES = (*SOURCES, "synthetic", "all")  # the sources registered with the package (`config_names()`: now)
REPORT_NAME = "split_report"
# Synthetic photos are stored as JPEG (quality 95, no chroma subsampling, as HRF's photos are): encoding a noisy
# 512 px photo as PNG takes longer than rendering it. Masks stay lossless PNG, so they stay exact.
SYNTHETIC_PHOTO_FORMAT = {"format": "JPEG", "quality": 95, "subsampling": 0}
SYNTHETIC_MASK_FORMAT = {"format": "PNG", "compress_level": 1}


@dataclass
class MdfFundusConfig(datasets.BuilderConfig):
    """Which source(s) to read and how to split them.

    `fives`, `hrf`, `stonerounds`: roots of the paper's sources (`all` reads those given, plus `data_dir` as an
    image folder with `metadata.jsonl`); a single-source config reads its own field or `data_dir`.
    `test_size`: fraction of the cases of each (source, label) stratum held out for test (FIVES keeps its own test).
    `validation_size`: fraction of the remaining training cases of each stratum carved out for validation.
    `num_images`, `image_size`, `composition`: the synthetic set (see `synthetic.generate`).
    `source_fingerprint`: a digest of the builder's own code (the synthetic generator included) and of the source
    folders' listings, so that neither a changed generator nor a changed folder is read from a stale cache.
    """

    fives: str | None = None
    hrf: str | None = None
    stonerounds: str | None = None
    seed: int = 0
    test_size: float = 0.2
    validation_size: float = 0.1
    num_images: int | None = None
    image_size: int = 512
    composition: dict | None = None
    source_fingerprint: str | None = None


class MdfFundus(datasets.GeneratorBasedBuilder):
    """Fundus photos with disease label, disease type, clinical text, vessel mask, case and split (see docs/data.md)."""

    VERSION = datasets.Version("1.2.0")  # 1.1: the file_name column; 1.2: age_dependent
    BUILDER_CONFIG_CLASS = MdfFundusConfig
    BUILDER_CONFIGS = [MdfFundusConfig(name=name) for name in CONFIG_NAMES]
    DEFAULT_CONFIG_NAME = "synthetic"

    def __init__(self, *args, num_workers: int | None = None, **kwargs):
        self.num_workers = num_workers or default_num_workers()
        self.report: dict | None = None
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="MDF-MLLM fundus image-text pairs: FIVES, HRF, StoneRounds, image folders, synthetic.",
            features=FEATURES,
        )

    def _split_generators(self, dl_manager):
        records, skipped = collect_records(self.config, self.num_workers)
        splits = assign_splits(records, self.config.seed, self.config.test_size, self.config.validation_size)
        self.report = split_report(records, splits, skipped, self.config.name, self.config.seed)
        write_report(self.report, self._output_dir)  # moved into the cache folder with the data
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={"records": [r for r, s in zip(records, splits) if s == split], "split": split},
            )
            for split in SPLITS
            if split in splits  # datasets cannot read back an empty split; build() adds it as an empty Dataset
        ]

    def _generate_examples(self, records: list[Record], split: str):
        def make(record):
            return to_example(record, split, self.config.image_size, self.config.seed)

        for index, example in enumerate(ordered_map(make, records, self.num_workers)):
            yield datasets.builder.Key(0, index), example


# ---------------------------------------------------------------------------------------------------------------------
# Records: what each config reads.


def collect_records(config: MdfFundusConfig, num_workers: int = 1) -> tuple[list[Record], list[Skipped]]:
    """All usable records of a config, and the files skipped on the way (with paths and reasons)."""
    if config.name == "synthetic":
        items = synthetic.plan(config.num_images, config.seed, config.composition)
        records = [
            Record(f"synthetic_{item.part}", item.case_id, item.label, item.text,
                   official_split=item.official_split, synthetic=item)
            for item in items
        ]
        return records, []
    roots = source_roots(config)
    records, skipped = [], []
    for source, root in roots.items():
        found, bad = SOURCES[source].read(root)
        records += [replace(record, file_name=os.path.relpath(record.image_path, root)) for record in found]
        skipped += bad
    records, unreadable = validate_images(records, num_workers)
    skipped += unreadable
    if not records:
        first = f"; first: {shown(skipped[0].path)}: {shown(skipped[0].reason)}" if skipped else ""
        raise ValueError(f"{config.name}: no usable photo in {', '.join(roots.values())} ({len(skipped)} skipped"
                         f"{first})")
    return records, skipped


def source_roots(config: MdfFundusConfig) -> dict[str, str]:
    """Source name -> folder for a config; a clear error when a needed folder is not given."""
    if config.name == "all":
        roots = {source: getattr(config, source) for source in PAPER_SOURCES if getattr(config, source)}
        if config.data_dir:
            roots["manifest"] = config.data_dir
        if not roots:
            raise ValueError("all: give at least one of fives=, hrf=, stonerounds= (or data_dir= for an image folder)")
        return roots
    if config.name not in SOURCES:
        raise ValueError(f"config name {config.name!r} is not one of {config_names()}")
    return {config.name: getattr(config, config.name, None) or config.data_dir}


def to_example(record: Record, split: str, image_size: int = 512, seed: int = 0) -> dict:
    """The unified example of a record: images as encoded bytes (files read as they are; synthetic ones rendered and
    encoded, the photo as JPEG and the mask as PNG) and `file_name`, the photo's path relative to its data folder
    (synthetic: `synthetic_<part>_<index>.jpg`, the same for every build of one plan)."""
    file_name = record.file_name
    if record.synthetic is not None:
        image, mask = synthetic.render(record.synthetic, image_size, seed)
        name = f"{record.source}_{record.synthetic.number:05d}"
        file_name = f"{name}.jpg"
        image = _encode(image, file_name, SYNTHETIC_PHOTO_FORMAT)
        mask = _encode(mask, f"{name}_mask.png", SYNTHETIC_MASK_FORMAT)
    else:
        image = _file(record.image_path)
        mask = _file(record.mask_path) if record.mask_path else None
    return {
        "image": image,
        "label": record.label,
        "disease_type": LABEL_TYPES[record.label],
        "text": record.text,
        "source": record.source,
        "case_id": record.case_id,
        "file_name": file_name,
        "vessel_mask": mask,
        "split": split,
        "age_dependent": getattr(record.synthetic, "age_dependent", False),
    }


def _file(path: str) -> dict:
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": os.path.basename(path)}


def _encode(array: np.ndarray, name: str, save_kwargs: dict) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, **save_kwargs)
    return {"bytes": buffer.getvalue(), "path": name}


# ---------------------------------------------------------------------------------------------------------------------
# Splits: official where there is one, else stratified by label and grouped by case; validation carved from train.


def assign_splits(
    records: list[Record], seed: int = 0, test_size: float = 0.2, validation_size: float = 0.1
) -> list[str]:
    """The split of each record.

    Records of one case (`source`, `case_id`) always share a split. A record's `official_split` is kept (FIVES'
    train/test); cases without one are split per stratum (source, set of labels in the case): `round(n * test_size)`
    cases to test (at least one when the stratum has 3 or more), chosen by a seeded permutation. Validation is then
    carved the same way, with `validation_size`, from every training case (official ones included, unless the source
    has official validation records too).
    """
    cases = defaultdict(list)
    for index, record in enumerate(records):
        cases[(record.source, record.case_id)].append(index)
    official = {case: {records[i].official_split for i in members} - {None} for case, members in cases.items()}
    rng = np.random.default_rng(seed)
    chosen = {case: next(iter(s)) for case, s in official.items() if len(s) == 1 and s != {"train"}}
    free = [case for case in cases if not official[case]]
    chosen.update(dict.fromkeys(_stratified_take(free, cases, records, test_size, rng), "test"))
    # A source that brings its own validation split (a manifest) keeps its training cases as they are.
    has_validation = {record.source for record in records if record.official_split == "validation"}
    trainable = [case for case in cases if case not in chosen and not (case[0] in has_validation and official[case])]
    chosen.update(dict.fromkeys(_stratified_take(trainable, cases, records, validation_size, rng), "validation"))
    splits = [""] * len(records)
    for case, members in cases.items():
        for i in members:
            # A case whose official splits disagree (possible only in a manifest) keeps them; the report lists it.
            splits[i] = records[i].official_split if len(official[case]) > 1 else chosen.get(case, "train")
    return splits


def _stratified_take(case_keys, cases, records, fraction, rng) -> list:
    """A seeded choice of `round(n * fraction)` cases per stratum (at least 1 when n >= 3 and fraction > 0)."""
    strata = defaultdict(list)
    for case in case_keys:
        labels = tuple(sorted({_stratum_label(records[i]) for i in cases[case]}))
        strata[(case[0], labels)].append(case)
    taken = []
    for stratum in sorted(strata):
        members = sorted(strata[stratum])
        count = math.floor(len(members) * fraction + 0.5)
        if fraction > 0 and len(members) >= 3:
            count = max(count, 1)
        taken += [members[i] for i in rng.permutation(len(members))[:count]]
    return taken


def _stratum_label(record: Record) -> str:
    """A record's label, with its synthetic presentation and look where it has one, so that both sides of every
    phenocopy pair, overlapping history and age-dependent look reach every split."""
    presentation = getattr(record.synthetic, "presentation", "")
    return f"{record.label}/{presentation}/{record.synthetic.look}" if presentation else record.label


# ---------------------------------------------------------------------------------------------------------------------
# The split report.


def split_report(records: list[Record], splits: list[str], skipped: list[Skipped], config: str, seed: int) -> dict:
    """Counts per source x label x split, skipped files (path, reason), cases and identical images across splits."""
    counts = defaultdict(lambda: defaultdict(Counter))
    case_splits = defaultdict(set)
    by_hash = defaultdict(list)
    for record, split in zip(records, splits):
        counts[record.source][record.label][split] += 1
        case_splits[(record.source, record.case_id)].add(split)
        if record.content_hash:
            by_hash[record.content_hash].append({"path": record.image_path, "case_id": record.case_id, "split": split})
    duplicates = [
        {"hash": digest, "splits": sorted({item["split"] for item in items}), "images": items}
        for digest, items in sorted(by_hash.items())
        if len({item["split"] for item in items}) > 1
    ]
    return {
        "config": config,
        "seed": seed,
        "totals": {split: splits.count(split) for split in SPLITS},
        "counts": {
            source: {label: {split: by_label[label][split] for split in SPLITS} for label in sorted(by_label)}
            for source, by_label in sorted(counts.items())
        },
        "num_skipped": len(skipped),
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "cases_in_several_splits": sorted(f"{s}:{c}" for (s, c), v in case_splits.items() if len(v) > 1),
        "duplicates_across_splits": duplicates,
    }


def report_markdown(report: dict) -> str:
    """The split report as Markdown: the count table, then skipped files and duplicate images."""
    lines = [f"# Split report: `{report['config']}` (seed {report['seed']})", ""]
    lines += ["| source | label | " + " | ".join(SPLITS) + " | total |", "|---|---|" + "---:|" * (len(SPLITS) + 1)]
    for source, by_label in report["counts"].items():
        for label, by_split in by_label.items():
            cells = [str(by_split[s]) for s in SPLITS]
            lines.append(f"| {source} | {label} | " + " | ".join(cells) + f" | {sum(by_split.values())} |")
    totals = report["totals"]
    lines.append("| **all** | | " + " | ".join(str(totals[s]) for s in SPLITS) + f" | {sum(totals.values())} |")
    lines += ["", f"## Skipped files ({report['num_skipped']})", ""]
    lines += [f"- `{shown(s['path'])}`: {shown(s['reason'])}" for s in report["skipped"]] or ["None."]
    lines += ["", f"## Cases in several splits ({len(report['cases_in_several_splits'])})", ""]
    lines += [f"- `{shown(case)}`" for case in report["cases_in_several_splits"]] or ["None."]
    lines += ["", f"## Identical images in several splits ({len(report['duplicates_across_splits'])})", ""]
    for dup in report["duplicates_across_splits"]:
        images = ", ".join(f"`{shown(item['path'])}` ({item['split']})" for item in dup["images"])
        lines.append(f"- {dup['hash']}: {images}")
    if not report["duplicates_across_splits"]:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: str) -> None:
    """Write `split_report.json` and `split_report.md` into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{REPORT_NAME}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    with open(os.path.join(folder, f"{REPORT_NAME}.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(report))


# ---------------------------------------------------------------------------------------------------------------------
# Loading.

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mdf_mllm", "datasets")


def make_builder(
    name: str = "synthetic",
    *,
    fives: str | None = None,
    hrf: str | None = None,
    stonerounds: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    **config_kwargs,
) -> MdfFundus:
    """An `MdfFundus` builder for config `name`, caching under `cache_dir` (default `$MDF_MLLM_DATA_CACHE` or
    ~/.cache/mdf_mllm/datasets), keyed by the config and a fingerprint of the builder's code and of the source
    folders' listings."""
    if name not in config_names():
        raise ValueError(f"name: {name!r} is not one of {config_names()}")
    folders = [os.path.abspath(p) if p else None for p in (fives, hrf, stonerounds, data_dir)]
    builder = MdfFundus
    if name not in builder.builder_configs:  # a source registered after the package: a config of its own
        builder = type(MdfFundus.__name__, (MdfFundus,), {"BUILDER_CONFIGS": [MdfFundusConfig(name=name) for name in
                                                                              config_names()]})
    return builder(
        config_name=name,
        cache_dir=cache_dir or os.environ.get("MDF_MLLM_DATA_CACHE", DEFAULT_CACHE),
        num_workers=num_workers,
        fives=folders[0],
        hrf=folders[1],
        stonerounds=folders[2],
        data_dir=folders[3],
        seed=seed,
        source_fingerprint=_fingerprint([p for p in folders if p] if name != "synthetic" else []),
        **config_kwargs,
    )


def config_names() -> tuple[str, ...]:
    """Every config the builder reads: each registered source (`sources.SOURCES`), the synthetic set, `all`."""
    return (*SOURCES, "synthetic", "all")


# What a build's content depends on besides its config: the code that reads, renders and encodes the examples.
CODE_FILES = [synthetic.__file__, os.path.join(os.path.dirname(__file__), "sources.py"), __file__]


def code_digest(files: list[str] | None = None) -> str:
    """Digest of the bytes of `files` (default `CODE_FILES`)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in files or CODE_FILES:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _fingerprint(folders: list[str]) -> str:
    """Digest of the builder's code and of every file's relative path, size and modification time under `folders`."""
    digest = hashlib.blake2b(code_digest().encode(), digest_size=8)
    for folder in folders:
        digest.update(folder.encode())
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                stat = os.stat(path) if os.path.exists(path) else os.lstat(path)  # a broken link: the link itself
                # fsencode: a file name in another encoding holds surrogates, which .encode() refuses
                digest.update(os.fsencode(os.path.relpath(path, folder)) + f":{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def build(name: str = "synthetic", **kwargs) -> tuple[datasets.DatasetDict, dict]:
    """`load()` plus the split report (read back from the cache when the data was built before)."""
    builder = make_builder(name, **kwargs)
    builder.download_and_prepare()
    with open(os.path.join(builder.cache_dir, f"{REPORT_NAME}.json"), encoding="utf-8") as f:
        report = json.load(f)
    dataset = builder.as_dataset()
    empty = {column: [] for column in FEATURES}
    return datasets.DatasetDict(
        {split: dataset[split] if split in dataset else datasets.Dataset.from_dict(empty, FEATURES) for split in SPLITS}
    ), report


def load(
    name: str = "synthetic",
    *,
    fives: str | None = None,
    hrf: str | None = None,
    stonerounds: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    **kwargs,
) -> datasets.DatasetDict:
    """The `train` / `validation` / `test` DatasetDict of config `name` (one of `CONFIG_NAMES`).

    `kwargs`: `num_images`, `image_size`, `composition` (synthetic), `test_size`, `validation_size`, `cache_dir`,
    `num_workers`.
    """
    dataset, _ = build(name, fives=fives, hrf=hrf, stonerounds=stonerounds, data_dir=data_dir, seed=seed, **kwargs)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Export: files that `datasets.load_dataset` reads with no script.

DEFAULT_MAX_SHARD_BYTES = 500 * 2**20


SHARD_NAME = re.compile(r"(train|validation|test)-\d{5}-of-\d{5}\.parquet")
IMAGEFOLDER_NAME = re.compile(r"\d{5}(_mask)?\.[A-Za-z0-9]+|metadata\.jsonl")
# What an export owns in its folder: the Parquet shards' `data/`, the ImageFolder's split folders and the split report.
# An export of either format replaces all of it, so an earlier export of the other format never mixes into
# `load_dataset(out)`.
OWNED_FOLDERS = {"data": SHARD_NAME, **dict.fromkeys(SPLITS, IMAGEFOLDER_NAME)}
REPORT_FILES = (f"{REPORT_NAME}.json", f"{REPORT_NAME}.md")


def export_problem(out: str) -> str | None:
    """Why an export may not go to `out` (None: it may): `out` holds files that no export wrote, which
    `load_dataset(out)` would mix in and which the export, replacing what an earlier one owns, must not delete.
    Hidden entries at its top (which `load_dataset` skips) are left as they are."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: is a file; choose another --out"
    foreign = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name)
        if name.startswith(".") or (name in REPORT_FILES and os.path.isfile(path)):
            continue
        pattern = OWNED_FOLDERS.get(name)
        if pattern is None or os.path.islink(path) or not os.path.isdir(path):
            foreign.append(name)
        else:
            foreign += [f"{name}/{entry}" for entry in sorted(os.listdir(path))
                        if not (pattern.fullmatch(entry) and os.path.isfile(os.path.join(path, entry)))]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return (f"--out {out}: holds files an export did not write ({', '.join(foreign[:3])}{more}); an export "
                "replaces what an earlier one wrote there, so choose another --out")
    return None


def _replace_export(out: str, write) -> None:
    """`write(folder)` into a temporary folder inside `out`, whose contents then take the place of everything an
    earlier export owns there (`OWNED_FOLDERS`, the split report), whichever its format: exports never mix, and a
    failed one leaves the earlier one whole. `out` must pass `export_problem`."""
    problem = export_problem(out)
    if problem:
        raise ValueError(problem)
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out)
    previous = staging + "-previous"
    try:
        write(staging)
        os.mkdir(previous)
        for name in (*OWNED_FOLDERS, *REPORT_FILES):
            if os.path.exists(os.path.join(out, name)):
                os.rename(os.path.join(out, name), os.path.join(previous, name))
        for name in os.listdir(staging):
            os.rename(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def export_parquet(
    dataset: datasets.DatasetDict, out: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write `out/data/<split>-<i>-of-<n>.parquet` (images embedded, features in the schema); return the paths.

    `datasets.load_dataset("parquet", data_dir=out)` and `load_dataset(out)` read it back with the same features. It
    replaces an earlier export of either format (see `_replace_export`; `out` must pass `export_problem`). A split
    with no rows is not written (datasets cannot read back an empty split): the export then loads with the other
    splits.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected a positive size, got {max_shard_bytes}")
    if not any(len(part) for part in dataset.values()):
        raise ValueError("nothing to export: every split is empty")
    names = []

    def write(folder: str) -> None:
        os.mkdir(os.path.join(folder, "data"))
        for split, part in dataset.items():
            num_shards = max(1, math.ceil(part.data.nbytes / max_shard_bytes)) if len(part) else 0
            for index in range(num_shards):
                names.append(f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
                part.shard(num_shards, index, contiguous=True).to_parquet(os.path.join(folder, "data", names[-1]))

    _replace_export(out, write)
    return [os.path.join(out, "data", name) for name in names]


def export_imagefolder(dataset: datasets.DatasetDict, out: str) -> None:
    """Write `out/<split>/<n>.<ext>` (+ `<n>_mask.<ext>`) and `out/<split>/metadata.jsonl`.

    `datasets.load_dataset(out)` reads it as an ImageFolder (`vessel_mask_file_name` becomes an Image column; labels
    come back as names), and `load("manifest", data_dir=out)` reads it back with the same splits. It replaces an
    earlier export of either format (see `_replace_export`; `out` must pass `export_problem`).
    """
    _replace_export(out, lambda folder: _write_imagefolder(dataset, folder))


def _write_imagefolder(dataset: datasets.DatasetDict, out: str) -> None:
    for split, part in dataset.items():
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        raw = part.cast_column("image", datasets.Image(decode=False))
        raw = raw.cast_column("vessel_mask", datasets.Image(decode=False))
        label_names = part.features["label"].names
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as manifest:
            for index, row in enumerate(tqdm(raw, desc=f"writing {split}", unit="img", leave=False)):
                row_out = {"file_name": _write_image(folder, f"{index:05d}", row["image"])}
                if row["vessel_mask"] is not None:
                    row_out["vessel_mask_file_name"] = _write_image(folder, f"{index:05d}_mask", row["vessel_mask"])
                row_out.update(
                    label=label_names[row["label"]],
                    text=row["text"],
                    source=row["source"],
                    case_id=row["case_id"],
                    split=split,
                )
                manifest.write(json.dumps(row_out, allow_nan=False) + "\n")


def _write_image(folder: str, stem: str, image: dict) -> str:
    suffix = os.path.splitext(image.get("path") or "")[1].lower() or ".png"
    name = stem + suffix
    with open(os.path.join(folder, name), "wb") as f:
        f.write(image["bytes"])
    return name
