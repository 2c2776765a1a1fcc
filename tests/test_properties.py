"""Property tests (hypothesis): random images through the processor, random configs through MdfMllmConfig, random
values of the job's numeric options through its parser.

The processor either returns inputs of the configured shapes, dtypes and finite values, or raises a ValueError with a
message; never another exception. A valid config constructs and survives a JSON round trip exactly; an invalid one
raises a ValueError naming the field. The job either runs with every option in its range or exits 2 with one line.
"""

import contextlib
import io
import json
import os
import re
import tempfile
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from configuration_mdf_mllm import DEFAULT_LABELS, DISEASE_TYPES, UNET_DEPTHS, MdfMllmConfig
from conftest import tiny_mllama_config
from mdf_mllm import main_job
from mdf_mllm.guards import OPTION_RANGES
from mdf_mllm.job import DataArguments, MdfTrainingArguments, ModelArguments, RunArguments
from processing_mdf_mllm import build_default_processor


TILE, UNET = 28, 32
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROCESSOR = build_default_processor(image_size=TILE, unet_image_size=UNET)

PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "I", "F",
             "I;16"]
CONTENTS = ["disc", "noise", "uniform", "gradient"]


def draw(width: int, height: int, content: str, seed: int) -> np.ndarray:
    """(height, width, 3) uint8: a disc of random place and size on black, noise, one colour or a ramp."""
    rng = np.random.default_rng(seed)
    if content == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if content == "uniform":
        return np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    if content == "gradient":
        return np.repeat(((xx + yy) * 255 / max(width + height - 2, 1)).astype(np.uint8)[..., None], 3, -1)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    radius = rng.uniform(0.5, max(width, height))
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[np.hypot(xx - cx, yy - cy) <= radius] = rng.integers(30, 256, 3)
    return pixels


def as_input(pixels: np.ndarray, kind: str):
    """The same pixels as a PIL image of a mode, or an array/tensor of another dtype or layout."""
    if kind in PIL_MODES:
        return Image.fromarray(pixels).convert(kind)
    return {
        "uint16 array": lambda: pixels.astype(np.uint16) * 257,
        "float chw array": lambda: pixels.transpose(2, 0, 1).astype(np.float32) / 255,
        "bool grey array": lambda: pixels.max(-1) > 127,
        "uint8 tensor": lambda: torch.from_numpy(pixels.copy()),
        "float64 grey array": lambda: pixels.mean(-1),
        "rgba array": lambda: np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], -1),
    }[kind]()


INPUT_KINDS = PIL_MODES + ["uint16 array", "float chw array", "bool grey array", "uint8 tensor", "float64 grey array",
                           "rgba array"]


@PROPERTY_SETTINGS
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    content=st.sampled_from(CONTENTS),
    kind=st.sampled_from(INPUT_KINDS),
    seed=st.integers(0, 2**16),
)
def test_any_image_gives_valid_outputs_or_a_value_error(width, height, content, kind, seed):
    image = as_input(draw(width, height, content, seed), kind)
    try:
        out = PROCESSOR(images=image, clinical_text="night blindness", return_tensors="pt")
    except ValueError as error:
        assert str(error).startswith("images[0]"), error  # names the input
        return
    assert out["pixel_values"].shape == (1, 1, 1, 3, TILE, TILE) and out["pixel_values"].dtype == torch.float32
    assert out["unet_pixel_values"].shape == (1, 3, UNET, UNET) and out["unet_pixel_values"].dtype == torch.float32
    assert out["aspect_ratio_ids"].shape == (1, 1) and out["cross_attention_mask"].shape[-2:] == (1, 1)
    for key in ("pixel_values", "unet_pixel_values"):
        assert torch.isfinite(out[key]).all(), key
    # Normalised 0..255 pixels stay within the range the normalisation can give.
    mean, std = np.array(PROCESSOR.image_processor.unet_image_mean), np.array(PROCESSOR.image_processor.unet_image_std)
    low, high = (0 - mean) / std, (1 - mean) / std
    view = out["unet_pixel_values"][0].numpy()
    assert (view >= low[:, None, None] - 1e-5).all() and (view <= high[:, None, None] + 1e-5).all()


