"""`mdf-mllm`: classify fundus photos and draw explanation maps with an exported MDF-MLLM model.

    mdf-mllm predict IMAGE... --model DIR [--text "..."] [--json] [--top-k K] [--batch-size N]
    mdf-mllm explain IMAGE --model DIR [--text "..."] --out map.png [--label NAME]

Bad input (a missing, unreadable or decompression-bomb image, an image with no fundus in it, a missing model
folder) ends with a one-line message naming the path (control characters escaped) and exit status 2.
"""

import argparse
import json
import os
import sys
import warnings

from PIL import Image, UnidentifiedImageError


class InputError(Exception):
    """A problem with what the user gave: reported in one line, exit status 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mdf-mllm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("predict", "class probabilities per photo"), ("explain", "attention map of the answer")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("images", nargs="+" if name == "predict" else 1, metavar="IMAGE")
        command.add_argument("--model", required=True, help="exported model folder")
        command.add_argument("--text", default=None, help="clinical history, used for every photo")
        command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
        command.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    predict, explain = commands.choices["predict"], commands.choices["explain"]
    predict.add_argument("--json", action="store_true", help="print JSON: [{image, predictions}, ...]")
    predict.add_argument("--top-k", type=int, default=None, help="keep the k best classes per photo")
    predict.add_argument("--batch-size", type=int, default=1)
    explain.add_argument("--out", required=True, help="PNG file to write")
    explain.add_argument("--label", default=None, help="class to explain (default: the predicted one)")
    return parser.parse_args(argv)


def shown(text: str) -> str:
    """`text` on one line: control characters and undecodable bytes of file names as escapes (\\n, \\x01, \\udcff)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def open_image(path: str) -> Image.Image:
    """Load and decode a photo fully now, so that a missing or corrupt file is reported before the model loads.

    A decompression bomb (a small file declaring more than `Image.MAX_IMAGE_PIXELS` pixels) is refused from its
    header, before its pixels are allocated.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to 2x the limit
            with Image.open(path) as image:
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None


def check_field_of_view(image, path: str, image_processor) -> None:
    try:
        image_processor.field_of_view(image)
    except ValueError as error:
        raise InputError(f"{path}: {str(error).split(': ', 1)[-1]}") from None


def load(args):
    """The pipeline (model + processor) for `args.model`, placed on `args.device` in `args.dtype`."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        what = "no config.json in the model folder" if os.path.isdir(args.model) else "no such model folder"
        raise InputError(f"{args.model}: {what}")
    import torch
    from transformers.utils import logging

    from pipeline_mdf_mllm import load_pipeline

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    try:
        return load_pipeline(args.model, device=args.device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise InputError(f"{args.model}: cannot load the model ({str(error).splitlines()[0]})") from None


def predict(args) -> None:
    images = [open_image(path) for path in args.images]
    classifier = load(args)
    for image, path in zip(images, args.images):
        check_field_of_view(image, path, classifier.image_processor)
    results = classifier(images, clinical_text=args.text, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"image": path, "predictions": result} for path, result in zip(args.images, results)]))
        return
    for path, result in zip(args.images, results):
        best = result[0]
        print(f"{path}\t{best['label']} ({best['disease_type']})\t{best['score']:.3f}")


def explain(args) -> None:
    from explain_mdf_mllm import draw_explanation, explain as explain_image

    path = args.images[0]
    image = open_image(path)
    classifier = load(args)
    check_field_of_view(image, path, classifier.image_processor)
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise InputError(f"{args.out}: the folder {out_folder} does not exist")
    try:
        explanation = explain_image(classifier.model, classifier.processor, image, args.text, label=args.label)
    except ValueError as error:  # an unknown --label
        raise InputError(str(error)) from None
    draw_explanation(explanation, args.out)
    score = explanation.probabilities[explanation.label]
    print(f"{args.out}\t{explanation.label} ({explanation.disease_type})\t{score:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        {"predict": predict, "explain": explain}[args.command](args)
    except (InputError, ValueError, OSError) as error:  # bad input, or an unwritable --out: one line, no traceback
        print(f"mdf-mllm: error: {shown(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
