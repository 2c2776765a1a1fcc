"""What an export documents: its results files (results.json, results.md, confusion matrices) and its Hub model
card."""

import json
from pathlib import Path

from configuration_mdf_mllm import DISEASE_TYPES
from mdf_mllm.metrics import LEVELS
from mdf_mllm.plots import (CONFUSION_MATRIX_FILE, RELIABILITY_FILE, RISK_COVERAGE_FILE, TRAINING_CURVES_FILE,
                            plot_confusion_matrix)
from mdf_mllm.tables import markdown_table, misclassified_table

ENDPOINT_HANDLER_FILE = "handler.py"  # the name Inference Endpoints looks for


def write_results(report: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md (with the misclassified items when the report has them) and one
    confusion-matrix PNG per level (`CONFUSION_MATRIX_FILE`) into `out_dir`. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    misclassified = misclassified_table(report)
    paths["markdown"].write_text(
        "# Evaluation results\n\n" + markdown_table(report) + (f"\n{misclassified}" if misclassified else "")
    )
    for level in LEVELS:
        paths[f"confusion_{level}"] = plot_confusion_matrix(
            report[level]["confusion_matrix"],
            report[level]["label_names"],
            out_dir / CONFUSION_MATRIX_FILE.format(level=level),
            title=f"Confusion matrix ({level}, n={report['num_items']})",
        )
    return paths


def _shipped_file(folder: Path, path, what: str) -> str:
    """`path` (absolute, or relative to `folder`) as a POSIX path relative to `folder`; the file must exist inside it,
    since a model repository can only link and serve its own files."""
    file = Path(path)
    file = file if file.is_absolute() else folder / file
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist; copy it into {folder} first")
    if not file.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{what} {file} is outside {folder}; the Hub only serves files in the repo")
    return file.resolve().relative_to(folder.resolve()).as_posix()


def _widgets(folder: Path, widget_examples: list[dict]) -> list[dict]:
    """Hub widget entries with static outputs; every image must be a file inside `folder`."""
    widgets = []
    for example in widget_examples:
        src = _shipped_file(folder, example["image_path"], "widget image")
        scores = sorted(example["output"].items(), key=lambda item: -item[1])
        widgets.append(
            {
                "src": src,
                "text": example["text"],
                "example_title": example.get("title", Path(src).stem),
                "output": [{"label": label, "score": round(float(score), 4)} for label, score in scores],
            }
        )
    return widgets


MODEL_CARD_TAGS = ["medical", "ophthalmology", "fundus", "retina", "mllama", "image-text-to-text", "custom_code"]
LLAMA_LICENSE = "llama3.2"  # Meta's Llama 3.2 Community License: binds every model fine-tuned from its weights
PROJECT_LICENSE = "apache-2.0"  # this repository's licence (pyproject.toml)

# How the card names the dataset_builder configurations that are no single source (each source says it itself,
# `dataset_builder.sources.SOURCES`). None of them is a Hub dataset, so the card's metadata has no `datasets:` entry
# and no model-index (whose `dataset.type` must be a Hub dataset id): results are in the text.
DATASET_DESCRIPTIONS = {
    "synthetic": "the synthetic fundus set rendered by this repository's `dataset_builder`{seed} (fundus-like "
    "photos with exact vessel masks and clinical texts; not a Hub dataset)",
    "all": "FIVES, HRF and StoneRounds together, read by `dataset_builder` from local copies",
}


def dataset_descriptions() -> dict[str, str]:
    from dataset_builder.sources import SOURCES

    return {**DATASET_DESCRIPTIONS, **{name: source.description for name, source in SOURCES.items()}}


# The figures `write_results` and `plot_training_curves` write, with their captions in the card.
STANDARD_FIGURES = {
    TRAINING_CURVES_FILE: "Training and evaluation loss of each model (log scale), and the U-Net gates when logged",
    **{
        CONFUSION_MATRIX_FILE.format(level=level): f"Confusion matrix, {level} level, test set (count and share of "
        "the true class)"
        for level in LEVELS
    },
    RELIABILITY_FILE: "Reliability diagram of each row on the test photos: the accuracy of the photos in each bin of "
    "top-label confidence against the diagonal of perfect calibration (with the model's temperature-scaled "
    "probabilities beside its raw ones)",
    RISK_COVERAGE_FILE: "Risk-coverage: the accuracy of each row when it answers only its most confident photos",
}


def license_for(base_model: str | None) -> str:
    """The licence a model inherits from its base: Llama 3.2's for anything fine-tuned from a Meta Llama 3.2
    checkpoint (a Hub id under meta-llama/ or a local copy named after it), else this project's Apache-2.0 (a model
    trained from scratch with the repository's own tokenizer, or from a base made by `train_hf.py --make_base`)."""
    name = (base_model or "").lower()
    return LLAMA_LICENSE if "meta-llama" in name or "llama-3.2" in name else PROJECT_LICENSE


def describe_data(datasets: list[str], dataset_seed: int | None = None) -> str:
    """One sentence naming the data as it is, from `dataset_builder` configuration names."""
    descriptions = dataset_descriptions()
    unknown = sorted(set(datasets) - set(descriptions))
    if not datasets or unknown:
        raise ValueError(f"datasets: expected names from {sorted(descriptions)}, got {datasets}")
    seed = "" if dataset_seed is None else f" with seed {dataset_seed}"
    return "; ".join(descriptions[name].format(seed=seed) for name in datasets)


DEFAULT_USAGE_CODE = """from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("path/or/repo-id", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/or/repo-id", trust_remote_code=True)
inputs = processor(images=Image.open("fundus.png"), clinical_text="62-year-old, blurred central vision.")
probabilities = model.classify(**inputs)  # (batch, num_labels)
print(model.config.id2label[int(probabilities.argmax(-1)[0])])"""


def hub_base_model(base_model: str | None) -> str | None:
    """`base_model` when it names a Hub model; None for no base or a local folder, whose path (on the training
    machine) means nothing on the Hub: the card then describes the base in its text."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if base_model is None or Path(base_model).exists():
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _origin(base_model: str | None, base_description: str | None) -> str:
    if base_model is None:
        return (
            "This model was trained from scratch: Llama 3.2 Vision's (Mllama's) architecture at a small size, randomly "
            "initialised, with the repository's own tokenizer; it holds no pretrained weights."
        )
    hub_id = hub_base_model(base_model)
    base = f"`{hub_id}`" if hub_id else (
        f"a local base, {base_description or f'the Mllama checkpoint in a folder named `{Path(base_model).name}`'}")
    return (
        f"This model was fine-tuned from {base}: every Mllama weight was loaded from it, and the MDF modules "
        "were added so that they change nothing at the start (each U-Net branch's value projection at zero, or its "
        "gate closed), so training started from exactly the base model's outputs."
    )


def _results_section(folder: Path, metrics_report: dict, comparison: str, figures) -> str:
    """Results tables, the comparison with other models, the full results file and the figures, as markdown."""
    parts = [markdown_table(metrics_report)]
    if comparison:
        parts.append("### Comparison\n\nThe same test photos, every model and reference trained on the same data:\n\n"
                     + comparison)
    if (folder / "results.md").is_file():
        listed = " and the misclassified test items" if "misclassified" in metrics_report else ""
        parts.append(f"The full results{listed}: [results.md](results.md).\n")
    if figures:
        parts.append(
            "### Figures\n\n"
            + "\n".join(
                f"{caption}:\n\n![{caption}]({_shipped_file(folder, path, 'figure')})\n"
                for path, caption in figures.items()
            )
        )
    return "\n".join(parts)


def _handler_note(folder: Path) -> str:
    if not (folder / ENDPOINT_HANDLER_FILE).is_file():
        return ""
    return (
        f"Deployed on Inference Endpoints, the repository's `{ENDPOINT_HANDLER_FILE}` (a custom handler) serves it: "
        'send `{"inputs": <the photo, base64>, "parameters": {"clinical_text": "...", "top_k": 3, "check_fundus": '
        'true}}` (parameters optional) and get the pipeline\'s `[{"label", "score", "disease_type"}, ...]`, highest '
        'score first, or `{"error": "..."}` for a photo that is not a fundus photograph or a malformed request.\n'
    )


def _model_card_body(folder, model_name, origin, metrics_report, data, comparison, figures,
                     training_args_summary, synthetic_data, usage_code, extra_markdown) -> str:
    data_note = (
        "**The reported numbers come from synthetic fundus images; they show the pipeline works, not clinical "
        "performance. These weights demonstrate the pipeline and are not for real eyes** (see what they answer on "
        "real photos below). "
        if synthetic_data
        else ""
    )
    training_rows = "\n".join(f"| {key} | {value} |" for key, value in training_args_summary.items())
    return f"""# {model_name}

MDF-MLLM (multi-depth fusion multimodal LLM) classifies retinal diseases from a fundus photograph plus optional
clinical text. It is Llama 3.2 Vision (Mllama) with a U-Net beside it: skip features from four U-Net encoder depths
are projected to the language model's width and read by its cross-attention layers through extra gated
cross-attention, and the text conditions the U-Net through FiLM. A prediction scores every class verbalizer by its
log-likelihood given the prompt; labels are two-level (disease, and its type: {", ".join(DISEASE_TYPES)}).

{origin}

## How to use

The model and processor classes live in this repository, so loading needs `trust_remote_code=True`:

```python
{usage_code}
```

The widget on this page shows stored example outputs: the hosted inference API does not run custom code.
{_handler_note(folder)}
## Results

Trained and evaluated on {data}.

{_results_section(folder, metrics_report, comparison, figures)}
## Intended use and limitations

Research use only. This model is not a medical device, has not been validated clinically, and must not be used
for diagnosis or treatment decisions. {data_note}Fundus datasets are small, come from few sites and cameras, and
rare inherited diseases have few examples; expect lower performance on other populations, devices and image
quality, and check calibration before using the probabilities.

## Training details

| Setting | Value |
|---|---|
{training_rows}
{extra_markdown}"""


def write_model_card(
    folder,
    base_model: str | None,
    *,
    metrics_report: dict,
    datasets: list[str],
    training_args_summary: dict,
    widget_examples: list[dict] = (),
    comparison: str = "",
    dataset_seed: int | None = None,
    figures: dict[str, str] | None = None,
    extra_markdown: str = "",
    model_name: str = "MDF-MLLM",
    license: str | None = None,
    usage_code: str = DEFAULT_USAGE_CODE,
    base_description: str | None = None,
) -> Path:
    """Write `folder/README.md`: a Hub model card (metadata, static widgets, usage, results, figures, limitations).

    Args:
        base_model: the checkpoint actually loaded (Hub id or path), or None for a model trained from scratch. Only
            a Hub id goes into the card's `base_model` metadata; a local base is described in the text
            (`base_description`, else its folder's name), never by its path. The licence follows from it
            (`license_for`).
        metrics_report: `classification_report(...)` of the test set.
        datasets: the `dataset_builder` names of the data (`dataset_descriptions`), described in the text.
        training_args_summary: setting -> value, shown as the training details table.
        widget_examples: `[{"image_path": file inside folder, "text": clinical text, "output": {label: score},
            "title": optional caption}]`; the Hub shows these stored outputs.
        comparison: the comparison with the other models and references on the same test photos, as markdown
            (`tables.comparison_markdown`: this model's row first).
        dataset_seed: the seed the synthetic set (and the splits) were made with.
        figures: path (inside `folder`) -> caption of each image embedded in the card; default: the
            `STANDARD_FIGURES` that exist in `folder`.
        license: overrides `license_for(base_model)`, for a Llama-derived base whose name does not show it.
        usage_code: the Python shown under "How to use" (load, preprocess, `model.classify`).
        base_description: what a local base is and how it was made (e.g. `model_setup.describe_base`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    data = describe_data(list(datasets), dataset_seed)
    if figures is None:
        figures = {name: caption for name, caption in STANDARD_FIGURES.items() if (folder / name).is_file()}
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_base_model(base_model),
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license or license_for(base_model),
        tags=MODEL_CARD_TAGS,
        widget=_widgets(folder, widget_examples) or None,
    )
    body = _model_card_body(
        folder, model_name, _origin(base_model, base_description), metrics_report, data, comparison, figures,
        training_args_summary, "synthetic" in datasets, usage_code, extra_markdown,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    card.save(path)
    return path
