"""mdf_mllm/cli.py: command-line options in one style across `train_hf.py`, `mdf-mllm` and `python -m
dataset_builder`: help shows each long option once, with underscores (as train_hf.py's, from HfArgumentParser); the
hyphenated spelling is accepted too, with `=value` and abbreviations, and means the same."""

import re

import pytest

from dataset_builder import __main__ as builder_cli
from mdf_mllm import cli
from mdf_mllm import main_job as job


HYPHENATED = re.compile(r"(?<![\w-])--[a-z0-9]+(?:_[a-z0-9]+)*-[a-z0-9]")


def help_of(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("parse, argv", [
    (cli.parse_args, ["predict", "--help"]),
    (cli.parse_args, ["explain", "--help"]),
    (builder_cli.parse_args, ["build", "--help"]),
    (builder_cli.parse_args, ["preview", "--help"]),
    (job.parse_arguments, ["--help"]),
], ids=["mdf-mllm predict", "mdf-mllm explain", "dataset_builder build", "dataset_builder preview", "train_hf.py"])
def test_help_shows_every_long_option_once_with_underscores(parse, argv, capsys):
    text = help_of(parse, argv, capsys)
    options = re.findall(r"(?<![\w-])--\w+", text)
    assert options and HYPHENATED.findall(text) == []
    if parse is job.parse_arguments:
        # HfArgumentParser registers `--data-dir` beside `--data_dir`: only the one is listed.
        assert "--data_dir" in text and "--per_device_train_batch_size" in text and "--data-dir" not in text
    if parse is cli.parse_args and "predict" in argv:
        assert "--top_k" in text and "--no_fundus_check" in text


def test_both_spellings_mean_the_same(tmp_path):
    same = [
        (cli.parse_args, ["predict", "a.png", "--model", "m", "--top_k", "3", "--batch_size", "2", "--no_fundus_check"],
         ["predict", "a.png", "--model", "m", "--top-k=3", "--batch", "2", "--no-fundus-check"]),
        (builder_cli.parse_args, ["build", "--data_dir", "d", "--num_images", "8", "--out", "o", "--max_shard_mb", "5"],
         ["build", "--data-dir", "d", "--num-images=8", "--out", "o", "--max-shard-mb", "5"]),
        (builder_cli.parse_args, ["preview", "--per_class", "2", "--out", "p.png"],
         ["preview", "--per-class", "2", "--out", "p.png"]),
    ]
    for parse, underscores, hyphens in same:
        assert vars(parse(hyphens)) == vars(parse(underscores))
    out = str(tmp_path)
    assert job.parse_arguments(["--output_dir", out, "--data-dir", "d", "--unet-gate-start", "0.25"]) == \
        job.parse_arguments(["--output_dir", out, "--data_dir", "d", "--unet_gate_start", "0.25"])


def test_the_dataset_command_line_speaks_the_jobs_option_names_and_still_takes_its_old_ones():
    new = builder_cli.parse_args(["build", "--dataset", "manifest", "--dataset_seed", "3", "--output_dir", "o",
                                  "--data_dir", "d"])
    old = builder_cli.parse_args(["build", "--source", "manifest", "--seed", "3", "--out", "o", "--data_dir", "d"])
    assert vars(new) == vars(old) and (new.source, new.seed, new.out) == ("manifest", 3, "o")
    settings = job.parse_arguments(["--dataset", "manifest", "--dataset_seed", "3", "--output_dir", "o", "--data_dir",
                                    "d"])
    assert (settings.data.dataset, settings.data.dataset_seed, settings.training.output_dir) == ("manifest", 3, "o")
    preview = builder_cli.parse_args(["preview", "--dataset", "synthetic", "--dataset_seed", "2", "--out", "p.png"])
    assert (preview.source, preview.seed) == ("synthetic", 2)


def test_values_and_what_follows_a_double_dash_are_left_as_they_are():
    args = cli.parse_args(["predict", "--model", "m", "--text", "a-b", "--", "--top-k"])
    assert args.images == ["--top-k"] and args.text == "a-b" and args.top_k is None
