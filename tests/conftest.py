"""Shared fixtures: tiny Mllama / MDF-MLLM layouts that build and run in well under a second on a CPU."""

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import MllamaConfig  # noqa: E402

import configuration_mdf_mllm  # noqa: E402
from dataset_builder import render_fundus, resolve_label  # noqa: E402


# The tiny layout is written once, in configuration_mdf_mllm.LAYOUTS (what `--model_size tiny` builds); the tests'
# models are it, with their own vocabulary, FiLM MLPs of width 8 rather than the job's 64 (1% of a tiny model's
# weights rather than 8%) and, per test, other heads or cross-attention layers (LAYOUTS).
TINY = configuration_mdf_mllm.LAYOUTS["tiny"]["mllama"]
TINY_MDF = {**configuration_mdf_mllm.LAYOUTS["tiny"]["mdf"], "film_hidden_dim": 8}


def tiny_mllama_config(
    cross_attention_layers=tuple(TINY["text"]["cross_attention_layers"]),
    num_attention_heads=TINY["text"]["num_attention_heads"],
    num_key_value_heads=TINY["text"]["num_key_value_heads"],
    vision_image_size=TINY["tile"],
    max_num_tiles=1,
    vocab_size=96,
    hidden_size=TINY["text"]["hidden_size"],
    num_hidden_layers=TINY["text"]["num_hidden_layers"],
) -> MllamaConfig:
    """A Mllama of the 11B layout's shape, shrunk: vision tiles of `vision_image_size` px (patch 14)."""
    supported = [[1, 1]] if max_num_tiles == 1 else [[1, 1], [1, 2], [2, 1], [2, 2]][: max_num_tiles + 1]
    vision = dict(
        **TINY["vision"],
        image_size=vision_image_size,
        patch_size=14,
        max_num_tiles=max_num_tiles,
        supported_aspect_ratios=supported,
        intermediate_layers_indices=[0],
        vision_output_dim=2 * TINY["vision"]["hidden_size"],
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=TINY["text"]["intermediate_size"],
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        cross_attention_layers=list(cross_attention_layers),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        max_position_embeddings=256,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size)


# Two layouts that differ in cross-attention indices, head counts (GQA) and vision size.
LAYOUTS = {
    "a": dict(cross_attention_layers=(1, 3), num_attention_heads=4, num_key_value_heads=2, vision_image_size=28),
    "b": dict(
        cross_attention_layers=(1, 2, 4),
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_image_size=42,
        num_hidden_layers=5,
        hidden_size=64,
    ),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The caches the code under test writes (synthetic set, cached base): under pytest's temporary folder, never the user's
# ~/.cache/mdf_mllm, so a stale cache from an older generator can neither hide a change nor be overwritten by a test.
CACHE_VARIABLES = ("MDF_MLLM_DATA_CACHE", "MDF_MLLM_BASE_CACHE")


@pytest.fixture(scope="session", autouse=True)
def _caches_in_tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    for name in CACHE_VARIABLES:
        os.environ[name] = str(root / name.lower())  # subprocesses the tests start inherit them
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def missing(reason: str):
    """A requirement that CI installs is missing: skip with `reason` locally, fail under CI=true (no silent skip)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, install: str):
    """Import and return module `name`; missing, see `missing` (`install` says how to get it)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"needs {name} ({install}): {error}")


def require_program(name: str, install: str) -> str:
    """The path of executable `name` on PATH; missing, see `missing`."""
    path = shutil.which(name)
    if path is None:
        missing(f"needs the program {name} on PATH ({install})")
    return path


def mdf_config(layout: str = "a", **mdf_kwargs):
    """The MDF config of tiny layout `layout`: tiny U-Net (S=32), 2x2 grid."""
    from configuration_mdf_mllm import MdfMllmConfig

    return MdfMllmConfig.from_mllama_config(tiny_mllama_config(**LAYOUTS[layout]), **{**TINY_MDF, **mdf_kwargs})


