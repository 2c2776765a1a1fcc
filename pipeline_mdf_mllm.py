"""The `fundus-classification` pipeline: fundus photo(s) + optional clinical text -> classes scored by `classify()`.

    from transformers import pipeline
    classify = pipeline("fundus-classification", model="path/or/repo", trust_remote_code=True)
    classify("fundus.png", clinical_text="Night blindness since childhood.")
    # [{"label": ..., "score": ..., "disease_type": ...}, ...] for every class, highest score first

`register_pipeline(folder)` writes the `custom_pipelines` entry into an exported model's config.json and copies this
file beside it, which is how `pipeline(task, model=folder, trust_remote_code=True)` finds the class. This file is
copied into exported model folders, so it imports only torch/transformers/stdlib and does no I/O at import time.
"""

import json
import os
import shutil

import torch
from transformers import Pipeline


try:
    from .image_processing_mdf_mllm import to_rgb_image
    from .modeling_mdf_mllm import MdfMllmForConditionalGeneration, require_safetensors
    from .processing_mdf_mllm import MdfMllmProcessor
except ImportError:  # imported from the repository rather than from an exported folder
    from image_processing_mdf_mllm import to_rgb_image
    from modeling_mdf_mllm import MdfMllmForConditionalGeneration, require_safetensors
    from processing_mdf_mllm import MdfMllmProcessor


