"""MDF-MLLM demo (a Gradio app; Hugging Face Spaces run the root `app.py`, which calls `main`): a fundus photo +
clinical history in, the class probabilities and the explanation map out. A photo that fails the model's fundus check
(not a colour fundus photograph) is refused unless the user ticks "Classify anyway".

    MDF_MLLM_MODEL=path/to/exported/model python -m mdf_mllm.demo   # or: python app.py path/to/model [--port 7860]

It listens on 127.0.0.1 unless `--host` or Gradio's `GRADIO_SERVER_NAME` says otherwise (`GRADIO_SERVER_PORT` too).

Needs the optional `demo` extra (gradio).
"""

import argparse
import json
import os

import gradio as gr

from mdf_mllm.explain import draw_explanation, explain
from mdf_mllm.export import EXAMPLE_HISTORIES
from pipeline_mdf_mllm import load_pipeline
from image_processing_mdf_mllm import MdfMllmImageProcessor, NotFundusError


MODEL_ENV = "MDF_MLLM_MODEL"
MAX_FILE_SIZE = "25mb"  # a fundus photo is a few MB; more is refused by Gradio before it reaches the model
SAMPLE_HISTORY = "Gradual loss of central vision over two years."  # for an example photo without a history of its own
NOT_FOR_REAL_EYES = (
    "**These weights demonstrate the pipeline: they were trained on synthetic fundus photos and are not for real "
    "eyes.** On real photographs they answer with confidence and are often wrong (see the model card's table of "
    "answers on real photos). Not a medical device."
)


class UploadedPhoto(gr.Image):
    """The photo input, saying in words what was wrong with an upload that is not a readable image (Gradio would
    answer "upstream app raised an exception")."""

    is_template = True  # Gradio's mark of a subclass that the page draws with its parent's widget (gr.Image's)

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for a bad file
            raise gr.Error(f"The upload is not an image this demo can read ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'unreadable'}). Upload a PNG, JPEG or "
                           "TIFF fundus photograph.") from None


def example_photos(model_folder: str) -> list[list[str]]:
    """[photo, history] rows of the export's example photos (`examples/`, each with its own history from the test
    split, as the export wrote them), for the page to offer as clickable examples."""
    folder = os.path.join(model_folder, "examples")
    if not os.path.isdir(folder):
        return []
    histories = {}
    if os.path.isfile(os.path.join(folder, EXAMPLE_HISTORIES)):
        with open(os.path.join(folder, EXAMPLE_HISTORIES), encoding="utf-8") as f:
            histories = json.load(f)
    photos = sorted(name for name in os.listdir(folder) if name.lower().endswith((".png", ".jpg", ".jpeg")))
    # A photo the export lists keeps its own history, none included; only an unlisted one gets the sample.
    return [[os.path.join(folder, name), histories[name] if name in histories else SAMPLE_HISTORY] for name in photos]


def answer(classifier, checker, image, clinical_text, skip_fundus_check=False):
    """The demo's answer to one photo: (summary, class probabilities, explanation map); a gr.Error in words for a
    photo that cannot be classified. `checker`: this repository's image processor with the model's settings, whose
    NotFundusError is the class caught here (the pipeline's processor is the model folder's own copy of the code)."""
    if image is None:
        raise gr.Error("Upload a fundus photograph first.")
    try:
        checker.check_fundus(image, "The photo")
    except NotFundusError as error:  # refused, unless the user asked to classify it anyway
        if not skip_fundus_check:
            raise gr.Error(f"{error}. Tick 'Classify anyway' to classify it nonetheless.") from None
        gr.Warning(str(error))
    except ValueError as error:  # a truncated file, a photo of NaNs: classifying anyway would fail the same way
        raise gr.Error(str(error)) from None
    try:
        explanation = explain(classifier.model, classifier.processor, image, clinical_text or None)
    except ValueError as error:  # e.g. no field of view in the photo
        raise gr.Error(str(error)) from None
    score = explanation.probabilities[explanation.label]
    summary = f"{explanation.label} ({explanation.disease_type}): {score:.3f}"
    return summary, explanation.probabilities, draw_explanation(explanation)


def build_demo(model_folder: str) -> gr.Blocks:
    """The demo page for the model in `model_folder`."""
    classifier = load_pipeline(model_folder, device="cpu")
    checker = MdfMllmImageProcessor.from_pretrained(model_folder)

    def predict(image, clinical_text, skip_fundus_check=False):
        return answer(classifier, checker, image, clinical_text, skip_fundus_check)

    with gr.Blocks(title="MDF-MLLM") as demo:
        gr.Markdown(
            "# MDF-MLLM\nRetinal disease from a fundus photograph and a clinical history: U-Net features fused "
            f"into Llama 3.2 Vision. Research demo.\n\n{NOT_FOR_REAL_EYES}"
        )
        with gr.Row():
            with gr.Column():
                photo = UploadedPhoto(type="pil", label="Fundus photograph", elem_id="photo")
                history = gr.Textbox(label="Clinical history (optional)", lines=3, elem_id="history")
                skip_check = gr.Checkbox(label="Classify anyway if it does not look like a fundus photograph",
                                         value=False, elem_id="skip_fundus_check")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                examples = example_photos(model_folder)
                if examples:
                    gr.Examples(examples, inputs=[photo, history], label="Example photos from the test split")
            with gr.Column():
                prediction = gr.Textbox(label="Prediction", interactive=False, elem_id="prediction")
                num_labels = classifier.model.config.num_labels
                probabilities = gr.Label(label="Class probabilities", num_top_classes=num_labels)
                attention = gr.Image(label="Where the answer looked (U-Net depths, vision branch)", elem_id="map")
        button.click(predict, inputs=[photo, history, skip_check], outputs=[prediction, probabilities, attention])
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MDF-MLLM demo")
    parser.add_argument("model", nargs="?", default=os.environ.get(MODEL_ENV), help=f"model folder (or ${MODEL_ENV})")
    # Gradio's own variables (a Space sets GRADIO_SERVER_NAME=0.0.0.0); unset, the demo listens on this machine only.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
                        help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"give the model folder as an argument or in ${MODEL_ENV}")
    build_demo(args.model).launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE)


if __name__ == "__main__":
    main()
