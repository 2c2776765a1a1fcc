"""`train_hf.py --make_base` records the base's layout; `--base_model` with that base gets MDF modules of the same
layout (not the 11B defaults), and for any other base the job says which sizes it chose before training."""

import json
import shutil

import pytest

from mdf_mllm import model_setup, stage1, stages, train as job
from mdf_mllm.job import ModelArguments


TINY_DATA = ["--num_images", "40", "--image_size", "64"]
TINY_LINE = ("MDF modules: U-Net 32 px of base width 4, fusion grid 2x2, projector 8 (the tiny layout); --model_size, "
             "--unet_image_size and --fusion_grid change them")
DEFAULT_LINE = ("MDF modules: U-Net 512 px of base width 32, fusion grid 16x16, projector 256 (the defaults for Llama "
                "3.2 11B Vision); --model_size, --unet_image_size and --fusion_grid change them")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny base as `--make_base` writes it (untrained: the layout is what matters), and a copy without its record
    (any other local Mllama checkpoint)."""
    out = tmp_path_factory.mktemp("make-base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "train", lambda *args, **kwargs: None)
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
    assert model_setup.mdf_sizes(model_args) == model_setup.layout_sizes("tiny")
    processor = model_setup.base_processor(model_args)
    assert processor.image_processor.unet_image_size == 32
    config = model_setup.build_model(model_args, processor).config
    assert (config.unet_config["image_size"], config.unet_config["base_channels"], config.fusion_grid,
            config.projector_dim) == (32, 4, 2, 8)
    assert model_setup.describe_mdf_sizes(model_args) == TINY_LINE
    # --model_size still wins; any other base gets the config's (11B) defaults, said as such.
    small = ModelArguments(base_model=str(made), model_size="small")
    assert model_setup.mdf_sizes(small) == model_setup.layout_sizes("small")
    assert model_setup.mdf_sizes(ModelArguments(base_model=str(other))) == {}
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
