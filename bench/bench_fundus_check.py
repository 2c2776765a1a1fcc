"""The fundus check (`MdfMllmImageProcessor.fundus_score`): how often it passes fundus photos and flags everything
else, and what it costs next to the image processor itself.

Fundus photos: the real `skimage.data.retina()` under variations a clinic's photos show (size, JPEG quality, dim
exposure, blur, a disc cut by the frame, burned-in text, rotation) and the synthetic set (every class, several sizes
and JPEG qualities). Not fundus photos: skimage's natural and scientific images, noise, flat images; reported apart,
the hard case of natural photos cut to a disc on black. `skimage.data.microaneurysms()` is reported on its own (see
the section's text).

`python bench/bench_fundus_check.py` prints the Markdown section; `bench/run.py` calls `run()`.
"""

import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from skimage import data


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset_builder import synthetic  # noqa: E402
from image_processing_mdf_mllm import DEFAULT_FUNDUS_THRESHOLD, MdfMllmImageProcessor, to_rgb_image  # noqa: E402


NATURAL = ["astronaut", "camera", "coffee", "chelsea", "cat", "rocket", "moon", "page", "text", "clock", "coins",
           "hubble_deep_field", "immunohistochemistry", "logo", "brick", "grass", "gravel", "colorwheel",
           "checkerboard", "horse", "cell"]
SYNTHETIC_SIZES, SYNTHETIC_QUALITIES, SYNTHETIC_PER_CLASS = (64, 128, 256, 512), (30, 60, 95), 3
TIMING_SIDE, TIMING_PHOTOS, REPS = 2048, 4, 5


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def real_variants() -> dict[str, Image.Image]:
    """The real retina photo as clinics' photos vary."""
    retina = Image.fromarray(data.retina())
    variants = {f"{side} px": retina.resize((side, side), Image.Resampling.BILINEAR) for side in (64, 128, 512, 1024)}
    variants |= {f"JPEG quality {q}": jpeg(retina, q) for q in (10, 30, 70)}
    variants["dim (x0.35)"] = Image.fromarray((np.asarray(retina) * 0.35).astype(np.uint8))
    variants["bright (x1.4, clipped)"] = Image.fromarray(np.clip(np.asarray(retina) * 1.4, 0, 255).astype(np.uint8))
    variants["blurred (radius 4 px)"] = retina.filter(ImageFilter.GaussianBlur(4))
    cut = Image.new("RGB", (1800, 1100))
    cut.paste(retina, (200, -150))  # HRF-like: the disc runs off the top and bottom
    variants["disc cut by the frame"] = cut
    marked = retina.copy()
    draw = ImageDraw.Draw(marked)
    draw.rectangle((1250, 40, 1400, 400), fill=(255, 255, 255))
    draw.text((10, 10), "OD 2019-03-04 ID 1234", fill=(255, 255, 0))
    variants["white bar and text burned in"] = marked
    variants["rotated 30 degrees"] = retina.rotate(30)
    return {f"retina, {name}": image for name, image in variants.items()}


