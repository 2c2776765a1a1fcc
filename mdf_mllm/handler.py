"""Inference Endpoints custom handler: serves an exported MDF-MLLM folder through its `fundus-classification` pipeline.

Every export ships this file as `handler.py`, the name Inference Endpoints looks for (the hosted inference API does
not run custom code; an endpoint does). A request is

    {"inputs": <one photo: base64 text (a data: URL too) or raw bytes>,
     "parameters": {"clinical_text": "...", "top_k": 3, "check_fundus": true}}   # every parameter optional

and the answer the pipeline's `[{"label", "score", "disease_type"}, ...]`, highest score first, or `{"error": "..."}`
for a photo that is not a fundus photograph or a malformed request. It imports only the standard library, torch, PIL
and transformers (which loads the pipeline and model code from the folder) and does no I/O at import time.
"""

import base64
import binascii
import io
import math
import warnings

import torch
from PIL import Image
from transformers import pipeline


TASK = "fundus-classification"  # pipeline_mdf_mllm.TASK, registered in the folder's config.json
PARAMETERS = ("clinical_text", "top_k", "check_fundus")


class EndpointHandler:
    def __init__(self, path: str = ""):
        # Weights as safetensors only: the remote code refuses a pickle-only folder, naming its pytorch_model.bin.
        self.pipeline = pipeline(TASK, model=path, trust_remote_code=True, model_kwargs={"use_safetensors": True},
                                 device="cuda" if torch.cuda.is_available() else "cpu")

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
            inputs = base64.b64decode(inputs.split(",", 1)[1] if inputs.startswith("data:") else inputs, validate=True)
        except (binascii.Error, IndexError):
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
