"""Image-processor throughput on 2048x2048 JPEG fundus photos: ours (stock Mllama tiles + field-of-view detection +
U-Net crop) against the stock Mllama image processor alone, same settings, interleaved in one run.

`python bench/bench_processor.py` prints the Markdown section; `bench/run.py` calls `run()`.
"""

import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image
from skimage import data


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from image_processing_mdf_mllm import MdfMllmImageProcessor, MllamaImageProcessor  # noqa: E402


SIDE, PHOTOS, REPS = 2048, 6, 7
SETTINGS = [  # (label, tile size, max tiles, U-Net size S)
    ("small default", 112, 1, 128),
    ("11B layout", 560, 4, 512),
]


def make_photos(folder: str) -> list[str]:
    """JPEG files of the real retina photo resized to SIDE x SIDE, each slightly shifted so none is cached."""
    retina = Image.fromarray(data.retina()).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    paths = []
    for i in range(PHOTOS):
        shifted = Image.new("RGB", (SIDE, SIDE))
        shifted.paste(retina, (8 * i - 20, 6 * i - 15))
        paths.append(os.path.join(folder, f"fundus_{i}.jpg"))
        shifted.save(paths[-1], quality=92)
    return paths


def seconds_per_photo(processor, photos) -> float:
    start = time.perf_counter()
    for photo in photos:
        processor(Image.open(photo) if isinstance(photo, str) else photo, return_tensors="pt")
    return (time.perf_counter() - start) / len(photos)


def compare(tile: int, max_tiles: int, unet_size: int, photos) -> tuple[float, float]:
    """Median seconds per photo of (stock, ours), the two timed alternately REPS times."""
    common = dict(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    stock, ours = MllamaImageProcessor(**common), MdfMllmImageProcessor(**common, unet_image_size=unet_size)
    seconds_per_photo(stock, photos[:1]), seconds_per_photo(ours, photos[:1])  # warm-up
    times = {"stock": [], "ours": []}
    for _ in range(REPS):
        times["stock"].append(seconds_per_photo(stock, photos))
        times["ours"].append(seconds_per_photo(ours, photos))
    return statistics.median(times["stock"]), statistics.median(times["ours"])


def run() -> str:
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = make_photos(folder)
        decoded = [Image.open(path).convert("RGB") for path in paths]
        for label, tile, max_tiles, unet_size in SETTINGS:
            for source, photos in (("JPEG file", paths), ("decoded PIL", decoded)):
                stock, ours = compare(tile, max_tiles, unet_size, photos)
                rows.append(
                    f"| {label} (tile {tile}, {max_tiles} tile(s), S={unet_size}) | {source} | {1 / stock:.1f} | "
                    f"{1 / ours:.1f} | {ours / stock:.2f} |"
                )
    backend = MllamaImageProcessor.__name__
    return "\n".join([
        "## Image processor throughput (2048x2048 fundus JPEGs)",
        "",
        f"Stock `{backend}` alone against `MdfMllmImageProcessor` (the same tiles plus field-of-view detection and "
        f"the U-Net crop), same settings, timed alternately; median of {REPS} repetitions over {PHOTOS} photos "
        f"(the real `skimage.data.retina()` resized to {SIDE}x{SIDE}), one photo per call, "
        f"{torch.get_num_threads()} threads. Target: ours / stock <= 1.5.",
        "",
        "| settings | input | stock images/s | ours images/s | ours / stock time |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    print(run())
