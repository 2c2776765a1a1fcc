"""Inference Endpoints custom handler: serves an exported MDF-MLLM folder through its `fundus-classification` pipeline.

Every export ships this file as `handler.py`, the name Inference Endpoints looks for (the hosted inference API does
not run custom code; an endpoint does). A request is

    {"inputs": <one photo: base64 text (a data: URL too) or raw bytes>,
     "parameters": {"clinical_text": "...", "top_k": 3, "check_fundus": true}}   # every parameter optional

and the answer the pipeline's `[{"label", "score", "disease_type"}, ...]`, highest score first, or `{"error": "..."}`
for a photo that is not a fundus photograph or a malformed request. The photo may be base64 as any encoder writes it:
wrapped in lines (GNU `base64`), with a trailing newline, without padding, or in the URL-safe alphabet.

It imports only the standard library, torch and PIL, and does no I/O at import time. The model's code is the
folder's own `pipeline_mdf_mllm.py` and the modules beside it, imported by those names once every Python file of the
folder is found in `export_files.json`: neither a module put there later nor the modules an edited `auto_map` names
in config.json is ever run.
"""

import base64
import binascii
import hashlib
import importlib
import io
import json
import math
import os
import sys
import types
import warnings

import torch
from PIL import Image


TASK = "fundus-classification"  # pipeline_mdf_mllm.TASK, registered in the folder's config.json
PARAMETERS = ("clinical_text", "top_k", "check_fundus")
EXPORT_MANIFEST = "export_files.json"  # mdf_mllm.export.EXPORT_MANIFEST: every file the export wrote
PIPELINE_MODULE = "pipeline_mdf_mllm"
URL_SAFE = str.maketrans("-_", "+/")  # base64url's two letters -> base64's


class EndpointHandler:
    def __init__(self, path: str = ""):
        # Weights as safetensors only: load_pipeline refuses a pickle-only folder, naming its pytorch_model.bin.
        self.pipeline = folder_code(path).load_pipeline(path, device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, data) -> list[dict] | dict:
        try:
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object {{\"inputs\": ..., \"parameters\": {{...}}}}, got "
                                 f"{type(data).__name__}")
            answer = self.pipeline(read_image(data.get("inputs")), **read_parameters(data.get("parameters")))
        except ValueError as error:  # a bad request, or the pipeline refusing a photo: the client reads why
            return {"error": str(error)}
        if not all(math.isfinite(item["score"]) for item in answer):  # NaN is not JSON, and no answer
            return {"error": "the model gave non-finite scores for this photo; no answer can be given"}
        return answer


def read_image(inputs) -> Image.Image:
    """The photo of a request: a PIL image (the toolkit decodes an image body itself), raw bytes or base64 text.
    Text is never read as a file path: a request must not open files on the server."""
    if isinstance(inputs, Image.Image):
        return inputs
    if isinstance(inputs, str):
        try:
            inputs = read_base64(inputs.split(",", 1)[1] if inputs.startswith("data:") else inputs)
        except (binascii.Error, IndexError, ValueError):  # ValueError: a character that is not ASCII
            raise ValueError("inputs: text that is not base64; send the photo as base64 text or raw bytes") from None
    if not isinstance(inputs, (bytes, bytearray)):
        raise ValueError(f"inputs: expected a photo as base64 text or raw bytes, got {type(inputs).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
            image = Image.open(io.BytesIO(inputs))
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"inputs: not an image PIL can read ({error})") from None
    # From the header, before any pixel is decoded: a small file can declare a photo of gigabytes.
    if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"inputs: {image.width}x{image.height} pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS}; "
                         "refused as a possible decompression bomb")
    return image  # decoded by the pipeline, which reports a truncated or corrupt file


def read_base64(text: str) -> bytes:
    """Base64 as encoders write it: line breaks and other whitespace dropped, the URL-safe alphabet's `-` and `_` read
    as `+` and `/`, missing padding restored; anything else (a file name, a stray character) is a `binascii.Error`."""
    compact = "".join(text.split()).translate(URL_SAFE)
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def folder_code(path: str) -> types.ModuleType:
    """The folder's `pipeline_mdf_mllm` module, imported as a package of the folder (so its relative imports find the
    modeling and processing modules beside it) under a name of its own, after checking that every Python file of the
    folder is one `export_files.json` lists: a `ValueError` names any other."""
    folder = os.path.abspath(path)
    try:
        with open(os.path.join(folder, EXPORT_MANIFEST), encoding="utf-8") as file:
            written = set(json.load(file)["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder}: no readable {EXPORT_MANIFEST} ({type(error).__name__}), so its code cannot be "
                         "checked; serve a folder as the export wrote it") from None
    code = sorted(name for name in os.listdir(folder) if name.endswith(".py"))
    foreign = [name for name in code if name not in written]
    if foreign:
        raise ValueError(f"{folder}: holds Python files the export did not write ({', '.join(foreign)}); its code is "
                         "not run")
    if f"{PIPELINE_MODULE}.py" not in code:
        raise ValueError(f"{folder}: has no {PIPELINE_MODULE}.py; serve a folder as the export wrote it")
    package = "exported_mdf_mllm_" + hashlib.sha256(folder.encode()).hexdigest()[:16]
    if package not in sys.modules:
        sys.modules[package] = types.ModuleType(package)
        sys.modules[package].__path__ = [folder]
    return importlib.import_module(f"{package}.{PIPELINE_MODULE}")


def read_parameters(parameters) -> dict:
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict) or set(parameters) - set(PARAMETERS):
        raise ValueError(f"parameters: expected an object with some of {', '.join(PARAMETERS)}, got {parameters!r}")
    top_k, text = parameters.get("top_k"), parameters.get("clinical_text")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValueError(f"parameters.top_k: expected a whole number >= 1, got {top_k!r}")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"parameters.clinical_text: expected text, got {text!r}")
    return parameters  # the pipeline checks check_fundus itself
