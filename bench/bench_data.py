"""Data throughput: the synthetic generator at 512 px, and building the `all` dataset from local folders against
plain PIL decoding of the same files, measured side by side.

    python bench/bench_data.py       # prints the Markdown section
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

from dataset_builder import build, render_fundus  # noqa: E402
from dataset_builder.sources import default_num_workers, ordered_map  # noqa: E402


REPEATS = 3
SYNTHETIC_IMAGES = 64
SYNTHETIC_SIZE = 512
TREE_SIZE = 1024
LABELS = ["normal", "amd", "dr", "glaucoma", "retinitis_pigmentosa", "stargardt", "choroideremia", "best_disease"]


def _median_rate(count: int, fn) -> float:
    """Median over REPEATS of count / seconds taken by fn(repeat)."""
    rates = []
    for repeat in range(REPEATS):
        start = time.perf_counter()
        fn(repeat)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def make_trees(root: Path) -> list[Path]:
    """FIVES (24 PNG + PNG masks), HRF (15 JPEG + TIFF masks) and StoneRounds (21 PNG/JPEG, 7 cases) trees at
    1024 px: 60 photos. Returns every image file the builder decodes (photos and masks)."""
    rng = np.random.default_rng(0)
    files = []

    def photo(label):
        return render_fundus(label, rng, TREE_SIZE)

    for k in range(24):
        split, letter = ("train" if k < 18 else "test"), "ADGN"[k % 4]
        image, mask = photo({"A": "amd", "D": "dr", "G": "glaucoma", "N": "normal"}[letter])
        for folder, array in (("Original", image), ("Ground truth", mask)):
            files.append(root / "fives" / split / folder / f"{k + 1}_{letter}.png")
            _save(files[-1], array)
    for k in range(15):
        suffix, label = [("h", "normal"), ("dr", "dr"), ("g", "glaucoma")][k % 3]
        image, mask = photo(label)
        stem = f"{k // 3 + 1:02d}_{suffix}"
        files.append(root / "hrf" / "images" / f"{stem}.{'JPG' if suffix == 'dr' else 'jpg'}")
        _save(files[-1], image, format="JPEG", quality=92)
        files.append(root / "hrf" / "manual1" / f"{stem}.tif")
        _save(files[-1], mask)
    for case in range(7):
        label = LABELS[4 + case % 4]
        (root / "stonerounds" / f"case_{case}").mkdir(parents=True)
        (root / "stonerounds" / f"case_{case}" / "case.json").write_text(f'{{"diagnosis": "{label}", "age": 30}}')
        for eye in range(3):
            path = root / "stonerounds" / f"case_{case}" / f"eye_{eye}.{'png' if eye % 2 else 'jpg'}"
            _save(path, photo(label)[0], **({} if eye % 2 else {"format": "JPEG", "quality": 92}))
            files.append(path)
    return files


def bench_synthetic(workdir: Path) -> list[tuple[str, str]]:
    workers = default_num_workers()

    def render(threads):
        def run(repeat):
            seeds = [(repeat, i) for i in range(SYNTHETIC_IMAGES)]
            draw = lambda seed: render_fundus(LABELS[seed[1] % 8], np.random.default_rng(seed), SYNTHETIC_SIZE)  # noqa: E731
            list(ordered_map(draw, seeds, threads))

        return run

    render_rate = _median_rate(SYNTHETIC_IMAGES, render(1))
    render_rate_threads = _median_rate(SYNTHETIC_IMAGES, render(workers))

    def build_synthetic(repeat):
        build("synthetic", num_images=SYNTHETIC_IMAGES, image_size=SYNTHETIC_SIZE, seed=repeat,
              cache_dir=str(workdir / f"syn{repeat}"), num_workers=workers)

    build_rate = _median_rate(SYNTHETIC_IMAGES, build_synthetic)
    return [
        ("synthetic: render only, 1 thread", f"{render_rate:.1f} img/s"),
        (f"synthetic: render only, {workers} threads", f"{render_rate_threads:.1f} img/s"),
        (f"synthetic: `load('synthetic')` end to end (render + JPEG/PNG + Arrow), {workers} threads",
         f"{build_rate:.1f} img/s (target >= 20)"),
    ]


def bench_folders(workdir: Path) -> list[tuple[str, str]]:
    files = make_trees(workdir / "trees")
    photos = 60
    roots = {name: str(workdir / "trees" / name) for name in ("fives", "hrf", "stonerounds")}

    def pil_decode(_):
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")

    def build_all(workers):
        def run(repeat):
            dataset, report = build("all", **roots, cache_dir=str(workdir / f"all{workers}_{repeat}"),
                                    num_workers=workers)
            assert sum(report["totals"].values()) == photos, report["totals"]

        return run

    workers = default_num_workers()
    # Side by side, interleaved per repeat so that disk cache and CPU state are alike for all three.
    rates = {"pil": [], 1: [], workers: []}
    for repeat in range(REPEATS):
        for key, fn in (("pil", pil_decode), (1, build_all(1)), (workers, build_all(workers))):
            start = time.perf_counter()
            fn(repeat)
            rates[key].append(photos / (time.perf_counter() - start))
    pil, single, multi = (statistics.median(rates[key]) for key in ("pil", 1, workers))
    return [
        (f"plain PIL `Image.open().convert('RGB')` of the same {len(files)} files, 1 thread", f"{pil:.1f} photos/s"),
        ("`build('all')` (decode-check + hash + Arrow), 1 thread", f"{single:.1f} photos/s ({single / pil:.2f}x PIL)"),
        (f"`build('all')`, {workers} threads", f"{multi:.1f} photos/s ({multi / pil:.2f}x PIL)"),
    ]


def run() -> str:
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_synthetic(Path(tmp)) + bench_folders(Path(tmp))
    finally:
        datasets.enable_progress_bars()
    lines = [
        "## Data: synthetic generation and building from folders",
        "",
        f"{os.cpu_count()} CPUs; medians of {REPEATS} runs. Synthetic: {SYNTHETIC_IMAGES} images at "
        f"{SYNTHETIC_SIZE} px. Folders: fake FIVES / HRF / StoneRounds trees of 60 photos at {TREE_SIZE} px "
        "(PNG and JPEG, with PNG/TIFF vessel masks for FIVES and HRF), built from scratch each run; the builder "
        "decodes every photo and mask once (to skip unreadable files and hash duplicates) and stores the original "
        "bytes.",
        "",
        "| measurement | rate |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