# ----------------------------------------------------------------------------------------------------------------
# Configs

NUM_LAYERS = 6
LABEL_NAMES = [name for name, _, _ in DEFAULT_LABELS]
VERBALIZERS = [verbalizer for _, verbalizer, _ in DEFAULT_LABELS]


@st.composite
def valid_configs(draw_value):
    cross_layers = draw_value(st.lists(st.integers(0, NUM_LAYERS - 1), min_size=1, max_size=NUM_LAYERS, unique=True))
    fused = draw_value(st.lists(st.sampled_from(sorted(cross_layers)), unique=True))
    fusion_layers = {layer: draw_value(st.integers(1, UNET_DEPTHS)) for layer in fused}
    grid = draw_value(st.integers(1, 4))
    use_decoder = draw_value(st.booleans())
    multiple = grid * 8 if not use_decoder else np.lcm(grid * 8, 16)
    image_size = int(multiple * draw_value(st.integers(1, 3)))
    count = draw_value(st.integers(1, len(LABEL_NAMES)))
    labels = draw_value(st.permutations(range(len(LABEL_NAMES))))[:count]
    kwargs = dict(
        unet_config={"in_channels": draw_value(st.sampled_from([1, 3])), "base_channels": draw_value(st.integers(1, 8)),
                     "image_size": image_size, "use_decoder": use_decoder},
        fusion_layers=fusion_layers,
        fusion_grid=grid,
        projector_dim=draw_value(st.one_of(st.none(), st.integers(1, 64))),
        use_film=draw_value(st.booleans()),
        film_hidden_dim=draw_value(st.integers(1, 64)),
        seg_loss_weight=draw_value(st.floats(0, 10, allow_nan=False)),
        id2label={i: LABEL_NAMES[label] for i, label in enumerate(labels)},
        verbalizers=[VERBALIZERS[label] for label in labels],
        disease_types=[draw_value(st.sampled_from(DISEASE_TYPES)) for _ in labels],
    )
    return sorted(cross_layers), kwargs


def make_config(cross_layers, kwargs) -> MdfMllmConfig:
    base = tiny_mllama_config(cross_attention_layers=cross_layers, num_hidden_layers=NUM_LAYERS)
    return MdfMllmConfig.from_mllama_config(base, **kwargs)


@PROPERTY_SETTINGS
@given(valid_configs())
def test_valid_configs_construct_and_round_trip_through_json(case):
    cross_layers, kwargs = case
    config = make_config(cross_layers, kwargs)
    assert config.fusion_layers == kwargs["fusion_layers"]
    assert config.unet_config == kwargs["unet_config"]
    assert config.verbalizers == kwargs["verbalizers"] and config.disease_types == kwargs["disease_types"]
    assert config.label_names == list(kwargs["id2label"].values())
    text = config.to_json_string()
    loaded = MdfMllmConfig.from_dict(json.loads(text))
    assert loaded.to_json_string() == text
    assert loaded.fusion_layers == config.fusion_layers  # integer keys again


