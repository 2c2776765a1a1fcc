"""MDF-MLLM image processing: any fundus photo -> what the vision tower and the U-Net take.

* Decoding: any photo (path, bytes, PIL, array, tensor) -> an upright RGB uint8 image (`to_rgb_image`), a vessel
  mask -> a binary image (`to_binary_mask`).
* The field of view: the bright fundus disc on its dark background, fitted as a circle (`detect_field_of_view`),
  and the square crop around it (`crop_to_circle`).
* The fundus check: how much a photo looks like a fundus photograph (`fundus_cues`, `fundus_score`).
* `MdfMllmImageProcessor`: Mllama's tiles for the vision tower, plus the U-Net view: a square crop centred on the
  field of view, resized to S x S and normalised.

Kept apart from `processing_mdf_mllm.py` (prompt, tokenizer, processor, collator) as transformers keeps its
`image_processing_*.py`. This file is copied into every exported model folder and imported by `trust_remote_code`
(`auto_map` names it for `AutoImageProcessor`), so it imports only torch/transformers/numpy/PIL/stdlib and does
nothing at import time but define things.
"""

import functools
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import is_torchvision_available


# Subclass what `AutoImageProcessor` gives for mllama by default: the torchvision backend when torchvision is
# installed, the PIL backend otherwise. Only `_preprocess_image_like_inputs` is overridden, which both share.
if is_torchvision_available():
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor, MllamaImageProcessorKwargs
else:
    from transformers.models.mllama.image_processing_pil_mllama import (
        MllamaImageProcessorKwargs,
        MllamaImageProcessorPil as MllamaImageProcessor,
    )

# ----------------------------------------------------------------------------------------------------------------
# Any photo -> upright RGB uint8 PIL image


# PIL's premultiplied-alpha modes -> the mode of their colour bands.
PREMULTIPLIED = {"La": "L", "RGBa": "RGB"}


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone and camera photos are often stored sideways)."""
    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """8-bit, 16-bit, bool and float (0..1 or 0..255) pixel values -> uint8 0..255.

    Other integer types (PIL's 32-bit "I" mode) are read as 8-bit when no value exceeds 255, else as 16-bit.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max(initial=0))
        if array.min(initial=0) < 0 or top > 65535:
            raise ValueError(f"{name}: integer pixel values must lie in 0..65535, got {array.min()}..{top}")
        return _to_uint8(array.astype(np.uint8 if top <= 255 else np.uint16), name)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the image holds NaN or infinite pixel values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"{name}: unsupported pixel type {array.dtype}")


def _as_hwc(image, name: str) -> np.ndarray:
    """A numpy array, torch tensor or PIL image -> (H, W, C) array, C in 1, 3, 4 (channels-first is detected)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an image of shape (H, W), (H, W, C) or (C, H, W), C in 1/3/4; got "
                         f"{tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: the image is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return array


def _describe(image, name: str) -> str:
    """`name`, plus the file a path or an opened PIL image refers to, for error messages."""
    filename = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", None)
    return f"{name} ({filename})" if filename else name


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """`image` with its pixels decoded, after checking that their count is sane.

    A decompression bomb (a small file declaring e.g. 50,000 x 50,000 pixels) is refused from its header, before any
    pixel memory is allocated: above PIL's `Image.MAX_IMAGE_PIXELS` (PIL itself only warns up to twice that).
    Truncated and corrupt files fail here, as a `ValueError` naming the image, not deep inside a later conversion.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(f"{_describe(image, name)}: {image.width}x{image.height} pixels exceeds the limit of {limit} "
                         "(PIL.Image.MAX_IMAGE_PIXELS); refused as a possible decompression bomb")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error, MemoryError) as error:  # what PIL's decoders raise
        raise ValueError(f"{_describe(image, name)}: cannot decode the image ({type(error).__name__}: {error})") from None
    return image


