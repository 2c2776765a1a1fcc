"""`train_hf.py --make_base` records the base's layout; `--base_model` with that base gets MDF modules of the same
layout (not the 11B defaults), and for any other base the job says which sizes it chose before training. Every layout
builds the model it built before the layouts were one table."""

import json
import shutil

import pytest

from configuration_mdf_mllm import LAYOUTS
from mdf_mllm import model_setup, stage1, stages, main_job as job
from mdf_mllm.job import ModelArguments


TINY_DATA = ["--num_images", "40", "--image_size", "64"]
TINY_LINE = ("MDF modules: U-Net 32 px of base width 4, fusion grid 2x2, projector 8 (the tiny layout); --model_size, "
             "--unet_image_size and --fusion_grid change them")
DEFAULT_LINE = ("MDF modules: U-Net 512 px of base width 32, fusion grid 16x16, projector 256 (the defaults for Llama "
                "3.2 11B Vision); --model_size, --unet_image_size and --fusion_grid change them")

# What the job built in each layout before configuration_mdf_mllm.LAYOUTS held them (91cd294), written out here as an
# independent check. The MDF modules: U-Net, fusion grid, projector and FiLM widths.
UNET = dict(in_channels=3, use_decoder=True)
MDF_SIZES = {
    "tiny": (dict(UNET, base_channels=4, image_size=32), 2, 8, 64),
    "small": (dict(UNET, base_channels=16, image_size=128), 8, 64, 64),
    "11b": (dict(UNET, base_channels=32, image_size=512), 16, 256, 256),
}
# The Mllama the job builds (from scratch, or as a base): vision tile, hidden and intermediate sizes, layers, global
# layers, heads, output width; text hidden and intermediate sizes, layers, heads, KV heads, cross-attention layers.
MLLAMA = {
    "tiny": ((28, 16, 32, 2, 1, 2, 32), (32, 64, 4, 4, 2, [1, 3])),
    "small": ((112, 64, 128, 2, 1, 2, 128), (128, 256, 8, 4, 2, [1, 3, 5, 7])),
}
# What every such Mllama shares: patch, tiles, aspect ratios, intermediate vision layers; the offline tokenizer's
# vocabulary (`<|image|>` its last id), positions, image, BOS, EOS and pad ids.
MLLAMA_COMMON = (14, 1, [[1, 1]], [0], 2843, 2048, 2843, 2836, 2840, 2842)


def mllama_shape(config) -> tuple:
    vision, text = config.vision_config, config.text_config
    return ((vision.image_size, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers,
             vision.num_global_layers, vision.attention_heads, vision.vision_output_dim),
            (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
             text.num_key_value_heads, text.cross_attention_layers))


def mllama_common(config) -> tuple:
    vision, text = config.vision_config, config.text_config
    return (vision.patch_size, vision.max_num_tiles, vision.supported_aspect_ratios,
            vision.intermediate_layers_indices, text.vocab_size, text.max_position_embeddings,
            config.image_token_index, text.bos_token_id, text.eos_token_id, text.pad_token_id)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny base as `--make_base` writes it (untrained: the layout is what matters), and a copy without its record
    (any other local Mllama checkpoint)."""
    out = tmp_path_factory.mktemp("make-base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "train_model", lambda *args, **kwargs: None)
        job.main(["--make_base", "--model_size", "tiny", "--base_epochs", "3", *TINY_DATA, "--output_dir",
                       str(out)])
    other = shutil.copytree(out / "base", out / "other")
    # missing_ok: a base made without its record fails test_make_base_records_its_layout, not this fixture
    (other / model_setup.BASE_RECORD_FILE).unlink(missing_ok=True)
    return out / "base", other


def test_make_base_records_its_layout(bases):
    made, _ = bases
    record = json.loads((made / model_setup.BASE_RECORD_FILE).read_text())
    assert record == {"model_size": "tiny", "epochs": 3.0, "dataset": "synthetic"}
    assert model_setup.describe_base(str(made)) == (
        "a stock Mllama of this repository's tiny layout, trained from scratch by `train_hf.py --make_base` for 3 "
        "epochs on the synthetic data (no pretrained weights)")
    assert model_setup.describe_base(str(bases[1])) is None


def test_base_model_made_here_gets_mdf_modules_of_its_layout(bases):
    made, other = bases
    model_args = ModelArguments(base_model=str(made))
    assert model_setup.mdf_layout(model_args) == ("tiny", LAYOUTS["tiny"]["mdf"])
    processor = model_setup.base_processor(model_args)
    assert processor.image_processor.unet_image_size == 32
    config = model_setup.build_model(model_args, processor).config
    assert (config.unet_config["image_size"], config.unet_config["base_channels"], config.fusion_grid,
            config.projector_dim) == (32, 4, 2, 8)
    assert model_setup.describe_mdf_sizes(model_args) == TINY_LINE
    # --model_size still wins; any other base gets the config's (11B) defaults, said as such.
    small = ModelArguments(base_model=str(made), model_size="small")
    assert model_setup.mdf_layout(small) == ("small", LAYOUTS["small"]["mdf"])
    assert model_setup.mdf_layout(ModelArguments(base_model=str(other))) == ("11b", {})
    assert model_setup.describe_mdf_sizes(ModelArguments(base_model=str(other))) == DEFAULT_LINE
    grid = ModelArguments(base_model=str(other), unet_image_size=64, fusion_grid=4)
    assert model_setup.describe_mdf_sizes(grid).startswith("MDF modules: U-Net 64 px of base width 32, fusion grid "
                                                           "4x4, projector 256 (")


@pytest.mark.parametrize("which, line", [(0, TINY_LINE), (1, DEFAULT_LINE)], ids=["made-here", "other-base"])
def test_the_job_says_which_mdf_sizes_it_chose_before_training(bases, which, line, tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def no_stage_1(*args):
        raise Stop

    monkeypatch.setattr(stage1, "run", no_stage_1)  # the first training after the sizes are chosen
    with pytest.raises(Stop):
        job.main(["--base_model", str(bases[which]), *TINY_DATA, "--output_dir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1] == line


@pytest.mark.parametrize("options, base, layout, mllama", [
    (dict(model_size="tiny"), None, "tiny", "tiny"),
    (dict(), None, "small", "small"),
    (dict(), 0, "tiny", "tiny"),
    (dict(model_size="small"), 0, "small", "tiny"),
    (dict(), 1, "11b", "tiny"),
], ids=["tiny-from-scratch", "small-from-scratch", "base-made-here", "small-on-a-tiny-base", "other-base"])
def test_every_layout_builds_the_model_it_built(bases, options, base, layout, mllama):
    model_args = ModelArguments(base_model=None if base is None else str(bases[base]), **options)
    processor = (model_setup.base_processor(model_args) if model_args.base_model else
                 model_setup.default_processor(model_args))
    config = model_setup.build_model(model_args, processor).config
    assert (config.unet_config, config.fusion_grid, config.projector_dim, config.film_hidden_dim) == MDF_SIZES[layout]
    assert processor.image_processor.unet_image_size == MDF_SIZES[layout][0]["image_size"]
    assert processor.image_processor.size["height"] == MLLAMA[mllama][0][0]
    assert (mllama_shape(config), mllama_common(config)) == (MLLAMA[mllama], MLLAMA_COMMON)