def synthetic_photos() -> dict[str, Image.Image]:
    """SYNTHETIC_PER_CLASS planned items per class, at every size (JPEG quality 95 as stored) and every quality."""
    by_class = {}
    for item in synthetic.plan(None, 0):
        by_class.setdefault(item.label, []).append(item)
    photos = {}
    for label, items in by_class.items():
        for item in items[:: max(1, len(items) // SYNTHETIC_PER_CLASS)][:SYNTHETIC_PER_CLASS]:
            for size in SYNTHETIC_SIZES:
                rendered = Image.fromarray(synthetic.render(item, size)[0])
                for quality in SYNTHETIC_QUALITIES if size == 256 else (95,):
                    photos[f"{label} {item.case_id} {size} px q{quality}"] = jpeg(rendered, quality)
    return photos


def not_fundus() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = {f"skimage {name}": getattr(data, name)() for name in NATURAL}
    for i, (h, w) in enumerate([(64, 64), (128, 96), (256, 256), (512, 384), (1000, 1000)]):
        images[f"uniform noise {w}x{h}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images[f"grey noise {w}x{h}"] = rng.integers(0, 256, (h, w), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(max(2, w // 40))))
        images[f"smoothed noise {w}x{h}"] = smooth
    for name, colour in {"black": 0, "white": 255, "grey": 128, "fundus orange": (200, 90, 30)}.items():
        images[f"flat {name}"] = np.full((256, 256, 3), colour, np.uint8)
    return images


def disc_cut(image: np.ndarray) -> np.ndarray:
    """A natural photo cut to its inscribed disc on black: a field of view without a fundus in it."""
    rgb = np.asarray(Image.fromarray(image).convert("RGB"))
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    inside = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) <= 0.45 * min(h, w)
    return rgb * inside[..., None].astype(np.uint8)


def rate(scores: dict[str, float], passed: bool) -> str:
    hits = sum((score >= DEFAULT_FUNDUS_THRESHOLD) == passed for score in scores.values())
    return f"{hits}/{len(scores)} ({hits / len(scores):.0%})"


def score_range(scores: dict[str, float]) -> str:
    values = sorted(scores.values())
    return f"{values[0]:.2f} / {statistics.median(values):.2f} / {values[-1]:.2f}"


def timing(settings) -> list[str]:
    """Median milliseconds per photo of the pipeline's preprocessing without and with the check, on the same 2048 px
    photos, timed alternately: decode (for a file), [fundus check,] image processor, as the pipeline runs them."""
    retina = Image.fromarray(data.retina()).resize((TIMING_SIDE, TIMING_SIDE), Image.Resampling.BICUBIC)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(TIMING_PHOTOS):
            paths.append(os.path.join(folder, f"fundus_{i}.jpg"))
            retina.rotate(5 * i).save(paths[-1], quality=92)
        decoded = [Image.open(path).convert("RGB") for path in paths]
        for label, tile, max_tiles, unet_size in settings:
            processor = MdfMllmImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=max_tiles,
                                              unet_image_size=unet_size)

            def preprocess(photo, check):
                photo = to_rgb_image(photo)
                if check:
                    processor.check_fundus(photo)
                processor(photo, return_tensors="pt")

            for source, photos in (("JPEG file", paths), ("decoded PIL", decoded)):
                times = {False: [], True: []}
                for _ in range(REPS):
                    for check in (False, True):
                        start = time.perf_counter()
                        for photo in photos:
                            preprocess(photo, check)
                        times[check].append((time.perf_counter() - start) / len(photos))
                without, with_check = statistics.median(times[False]), statistics.median(times[True])
                rows.append(f"| {label} (tile {tile}, {max_tiles} tile(s), S={unet_size}) | {source} | "
                            f"{1e3 * without:.1f} | {1e3 * with_check:.1f} | {with_check / without - 1:+.0%} |")
    return rows


def run() -> str:
    torch.set_num_threads(2)
    image_processor = MdfMllmImageProcessor()
    score = image_processor.fundus_score
    real = {name: score(image) for name, image in real_variants().items()}
    synthetic_scores = {name: score(image) for name, image in synthetic_photos().items()}
    negatives = not_fundus()
    negative_scores = {name: score(image) for name, image in negatives.items()}
    natural = {name: value for name, value in negative_scores.items() if name.startswith("skimage")}
    noise = {name: value for name, value in negative_scores.items() if "noise" in name}
    flat = {name: value for name, value in negative_scores.items() if name.startswith("flat")}
    cut = {name: score(disc_cut(image)) for name, image in negatives.items() if name.startswith("skimage")}
    micro = score(data.microaneurysms())
    passed_cut = ", ".join(name.removeprefix("skimage ") for name, value in cut.items()
                           if value >= DEFAULT_FUNDUS_THRESHOLD) or "none"
    lowest_real = min(real, key=real.get)
    rows = [
        ("real fundus photo (`retina()`), variations", real, True),
        (f"synthetic set: 8 classes x {SYNTHETIC_PER_CLASS} photos, sizes {SYNTHETIC_SIZES}, JPEG q "
         f"{SYNTHETIC_QUALITIES} at 256 px", synthetic_scores, True),
        (f"skimage natural/scientific images ({len(natural)})", natural, False),
        ("noise: uniform RGB, grey, smoothed; 64 to 1000 px", noise, False),
        ("flat images: black, white, grey, fundus orange", flat, False),
        ("hard case: the skimage images cut to a disc on black", cut, False),
    ]
    settings = [("small default", 112, 1, 128), ("11B layout", 560, 4, 512)]
    return "\n".join([
        "## Fundus check",
        "",
        f"`MdfMllmImageProcessor.fundus_score(image)` in [0, 1] is the product of three cues measured on a "
        f"128 px thumbnail around the detected field of view (a bright disc fitted to the bright region, a dark ring "
        f"just outside it, retinal colour inside it); the pipeline, the CLI and the demo refuse (or, when told, only "
        f"warn about) an image scoring below `fundus_threshold` = {DEFAULT_FUNDUS_THRESHOLD}.",
        "",
        "| images | wanted | rate as wanted | score min / median / max |",
        "|---|---|---:|---:|",
        *(f"| {name} | {'pass' if passed else 'flagged'} | {rate(scores, passed)} | {score_range(scores)} |"
          for name, scores, passed in rows),
        "",
        f"Lowest real-photo variant: {lowest_real} ({real[lowest_real]:.2f}). Natural photos cut to a disc on black "
        f"that pass: {passed_cut} -- the check looks for a fundus photograph's layout and colour, not for retinal "
        "anatomy, so a warm-coloured photo inside a black circle can pass it.",
        "",
        f"`skimage.data.microaneurysms()` scores {micro:.2f} and is flagged, as it should be for this model: it is a "
        "102x102 green-channel crop from inside an HRF photo's field of view (no disc, no dark surround, no colour), "
        "not a colour fundus photograph, and the model reads the whole field of view in colour. A user who wants "
        "such a crop classified anyway passes `check_fundus=False` (pipeline) or `--no_fundus_check` (CLI).",
        "",
        f"Cost: the pipeline's preprocessing of one photo (decode a file once, then the check, then the image "
        f"processor) without and with the check; median milliseconds per photo over {TIMING_PHOTOS} "
        f"{TIMING_SIDE}x{TIMING_SIDE} fundus JPEGs, {REPS} repetitions, timed alternately, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| settings | input | without check, ms | with check, ms | added |",
        "|---|---|---:|---:|---:|",
        *timing(settings),
        "",
    ])


if __name__ == "__main__":
    print(run())