def break_config(case, how, data):
    """One invalid change to a valid config, and the start of the error message that must name the field."""
    cross_layers, kwargs = case
    kwargs = {**kwargs, "unet_config": dict(kwargs["unet_config"])}
    if how == "layer not cross-attention":
        layer = data.draw(st.integers(0, NUM_LAYERS + 3).filter(lambda layer: layer not in cross_layers))
        kwargs["fusion_layers"] = {**kwargs["fusion_layers"], layer: 1}
        return kwargs, f"fusion_layers: layer {layer} is not a cross-attention layer"
    if how == "depth out of range":
        depth = data.draw(st.one_of(st.integers(-3, 0), st.integers(UNET_DEPTHS + 1, 9)))
        kwargs["fusion_layers"] = {cross_layers[0]: depth}
        return kwargs, f"fusion_layers: layer {cross_layers[0]} maps to depth {depth}"
    if how == "grid does not tile":
        grid = kwargs["fusion_grid"]
        size = data.draw(st.integers(8, 512).filter(lambda size: size % (grid * 8)))
        kwargs["unet_config"]["image_size"] = size
        return kwargs, f"unet_config.image_size: {size} must be divisible by fusion_grid"
    if how == "decoder needs 16":
        kwargs["unet_config"].update(use_decoder=True, image_size=8 * data.draw(st.integers(0, 20)) * 2 + 8)
        kwargs["fusion_grid"] = 1
        return kwargs, "unet_config.image_size: .* must be divisible by 16"
    if how == "verbalizer count":
        kwargs["verbalizers"] = kwargs["verbalizers"] + ["extra answer"]
        return kwargs, f"verbalizers: {len(kwargs['verbalizers'])} entries for {len(kwargs['id2label'])} labels"
    if how == "duplicate verbalizer":
        assume(len(kwargs["verbalizers"]) >= 2)
        kwargs["verbalizers"] = [kwargs["verbalizers"][0]] + kwargs["verbalizers"][:-1]
        return kwargs, "verbalizers: duplicate verbalizers"
    if how == "unknown disease type":
        kwargs["disease_types"] = ["viral"] + kwargs["disease_types"][1:]
        return kwargs, r"disease_types: \['viral'\]"
    raise AssertionError(how)


BREAKS = ["layer not cross-attention", "depth out of range", "grid does not tile", "decoder needs 16",
          "verbalizer count", "duplicate verbalizer", "unknown disease type"]


@PROPERTY_SETTINGS
@given(case=valid_configs(), how=st.sampled_from(BREAKS), data=st.data())
def test_invalid_configs_raise_a_value_error_naming_the_field(case, how, data):
    kwargs, message = break_config(case, how, data)
    with pytest.raises(ValueError, match=message):
        make_config(case[0], kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The job's options (train_hf.py)


def numeric_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if re.search(r"\b(int|float)\b", str(f.type)) and "bool" not in str(f.type)]


def test_every_numeric_option_of_the_job_has_a_range():
    ours = [name for cls in (ModelArguments, DataArguments, RunArguments) for name in numeric_fields(cls)]
    ours += [name for name in numeric_fields(MdfTrainingArguments) if name in vars(MdfTrainingArguments)]
    assert sorted(set(ours) - set(OPTION_RANGES)) == []
    every = {name for cls in (ModelArguments, DataArguments, RunArguments, MdfTrainingArguments)
             for name in numeric_fields(cls)}
    assert sorted(set(OPTION_RANGES) - every) == []  # no range for an option that does not exist


OPTION_VALUES = st.one_of(
    st.integers(-(2**64), 2**64),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "0x10", "1_000", "2.5", "-0"]),
).map(str)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(sorted(OPTION_RANGES)), OPTION_VALUES, min_size=1, max_size=3))
def test_any_numeric_option_values_give_one_line_and_exit_2_or_a_run(values):
    argv = [arg for name, value in values.items() for arg in (f"--{name}", value)]
    started, original = [], main_job.run
    main_job.run = lambda job, phases=None: started.append(job)
    err = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(err):
            main_job.main(["--model_size", "tiny", *argv, "--output_dir", os.path.join(folder, "out")])
    except SystemExit as stop:
        assert stop.code == 2 and not started, (argv, err.getvalue())
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("train_hf.py: error: "), err.getvalue()
        return
    finally:
        main_job.run = original
    (job,) = started
    for name, value in values.items():
        parsed = next(getattr(part, name) for part in (job.model, job.data, job.run, job.training)
                      if hasattr(part, name))
        assert OPTION_RANGES[name].accepts(parsed), (name, value, parsed)
