"""Readers for the on-disk layouts of FIVES, HRF, StoneRounds and labelled image folders (see docs/data.md).

Each reader walks its folder and returns `(records, skipped)`: a `Record` per usable image (label, case, text, mask
path, official split) and a `Skipped(path, reason)` per file it could not use. Nothing is decoded here;
`validate_images` decodes every image once (in threads), hashes its pixels and moves unreadable ones, and ones with
no field of view to crop (an all-black frame), to `skipped`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from PIL import Image
from tqdm.auto import tqdm

from configuration_mdf_mllm import DEFAULT_LABELS
from image_processing_mdf_mllm import MdfMllmImageProcessor, detect_field_of_view, to_rgb_image


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".gif", ".webp"}
SPLITS = ("train", "validation", "test")
# The label space and the paper's sources, written once for the whole data package (builder, synthetic set, CLI).
LABEL_NAMES = [name for name, _, _ in DEFAULT_LABELS]
LABEL_TYPES = {name: kind for name, _, kind in DEFAULT_LABELS}
PAPER_SOURCES = ("fives", "hrf", "stonerounds")
FIVES_LABELS = {"a": "amd", "d": "dr", "g": "glaucoma", "n": "normal"}
HRF_LABELS = {"h": "normal", "dr": "dr", "g": "glaucoma"}
LABEL_ALIASES = {"healthy": "normal"}
# Llama 3's special tokens are all spelled <|name|> (<|image|>, <|eot_id|>, <|reserved_special_token_7|>, ...): in a
# clinical history the processor would read one as that token and refuse the sample, so the builder refuses the row.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>")


@dataclass(frozen=True)
class Record:
    """One example before it is read: where its image and mask are, and its label, case and text."""

    source: str
    case_id: str
    label: str
    text: str = ""
    image_path: str | None = None
    mask_path: str | None = None
    official_split: str | None = None  # "train"/"test" (FIVES, manifests with a split) or None: ours to choose
    synthetic: object | None = None  # a synthetic.SyntheticItem, rendered instead of read
    content_hash: str | None = None  # of the decoded pixels, set by validate_images
    file_name: str | None = None  # the image's path relative to its source's data folder, set by collect_records


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def resolve_label(diagnosis: str) -> str | None:
    """Label name for a diagnosis, case-insensitive on the name or verbalizer ("Stargardt disease" -> "stargardt")."""
    key = " ".join(str(diagnosis).lower().replace("_", " ").split())
    key = LABEL_ALIASES.get(key, key)
    for name, verbalizer, _ in DEFAULT_LABELS:
        if key in (name.replace("_", " "), verbalizer.lower()):
            return name
    return None


def case_text(case: dict) -> str:
    """The clinical text of a StoneRounds-style case: "34-year-old male. <history> Gene: RHO." (empty if no fields)."""
    age, sex, history, gene = (case.get(key) for key in ("age", "sex", "history", "gene"))
    parts = []
    if age and sex:
        parts.append(f"{age}-year-old {sex}.")
    elif age or sex:
        parts.append(f"Age {age}." if age else f"Sex: {sex}.")
    if history:
        parts.append(str(history).strip())
    if gene:
        parts.append(f"Gene: {gene}.")
    return " ".join(parts)


def require_dir(path: str | None, what: str) -> str:
    """`path` if it is a folder holding at least one file, else a clear error naming it."""
    if path is None:
        raise ValueError(f"{what}: no data_dir given")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} data_dir {path!r} does not exist or is not a folder")
    if not any(files for _, _, files in os.walk(path)):
        raise ValueError(f"{what} data_dir {path!r} is empty")
    return path


def _child(folder: str, *names: str) -> str | None:
    """The sub-folder of `folder` whose name matches one of `names`, case-insensitively (e.g. FIVES' 'Groud truth')."""
    if not os.path.isdir(folder):
        return None
    entries = {entry.lower(): entry for entry in os.listdir(folder) if os.path.isdir(os.path.join(folder, entry))}
    for name in names:
        if name.lower() in entries:
            return os.path.join(folder, entries[name.lower()])
    return None


def _files(folder: str) -> list[str]:
    """Visible files of `folder`, sorted."""
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _images_by_stem(folder: str | None) -> dict[str, str]:
    """Image files of `folder` by lower-case name without suffix (masks may be .png, .tif, .gif...); {} if no folder."""
    if folder is None:
        return {}
    return {os.path.splitext(name)[0].lower(): os.path.join(folder, name) for name in _files(folder) if _is_image(name)}


def _suffix_skip(path: str) -> Skipped:
    suffix = os.path.splitext(path)[1]
    return Skipped(path, f"unknown file-name suffix {suffix!r} (not one of {sorted(IMAGE_SUFFIXES)})")


def _labelled_name(path: str, pattern: str, rule: str, skipped: list[Skipped]) -> re.Match | None:
    """The match of a photo's file stem against its source's naming `pattern`; a wrong suffix or a stem that breaks
    the naming `rule` is recorded in `skipped` and gives None."""
    if not _is_image(path):
        skipped.append(_suffix_skip(path))
        return None
    match = re.fullmatch(pattern, os.path.splitext(os.path.basename(path))[0], re.IGNORECASE)
    if match is None:
        skipped.append(Skipped(path, rule))
    return match


def read_fives(root: str | None) -> tuple[list[Record], list[Skipped]]:
    """FIVES: `{train,test}/Original/<n>_<A|D|G|N>.png`, masks of the same name in `Ground truth` or `Groud truth`."""
    root = require_dir(root, "fives")
    records, skipped = [], []
    split_dirs = {split: _child(root, split) for split in ("train", "test")}
    if not any(_child(d, "original") for d in split_dirs.values() if d):
        raise ValueError(f"fives data_dir {root!r} has no train/Original or test/Original folder")
    for split, split_dir in split_dirs.items():
        originals = _child(split_dir, "original") if split_dir else None
        if originals is None:
            continue
        masks = _images_by_stem(_child(split_dir, "ground truth", "groud truth", "groundtruth"))
        for name in _files(originals):
            path = os.path.join(originals, name)
            stem = os.path.splitext(name)[0]
            match = _labelled_name(
                path, r"\d+_([adgn])", "FIVES file name must be <number>_<A|D|G|N> (AMD, DR, glaucoma, normal)", skipped
            )
            if match is not None:
                label = FIVES_LABELS[match.group(1).lower()]
                records.append(
                    Record("fives", f"fives/{split}/{stem}", label, "", path, masks.get(stem.lower()), split)
                )
    return records, skipped


def read_hrf(root: str | None) -> tuple[list[Record], list[Skipped]]:
    """HRF: `[all/]images/<nn>_<h|dr|g>.jpg|JPG`, vessel masks `manual1/<stem>.tif`; the number is the patient."""
    root = require_dir(root, "hrf")
    base = root if _child(root, "images") else (_child(root, "all") or root)
    images = _child(base, "images")
    if images is None:
        raise ValueError(f"hrf data_dir {root!r} has no images/ (or all/images/) folder")
    masks = _images_by_stem(_child(base, "manual1"))
    records, skipped = [], []
    for name in _files(images):
        path = os.path.join(images, name)
        stem = os.path.splitext(name)[0]
        match = _labelled_name(
            path, r"(\d+)_(h|dr|g)", "HRF file name must be <number>_<h|dr|g> (healthy, DR, glaucoma)", skipped
        )
        if match is not None:
            label = HRF_LABELS[match.group(2).lower()]
            case_id = f"hrf/{int(match.group(1)):02d}"
            records.append(Record("hrf", case_id, label, "", path, masks.get(stem.lower())))
    return records, skipped


def read_stonerounds(root: str | None) -> tuple[list[Record], list[Skipped]]:
    """StoneRounds: `<root>/<case_id>/case.json` (`diagnosis`, `gene`, `history`, `age`, `sex`) beside its images."""
    root = require_dir(root, "stonerounds")
    records, skipped = [], []
    for name in sorted(os.listdir(root)):
        case_dir = os.path.join(root, name)
        if name.startswith("."):
            continue
        if not os.path.isdir(case_dir):
            skipped.append(Skipped(case_dir, "not inside a case folder (<root>/<case_id>/)"))
            continue
        case_json = os.path.join(case_dir, "case.json")
        try:
            with open(case_json, encoding="utf-8") as f:
                case = json.load(f)
            label = resolve_label(case["diagnosis"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            skipped.append(Skipped(case_json, f"case.json missing or unreadable ({type(error).__name__}: {error})"))
            continue
        if label is None:
            skipped.append(Skipped(case_json, f"unknown diagnosis {case['diagnosis']!r}"))
            continue
        text = case_text(case)
        if SPECIAL_TOKEN.search(text):
            skipped.append(Skipped(case_json, special_token_reason(text)))
            continue
        for file in _files(case_dir):
            path = os.path.join(case_dir, file)
            if file == "case.json":
                continue
            if not _is_image(file):
                skipped.append(_suffix_skip(path))
            else:
                records.append(Record("stonerounds", f"stonerounds/{name}", label, text, path))
    return records, skipped


MANIFEST = "metadata.jsonl"


def read_manifest(root: str | None) -> tuple[list[Record], list[Skipped]]:
    """An image folder with `metadata.jsonl` (`file_name`, `label`, optional `text`, `case_id`, `mask_file_name`,
    `source`, `split`) at its root or in `train/`, `validation/`, `test/` (as `export_imagefolder` writes it).

    A bad row is skipped with its file and line (JSON, fields, encoding, a file outside the data folder); a UTF-8 BOM
    is accepted. Nothing reached through a symlink (a file, or a split folder) that leads outside `root` is read. A
    file listed twice with one label is kept once; a photo listed with two labels is a conflict, whether by one file or
    by several holding its bytes (a hard link, a copy), and none of its rows is kept. A row whose text holds a special
    token (`<|image|>`, ...) is skipped."""
    root = require_dir(root, "manifest")
    manifests = [(os.path.join(root, MANIFEST), None)] + [
        (os.path.join(root, split, MANIFEST), split) for split in SPLITS
    ]
    manifests = [(path, split) for path, split in manifests if os.path.isfile(path)]
    if not manifests:
        raise ValueError(f"manifest data_dir {root!r} has no {MANIFEST} (nor train/{MANIFEST}, ...)")
    records, skipped = [], []
    for manifest, folder_split in manifests:
        if not _inside(root, os.path.relpath(manifest, root)):
            skipped.append(Skipped(manifest, "reached through a symlink that leads outside the data folder; not read"))
            continue
        with open(manifest, "rb") as f:
            lines = f.read().removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a BOM (Windows editors) is not a row
        for line_number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                skipped.append(Skipped(f"{manifest}:{line_number}", f"row not valid UTF-8 ({error.reason} at byte "
                                                                    f"{error.start}); save the manifest as UTF-8"))
                continue
            if line.strip():
                record = _manifest_row(root, manifest, line_number, line, folder_split)
                if isinstance(record, Record):
                    records.append((record, f"{manifest}:{line_number}"))
                else:
                    skipped.append(record)
    return _one_row_per_photo(records, skipped)


def _one_row_per_photo(rows: list[tuple[Record, str]], skipped: list[Skipped]) -> tuple[list[Record], list[Skipped]]:
    """(record, file:line) rows -> one record per photo file: a file listed again with the same label is kept once. A
    photo listed with two labels is a conflict, whether by one file or by several holding its bytes (a hard link, a
    copy under another name), and none of its rows is kept (which label is right is the user's call)."""
    reals = [os.path.realpath(record.image_path) for record, _ in rows]
    digests = {real: _photo_key(real) for real in dict.fromkeys(reals)}
    by_photo = defaultdict(list)
    for row, real in zip(rows, reals):
        by_photo[digests[real]].append(row)
    conflicts = {digest: photo_rows for digest, photo_rows in by_photo.items()
                 if len({record.label for record, _ in photo_rows}) > 1}
    for photo_rows in conflicts.values():
        labels = ", ".join(sorted({record.label for record, _ in photo_rows}))
        if len({os.path.realpath(record.image_path) for record, _ in photo_rows}) == 1:
            lines = ", ".join(where for _, where in photo_rows)
        else:  # several files: each named, with its line
            lines = ", ".join(f"{where}: {record.image_path}" for record, where in photo_rows) + ": one photo"
        skipped.append(Skipped(photo_rows[0][0].image_path, f"conflict: listed with labels {labels} ({lines}); none "
                                                            "kept, fix the manifest"))
    kept, first_at = [], {}
    for (record, where), real in zip(rows, reals):
        if digests[real] in conflicts:
            continue
        if real in first_at:
            skipped.append(Skipped(where, f"{record.image_path} listed again with the same label (first at "
                                          f"{first_at[real]}); kept once"))
            continue
        first_at[real] = where
        kept.append(record)
    return kept, skipped


def _photo_key(path: str) -> str:
    """What makes two rows one photo: the file's bytes (a hard link or a copy under another name is the same photo),
    or its real path when it cannot be read (decoding then reports it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return path


def _manifest_row(root: str, manifest: str, line_number: int, line: str,
                  folder_split: str | None) -> Record | Skipped:
    where = f"{manifest}:{line_number}"
    try:
        row = json.loads(line)
        file_name, diagnosis = row["file_name"], row["label"]
    except (ValueError, KeyError, TypeError, IndexError) as error:  # IndexError: a JSON list or string row
        return Skipped(where, f"bad metadata row, needs file_name and label ({type(error).__name__}: {error})")
    wrong_type = [key for key in ("file_name", "text", "case_id", "source", "split", "mask_file_name")
                  if key in row and not isinstance(row[key], str) and (key == "file_name" or row[key] is not None)]
    if wrong_type or not file_name:
        return Skipped(where, f"bad metadata row: {wrong_type or ['file_name']} must be a string (file_name non-empty)")
    mask_name = row.get("mask_file_name") or row.get("vessel_mask_file_name")
    if any("\x00" in name for name in (file_name, mask_name) if isinstance(name, str)):
        return Skipped(where, "bad metadata row: a file name holds a NUL byte")
    if mask_name is not None and not isinstance(mask_name, str):
        return Skipped(where, "bad metadata row: vessel_mask_file_name must be a string")
    folder = os.path.dirname(manifest)
    path = os.path.join(folder, file_name)
    outside = [name for name in (file_name, mask_name) if name and not _inside(root, os.path.relpath(
        os.path.join(folder, name), root))]
    if outside:
        return Skipped(where, f"file name {outside[0]!r} points outside the data folder (a path or a symlink)")
    label = _manifest_label(diagnosis)
    split = row.get("split") or folder_split
    if isinstance(label, Skipped):
        return Skipped(path, f"{label.reason} ({where})")
    if not _is_image(file_name):
        return Skipped(path, f"{_suffix_skip(path).reason} ({where})")
    if not os.path.isfile(path):
        return Skipped(path, f"file not found ({where})")
    if split not in (None, *SPLITS):
        return Skipped(path, f"unknown split {split!r} ({where})")
    if SPECIAL_TOKEN.search(row.get("text") or ""):
        return Skipped(where, f"{special_token_reason(row['text'])} ({file_name})")
    return Record(
        source=row.get("source") or "manifest",
        case_id=str(row.get("case_id") or f"manifest/{file_name}"),
        label=label,
        text=row.get("text") or "",
        image_path=path,
        mask_path=os.path.join(folder, mask_name) if mask_name else None,
        official_split=split,
    )


def special_token_reason(text: str) -> str:
    tokens = sorted(set(SPECIAL_TOKEN.findall(text)))
    return (f"text holds the special token(s) {', '.join(tokens)}, which the processor would read as tokens (an image "
            "slot, an end of turn); remove them from the history")


def _inside(folder: str, name: str) -> bool:
    """Whether `name`, relative to `folder`, stays inside it once every symlink is followed (no absolute path, no `..`
    out of it, no link to a file or folder elsewhere)."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(os.path.join(folder, name))]) == folder


def _manifest_label(label) -> str | Skipped:
    """A manifest's label: a name or verbalizer (any case), or a label id 0..K-1 as written by `label_names`."""
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(DEFAULT_LABELS):
            return DEFAULT_LABELS[label][0]
        return Skipped("", f"label id {label} outside 0..{len(DEFAULT_LABELS) - 1}")
    name = resolve_label(label) if isinstance(label, str) else None
    return name if name is not None else Skipped("", f"unknown label {label!r}")


@dataclass(frozen=True)
class Source:
    """A source of photos: its reader and what the builder, its command line, the job's options and the model card
    say of it. A new source is a reader and one `register(Source(...))`: `--source`/`--dataset NAME` then read it
    from `--data_dir` (the paper's sources also from an option of their own name)."""

    name: str
    read: Callable[[str | None], tuple[list[Record], list[Skipped]]]
    layout: str  # the folder its reader expects (the command lines' help)
    has_text: bool  # whether its photos come with a clinical history
    official_split: bool  # whether it brings a train/test split of its own (kept); else cases are split here
    description: str  # how the model card names it


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


register(Source("fives", read_fives, "FIVES root (train/, test/)", has_text=False, official_split=True,
                description="FIVES (AMD, DR, glaucoma and normal fundus photos with vessel masks), read by "
                "`dataset_builder` from a local copy"))
register(Source("hrf", read_hrf, "HRF root (images/, manual1/, or all/...)", has_text=False, official_split=False,
                description="HRF (healthy, DR and glaucoma fundus photos with vessel masks), read by `dataset_builder` "
                "from a local copy"))
register(Source("stonerounds", read_stonerounds, "StoneRounds root (<case_id>/case.json + images)", has_text=True,
                official_split=False, description="StoneRounds inherited retinal disease cases with clinical "
                "histories, read by `dataset_builder` from a local copy"))
register(Source("manifest", read_manifest, "an image folder with metadata.jsonl", has_text=True,
                official_split=True, description="a local image folder described by its `metadata.jsonl`, read by "
                "`dataset_builder`"))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding: every image is decoded once, to find the unreadable ones and hash the readable ones.


def ordered_map(fn: Callable, items: Iterable, num_workers: int, window: int | None = None) -> Iterator:
    """`map(fn, items)` on `num_workers` threads, in order, with at most `window` results held at once.

    PIL's decoders/encoders and numpy release the GIL, so threads scale on image work without pickling.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    window = window or 4 * num_workers
    with ThreadPoolExecutor(num_workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_num_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def decode_file(path: str) -> Image.Image:
    """Read and fully decode an image file; a clear `ValueError` naming the problem if it is empty or unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        # A decompression bomb (a small file declaring a huge size) is refused from its header, before PIL allocates
        # its pixels: PIL itself raises only above twice MAX_IMAGE_PIXELS and merely warns below.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
            )
        image.load()  # a truncated file fails here, not at open()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"unreadable image ({type(error).__name__}: {error})") from error
    return image


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes of another encoding in a file name, or "\udcff" in JSON
        return False
    return True


def _check(record: Record) -> tuple[Record | None, list[Skipped]]:
    """Decode a record's image (and mask): (record with its pixel hash, or None if unreadable or without a field of
    view; problems found)."""
    fields = ("image_path", "mask_path", "case_id", "text")
    not_utf8 = [field for field in fields if not _is_utf8(getattr(record, field) or "")]
    if not_utf8:  # Arrow stores UTF-8 strings only
        return None, [Skipped(record.image_path, f"{', '.join(not_utf8)} not valid UTF-8 (a file name in another "
                                                 "encoding?); rename the file or fix the text")]
    try:
        image = decode_file(record.image_path)
        # The processor crops every photo to its field of view: one with none (an all-black frame) cannot be trained on.
        detect_field_of_view(to_rgb_image(image), MdfMllmImageProcessor.fov_detection_size, "photo")
    except (OSError, ValueError) as error:
        return None, [Skipped(record.image_path, str(error))]
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())  # sha256: hardware-accelerated on most CPUs
    digest.update(image.tobytes())
    mask_path, problems = record.mask_path, []
    if mask_path is not None:
        try:
            decode_file(mask_path)
        except (OSError, ValueError) as error:
            problems.append(Skipped(mask_path, f"vessel mask {error}; the image is kept without a mask"))
            mask_path = None
    return replace(record, mask_path=mask_path, content_hash=digest.hexdigest()[:32]), problems


def validate_images(records: list[Record], num_workers: int | None = None) -> tuple[list[Record], list[Skipped]]:
    """Decode every record's image (and mask) once: keep the readable ones with a pixel hash, report the rest."""
    kept, skipped = [], []
    results = ordered_map(_check, records, num_workers or default_num_workers())
    for record, problems in tqdm(results, total=len(records), desc="decoding images", unit="img", leave=False):
        skipped.extend(problems)
        if record is not None:
            kept.append(record)
    return kept, skipped
