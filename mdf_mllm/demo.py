"""MDF-MLLM demo (a Gradio app; Hugging Face Spaces run the root `app.py`, which calls `main`): a fundus photo +
clinical history in, the class probabilities and the explanation map out. A photo that fails the model's fundus check
(not a colour fundus photograph) is refused unless the user ticks "Classify anyway".

    MDF_MLLM_MODEL=path/to/exported/model python -m mdf_mllm.demo   # or: python app.py path/to/model [--port 7860]

Needs the optional `demo` extra (gradio).
"""

import argparse
import os

import gradio as gr

from mdf_mllm.explain import draw_explanation, explain
from pipeline_mdf_mllm import load_pipeline


MODEL_ENV = "MDF_MLLM_MODEL"


def build_demo(model_folder: str) -> gr.Blocks:
    """The demo page for the model in `model_folder`."""
    classifier = load_pipeline(model_folder, device="cpu")

    def predict(image, clinical_text, skip_fundus_check=False):
        if image is None:
            raise gr.Error("Upload a fundus photograph first.")
        try:
            classifier.processor.image_processor.check_fundus(image, "The photo")
        except NotFundusError as error:  # refused, unless the user asked to classify it anyway
            if not skip_fundus_check:
                raise gr.Error(f"{error}. Tick 'Classify anyway' to classify it nonetheless.") from None
            gr.Warning(str(error))
        try:
            explanation = explain(classifier.model, classifier.processor, image, clinical_text or None)
        except ValueError as error:  # e.g. no field of view in the photo
            raise gr.Error(str(error)) from None
        score = explanation.probabilities[explanation.label]
        summary = f"{explanation.label} ({explanation.disease_type}): {score:.3f}"
        return summary, explanation.probabilities, draw_explanation(explanation)

    with gr.Blocks(title="MDF-MLLM") as demo:
        gr.Markdown(
            "# MDF-MLLM\nRetinal disease from a fundus photograph and a clinical history: U-Net features fused "
            "into Llama 3.2 Vision. Research demo, not a medical device."
        )
        with gr.Row():
            with gr.Column():
                photo = gr.Image(type="pil", label="Fundus photograph", elem_id="photo")
                history = gr.Textbox(label="Clinical history (optional)", lines=3, elem_id="history")
                skip_check = gr.Checkbox(label="Classify anyway if it does not look like a fundus photograph",
                                         value=False, elem_id="skip_fundus_check")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"give the model folder as an argument or in ${MODEL_ENV}")
    build_demo(args.model).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