TASK = "fundus-classification"


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters holding NaN or inf (what a diverged training run leaves)."""
    return [name for name, parameter in model.named_parameters()
            if parameter.is_floating_point() and not torch.isfinite(parameter.detach()).all()]


def require_finite(model: torch.nn.Module, where: str) -> None:
    """A `ValueError` naming `where` and the first non-finite tensor, for weights no answer can be trusted from."""
    bad = non_finite_parameters(model)
    if bad:
        raise ValueError(f"{where}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); the weights come "
                         "from a training run that diverged and cannot be used")


class FundusClassificationPipeline(Pipeline):
    """Scores every class of an MDF-MLLM model for each fundus photo, highest first.

    Call with one photo (PIL image, array, tensor or path) or a list, and `clinical_text` (one string for every
    photo, or one per photo, None/"" for none). Returns, per photo, `[{"label", "score", "disease_type"}, ...]`
    sorted by score (the scores of all classes sum to 1); `top_k=` keeps the first k. One photo in -> one list out;
    a list in -> a list of lists. `batch_size=` batches the model calls (left-padded prompts, as the processor pads).
    A sample may hold several photos of one patient, e.g. both eyes: `classify([[left, right]])`, scored together
    in one prompt (such calls run one sample at a time: transformers' batching cannot pad the image dimension).

    Every photo first passes the image processor's fundus check (`check_fundus`): one that does not look like a
    colour fundus photograph is refused with a `ValueError` naming it and its score (`check_fundus=True`, the
    default), classified with a warning (`check_fundus="warn"`), or classified unchecked (`check_fundus=False`).
    """

    # The MDF-MLLM processor carries the tokenizer and image processor: load it, and nothing separately.
    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        require_finite(self.model, getattr(self.model, "name_or_path", None) or "the model")
        # The batching collator pads token ids on the tokenizer's side; classify() expects what the processor does.
        self.tokenizer.padding_side = "left"

    def _sanitize_parameters(self, top_k=None, check_fundus=None, **kwargs):
        if check_fundus not in (None, True, False, "warn"):
            raise ValueError(f"check_fundus: expected True, False or 'warn', got {check_fundus!r}")
        preprocess_params = {} if check_fundus is None else {"check_fundus": check_fundus}
        postprocess_params = {} if top_k is None else {"top_k": top_k}
        return preprocess_params, {}, postprocess_params

    def __call__(self, images, clinical_text=None, **kwargs):
        single = not isinstance(images, (list, tuple))
        photos = [images] if single else list(images)
        if isinstance(clinical_text, (list, tuple)):
            if len(clinical_text) != len(photos):
                raise ValueError(f"clinical_text: {len(clinical_text)} texts for {len(photos)} images")
            texts = list(clinical_text)
        else:
            texts = [clinical_text] * len(photos)
        if any(isinstance(photo, (list, tuple)) and len(photo) > 1 for photo in photos):
            kwargs["batch_size"] = 1
        items = [{"image": photo, "clinical_text": text, "name": "image" if single else f"images[{i}]"}
                 for i, (photo, text) in enumerate(zip(photos, texts))]
        results = super().__call__(items, **kwargs)
        return results[0] if single else results

    def preprocess(self, item, check_fundus=True):
        several = isinstance(item["image"], (list, tuple))
        names = [f"{item['name']}[{j}]" for j in range(len(item["image"]))] if several else [item["name"]]
        images = item["image"] if several else [item["image"]]
        photos = [to_rgb_image(photo, name) for photo, name in zip(images, names)]
        if check_fundus:  # on the decoded photos: a file is read once
            on_failure = "error" if check_fundus is True else "warn"
            for photo, name in zip(photos, names):
                self.processor.image_processor.check_fundus(photo, name, on_failure)
        return self.processor(images=[photos], clinical_text=[item["clinical_text"]], return_tensors="pt")

    def _forward(self, model_inputs):
        # Images arrive as float32; the model may have been loaded in bf16/fp16 (`dtype=`).
        inputs = {
            key: value.to(self.model.dtype) if torch.is_floating_point(value) else value
            for key, value in model_inputs.items()
        }
        return {"probabilities": self.model.classify(**inputs).float()}

    def postprocess(self, model_outputs, top_k=None):
        config = self.model.config
        probabilities = model_outputs["probabilities"][0].tolist()
        order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:top_k]
        return [
            {"label": config.id2label[i], "score": probabilities[i], "disease_type": config.disease_types[i]}
            for i in order
        ]


def load_pipeline(model, dtype="auto", model_kwargs=None, **pipeline_kwargs) -> FundusClassificationPipeline:
    """The `fundus-classification` pipeline over `model` (a folder or Hub id), built from the classes of the modules
    beside this file, with weights read as safetensors only (`require_safetensors`).

    The folder is read as weights, config and processor only: unlike `pipeline(..., trust_remote_code=True)`, this
    never imports the modules its config.json's `auto_map` names, so the CLI, the demo and the Endpoints handler run
    no code that was put in a model folder."""
    require_safetensors(model)
    network = MdfMllmForConditionalGeneration.from_pretrained(
        model, dtype=dtype, **{**(model_kwargs or {}), "use_safetensors": True}
    )
    # False, not left unset: the tokenizer's AutoConfig would otherwise ask on a terminal whether to run the code
    processor = MdfMllmProcessor.from_pretrained(model, trust_remote_code=False)
    return FundusClassificationPipeline(model=network, processor=processor, task=TASK, **pipeline_kwargs)


def register_pipeline(model_folder: str | os.PathLike) -> None:
    """Make an exported model folder serve `pipeline("fundus-classification", model=folder, trust_remote_code=True)`.

    Writes `custom_pipelines` into its config.json (the entry `Pipeline.save_pretrained` writes for a registered
    pipeline: implementation `module.Class` and the auto class that loads the model) and copies this file there.
    """
    config_path = os.path.join(model_folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model_folder: no config.json in {os.fspath(model_folder)}; save the model first")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    module = os.path.splitext(os.path.basename(__file__))[0]
    config["custom_pipelines"] = {
        TASK: {"impl": f"{module}.{FundusClassificationPipeline.__name__}", "pt": ["AutoModel"], "type": "multimodal"}
    }
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True, allow_nan=False)
        file.write("\n")
    target = os.path.join(model_folder, os.path.basename(__file__))
    if os.path.abspath(target) != os.path.abspath(__file__):
        shutil.copyfile(__file__, target)


__all__ = ["FundusClassificationPipeline", "load_pipeline", "non_finite_parameters", "register_pipeline",
           "require_finite", "TASK"]
