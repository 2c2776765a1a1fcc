"""A contact sheet: a row per class with a few examples, each photo beside its vessel mask."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from .builder import LABEL_NAMES

LABEL_WIDTH = 170
GAP = 4


def _as_image(value) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    return Image.fromarray(np.asarray(value))


def contact_sheet(examples: Iterable[dict], per_class: int = 4, thumb: int = 128) -> Image.Image:
    """Draw up to `per_class` examples of each label (rows in label order): photo, then vessel mask (grey if none).

    `examples` have `label` (name or id), `image` and `vessel_mask` (PIL images or arrays, mask may be None).
    """
    rows: dict[str, list[dict]] = {}
    for example in examples:
        label = example["label"] if isinstance(example["label"], str) else LABEL_NAMES[example["label"]]
        if len(rows.setdefault(label, [])) < per_class:
            rows[label].append(example)
    labels = [name for name in LABEL_NAMES if name in rows]
    cell = 2 * thumb + GAP
    sheet = Image.new("RGB", (LABEL_WIDTH + per_class * (cell + 2 * GAP), max(1, len(labels)) * (thumb + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, label in enumerate(labels):
        top = row * (thumb + GAP)
        draw.text((6, top + thumb // 2 - 6), label, fill="black")
        for col, example in enumerate(rows[label]):
            left = LABEL_WIDTH + col * (cell + 2 * GAP)
            sheet.paste(_as_image(example["image"]).convert("RGB").resize((thumb, thumb)), (left, top))
            mask = _as_image(example.get("vessel_mask"))
            mask = mask.convert("RGB") if mask is not None else Image.new("RGB", (thumb, thumb), "grey")
            sheet.paste(mask.resize((thumb, thumb)), (left + thumb + GAP, top))
    return sheet
