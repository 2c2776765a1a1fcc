"""MdfMllmImageProcessor / MdfMllmProcessor / build_tokenizer / MdfMllmDataCollator."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

from image_processing_mdf_mllm import MdfMllmImageProcessor
from processing_mdf_mllm import (
    IMAGE_TOKEN,
    MdfMllmDataCollator,
    MdfMllmProcessor,
    build_default_processor,
    build_tokenizer,
)


TILE, UNET = 28, 32


@pytest.fixture(scope="module")
def processor():
    return build_default_processor(image_size=TILE, unet_image_size=UNET)


def draw_fundus(width, height, cx, cy, radius, brightness=1.0, bar=None, marks=False, seed=0):
    """A fundus-like JPEG: vignetted orange disc with a bright optic disc and dark vessels on black.

    `bar` burns in a white rectangle (x0, y0, x1, y1); `marks` burns in white text in two corners.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    distance = np.hypot(xx - cx, yy - cy) / radius
    shade = np.clip(1.0 - 0.55 * distance**2, 0, 1) * brightness * (distance <= 1)
    rgb = np.stack([220 * shade, 110 * shade, 40 * shade], -1) + rng.normal(0, 2, (height, width, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    vessel = tuple(int(c * brightness) for c in (90, 30, 15))
    for angle in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        t = np.linspace(0.15, 0.9, 20)
        draw.line(list(zip(cx + t * radius * np.cos(angle + t), cy + t * radius * np.sin(angle + t))), fill=vessel,
                  width=max(1, int(radius / 60)))
    if bar is not None:
        draw.rectangle(bar, fill=(255, 255, 255))
    if marks:
        draw.text((2, 2), "OD 2019-03-04 ID 1234", fill=(255, 255, 255))
        draw.text((2, height - 12), "FF450", fill=(255, 255, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return Image.open(buffer)


def assert_circle_close(found, expected, side, tolerance=0.02):
    errors = np.abs(np.subtract(found, expected)) / side
    assert errors.max() <= tolerance, f"circle {np.round(found, 1)} vs {expected}: errors {errors} of the side"


def raw_unet_view(encoded, image_processor) -> np.ndarray:
    """unet_pixel_values of the first sample back to 0..255 RGB, (S, S, 3)."""
    view = encoded["unet_pixel_values"][0].numpy().transpose(1, 2, 0)
    return (view * np.array(image_processor.unet_image_std) + np.array(image_processor.unet_image_mean)) * 255


# ---- field of view ------------------------------------------------------------------------------------------------


def test_retina_photo_circle_and_output_shapes(processor):
    retina = data.retina()
    # Independent fit: the disc is the red channel above 30; centroid and equal-area radius.
    ys, xs = np.nonzero(retina[..., 0] > 30)
    expected = (xs.mean(), ys.mean(), np.sqrt(len(xs) / np.pi))
    assert_circle_close(processor.image_processor.field_of_view(retina), expected, side=retina.shape[0])

    encoded = processor.image_processor(retina, return_tensors="pt")
    assert encoded["pixel_values"].shape == (1, 1, 1, 3, TILE, TILE)
    assert encoded["pixel_values"].dtype == torch.float32
    assert encoded["unet_pixel_values"].shape == (1, 3, UNET, UNET)
    assert encoded["unet_pixel_values"].dtype == torch.float32
    assert encoded["aspect_ratio_ids"].tolist() == [[1]] and encoded["num_tiles"] == [[1]]


def test_real_photo_cut_by_top_and_bottom_and_noisy_grey_surround(processor):
    retina = np.asarray(Image.fromarray(data.retina()).resize((400, 400)))
    ys, xs = np.nonzero(retina[..., 0] > 30)
    cx, cy, radius = xs.mean(), ys.mean(), np.sqrt(len(xs) / np.pi)
    canvas = Image.new("RGB", (560, 320))
    canvas.paste(Image.fromarray(retina), (80, -40))  # HRF-like: the disc runs off the top and bottom
    assert_circle_close(processor.image_processor.field_of_view(canvas), (cx + 80, cy - 40, radius), 560)

    grey = retina.astype(np.float32)
    outside = np.hypot(*np.mgrid[:400, :400][::-1] - np.array([cx, cy])[:, None, None]) > radius
    grey[outside] = np.random.default_rng(0).normal(22, 4, (outside.sum(), 3))  # lit, noisy background
    assert_circle_close(processor.image_processor.field_of_view(grey.clip(0, 255)), (cx, cy, radius), 400)


def test_photo_cropped_inside_the_field_of_view_keeps_the_whole_frame(processor):
    crop = data.microaneurysms()  # 102x102 crop of an HRF photo: no dark surround to find
    assert processor.image_processor.field_of_view(crop) == (50.5, 50.5, 51.0)


SYNTHETIC = {
    "centred": dict(width=160, height=160, cx=80, cy=80, radius=70),
    "cut_by_top_and_bottom": dict(width=240, height=160, cx=120, cy=80, radius=100),
    "off_centre": dict(width=200, height=160, cx=75, cy=95, radius=55),
    "dim": dict(width=160, height=160, cx=80, cy=80, radius=70, brightness=0.18),
    "bar_and_text_beside": dict(width=200, height=160, cx=80, cy=80, radius=70, bar=(165, 10, 185, 150), marks=True),
    "bar_touching": dict(width=200, height=160, cx=80, cy=80, radius=70, bar=(148, 15, 170, 145)),
}


@pytest.mark.parametrize("case", SYNTHETIC)
def test_synthetic_field_of_view(processor, case):
    spec = SYNTHETIC[case]
    photo = draw_fundus(**spec)
    expected = (spec["cx"], spec["cy"], spec["radius"])
    assert_circle_close(processor.image_processor.field_of_view(photo), expected, max(photo.size))


def test_unet_view_is_the_square_around_the_disc_padded_with_black(processor):
    # Disc of radius 100 in a 160-high photo: the 200 px square sticks out 20 px above and below -> black there.
    photo = draw_fundus(width=240, height=160, cx=120, cy=80, radius=100)
    size = 50
    encoded = processor.image_processor(photo, unet_image_size=size, return_tensors="pt")
    view = raw_unet_view(encoded, processor.image_processor).max(axis=2)
    padding = round(20 * size / 200)
    assert view[: padding - 1].max() < 10 and view[-padding + 1 :].max() < 10
    assert view[size // 2, 2] > 40 and view[size // 2, -3] > 40  # the disc reaches the left and right sides
    assert view[size // 2, size // 2] > 100


def test_vessel_mask_gets_the_same_crop(processor):
    photo = draw_fundus(width=200, height=160, cx=75, cy=95, radius=55)
    yy, xx = np.mgrid[:160, :200]
    disc_mask = (np.hypot(xx - 75, yy - 95) <= 55).astype(np.uint8) * 255
    encoded = processor.image_processor(photo, vessel_masks=disc_mask, return_tensors="pt")
    mask = encoded["vessel_mask"]
    assert mask.shape == (1, 1, UNET, UNET) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # The disc fills the square: the mask is the inscribed circle.
    assert mask.mean().item() == pytest.approx(np.pi / 4, abs=0.04)
    assert mask[0, 0, UNET // 2, UNET // 2] == 1 and mask[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match=r"vessel_masks\[0\]: mask is 10x10 pixels but its image is 200x160"):
        processor.image_processor(photo, vessel_masks=np.zeros((10, 10)))


# ---- image types ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fundus():
    spec = dict(width=200, height=160, cx=75, cy=95, radius=55)
    return draw_fundus(**spec).convert("RGB"), (spec["cx"], spec["cy"], spec["radius"])


def _sixteen_bit(photo):
    """A 16-bit greyscale PNG, as PIL opens it."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(buffer, "PNG")
    image = Image.open(buffer)
    assert image.mode.startswith("I"), image.mode
    return image


def _transparent_background(photo):
    rgba = np.asarray(photo.convert("RGBA")).copy()
    outside = rgba[..., :3].max(axis=2) < 20
    rgba[outside] = (255, 255, 255, 0)  # white but fully transparent: must read as black background
    return Image.fromarray(rgba, "RGBA")


CONVERSIONS = {
    "grayscale": lambda photo: photo.convert("L"),
    "grayscale_alpha": lambda photo: _transparent_background(photo).convert("LA"),
    "rgba": _transparent_background,
    "16_bit": _sixteen_bit,
    "cmyk": lambda photo: photo.convert("CMYK"),
    "palette": lambda photo: photo.convert("P"),
    "float_chw_array": lambda photo: np.asarray(photo).transpose(2, 0, 1) / 255.0,
    "uint16_array": lambda photo: np.asarray(photo).astype(np.uint16) * 257,
    "tensor": lambda photo: torch.from_numpy(np.asarray(photo).copy()),
}


@pytest.mark.parametrize("kind", CONVERSIONS)
def test_image_types_give_the_same_circle(processor, fundus, kind):
    photo, expected = fundus
    converted = CONVERSIONS[kind](photo)
    assert_circle_close(processor.image_processor.field_of_view(converted), expected, max(photo.size), 0.01)
    encoded = processor.image_processor(converted, return_tensors="pt")
    assert encoded["unet_pixel_values"].shape == (1, 3, UNET, UNET)
    assert torch.isfinite(encoded["unet_pixel_values"]).all()


def test_exif_rotated_photo_is_read_upright(processor, fundus):
    photo, (cx, cy, radius) = fundus
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored = upright turned counter-clockwise
    buffer = io.BytesIO()
    photo.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(buffer)
    assert stored.size == (photo.height, photo.width)
    assert_circle_close(processor.image_processor.field_of_view(stored), (cx, cy, radius), max(photo.size), 0.01)


def test_tiny_image_is_processed(processor):
    tiny = np.zeros((8, 8, 3), np.uint8)
    yy, xx = np.mgrid[:8, :8]
    tiny[np.hypot(xx - 3.5, yy - 3.5) <= 3.5] = (200, 90, 30)
    encoded = processor.image_processor(tiny, return_tensors="pt")
    assert encoded["pixel_values"].shape == (1, 1, 1, 3, TILE, TILE)
    assert encoded["unet_pixel_values"].shape == (1, 3, UNET, UNET)
    cx, cy, radius = processor.image_processor.field_of_view(tiny)
    assert abs(cx - 3.5) <= 1 and abs(cy - 3.5) <= 1 and abs(radius - 3.5) <= 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((64, 64, 3), np.uint8), r"images\[0\]: no field of view found: the image is uniform"),
        (np.zeros((64, 64, 2), np.uint8), r"images\[0\]: expected an image of shape"),
        (np.full((64, 64), np.nan, np.float32), r"images\[0\]: the image holds NaN"),
        ("/nonexistent/fundus.png", r"images\[0\]: no image file at /nonexistent/fundus.png"),
    ],
)
def test_bad_images_raise_errors_that_name_the_problem(processor, image, message):
    error = FileNotFoundError if isinstance(image, str) else ValueError
    with pytest.raises(error, match=message):
        processor.image_processor([image], return_tensors="pt")


# ---- prompts, labels, tokens -----------------------------------------------------------------------------------


def test_prompt_errors(processor, fundus):
    photo, _ = fundus
    with pytest.raises(ValueError, match=r"text\[0\]: the prompt holds 0 <\|image\|> token\(s\) for 1 image"):
        processor(images=photo, text="Which disease is this?")
    with pytest.raises(ValueError, match=r"text\[0\]: the prompt holds 2 <\|image\|> token\(s\) for 1 image"):
        processor(images=photo, text="<|image|><|image|>Which disease?")
    with pytest.raises(ValueError, match=r"text: 1 entries for a batch of 2"):
        processor(images=[photo, photo], text=["<|image|>Which disease?"])
    with pytest.raises(ValueError, match=r"text\[0\]: the prompt holds 1 <\|image\|> token\(s\) for 2 image"):
        processor(images=[[photo, photo]], text=["<|image|>Which?"])
    with pytest.raises(ValueError, match=r"images\[0\]: the sample holds no image"):
        processor(images=[[]])
    with pytest.raises(ValueError, match=r"labels: unknown label 'flu'"):
        processor(images=photo, labels="flu")


def test_labels_mask_exactly_the_answer(processor, fundus):
    photo, _ = fundus
    tokenizer = processor.tokenizer
    labels = ["retinitis_pigmentosa", 3]
    encoded = processor(images=[photo, photo], clinical_text=["Night blindness since age 7.", None], labels=labels)
    assert encoded["input_ids"].shape == encoded["labels"].shape == encoded["attention_mask"].shape
    for row, label in enumerate(labels):
        answer = encoded["labels"][row][encoded["labels"][row] != -100]
        expected = processor.verbalizers[processor.label_id(label)] + "<|eot_id|>"
        assert tokenizer.decode(answer) == expected
        # The answer is the end of the row and matches the input ids there.
        assert torch.equal(encoded["input_ids"][row, -len(answer) :], answer)
        assert (encoded["labels"][row, : -len(answer)] == -100).all()
    # Left padding: the shorter row (no clinical history) starts with pad tokens, masked out.
    padding = int((encoded["attention_mask"][1] == 0).sum())
    assert padding > 0 and encoded["attention_mask"][1, padding:].all()
    assert (encoded["input_ids"][1, :padding] == tokenizer.pad_token_id).all()
    assert "Clinical history: Night blindness since age 7." in tokenizer.decode(encoded["input_ids"][0])
    assert "Clinical history" not in tokenizer.decode(encoded["input_ids"][1])


def test_cross_attention_mask_starts_at_the_image_token(processor, fundus):
    photo, _ = fundus
    encoded = processor(images=[photo, photo], clinical_text=["Family history of RP.", ""])
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert encoded["cross_attention_mask"].shape == (*encoded["input_ids"].shape, 1, 1)
    for ids, mask in zip(encoded["input_ids"], encoded["cross_attention_mask"][..., 0, 0]):
        position = ids.tolist().index(image_id)
        assert mask[:position].sum() == 0 and mask[position:].all()
    assert set(encoded) == {"input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                            "cross_attention_mask", "unet_pixel_values"}


@pytest.mark.parametrize("clinical_text", [None, "Visual acuity 20/200; onset in adolescence. Brother affected."])
def test_verbalizer_token_ids_continue_the_prompt(processor, clinical_text):
    tokenizer = processor.tokenizer
    prompt = processor.build_prompt(clinical_text)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for label, verbalizer in enumerate(processor.verbalizers):
        full = tokenizer(prompt + verbalizer + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        assert full == prompt_ids + processor.verbalizer_token_ids[label]
    assert processor.label_from_answer(" Stargardt Disease<|eot_id|>") == processor.label_id("stargardt")


def test_tokenizer_layout_and_coverage():
    tokenizer = build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tokenizer) - 1 == max(tokenizer.get_vocab().values())
    assert 300 <= len(tokenizer) <= 3000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"):
        assert tokenizer.convert_tokens_to_ids(token) < image_id
    text = "Ünïcödé 眼底 🙂 — acuity 20/40\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    assert len(tokenizer("retinitis pigmentosa", add_special_tokens=False)["input_ids"]) <= 3
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_every_number_of_up_to_three_digits_is_one_token_as_in_llama_3():
    """An age is one token (its own embedding), never a bag of digits in which 52 and 25 are the same."""
    tokenizer = build_tokenizer()
    ids = {number: tokenizer(str(number), add_special_tokens=False)["input_ids"] for number in range(1000)}
    assert all(len(one) == 1 for one in ids.values())
    assert len({one[0] for one in ids.values()}) == 1000
    assert [tokenizer.decode([i]) for i in tokenizer("A 52-year-old, IOP 130/85", add_special_tokens=False)[
        "input_ids"]] == ["A", " ", "52", "-", "year", "-", "old", ",", " ", "I", "O", "P", " ", "130", "/", "85"]
    assert tokenizer("1234", add_special_tokens=False)["input_ids"] == ids[123] + ids[4]  # Llama 3 splits 3 + 1


# ---- save / load --------------------------------------------------------------------------------------------------


def test_save_and_load_keep_settings_and_outputs(tmp_path, fundus):
    photo, _ = fundus
    processor = build_default_processor(
        image_size=TILE, unet_image_size=48, unet_image_mean=[0.1, 0.2, 0.3], unet_image_std=[0.5, 0.6, 0.7],
        fov_detection_size=128, instruction="Name the disease.", label_names=["normal", "rp"],
        verbalizers=["normal", "retinitis pigmentosa"],
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_mdf_mllm.MdfMllmProcessor"
    image_processor_class = "image_processing_mdf_mllm.MdfMllmImageProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == image_processor_class
    for name in ("processing_mdf_mllm.py", "image_processing_mdf_mllm.py", "configuration_mdf_mllm.py"):
        assert (tmp_path / name).exists(), name

    processor.image_processor.save_pretrained(tmp_path / "image_processor")
    config = json.loads((tmp_path / "image_processor" / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == image_processor_class
    assert (tmp_path / "image_processor" / "image_processing_mdf_mllm.py").exists()
    assert (config["unet_image_size"], config["unet_image_mean"]) == (48, [0.1, 0.2, 0.3])

    loaded = MdfMllmProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, MdfMllmImageProcessor)
    for name in ("unet_image_size", "unet_image_mean", "unet_image_std", "fov_detection_size", "max_image_tiles"):
        assert getattr(loaded.image_processor, name) == getattr(processor.image_processor, name), name
    assert (loaded.label_names, loaded.verbalizers, loaded.instruction) == (
        processor.label_names, processor.verbalizers, processor.instruction)
    before = processor(images=photo, clinical_text="Night blindness.", labels="rp")
    after = loaded(images=photo, clinical_text="Night blindness.", labels="rp")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_auto_processor_loads_the_exported_folder_in_a_fresh_process(tmp_path, processor, fundus):
    photo, _ = fundus
    export = tmp_path / "export"
    processor.save_pretrained(export)
    np.save(tmp_path / "photo.npy", np.asarray(photo))
    expected = processor(images=photo, clinical_text="Onset at age 12.", labels=2)
    torch.save(dict(expected), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        from importlib.abc import MetaPathFinder

        class NotThisProject(MetaPathFinder):  # the exported folder must be enough
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"configuration_mdf_mllm", "image_processing_mdf_mllm",
                                          "processing_mdf_mllm"}}:
                    raise ImportError(name)

        sys.meta_path.insert(0, NotThisProject())
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(export)!r}, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained({str(export)!r}, trust_remote_code=True)
        for loaded, name in ((processor, "MdfMllmProcessor"), (image_processor, "MdfMllmImageProcessor")):
            assert type(loaded).__name__ == name, type(loaded)
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        photo = np.load({str(tmp_path / "photo.npy")!r})
        got = processor(images=photo, clinical_text="Onset at age 12.", labels=2)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert got.keys() == expected.keys(), (got.keys(), expected.keys())
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        print("OK")
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


# ---- collator -------------------------------------------------------------------------------------------------


def test_collator_matches_the_batched_call(processor, fundus):
    photo, _ = fundus
    other = draw_fundus(width=160, height=160, cx=80, cy=80, radius=70)
    mask = np.zeros((160, 200), np.uint8)
    mask[90:100] = 1
    texts, labels, masks = ["Night blindness since childhood.", None], [4, "normal"], [mask, np.zeros((160, 160))]
    batched = processor(images=[photo, other], clinical_text=texts, labels=labels, vessel_masks=masks)
    singles = [processor(images=image, clinical_text=text, labels=label, vessel_masks=vessel)
               for image, text, label, vessel in zip([photo, other], texts, labels, masks)]
    singles[0]["num_tiles"] = [[1]]  # non-inputs are dropped
    collated = MdfMllmDataCollator(processor)(singles)
    assert collated.keys() == batched.keys()
    for key in batched:
        assert torch.equal(collated[key], batched[key]), key


def test_collator_pads_tiles_and_images_like_mllama(processor, fundus):
    photo, _ = fundus
    one_tile = processor(images=photo)
    wide = Image.fromarray(np.concatenate([np.asarray(photo)] * 2, axis=1))
    two_tiles = processor(images=wide, clinical_text="A much longer clinical history with many more words.",
                          max_image_tiles=2)
    examples = [{key: value[0].tolist() for key, value in one_tile.items()}, dict(two_tiles)]  # lists and tensors
    batch = MdfMllmDataCollator(processor.tokenizer.pad_token_id)(examples)
    assert batch["pixel_values"].shape == (2, 1, 2, 3, TILE, TILE)
    assert batch["pixel_values"][0, 0, 1].abs().sum() == 0
    assert torch.equal(batch["pixel_values"][1], two_tiles["pixel_values"][0])
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 0]], [[1, 1]]]
    assert batch["cross_attention_mask"].shape == (2, batch["input_ids"].shape[1], 1, 2)
    short = one_tile["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, -short:], one_tile["input_ids"][0])
    assert (batch["input_ids"][0, :-short] == processor.tokenizer.pad_token_id).all()
    assert (batch["cross_attention_mask"][0, :-short] == 0).all()
    with pytest.raises(ValueError, match=r"labels: present in 1 of 2 examples"):
        MdfMllmDataCollator(processor)([dict(processor(images=photo, labels=0)), dict(one_tile)])


# ---- several images per sample --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_eyes(fundus):
    """Left and right eye (mirror images of each other, different sizes) and a third photo of one eye."""
    left, _ = fundus
    right = draw_fundus(width=160, height=160, cx=80, cy=80, radius=70).convert("RGB")
    right = right.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return left, right, draw_fundus(width=240, height=160, cx=120, cy=80, radius=100).convert("RGB")


def test_several_images_per_sample_give_one_unet_view_each_zero_padded(processor, both_eyes):
    left, right, other = both_eyes
    mask = np.zeros((160, 200), np.uint8)
    mask[90:100] = 255
    masks = [[mask, np.zeros((160, 160))], [np.ones((160, 240))]]
    encoded = processor(images=[[left, right], [other]], clinical_text=["Both eyes.", None], vessel_masks=masks)
    assert encoded["unet_pixel_values"].shape == (2, 2, 3, UNET, UNET)
    assert encoded["vessel_mask"].shape == (2, 2, 1, UNET, UNET)
    assert encoded["pixel_values"].shape == (2, 2, 1, 3, TILE, TILE)
    # Each view is what the photo gives alone; the missing second photo of sample 1 is all zeros.
    for (row, slot), photo, vessel in [((0, 0), left, mask), ((0, 1), right, masks[0][1]),
                                       ((1, 0), other, masks[1][0])]:
        alone = processor.image_processor(photo, vessel_masks=vessel, return_tensors="pt")
        assert torch.equal(encoded["unet_pixel_values"][row, slot], alone["unet_pixel_values"][0])
        assert torch.equal(encoded["vessel_mask"][row, slot], alone["vessel_mask"][0])
    assert encoded["unet_pixel_values"][1, 1].abs().sum() == 0 and encoded["vessel_mask"][1, 1].sum() == 0
    assert encoded["vessel_mask"][1, 0].sum() > 0  # a real all-vessel mask is not mistaken for padding
    # The built prompt has one image token per photo; each image's cross-attention starts at its own token.
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = encoded["input_ids"][0].tolist()
    first, second = [i for i, token in enumerate(ids) if token == image_id]
    mask0 = encoded["cross_attention_mask"][0, :, :, 0]  # (L, images)
    assert mask0[:first].sum() == 0 and mask0[first:, 0].all()
    assert mask0[second:, 1].all() and mask0[:second, 1].sum() == 0
    assert encoded["input_ids"][1].tolist().count(image_id) == 1
    assert encoded["cross_attention_mask"][1, :, 1].sum() == 0
    with pytest.raises(ValueError, match=r"vessel_masks: masks per sample \[1, 1\] for images per sample \[2, 1\]"):
        processor(images=[[left, right], [other]], vessel_masks=[mask, np.ones((160, 240))])
    # One photo in every sample: the 4-D U-Net view the model has always read.
    assert processor(images=[[left], [other]])["unet_pixel_values"].shape == (2, 3, UNET, UNET)


def test_collator_pads_several_images_like_the_batched_call(processor, both_eyes):
    left, right, other = both_eyes
    samples, texts, labels = [[left, right], [other]], ["Both eyes.", None], ["dr", 0]
    masks = [[np.zeros((160, 200)), np.ones((160, 160))], [np.ones((160, 240))]]
    batched = processor(images=samples, clinical_text=texts, labels=labels, vessel_masks=masks)
    singles = [processor(images=[images], clinical_text=[text], labels=[label], vessel_masks=[vessel])
               for images, text, label, vessel in zip(samples, texts, labels, masks)]
    singles[1] = {key: value[0] for key, value in singles[1].items()}  # without the batch dimension
    collated = MdfMllmDataCollator(processor)(singles)
    assert collated.keys() == batched.keys()
    for key in batched:
        assert torch.equal(collated[key], batched[key]), key
    assert collated["unet_pixel_values"].shape == (2, 2, 3, UNET, UNET)
    with pytest.raises(ValueError, match=r"unet_pixel_values: examples have different image shapes"):
        MdfMllmDataCollator(processor)([{"unet_pixel_values": torch.zeros(3, 8, 8)},
                                        {"unet_pixel_values": torch.zeros(3, 9, 9)}])


# ---- fundus check ---------------------------------------------------------------------------------------------


NOT_FUNDUS = {
    **{name: getattr(data, name) for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "moon", "page",
                                              "coins", "hubble_deep_field", "colorwheel")},
    "noise": lambda: np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8),
    "grey_noise": lambda: np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8),
    "flat": lambda: np.full((48, 48, 3), 200, np.uint8),
    "black": lambda: np.zeros((48, 48, 3), np.uint8),
}


@pytest.mark.parametrize("name", NOT_FUNDUS)
def test_fundus_check_flags_natural_photos_noise_and_flat_images(processor, name):
    image = NOT_FUNDUS[name]()
    image_processor = processor.image_processor
    score = image_processor.fundus_score(image)
    assert 0.0 <= score < 0.2, score
    with pytest.raises(ValueError, match=rf"photo\.png: does not look like a colour fundus photograph \(fundus score "
                                         rf"{score:.2f} < threshold 0\.50"):
        image_processor.check_fundus(image, "photo.png")


def test_fundus_check_passes_fundus_photos(processor, fundus):
    from dataset_builder import synthetic

    image_processor = processor.image_processor
    retina = data.retina()
    photos = {"retina": retina, "retina_small_jpeg": _jpeg(Image.fromarray(retina).resize((160, 160)), 30),
              "drawn": fundus[0], "drawn_cut_by_frame": draw_fundus(width=240, height=160, cx=120, cy=80, radius=100)}
    looks = {}
    for item in synthetic.plan(None, 0):  # one photo of every look of the synthetic set, two sizes
        looks.setdefault(item.look or item.label, item)
    for look, item in looks.items():
        for size in (64, 128):
            photos[f"{look}_{size}"] = synthetic.render(item, size)[0]
    scores = {name: image_processor.check_fundus(photo, name) for name, photo in photos.items()}
    assert min(scores.values()) > 0.8, scores
    assert set(looks) == set(synthetic.LOOKS)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


@pytest.mark.parametrize("colour, expected", [((200, 90, 30), 1.0), ((120, 100, 80), 0.5), ((150, 150, 150), 0.0),
                                              ((60, 100, 120), 0.0), ((200, 40, 120), 0.0)])
def test_fundus_score_colour_cue_on_a_flat_disc(processor, colour, expected):
    """A flat disc on black: disc and surround cues are 1, so the score is the colour cue: the red share
    R / (R + G + B) ramped from 0.36 to 0.44, times the share of pixels ordered R >= G >= B."""
    yy, xx = np.mgrid[:120, :120]
    image = np.zeros((120, 120, 3), np.uint8)
    image[np.hypot(xx - 59.5, yy - 59.5) <= 50] = colour
    red_share = colour[0] / sum(colour)
    ordered = float(colour[0] >= colour[1] >= colour[2])
    assert np.clip((red_share - 0.36) / 0.08, 0, 1) * ordered == pytest.approx(expected)
    assert processor.image_processor.fundus_score(image) == pytest.approx(expected, abs=0.01)


def test_fundus_score_disc_cue_flags_fundus_coloured_shapes_that_are_not_discs():
    """Retinal colour on a dark surround is not enough: a cross or a flat ellipse is no field of view."""
    from image_processing_mdf_mllm import fundus_cues

    yy, xx = np.mgrid[:120, :120]
    cross, ellipse = np.zeros((120, 120, 3), np.uint8), np.zeros((120, 120, 3), np.uint8)
    cross[50:70, 10:110] = cross[10:110, 50:70] = (200, 90, 30)
    ellipse[((xx - 60) / 55) ** 2 + ((yy - 60) / 22) ** 2 <= 1] = (200, 90, 30)
    for shape in (cross, ellipse):
        cues = fundus_cues(Image.fromarray(shape))
        assert cues["surround"] == 1.0 and cues["colour"] == 1.0 and cues["disc"] < 0.1, cues
        assert MdfMllmImageProcessor().fundus_score(shape) < 0.1


def test_fundus_check_warns_instead_and_threshold_is_a_saved_setting(processor, tmp_path):
    noise = NOT_FUNDUS["noise"]()
    with pytest.warns(UserWarning, match=r"images\[3\]: does not look like a colour fundus photograph"):
        assert processor.image_processor.check_fundus(noise, "images[3]", on_failure="warn") < 0.2
    with pytest.raises(ValueError, match=r"on_failure: expected 'error' or 'warn', got 'skip'"):
        processor.image_processor.check_fundus(noise, on_failure="skip")
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    with pytest.raises(ValueError, match=rf"upload \({path}\): does not look like"):
        processor.image_processor.check_fundus(str(path), "upload")
    lenient = MdfMllmImageProcessor(fundus_threshold=0.0)
    lenient.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["fundus_threshold"] == 0.0
    assert MdfMllmImageProcessor.from_pretrained(tmp_path).check_fundus(noise) < 0.2  # no error at threshold 0
    with pytest.raises(ValueError, match=r"fundus_threshold: expected a number in \[0, 1\], got 50"):
        MdfMllmImageProcessor(fundus_threshold=50).check_fundus(noise)


def test_cut_clinical_text_warns_how_many_tokens_were_kept(processor):
    short = build_default_processor(image_size=TILE, unet_image_size=UNET, max_clinical_text_tokens=8)
    text = "Night blindness since childhood; father affected; visual fields constricted; ERG extinguished."
    total = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match=rf"clinical_text\[1\]: the clinical text \({total} tokens\) was cut to its "
                                         r"first 8 tokens \(max_clinical_text_tokens=8\)"):
        short(images=[data.retina()] * 2, clinical_text=["Short.", text])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short.build_prompt("Night blindness.")  # under the budget: no warning


def test_the_exported_model_folder_carries_the_image_processor_file(model_folder):
    """The image processor lives in its own remote-code file (as transformers keeps `image_processing_*.py`): an export
    carries it, and `auto_map` sends `AutoImageProcessor` there rather than to the processor's file."""
    folder = Path(model_folder)
    assert (folder / "image_processing_mdf_mllm.py").is_file() and (folder / "processing_mdf_mllm.py").is_file()
    config = json.loads((folder / "processor_config.json").read_text())
    image_processor_class = config["image_processor"]["auto_map"]["AutoImageProcessor"]
    assert image_processor_class == "image_processing_mdf_mllm.MdfMllmImageProcessor"
    assert config["auto_map"]["AutoProcessor"] == "processing_mdf_mllm.MdfMllmProcessor"
    source = (folder / "processing_mdf_mllm.py").read_text()
    assert "class MdfMllmImageProcessor" not in source and "def detect_field_of_view" not in source


def test_the_chat_templates_written_once_are_the_texts_they_always_were():
    """The turns are written once (processing_mdf_mllm.LLAMA3_CHAT_TURNS); the processor's template and the stock
    base's (with its system turn in front) must still be, character for character, the templates that built the
    cached bases and the exports (their sha256 before the two were joined)."""
    import hashlib

    from mdf_mllm.model_setup import BASE_CHAT_TEMPLATE
    from processing_mdf_mllm import LLAMA3_CHAT_TEMPLATE, LLAMA3_CHAT_TURNS

    assert LLAMA3_CHAT_TEMPLATE.endswith(LLAMA3_CHAT_TURNS) and BASE_CHAT_TEMPLATE.endswith(LLAMA3_CHAT_TURNS)
    digest = {name: hashlib.sha256(text.encode()).hexdigest()
              for name, text in (("mdf", LLAMA3_CHAT_TEMPLATE), ("base", BASE_CHAT_TEMPLATE))}
    assert digest == {"mdf": "b6bac74b99ad861026db900390aa0248503e5749b4cd2e8bb3410ccbcabddf41",
                      "base": "b69c362b063a7849cc0f0506b062156926420995677a0b3dce2bcaaf9b2ceddd"}