def make_inputs(config, batch=2, length=9, image_at=3, seed=0):
    """Random token ids with the image token at `image_at`, one 1-tile image per row, and the U-Net view."""
    generator = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    input_ids = torch.randint(3, text.vocab_size, (batch, length), generator=generator)
    input_ids[:, image_at] = config.image_token_index
    cross_attention_mask = torch.zeros(batch, length, 1, vision.max_num_tiles, dtype=torch.long)
    cross_attention_mask[:, image_at:, 0, 0] = 1
    size = vision.image_size
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones(batch, length, dtype=torch.long),
        cross_attention_mask=cross_attention_mask,
        pixel_values=torch.randn(batch, 1, vision.max_num_tiles, 3, size, size, generator=generator),
        aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),
        aspect_ratio_mask=torch.nn.functional.pad(torch.ones(batch, 1, 1, dtype=torch.long), (0, vision.max_num_tiles - 1)),
    )
    if hasattr(config, "unet_config"):
        unet_size = config.unet_config["image_size"]
        inputs["unet_pixel_values"] = torch.randn(batch, 3, unet_size, unet_size, generator=generator)
    return inputs


def move_off_init(model, value=0.5):
    """Set every zero-initialised gate and FiLM output layer non-zero, as training would."""
    for name, param in model.named_parameters():
        if name.endswith(("_gate", ".gate", "mlp.2.weight", "mlp.2.bias")) and ("film" in name or "gate" in name):
            with torch.no_grad():
                param.copy_(value * torch.randn_like(param) if "film" in name else torch.full_like(param, value))


