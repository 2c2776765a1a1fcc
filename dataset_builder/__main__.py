"""Command line: build a dataset into Parquet shards (or an ImageFolder) with its split report, or draw a preview.

    python -m dataset_builder build --dataset all --fives FIVES --hrf HRF --stonerounds StoneRounds \
        --output_dir data/mdf
    python -m dataset_builder build --dataset synthetic --num_images 200 --image_size 256 --dataset_seed 1 \
        --output_dir data/syn
    python -m dataset_builder build --dataset manifest --data_dir my_folder --output_dir data/mine --format imagefolder
    python -m dataset_builder preview --dataset synthetic --out sheet.png

The options are the training job's (train_hf.py): --dataset, --dataset_seed, --output_dir; the earlier --source,
--seed and (build) --out are still accepted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from mdf_mllm.messages import OneLineParser, number_in, shown

from .builder import build, config_names, export_imagefolder, export_parquet, export_problem, write_report
from .preview import contact_sheet
from .sources import LABEL_NAMES, PAPER_SOURCES, SOURCES, SPLITS
from .synthetic import generate


MIN_IMAGE_SIZE = 32  # the smallest photo the synthetic renderer draws a fundus on


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", "--source", dest="source", choices=config_names(), default="synthetic",
                        help="which config to build")
    for name in PAPER_SOURCES:
        parser.add_argument(f"--{name}", help=SOURCES[name].layout)
    parser.add_argument(
        "--data_dir", help="the source's folder (single-source configs) or an image folder with metadata.jsonl"
    )
    parser.add_argument("--dataset_seed", "--seed", dest="seed", type=number_in(int, 0), default=0,
                        help="seed of the synthetic set and of the splits")
    parser.add_argument("--num_images", type=number_in(int, 1),
                        help="synthetic: total images (default: the paper's 1,305 mix)")
    parser.add_argument("--image_size", type=number_in(int, MIN_IMAGE_SIZE), default=512,
                        help=f"synthetic: side in pixels (at least {MIN_IMAGE_SIZE})")
    parser.add_argument("--cache_dir", help="where the builder caches Arrow files")
    parser.add_argument("--num_workers", type=number_in(int, 1),
                        help="decoding / rendering threads (default: the CPU count)")


def _source_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {
        **{name: getattr(args, name) for name in PAPER_SOURCES},
        "data_dir": args.data_dir,
        "seed": args.seed,
        "cache_dir": args.cache_dir,
        "num_workers": args.num_workers,
    }
    if args.source == "synthetic":
        kwargs.update(num_images=args.num_images, image_size=args.image_size)
    return kwargs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m dataset_builder", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build a dataset and export it")
    _add_source_arguments(build_parser)
    build_parser.add_argument("--output_dir", "--out", dest="out", required=True, help="output folder")
    build_parser.add_argument("--format", choices=("parquet", "imagefolder"), default="parquet")
    fraction = number_in(float, 0.0, 1.0, high_open=True)
    build_parser.add_argument("--test_size", type=fraction, default=0.2, help="fraction of cases held out for test")
    build_parser.add_argument("--validation_size", type=fraction, default=0.1,
                              help="fraction of the remaining training cases held out for validation")
    build_parser.add_argument("--max_shard_mb", type=number_in(int, 1), default=500, help="Parquet shard size")
    build_parser.add_argument("--push_to_hub", metavar="REPO", help="also push the DatasetDict to this Hub repo")
    preview_parser = commands.add_parser("preview", help="draw a contact sheet of examples per class with masks")
    _add_source_arguments(preview_parser)
    preview_parser.add_argument("--out", required=True, help="PNG file to write")
    preview_parser.add_argument("--per_class", type=number_in(int, 1), default=4)
    # a synthetic sheet renders its photos at twice the thumbnail's side
    preview_parser.add_argument("--thumb", type=number_in(int, MIN_IMAGE_SIZE // 2), default=128,
                                help=f"thumbnail side in pixels (at least {MIN_IMAGE_SIZE // 2})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        if args.command == "build":
            _build(args)
        else:
            _preview(args)
    except (ValueError, OSError) as error:  # bad or unreadable input: one line, no traceback
        print(f"error: {shown(error)}", file=sys.stderr)
        return 2
    return 0


def _build(args: argparse.Namespace) -> None:
    problem = export_problem(args.out)
    if problem:  # found before the build, not after it
        raise ValueError(problem)
    dataset, report = build(
        args.source, test_size=args.test_size, validation_size=args.validation_size, **_source_kwargs(args)
    )
    if args.format == "parquet":
        export_parquet(dataset, args.out, args.max_shard_mb * 2**20)
    else:
        export_imagefolder(dataset, args.out)
    write_report(report, args.out)
    empty = " (empty: not written, the export loads without it)" if args.format == "parquet" else " (empty)"
    totals = ", ".join(f"{split} {count}" + ("" if count else empty) for split, count in report["totals"].items())
    print(f"wrote {args.out} ({args.format}): {totals}; {report['num_skipped']} files skipped "
          f"(see {os.path.join(args.out, 'split_report.md')})")
    if args.push_to_hub:
        dataset.push_to_hub(args.push_to_hub)


def _preview(args: argparse.Namespace) -> None:
    if args.source == "synthetic":
        # Render just what the sheet shows, not the whole set.
        composition = {"stonerounds": dict.fromkeys(LABEL_NAMES, args.per_class)}
        examples = generate(image_size=2 * args.thumb, seed=args.seed, composition=composition)
    else:
        dataset, _ = build(args.source, **_source_kwargs(args))
        examples = itertools.chain.from_iterable(dataset[split] for split in SPLITS)
    contact_sheet(examples, args.per_class, args.thumb).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
