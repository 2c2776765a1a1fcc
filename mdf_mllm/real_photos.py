"""What a model answers on the real fundus photos available offline (scikit-image's sample data), as a Markdown table.

Weights trained on the synthetic set answer real photos too, with confidence: the model card shows this table, and
the README and the demo say what it means, so that nobody takes them for a model of real eyes.

    python -m mdf_mllm.real_photos path/to/exported/model      # prints the table
"""

import sys

from skimage import data
from PIL import Image

# name, the call that gives the photo, what it shows (scikit-image's description)
REAL_PHOTOS = (
    ("retina", "`skimage.data.retina()`", "normal", "a normal human retina (fundus photograph)"),
    ("microaneurysms", "`skimage.data.microaneurysms()`", "dr",
     "a crop of a diabetic retinopathy fundus photo with microaneurysms"),
)
TOP = 3


def real_photo_rows(classifier) -> list[dict]:
    """Per offline real photo: its source, the truth, the fundus score and the `TOP` answers of `classifier` (a
    fundus-classification pipeline), classified even where the fundus check would refuse the photo; or the error."""
    rows = []
    for name, call, truth, description in REAL_PHOTOS:
        photo = Image.fromarray(getattr(data, name)())
        row = {"photo": call, "truth": truth, "description": description}
        try:
            row["fundus_score"] = classifier.processor.image_processor.fundus_score(photo)
            row["answers"] = classifier(photo, top_k=TOP, check_fundus=False)
        except ValueError as error:  # e.g. no field of view in a crop
            row["error"] = str(error)
        rows.append(row)
    return rows


def real_photo_table(classifier) -> str:
    """`real_photo_rows` as a Markdown table."""
    threshold = classifier.processor.image_processor.fundus_threshold
    lines = [f"| photo (offline) | what it shows | fundus check (threshold {threshold:.2f}) | top {TOP} answers |",
             "|---|---|---|---|"]
    for row in real_photo_rows(classifier):
        if "error" in row:
            lines.append(f"| {row['photo']} | {row['description']} | - | not classified: {row['error']} |")
            continue
        passed = "passed" if row["fundus_score"] >= threshold else "refused"
        answers = ", ".join(f"{a['label']} {a['score']:.2f}" for a in row["answers"])
        lines.append(f"| {row['photo']} | {row['description']} (truth: {row['truth']}) | {passed} "
                     f"({row['fundus_score']:.2f}) | {answers} |")
    return "\n".join(lines)


NOT_FOR_REAL_EYES = ("These weights were trained on synthetic fundus photos: they demonstrate the pipeline and are "
                     "not for real eyes. What they answer on the real photos available offline (measured at export; "
                     "read nothing medical into it):")


def real_photo_section(model, processor) -> str:
    """The model card's section: `NOT_FOR_REAL_EYES` and the table, measured on `model` as it is exported."""
    from pipeline_mdf_mllm import FundusClassificationPipeline

    classifier = FundusClassificationPipeline(model=model, processor=processor, device=model.device)
    return f"\n## What these weights answer on real photos\n\n{NOT_FOR_REAL_EYES}\n\n{real_photo_table(classifier)}\n"


def main(argv=None) -> None:
    from pipeline_mdf_mllm import load_pipeline

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m mdf_mllm.real_photos MODEL_FOLDER")
    print(real_photo_table(load_pipeline(argv[0], device="cpu")))


if __name__ == "__main__":
    main()