def launch_two_cpu_processes(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run an `accelerate launch` over two gloo processes on a free loopback port. Tried twice: in this sandbox a gloo
    process now and then aborts (SIGABRT) while connecting, before any of our code runs. (Under FSDP one can also abort
    during interpreter finalization, after its work: the scripts launched here end with `os._exit`.)"""
    for attempt in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", port]
        result = subprocess.run([*launch, *command], capture_output=True, text=True, timeout=300, **kwargs)
        if result.returncode == 0 or "SIGABRT" not in result.stderr:
            return result
    return result


def export_tiny_model(folder) -> str:
    """A tiny MDF-MLLM with open gates, exported as training exports one: model + processor + pipeline + Endpoints
    handler in `folder`, and the list of the files written."""
    from configuration_mdf_mllm import MdfMllmConfig
    from mdf_mllm.export import EXPORT_MANIFEST, HANDLER_SOURCE, files_in
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration
    from pipeline_mdf_mllm import register_pipeline
    from processing_mdf_mllm import build_default_processor

    processor = build_default_processor(image_size=TINY["tile"],
                                        unet_image_size=TINY_MDF["unet_config"]["image_size"])
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    base = tiny_mllama_config(vocab_size=image_id)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(
        base,
        **TINY_MDF,
        verbalizer_token_ids=processor.verbalizer_token_ids,
        image_token_index=image_id,
    )
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    register_pipeline(folder)
    shutil.copyfile(HANDLER_SOURCE, Path(folder) / "handler.py")
    (Path(folder) / EXPORT_MANIFEST).write_text(json.dumps({"files": sorted(files_in(Path(folder)))}))
    return str(folder)


MARKER_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")  # transformers runs a copy of this file from its modules cache
from .modeling_mdf_mllm import *  # noqa: F401,F403
from .configuration_mdf_mllm import *  # noqa: F401,F403
from .processing_mdf_mllm import *  # noqa: F401,F403
from .image_processing_mdf_mllm import *  # noqa: F401,F403
from .pipeline_mdf_mllm import *  # noqa: F401,F403
"""


def injected_export(model_folder, root, listed: bool):
    """A copy of the export whose every `auto_map` (and custom pipeline) names `injected.py`, a module that writes
    `root/marker` when imported; `listed`: also added to export_files.json, as a careful attacker would."""
    from mdf_mllm.export import EXPORT_MANIFEST

    folder = shutil.copytree(model_folder, root / "model")
    (folder / "injected.py").write_text(MARKER_MODULE.format(marker=str(root / "marker")))
    for config in set(folder.glob("*.json")) - {folder / EXPORT_MANIFEST}:
        text = config.read_text()
        for module in ("configuration", "modeling", "processing", "image_processing", "pipeline"):
            text = text.replace(f'"{module}_mdf_mllm.', '"injected.')
        config.write_text(text)
    assert '"injected.' in (folder / "config.json").read_text()
    if listed:
        written = json.loads((folder / EXPORT_MANIFEST).read_text())
        (folder / EXPORT_MANIFEST).write_text(json.dumps({"files": written["files"] + ["injected.py"]}))
    return folder


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """An exported folder holding only the exported files, loaded with no hub access."""
    return export_tiny_model(tmp_path_factory.mktemp("exported") / "mdf-mllm-tiny")


@pytest.fixture(scope="session")
def classifier(model_folder):
    from transformers import pipeline

    from pipeline_mdf_mllm import TASK

    return pipeline(TASK, model=model_folder, trust_remote_code=True, device="cpu")


# The main job on 40 synthetic 64 px photos, and its stages kept short (test_main_job.py and the tests of its parts).
TINY_JOB = [
    "--model_size", "tiny",
    "--num_images", "40",
    "--image_size", "64",
    "--per_device_train_batch_size", "8",
    "--n_bootstrap", "50",
    "--logging_steps", "1",
]  # fmt: skip
TINY_STAGES = ["--num_train_epochs", "1", "--base_epochs", "2", "--stage1_epochs", "12", "--stage1_learning_rate", "1e-2"]


@pytest.fixture(scope="session")
def tiny_data():
    """The 40-photo set through the MDF processor of the tiny layout (a base's processor has the same settings)."""
    from mdf_mllm import main_job as job, model_setup, training
    from mdf_mllm.job import ModelArguments

    model_args = ModelArguments(model_size="tiny")
    processor = model_setup.mdf_processor(model_setup.stock_processor("tiny"), 32)
    data_args = job.parse_arguments(TINY_JOB).data
    dataset = training.load_data(data_args)
    return model_args, processor, dataset, training.process_splits(dataset, processor, no_text=False)


@pytest.fixture(scope="session")
def made_base(tmp_path_factory):
    """A base made by `--make_base` (one epoch), under made_base / "base"."""
    from mdf_mllm import main_job as job

    out = tmp_path_factory.mktemp("make-base")
    job.main([*TINY_JOB, "--make_base", "--base_epochs", "1", "--output_dir", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny():
    """A tiny MDF-MLLM with trained-looking gates, FiLM and value projections, its processor, and the 40-photo
    synthetic set's train split processed with and without answers."""
    from configuration_mdf_mllm import MdfMllmConfig
    from dataset_builder import load
    from mdf_mllm import training
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration
    from processing_mdf_mllm import build_default_processor

    processor = build_default_processor(image_size=28, unet_image_size=32)
    tokenizer = processor.tokenizer
    base = tiny_mllama_config(vocab_size=tokenizer.convert_tokens_to_ids("<|image|>"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(base, **TINY_MDF, image_token_index=base.image_token_index)
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    for branch in training.unet_branches(model).values():
        torch.nn.init.normal_(branch.value_projection.weight, std=0.1)
    split = load("synthetic", num_images=40, image_size=64, seed=0)["train"]
    answered = training.ProcessedSplit(split, processor, with_answers=True)
    prompts = training.ProcessedSplit(split, processor, with_answers=False)
    return model, processor, answered, prompts


# Tiny fake trees of every layout the readers read (test_sources.py, test_builder.py), from real pixels
# (`skimage.data.retina()` at 64 px) and synthetic ones, with real masks, a corrupt file, a zero-byte file, an unknown
# suffix and a StoneRounds case with three images.
SIZE = 64


def _retina() -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.retina()).resize((SIZE, SIZE), Image.BILINEAR))


def _synthetic(label: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return render_fundus(label, np.random.default_rng(seed), SIZE)


_SEEDS = iter(range(1000, 2000))  # every fake photo its own seed, so the only duplicate is the planted one


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _truncated_png(path):
    _save(path, _synthetic("dr", 99)[0])
    with open(path, "rb") as f:
        head = f.read()[:200]
    with open(path, "wb") as f:
        f.write(head)


def make_fives(root) -> dict:
    """FIVES tree: train (Groud-truth spelling) and test (Ground truth); returns expected {case_id: label}."""
    expected = {}
    for split, folder, names in (
        ("train", "Groud truth", ["1_A", "2_D", "3_G", "4_N", "7_A", "8_D", "9_G", "10_N"]),
        ("test", "Ground truth", ["1_A", "2_N"]),
    ):
        for k, stem in enumerate(names):
            label = {"A": "amd", "D": "dr", "G": "glaucoma", "N": "normal"}[stem[-1]]
            image, mask = _synthetic(label, next(_SEEDS))
            if (split, stem) in (("train", "4_N"), ("test", "2_N")):
                image = _retina()  # the same photo in train and test: a duplicate the report must list
            _save(os.path.join(root, split, "Original", f"{stem}.png"), image)
            _save(os.path.join(root, split, folder, f"{stem}.png"), mask)
            expected[f"fives/{split}/{stem}"] = label
    _truncated_png(os.path.join(root, "train", "Original", "5_D.png"))
    open(os.path.join(root, "test", "Original", "3_G.png"), "wb").close()  # zero bytes
    with open(os.path.join(root, "train", "Original", "notes.txt"), "w") as f:
        f.write("not an image")
    _save(os.path.join(root, "train", "Original", "6_X.png"), _retina())  # unknown class letter
    return expected


def make_hrf(root) -> dict:
    """HRF tree under all/, upper-case .JPG for DR, TIFF vessel masks; 5 patients x (h, dr, g)."""
    expected = {}
    for patient in range(1, 6):
        for suffix, label, ext in (("h", "normal", "jpg"), ("dr", "dr", "JPG"), ("g", "glaucoma", "jpg")):
            stem = f"{patient:02d}_{suffix}"
            image, mask = _synthetic(label, next(_SEEDS))
            _save(os.path.join(root, "all", "images", f"{stem}.{ext}"), image, format="JPEG", quality=95)
            _save(os.path.join(root, "all", "manual1", f"{stem}.tif"), mask)
            _save(os.path.join(root, "all", "mask", f"{stem}_mask.tif"), (mask * 0 + 255).astype(np.uint8))
            expected[stem] = (label, f"hrf/{patient:02d}")
    return expected


STONEROUNDS_CASES = {
    # case_id: (case.json, number of images)
    "rp_1": ({"diagnosis": "Retinitis pigmentosa", "age": 34, "sex": "male", "history": "Night blindness.",
              "gene": "RHO"}, 3),
    "rp_2": ({"diagnosis": "retinitis_pigmentosa", "history": "Field loss."}, 1),
    "rp_3": ({"diagnosis": "RETINITIS PIGMENTOSA", "age": 20}, 1),
    "stgd_1": ({"diagnosis": "Stargardt disease", "age": 12, "sex": "female", "gene": "ABCA4"}, 2),
    "chm_1": ({"diagnosis": "Choroideremia", "sex": "male"}, 1),
    "best_1": ({"diagnosis": "Best vitelliform macular dystrophy", "history": "Yolk lesion.", "gene": "BEST1"}, 1),
    "coats_1": ({"diagnosis": "Coats disease"}, 1),  # unknown: skipped and reported
}


STONEROUNDS_TEXTS = {
    "rp_1": "34-year-old male. Night blindness. Gene: RHO.",
    "rp_2": "Field loss.",
    "rp_3": "Age 20.",
    "stgd_1": "12-year-old female. Gene: ABCA4.",
    "chm_1": "Sex: male.",
    "best_1": "Yolk lesion. Gene: BEST1.",
}


def make_stonerounds(root) -> None:
    for case_id, (case, num_images) in STONEROUNDS_CASES.items():
        folder = os.path.join(root, case_id)
        os.makedirs(folder)
        with open(os.path.join(folder, "case.json"), "w") as f:
            json.dump(case, f)
        label = resolve_label(case["diagnosis"]) or "normal"
        for eye in range(num_images):
            _save(os.path.join(folder, f"image_{eye}.png"), _synthetic(label, next(_SEEDS))[0])


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths = {name: str(root / name) for name in ("fives", "hrf", "stonerounds")}
    expected = {"fives": make_fives(paths["fives"]), "hrf": make_hrf(paths["hrf"])}
    make_stonerounds(paths["stonerounds"])
    return paths, expected
