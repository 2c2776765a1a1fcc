"""`mdf-mllm`: classify fundus photos and draw explanation maps with an exported MDF-MLLM model.

    mdf-mllm predict IMAGE... --model DIR [--text "..."] [--json] [--top_k K] [--batch_size N]
    mdf-mllm explain IMAGE --model DIR [--text "..."] --out map.png [--label NAME]

Every photo first passes the model's fundus check: one that does not look like a colour fundus photograph (no bright
round field of view on a dark surround with retinal colour) is refused; `--no_fundus_check` classifies it anyway,
with a warning.

A mistake in the command (a bad option value, a device this machine lacks, a missing model folder, a missing,
unreadable, decompression-bomb or non-fundus image, an --out folder that does not exist) ends with one line naming
the option or path (control characters escaped) and exit status 2, before the model is loaded.
"""

import argparse
import json
import os
import sys
import warnings

from PIL import Image, UnidentifiedImageError

from mdf_mllm.messages import OneLineParser, number_in, shown


DTYPES = ("float32", "bfloat16", "float16")
positive_int = number_in(int, 1)


class InputError(Exception):
    """A problem with what the user gave: reported in one line, exit status 2."""


def image_file(text: str) -> str:
    """An output path whose suffix names a format PIL writes (.png, .jpg, .webp, ...)."""
    fmt = Image.registered_extensions().get(os.path.splitext(text)[1].lower())
    if fmt not in Image.SAVE or fmt in ("PDF", "EPS"):
        raise argparse.ArgumentTypeError(f"{text!r} has no image suffix; use .png, .jpg, .webp, .tif or .bmp")
    return text


def parse_args(argv):
    parser = OneLineParser(prog="mdf-mllm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("predict", "class probabilities per photo"), ("explain", "attention map of the answer")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("images", nargs="+" if name == "predict" else 1, metavar="IMAGE")
        command.add_argument("--model", required=True, help="exported model folder")
        command.add_argument("--text", default=None, help="clinical history, used for every photo")
        command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
        command.add_argument("--dtype", default=None, choices=DTYPES, help="default: the model's")
        command.add_argument("--no_fundus_check", action="store_true",
                             help="classify photos that fail the fundus check anyway (a warning is printed)")
    predict, explain = commands.choices["predict"], commands.choices["explain"]
    predict.add_argument("--json", action="store_true", help="print JSON: [{image, predictions}, ...]")
    predict.add_argument("--top_k", type=positive_int, default=None, help="keep the k best classes per photo")
    predict.add_argument("--batch_size", type=positive_int, default=1)
    explain.add_argument("--out", required=True, type=image_file,
                         help="image file to write; its suffix picks the format (.png, .jpg, ...)")
    explain.add_argument("--label", default=None, help="class to explain (default: the predicted one)")
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    """`--device` names a device this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a device; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "mps": int(torch.backends.mps.is_available())}
    if parsed.type not in available:
        raise InputError(f"--device {device}: not supported; use cpu, cuda, cuda:N or mps")
    if not available[parsed.type]:
        raise InputError(f"--device {device}: this machine has no {parsed.type.upper()} device; use --device cpu")
    if parsed.index is not None and parsed.index >= available[parsed.type]:
        raise InputError(f"--device {device}: this machine has {available[parsed.type]} {parsed.type} device(s), "
                         f"numbered from 0")


def check_model_folder(folder: str) -> None:
    """A local folder with config.json, checked at once: nothing reaches for the Hub with a wrong path."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        what = "no config.json in the model folder" if os.path.isdir(folder) else "no such model folder"
        raise InputError(f"--model {folder}: {what}")


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


def check_fundus(images, paths, model_folder: str, enforce: bool) -> None:
    """The model's fundus check on every photo, with the model folder's threshold, before the model loads: a refusal
    (`InputError`) or, when not `enforce`d, a one-line warning on stderr."""
    from image_processing_mdf_mllm import MdfMllmImageProcessor, NotFundusError

    try:
        image_processor = MdfMllmImageProcessor.from_pretrained(model_folder)
    except (OSError, ValueError) as error:
        raise InputError(f"--model {model_folder}: cannot read its image processor ({str(error).splitlines()[0]})")
    for image, path in zip(images, paths):
        try:
            image_processor.check_fundus(image, path)
        except NotFundusError as error:
            if enforce:
                raise InputError(f"{error}; --no_fundus_check classifies it anyway") from None
            print(f"mdf-mllm: warning: {shown(error)}", file=sys.stderr)
        except ValueError as error:  # unusable whatever the check says (a bad threshold, a photo of NaNs): no hint
            raise InputError(f"{path}: {error}") from None


def load(args):
    """The pipeline (model + processor) for `args.model`, placed on `args.device` in `args.dtype`."""
    import torch
    from transformers.utils import logging

    from pipeline_mdf_mllm import load_pipeline

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    try:
        return load_pipeline(args.model, device=args.device, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - a truncated file, a bad config value: whichever, it is the folder
        raise InputError(f"--model {args.model}: cannot load the model ({type(error).__name__}: "
                         f"{first_line(error)})") from None


def first_line(error: Exception) -> str:
    """What an error says, on one line: its first line, with the next one when the first only introduces it
    (huggingface_hub's "Validation error for field 'fusion_grid':" puts the field's value and type there)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])


def checked_inputs(args, paths: list[str]) -> list[Image.Image]:
    """Everything the user gave, checked before the model loads: device, model folder, photos and their fundus check."""
    check_model_folder(args.model)
    check_device(args.device)
    images = [open_image(path) for path in paths]
    check_fundus(images, paths, args.model, enforce=not args.no_fundus_check)
    return images


def predict(args) -> None:
    images = checked_inputs(args, args.images)
    classifier = load(args)
    results = classifier(images, clinical_text=args.text, top_k=args.top_k, batch_size=args.batch_size,
                         check_fundus=False)  # checked above
    if args.json:
        print(json.dumps([{"image": path, "predictions": result} for path, result in zip(args.images, results)],
                         allow_nan=False))  # a NaN score is an error, never invalid JSON
        return
    for path, result in zip(args.images, results):
        best = result[0]
        print(f"{path}\t{best['label']} ({best['disease_type']})\t{best['score']:.3f}")


def explain(args) -> None:
    from mdf_mllm.explain import draw_explanation, explain as explain_image

    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise InputError(f"--out {args.out}: the folder {out_folder} does not exist")
    (image,) = checked_inputs(args, args.images)
    classifier = load(args)
    try:
        explanation = explain_image(classifier.model, classifier.processor, image, args.text, label=args.label)
    except ValueError as error:  # an unknown --label
        message = str(error).replace("labels: unknown label", "--label: unknown class")
        raise InputError(message) from None
    draw_explanation(explanation, args.out)
    scores, predicted = explanation.probabilities, explanation.predicted
    other = f"\t(predicted: {predicted} {scores[predicted]:.3f})" if predicted != explanation.label else ""
    print(f"{args.out}\t{explanation.label} ({explanation.disease_type})\t{scores[explanation.label]:.3f}{other}")


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