def _open(image, name: str):
    """A path -> the decoded PIL image (errors name `name` and the path); anything else is returned as it is."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no image file at {path}")
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name} ({path}): refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # empty, not an image, unknown format
        raise ValueError(f"{name} ({path}): not a readable image ({type(error).__name__}: {error})") from None
    return _decoded(opened, name)


class NotFundusError(ValueError):
    """A photo refused by the fundus check: readable, but it does not look like a colour fundus photograph (what
    "classify anyway" overrides; any other ValueError about a photo is not overridden)."""


def to_rgb_image(image, name: str = "image") -> Image.Image:
    """Any photo -> upright RGB uint8 PIL image.

    Accepts PIL images in any mode (L, P, RGBA, CMYK, 16-bit I;16, ...), (H, W[, C]) or (C, H, W) arrays and tensors
    of uint8/uint16/bool/float, and file paths. Transparency is composited onto black, the fundus background.
    """
    image = _open(image, name)
    if isinstance(image, Image.Image):
        image = _upright(_decoded(image, name))
        if image.mode == "RGB":
            return image
        if image.mode in PREMULTIPLIED:  # colour already multiplied by alpha: on black, that is the colour itself
            image = Image.merge(PREMULTIPLIED[image.mode], image.split()[:-1])
        try:
            if image.has_transparency_data:  # RGBA, LA, PA, P with a transparent colour, ...
                image = image.convert("RGBA")
            elif image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
                return image.convert("RGB")  # L, 1, P, RGBX, CMYK, YCbCr, LAB, HSV
        except ValueError as error:  # a mode PIL cannot convert
            raise ValueError(f"{_describe(image, name)}: cannot convert mode {image.mode} to RGB ({error})") from None
    array = _to_uint8(_as_hwc(image, name), name)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.uint16)
        array = ((array[..., :3] * alpha + 127) // 255).astype(np.uint8)
    elif array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array))


def to_binary_mask(mask, name: str = "vessel_mask") -> Image.Image:
    """A vessel mask (any image type; 0/1, 0/255, bool, grey or colour) -> upright 'L' image of 0/255."""
    mask = _open(mask, name)
    if isinstance(mask, Image.Image):
        mask = _upright(_decoded(mask, name))
    array = _as_hwc(mask, name)[..., :3].max(axis=-1)  # colour channels only: alpha is no vessel
    top = array.max(initial=0)
    return Image.fromarray(((array > top / 2) & (top > 0)).astype(np.uint8) * 255)


# ----------------------------------------------------------------------------------------------------------------
# Field of view: threshold a thumbnail, keep the largest blob, fit a circle to its outer edge


MIN_CONTRAST = 8  # grey levels between background and fundus below which the image has no field of view
DARK_BACKGROUND = 0.5  # the background is darker than this fraction of the fundus' typical brightness
MIN_FOV_FRACTION = 0.02  # the fundus blob must cover at least this fraction of the image
THIN_STRUCTURE = 0.02  # bright structures thinner than this fraction of the image side (text strokes) are dropped


def _fov_levels(value: np.ndarray) -> tuple[float, float]:
    """Brightness of the background and of the fundus' typical pixel.

    The fundus level is the median of the clearly bright pixels, which the fundus dominates even beside a burned-in
    white bar, and which scales with dim photos.
    """
    background, top = np.percentile(value, [1, 99])
    if top - background < MIN_CONTRAST:
        raise ValueError(f"no field of view found: the image is uniform (brightness {background:.0f}..{top:.0f} of "
                         "255), a blank frame rather than a photo")
    return float(background), float(np.median(value[value > background + 0.1 * (top - background)]))


def _square_filter(mask: np.ndarray, size: int, combine) -> np.ndarray:
    """Erosion (`np.logical_and`) or dilation (`np.logical_or`) by a size x size square, edges replicated."""
    radius, (height, width) = size // 2, mask.shape
    padded = np.pad(mask, radius, mode="edge")
    rows = functools.reduce(combine, (padded[:, i : i + width] for i in range(size)))
    return functools.reduce(combine, (rows[i : i + height] for i in range(size)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The 8-connected component of `mask` with the most pixels, by union-find over row runs (no scipy)."""
    height, width = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    run_ends = np.nonzero(edges == -1)[1]  # exclusive
    parent = list(range(len(run_rows)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_begin = np.searchsorted(run_rows, np.arange(height + 1)).tolist()
    starts, ends = run_starts.tolist(), run_ends.tolist()
    for y in range(1, height):
        i, i_end, j, j_end = row_begin[y - 1], row_begin[y], row_begin[y], row_begin[y + 1]
        while i < i_end and j < j_end:  # two sorted run lists: link runs that touch, diagonals included
            if starts[j] <= ends[i] and starts[i] <= ends[j]:
                parent[root(j)] = root(i)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([root(i) for i in range(len(parent))])
    largest = roots == np.bincount(roots, weights=run_ends - run_starts).argmax()
    component = np.zeros_like(mask)
    for row, start, end in zip(run_rows[largest], run_starts[largest], run_ends[largest]):
        component[row, start:end] = True
    return component


def _row_edge_points(component: np.ndarray, value: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right ends of the component in every row, at the sub-pixel threshold crossing, as (x, y).

    Ends on the image border are left out: there the disc is cut by the frame, not by its own edge.
    """
    width = component.shape[1]
    rows = np.nonzero(component.any(axis=1))[0]
    left = component[rows].argmax(axis=1)
    right = width - 1 - component[rows, ::-1].argmax(axis=1)
    value = value.astype(np.float32)
    xs, ys = [], []
    for inside, step, keep in ((left, -1, left > 0), (right, 1, right < width - 1)):
        y, x = rows[keep], inside[keep]
        v_in, v_out = value[y, x], value[y, x + step]
        fraction = np.clip((v_in - threshold) / np.maximum(v_in - v_out, 1e-6), 0.0, 1.0)
        xs.append(x + step * fraction)
        ys.append(y.astype(np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def _circles_through(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circles through point triples: x, y of shape (..., 3) -> centre x, centre y, radius of shape (...)."""
    (x1, x2, x3), (y1, y2, y3) = np.moveaxis(x, -1, 0), np.moveaxis(y, -1, 0)
    det = 2 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    det = np.where(np.abs(det) < 1e-9, np.nan, det)  # collinear triples give no circle
    s1, s2, s3 = x1**2 + y1**2, x2**2 + y2**2, x3**2 + y3**2
    cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / det
    cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / det
    return cx, cy, np.hypot(x1 - cx, y1 - cy)


def _fit_circle(x: np.ndarray, y: np.ndarray, tolerance: float = 1.0, trials: int = 128):
    """Circle through edge points that may include outliers (a bar touching the disc, a notch), or None.

    RANSAC picks the circle through three points that most points lie on (seeded: deterministic), then a
    least-squares (Kasa) fit on its inliers refines it.
    """
    if len(x) < 3:
        return None
    triples = np.random.default_rng(0).integers(0, len(x), size=(trials, 3))
    cx, cy, radius = _circles_through(x[triples], y[triples])
    sample = slice(None, None, max(1, len(x) // 256))  # score the candidates on a few hundred points
    residual = np.abs(np.hypot(x[None, sample] - cx[:, None], y[None, sample] - cy[:, None]) - radius[:, None])
    best = (np.nan_to_num(residual, nan=np.inf) <= tolerance).sum(axis=1).argmax()
    keep = np.abs(np.hypot(x - cx[best], y - cy[best]) - radius[best]) <= tolerance
    for _ in range(2):
        if keep.sum() < 3:
            return None
        design = np.stack([x[keep], y[keep], np.ones(keep.sum())], axis=1)
        (a, b, c), *_ = np.linalg.lstsq(design, -(x[keep] ** 2 + y[keep] ** 2), rcond=None)
        center_x, center_y = -a / 2, -b / 2
        if center_x**2 + center_y**2 - c <= 0:
            return None
        fitted_radius = np.sqrt(center_x**2 + center_y**2 - c)
        keep = np.abs(np.hypot(x - center_x, y - center_y) - fitted_radius) <= tolerance
    return float(center_x), float(center_y), float(fitted_radius)


def _thumbnail(image: Image.Image, working_size: int) -> tuple[np.ndarray, int]:
    """(h, w, 3) uint8 block means of `image` at most `working_size` pixels a side (the fastest downsampling PIL
    has), and the integer reduction factor."""
    factor = -(-max(image.size) // working_size)  # ceil
    return np.asarray(image.reduce(factor) if factor > 1 else image), factor


def _disc_in_thumbnail(value: np.ndarray, name: str) -> tuple[tuple[float, float, float] | None, float]:
    """Circle `(center_x, center_y, radius)` of the field of view in a brightness thumbnail (None when the photo
    is cropped inside the field of view: no dark surround), and the brightness threshold between fundus and
    background. `ValueError` naming `name` when there is no field of view."""
    try:
        background, fundus = _fov_levels(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    threshold = background + 0.15 * (fundus - background)
    if background > DARK_BACKGROUND * fundus:
        return None, threshold
    mask = value > threshold
    thin = 2 * round(THIN_STRUCTURE * max(value.shape) / 2) + 1
    if thin >= 3:
        mask = _square_filter(_square_filter(mask, thin, np.logical_and), thin, np.logical_or)
    component = _largest_component(mask) if mask.any() else mask
    if component.sum() < MIN_FOV_FRACTION * component.size:
        raise ValueError(f"{name}: no field of view found: the largest bright region covers "
                         f"{component.mean():.1%} of the image")

    x_rows, y_rows = _row_edge_points(component, value, threshold)
    y_cols, x_cols = _row_edge_points(component.T, value.T, threshold)
    circle = _fit_circle(np.concatenate([x_rows, x_cols]), np.concatenate([y_rows, y_cols]))
    if circle is None or not 0 < circle[2] < 2 * max(value.shape):  # too few free edge points: the blob's box
        ys, xs = np.nonzero(component)
        circle = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, (max(np.ptp(xs), np.ptp(ys)) + 1) / 2)
    return circle, threshold


def detect_field_of_view(image: Image.Image, working_size: int = 256, name: str = "image") -> tuple[float, ...]:
    """Circle `(center_x, center_y, radius)` of the fundus field of view, in `image`'s pixel coordinates.

    Works on a thumbnail of at most `working_size` pixels a side (cost independent of the photo's size): threshold
    its brightness, drop thin bright structures (burned-in text), keep the largest blob, and fit a circle to the
    left/right/top/bottom ends of its rows and columns that do not touch the image border, so a disc cut by the
    frame (HRF) is fitted from its visible arc. A photo cropped inside the field of view (no dark surround) gets
    the circle centred on the image with half its longer side as radius.

    Raises `ValueError` when there is no field of view (uniform, e.g. all-black, image).
    """
    thumbnail, factor = _thumbnail(image, working_size)
    # Brightest channel: works for red-free and grey photos alike.
    circle, _ = _disc_in_thumbnail(thumbnail.max(axis=2), name)
    if circle is None:
        return (image.width - 1) / 2, (image.height - 1) / 2, max(image.size) / 2
    # Thumbnail pixel i averages full pixels i * factor .. (i + 1) * factor - 1: its centre is (i + 0.5) * factor - 0.5.
    cx, cy, radius = circle
    return (cx + 0.5) * factor - 0.5, (cy + 0.5) * factor - 0.5, radius * factor


# ----------------------------------------------------------------------------------------------------------------
# Fundus check: is this a colour fundus photograph at all?


FUNDUS_SCORE_SIZE = 128  # thumbnail side for the check: its cues are coarse, and the check must stay cheap
DEFAULT_FUNDUS_THRESHOLD = 0.5


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between."""
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def fundus_cues(image: Image.Image, working_size: int = FUNDUS_SCORE_SIZE) -> dict[str, float]:
    """The three cues of `fundus_score`, each in [0, 1], measured on a thumbnail around the detected field of view:

    * `disc`: the bright region is the fitted disc (their intersection over union inside the frame; a ramp from
      0.5 to 0.9): a roughly circular field of view, possibly cut by the frame;
    * `surround`: the ring just outside the disc (1.1 to 1.3 radii, inside the frame) is dark (the share of its
      pixels below the fundus threshold; a ramp from 0.3 to 0.8). A photo cropped inside the field of view, or any
      photo without a dark surround, scores 0;
    * `colour`: retinal colour inside the disc: the red share of its summed colour, R / (R + G + B) (a ramp from
      0.36 to 0.44: fundus photos sit near 0.6, pale atrophic ones near 0.45, grey images at 1/3), times the share
      of its pixels ordered R >= G >= B (orange to warm white, as the retina, the optic disc and bare sclera are).

    An image with no field of view at all (uniform) scores 0 on every cue.
    """
    rgb, _ = _thumbnail(image, working_size)
    value = rgb.max(axis=2)
    try:
        circle, threshold = _disc_in_thumbnail(value, "image")
    except ValueError:
        return {"disc": 0.0, "surround": 0.0, "colour": 0.0}
    height, width = value.shape
    cx, cy, radius = circle if circle is not None else ((width - 1) / 2, (height - 1) / 2, max(width, height) / 2)
    rows, columns = np.ogrid[:height, :width]
    distance = np.hypot(columns - cx, rows - cy) / radius
    bright, disc = value > threshold, distance <= 1
    ring = (distance > 1.1) & (distance < 1.3)
    inside = bright & (distance < 0.9)
    red, green, blue = rgb[inside].astype(np.float32).T
    red_share = float(red.sum() / max(red.sum() + green.sum() + blue.sum(), 1.0))
    ordered = float(np.mean((red >= green) & (green >= blue))) if inside.any() else 0.0
    return {
        "disc": _ramp((bright & disc).sum() / max((bright | disc).sum(), 1), 0.5, 0.9),
        "surround": _ramp(1 - bright[ring].mean(), 0.3, 0.8) if ring.any() else 0.0,
        "colour": _ramp(red_share, 0.36, 0.44) * ordered,
    }


def fundus_score(image, working_size: int = FUNDUS_SCORE_SIZE) -> float:
    """How much `image` looks like a colour fundus photograph, in [0, 1]: the product of `fundus_cues` (every cue
    must hold). Fundus photos score near 1; natural photos, noise and flat images near 0."""
    return float(np.prod(list(fundus_cues(to_rgb_image(image), working_size).values())))


def crop_to_circle(image: Image.Image, circle: tuple[float, float, float], size: int, resample) -> Image.Image:
    """The square circumscribing `circle`, resized to `size` x `size`; what lies outside the image is black."""
    cx, cy, radius = circle
    left, top, side = cx + 0.5 - radius, cy + 0.5 - radius, 2 * radius  # continuous coordinates (pixel i: [i, i+1))
    box = (max(left, 0.0), max(top, 0.0), min(left + side, image.width), min(top + side, image.height))
    scale = size / side
    target = [round((box[0] - left) * scale), round((box[1] - top) * scale),
              round((box[2] - left) * scale), round((box[3] - top) * scale)]
    canvas = Image.new(image.mode, (size, size), 0)
    if target[2] > target[0] and target[3] > target[1]:
        patch = image.resize((target[2] - target[0], target[3] - target[1]), resample, box=box, reducing_gap=1.5)
        canvas.paste(patch, (target[0], target[1]))
    return canvas


def nest_images(images) -> list[list]:
    """One image, a list of images, or a list of per-sample lists -> a list of per-sample lists."""
    if isinstance(images, (list, tuple)):
        return [list(sample) if isinstance(sample, (list, tuple)) else [sample] for sample in images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [[image] for image in images]
    return [[images]]


def _image_name(sample: int, index: int, images: list) -> str:
    """How errors name image `index` of sample `sample`: `images[i]` when the sample holds one, else `images[i][j]`."""
    return f"images[{sample}]" if len(images) == 1 else f"images[{sample}][{index}]"


def _pad_images(samples: list[list[np.ndarray]]) -> np.ndarray:
    """Per-sample lists of equally shaped arrays -> (B, N_max, ...), zeros where a sample has fewer."""
    shape = samples[0][0].shape
    batch = np.zeros((len(samples), max(len(sample) for sample in samples), *shape), samples[0][0].dtype)
    for row, sample in zip(batch, samples):
        row[: len(sample)] = sample
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Image processor


class MdfMllmImageProcessorKwargs(MllamaImageProcessorKwargs, total=False):
    """
    unet_image_size (`int`):
        S, the side of `unet_pixel_values` (the U-Net's input).
    unet_image_mean (`list[float]`), unet_image_std (`list[float]`):
        Per-channel normalisation of the U-Net view (after scaling pixels to 0..1).
    fov_detection_size (`int`):
        Longest side of the thumbnail the field of view is detected on.
    fundus_threshold (`float`):
        `fundus_score` below which `check_fundus` refuses (or warns about) an image.
    """

    unet_image_size: int
    unet_image_mean: float | list[float] | tuple[float, ...]
    unet_image_std: float | list[float] | tuple[float, ...]
    fov_detection_size: int
    fundus_threshold: float


class MdfMllmImageProcessor(MllamaImageProcessor):
    r"""Mllama's image processor plus the U-Net view of the fundus.

    Returns the stock `pixel_values` (B, 1, max_image_tiles, 3, tile, tile), `aspect_ratio_ids`, `aspect_ratio_mask`,
    `num_tiles`, and `unet_pixel_values` (B, 3, S, S) float32: the square around the detected field of view,
    resized to S = `unet_image_size` and normalised with `unet_image_mean`/`unet_image_std`. With
    `vessel_masks=` (one mask per image, same size as the image) also `vessel_mask` (B, 1, S, S) of 0./1.,
    cropped exactly like the photo.

    A sample may hold several photos (e.g. both eyes: `images=[[left, right], ...]`): when any sample has more than
    one, `unet_pixel_values` is (B, N_max, 3, S, S) and `vessel_mask` (B, N_max, 1, S, S), zero for the missing
    photos of shorter samples (as Mllama pads `pixel_values`).

    `fundus_score(image)` says how much an image looks like a colour fundus photograph; `check_fundus` refuses or
    warns below `fundus_threshold`. Preprocessing itself does not check: the pipeline, the CLI and the demo do.
    """

    unet_image_size = 512
    unet_image_mean = IMAGENET_DEFAULT_MEAN
    unet_image_std = IMAGENET_DEFAULT_STD
    fov_detection_size = 256
    fundus_threshold = DEFAULT_FUNDUS_THRESHOLD
    valid_kwargs = MdfMllmImageProcessorKwargs
    model_input_names = MllamaImageProcessor.model_input_names + ["unet_pixel_values"]

    def preprocess(self, images, vessel_masks=None, **kwargs) -> BatchFeature:
        return super().preprocess(images, image_like_kwargs={"vessel_masks": vessel_masks}, **kwargs)

    def field_of_view(self, image) -> tuple[float, float, float]:
        """`(center_x, center_y, radius)` of the fundus disc in `image`'s pixel coordinates (after EXIF rotation)."""
        return detect_field_of_view(to_rgb_image(image), self.fov_detection_size)

    def fundus_score(self, image) -> float:
        """How much `image` looks like a colour fundus photograph, in [0, 1] (see `fundus_cues`)."""
        return fundus_score(image)

    def check_fundus(self, image, name: str = "image", on_failure: str = "error") -> float:
        """`fundus_score(image)`; below `fundus_threshold` a `ValueError` naming `name` and the score
        (`on_failure="error"`) or a `UserWarning` saying the same (`"warn"`)."""
        if on_failure not in ("error", "warn"):
            raise ValueError(f"on_failure: expected 'error' or 'warn', got {on_failure!r}")
        threshold = self.fundus_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"fundus_threshold: expected a number in [0, 1], got {self.fundus_threshold!r}")
        score = self.fundus_score(image)
        if score < self.fundus_threshold:
            message = (f"{_describe(image, name)}: does not look like a colour fundus photograph (fundus score "
                       f"{score:.2f} < threshold {self.fundus_threshold:.2f}: no bright round field of view on a "
                       "dark surround with retinal colour)")
            if on_failure == "error":
                raise NotFundusError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        return score

    def _preprocess_image_like_inputs(self, images, vessel_masks=None, **kwargs) -> BatchFeature:
        samples = nest_images(images)
        for i, sample in enumerate(samples):
            if not sample:
                raise ValueError(f"images[{i}]: the sample holds no image")
        photos = [[to_rgb_image(image, _image_name(i, j, sample)) for j, image in enumerate(sample)]
                  for i, sample in enumerate(samples)]
        circles = [[detect_field_of_view(photo, kwargs["fov_detection_size"], _image_name(i, j, sample))
                    for j, photo in enumerate(sample)] for i, sample in enumerate(photos)]
        outputs = super()._preprocess_image_like_inputs(photos, **kwargs)

        size, resample = kwargs["unet_image_size"], Image.Resampling.BILINEAR
        views = np.stack([np.asarray(crop_to_circle(photo, circle, size, resample))
                          for sample in zip(photos, circles) for photo, circle in zip(*sample)])
        views = views.astype(np.float32)  # (images, S, S, 3) 0..255, normalised in place: (x / 255 - mean) / std
        views -= 255 * np.asarray(kwargs["unet_image_mean"], np.float32)
        views *= 1 / (255 * np.asarray(kwargs["unet_image_std"], np.float32))
        views = iter(views.transpose(0, 3, 1, 2))
        views = np.ascontiguousarray(_pad_images([[next(views) for _ in sample] for sample in photos]))
        data = {key: value for key, value in outputs.items() if key != "num_tiles"}
        if vessel_masks is not None:
            data["vessel_mask"] = self._crop_vessel_masks(vessel_masks, photos, circles, size)
        data["unet_pixel_values"] = views
        if views.shape[1] == 1:  # one photo in every sample: (B, 3, S, S), as the model has always read it
            data = {key: data[key][:, 0] if key in ("unet_pixel_values", "vessel_mask") else data[key] for key in data}
        encoded = BatchFeature(data, tensor_type=kwargs.get("return_tensors"))
        encoded["num_tiles"] = outputs["num_tiles"]
        return encoded

    @staticmethod
    def _crop_vessel_masks(vessel_masks, photos, circles, size) -> np.ndarray:
        """(B, N, 1, S, S) float32 0/1: each mask cropped with its photo's circle (antialiased, then thresholded)."""
        masks = nest_images(vessel_masks)
        counts = [len(sample) for sample in masks], [len(sample) for sample in photos]
        if counts[0] != counts[1]:
            raise ValueError(f"vessel_masks: masks per sample {counts[0]} for images per sample {counts[1]}")
        crops = []
        for i, sample in enumerate(zip(masks, photos, circles)):
            crops.append([])
            for j, (mask, photo, circle) in enumerate(zip(*sample)):
                name = _image_name(i, j, sample[0]).replace("images", "vessel_masks", 1)
                mask = to_binary_mask(mask, name)
                if mask.size != photo.size:
                    raise ValueError(f"{name}: mask is {mask.width}x{mask.height} pixels but its image is "
                                     f"{photo.width}x{photo.height}")
                crops[-1].append(np.asarray(crop_to_circle(mask, circle, size, Image.Resampling.BILINEAR)) >= 128)
        return _pad_images(crops)[:, :, None].astype(np.float32)


__all__ = [
    "MdfMllmImageProcessor",
    "NotFundusError",
    "crop_to_circle",
    "detect_field_of_view",
    "fundus_cues",
    "fundus_score",
    "to_binary_mask",
    "to_rgb_image",
]

MdfMllmImageProcessor.register_for_auto_class("AutoImageProcessor")
