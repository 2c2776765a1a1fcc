"""Inference: the exported `fundus-classification` pipeline, the CLI, and the explanation maps' geometry."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from skimage import data

from mdf_mllm.explain import answer_positions, draw_explanation, explain, overlay, upsample_cells
from modeling_mdf_mllm import MdfMllmUnetCrossAttention
from pipeline_mdf_mllm import TASK, register_pipeline
from image_processing_mdf_mllm import crop_to_circle, to_rgb_image


# Every module and package of this repository (pyproject's py-modules and packages).
PROJECT_MODULES = {path.stem for path in ROOT.glob("*.py")} | {"dataset_builder", "mdf_mllm", "tests", "bench"}


def fundus_photos(size=64) -> list[Image.Image]:
    """Three different fundus photos: skimage's real retina, rotated, and a synthetic AMD photo."""
    from dataset_builder import synthetic

    retina = Image.fromarray(data.retina()).resize((size, size))
    amd = next(item for item in synthetic.plan(None, 0) if item.label == "amd")
    return [retina, retina.rotate(40), Image.fromarray(synthetic.render(amd, size)[0])]


# ----------------------------------------------------------------------------------------------------------------
# Pipeline


def test_export_registers_the_pipeline_and_ships_its_code(model_folder):
    with open(os.path.join(model_folder, "config.json")) as file:
        config = json.load(file)
    assert config["custom_pipelines"] == {
        TASK: {"impl": "pipeline_mdf_mllm.FundusClassificationPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    }
    assert os.path.isfile(os.path.join(model_folder, "pipeline_mdf_mllm.py"))
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        register_pipeline(os.path.dirname(model_folder))


def test_pipeline_code_comes_from_the_model_folder(classifier):
    # Loaded as remote code from the folder (transformers_modules), not from this repository's module.
    assert type(classifier).__module__.startswith("transformers_modules.")
    assert type(classifier).__name__ == "FundusClassificationPipeline"


def test_pipeline_top_class_is_classify_argmax_and_scores_sum_to_one(classifier):
    model, processor = classifier.model, classifier.processor
    photos = fundus_photos()
    texts = ["Night blindness since childhood.", None, "diabetes for 20 years"]
    results = classifier(photos, clinical_text=texts)
    inputs = processor(images=photos, clinical_text=texts, return_tensors="pt")
    probabilities = model.classify(**inputs)
    labels = model.config.id2label
    for result, expected in zip(results, probabilities):
        assert [entry["label"] for entry in result][0] == labels[int(expected.argmax())]
        assert len(result) == model.config.num_labels
        scores = [entry["score"] for entry in result]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        for entry in result:
            label_id = model.config.label2id[entry["label"]]
            assert entry["disease_type"] == model.config.disease_types[label_id]
            assert entry["score"] == pytest.approx(float(expected[label_id]), abs=1e-5)


def test_pipeline_scores_follow_the_exported_temperature(model_folder, classifier, tmp_path):
    """An export whose config carries `classifier_temperature` T: the pipeline's scores are softmax(log p / T) of the
    scores without it, its top class the same."""
    from transformers import pipeline

    photo, text = fundus_photos()[0], "Night blindness since childhood."
    raw = {entry["label"]: entry["score"] for entry in classifier(photo, clinical_text=text)}
    folder = tmp_path / "calibrated"
    shutil.copytree(model_folder, folder)
    with open(folder / "config.json") as file:
        config = json.load(file)
    with open(folder / "config.json", "w") as file:
        json.dump({**config, "classifier_temperature": 3.0}, file)
    calibrated = pipeline(TASK, model=str(folder), trust_remote_code=True, device="cpu")(photo, clinical_text=text)
    labels = list(raw)
    scaled = np.exp(np.log([raw[label] for label in labels]) / 3.0)
    expected = dict(zip(labels, scaled / scaled.sum()))
    assert calibrated[0]["label"] == labels[0]
    assert {entry["label"]: entry["score"] for entry in calibrated} == pytest.approx(expected, abs=1e-5)
    assert max(abs(entry["score"] - raw[entry["label"]]) for entry in calibrated) > 1e-2


def test_batched_and_single_calls_agree(classifier):
    photos = fundus_photos()
    texts = ["Night blindness since childhood.", None, "diabetes for 20 years"]
    batched = classifier(photos, clinical_text=texts, batch_size=3)
    for photo, text, together in zip(photos, texts, batched):
        alone = classifier(photo, clinical_text=text)
        assert [entry["label"] for entry in alone] == [entry["label"] for entry in together]
        np.testing.assert_allclose([e["score"] for e in alone], [e["score"] for e in together], atol=1e-5)
    # The clinical text reaches the model: two texts, two answers for the same photo.
    with_text, without = classifier([photos[0]] * 2, clinical_text=["Night blindness since childhood.", None])
    assert max(abs(a["score"] - b["score"]) for a, b in zip(with_text, without)) > 1e-4


def test_pipeline_options_and_errors(model_folder, classifier, tmp_path):
    from transformers import pipeline

    photo = fundus_photos()[0]
    top = classifier(photo, top_k=2)
    assert top == classifier(photo)[:2]
    half = pipeline(TASK, model=model_folder, trust_remote_code=True, dtype=torch.bfloat16, device="cpu")
    assert half.model.dtype == torch.bfloat16
    assert sum(entry["score"] for entry in half(photo)) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="clinical_text: 1 texts for 2 images"):
        classifier([photo, photo], clinical_text=["one"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.png")):
        classifier(str(tmp_path / "missing.png"))


def test_both_eyes_in_one_sample(classifier):
    model, processor = classifier.model, classifier.processor
    left, right, other = fundus_photos()
    results = classifier([[left, right], [other]], clinical_text=["Night blindness.", None], batch_size=2)
    expected = model.classify(**processor(images=[[left, right]], clinical_text=["Night blindness."]))[0]
    assert processor(images=[[left, right]])["unet_pixel_values"].shape[:2] == (1, 2)
    scores = {entry["label"]: entry["score"] for entry in results[0]}
    assert [scores[name] for name in model.config.label_names] == pytest.approx(expected.tolist(), abs=1e-6)
    assert results[1] == classifier(other)
    with pytest.raises(ValueError, match=r"images\[0\]\[1\]: does not look like a colour fundus photograph"):
        classifier([[left, np.zeros((32, 32, 3), np.uint8)]])


def test_pipeline_refuses_or_warns_about_photos_that_are_not_fundus_photos(classifier, tmp_path):
    photo, astronaut = fundus_photos()[0], Image.fromarray(data.astronaut()).resize((64, 64))
    with pytest.raises(ValueError, match=r"^image: does not look like a colour fundus photograph \(fundus score 0\.0"):
        classifier(astronaut)
    path = tmp_path / "astronaut.png"
    astronaut.save(path)
    with pytest.raises(ValueError, match=rf"^images\[1\] \({path}\): does not look like a colour fundus photograph"):
        classifier([photo, str(path)])
    with pytest.warns(UserWarning, match=r"images\[1\]: does not look like a colour fundus photograph"):
        warned = classifier([photo, astronaut], check_fundus="warn")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unchecked = classifier([photo, astronaut], check_fundus=False)
    assert warned == unchecked and len(unchecked[1]) == classifier.model.config.num_labels
    with pytest.raises(ValueError, match=r"check_fundus: expected True, False or 'warn', got 'no'"):
        classifier(photo, check_fundus="no")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mdf_mllm", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_cli_json_matches_the_pipeline(model_folder, classifier, tmp_path, capsys):
    from mdf_mllm.cli import main

    paths = []
    for i, photo in enumerate(fundus_photos()[:2]):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    assert main(["predict", *paths, "--model", model_folder, "--text", "night blindness", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = classifier([Image.open(path) for path in paths], clinical_text="night blindness")
    assert [item["image"] for item in printed] == paths
    for item, result in zip(printed, expected):
        assert [e["label"] for e in item["predictions"]] == [e["label"] for e in result]
        np.testing.assert_allclose([e["score"] for e in item["predictions"]], [e["score"] for e in result], atol=1e-6)
    assert main(["predict", paths[0], "--model", model_folder, "--text", "night blindness"]) == 0
    best = expected[0][0]
    assert capsys.readouterr().out == f"{paths[0]}\t{best['label']} ({best['disease_type']})\t{best['score']:.3f}\n"


def test_cli_explain_writes_the_map(model_folder, classifier, tmp_path, capsys):
    from mdf_mllm.cli import main

    photo = tmp_path / "photo.png"
    fundus_photos()[0].save(photo)
    out = tmp_path / "map.png"
    assert main(["explain", str(photo), "--model", model_folder, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}\t")
    with Image.open(out) as written:
        assert written.format == "PNG" and written.width > written.height > 100
    # The suffix picks the format; a class other than the predicted one is explained, and the prediction named.
    scores = classifier(str(photo))
    other = scores[-1]
    jpeg = tmp_path / "map.jpg"
    assert main(["explain", str(photo), "--model", model_folder, "--out", str(jpeg), "--label", other["label"]]) == 0
    assert capsys.readouterr().out == (f"{jpeg}\t{other['label']} ({other['disease_type']})\t{other['score']:.3f}"
                                       f"\t(predicted: {scores[0]['label']} {scores[0]['score']:.3f})\n")
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"

@pytest.mark.parametrize("problem", ["missing image", "corrupt image", "missing model", "blank image"])
def test_cli_bad_input_is_one_line_and_exit_2(problem, model_folder, tmp_path, capsys):
    from mdf_mllm.cli import main

    photo, model = tmp_path / "photo.png", model_folder
    if problem == "corrupt image":
        photo.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif problem == "missing model":
        fundus_photos()[0].save(photo)
        model = str(tmp_path / "no-model")
    elif problem == "blank image":
        Image.new("RGB", (64, 64)).save(photo)
    named = f"--model {model}" if problem == "missing model" else str(photo)
    assert main(["predict", str(photo), "--model", model]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"mdf-mllm: error: {named}: ")


def cli_status(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of `mdf-mllm argv`, whether argparse or the command ends it."""
    from mdf_mllm.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


BAD_OPTIONS = {
    "device": (["--device", "tpu"], "mdf-mllm: error: --device tpu: not a device; use cpu, cuda, cuda:N or mps"),
    "absent device": (["--device", "cuda:99"], "mdf-mllm: error: --device cuda:99: this machine has"),
    "dtype": (["--dtype", "float8"], "mdf-mllm predict: error: argument --dtype: invalid choice: 'float8' (choose from "
                                     "'float32', 'bfloat16', 'float16')"),
    "top-k": (["--top-k", "0"], "mdf-mllm predict: error: argument --top_k: expected a positive integer, got '0'"),
    "batch size": (["--batch-size", "two"], "mdf-mllm predict: error: argument --batch_size: expected a positive"),
    "unknown option": (["--fast"], "mdf-mllm: error: unrecognized arguments: --fast"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_cli_bad_option_is_one_line_naming_it_and_exit_2(case, model_folder, tmp_path, capsys, monkeypatch):
    import pipeline_mdf_mllm

    monkeypatch.setattr(pipeline_mdf_mllm, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    photo = tmp_path / "photo.png"
    fundus_photos()[0].save(photo)
    options, message = BAD_OPTIONS[case]
    status, error = cli_status(["predict", str(photo), "--model", model_folder, *options], capsys)
    assert status == 2 and error.count("\n") == 1 and error.startswith(message), error


def test_cli_explain_bad_out_label_and_missing_model(model_folder, tmp_path, capsys, monkeypatch):
    import pipeline_mdf_mllm

    photo = tmp_path / "photo.png"
    fundus_photos()[0].save(photo)
    explain_photo = ["explain", str(photo), "--model", model_folder, "--out"]
    assert cli_status([*explain_photo, str(tmp_path / "map.txt")], capsys) == (
        2, f"mdf-mllm explain: error: argument --out: '{tmp_path / 'map.txt'}' has no image suffix; use .png, .jpg, "
           ".webp, .tif or .bmp\n")
    assert cli_status([*explain_photo, str(tmp_path / "no" / "map.png")], capsys) == (
        2, f"mdf-mllm: error: --out {tmp_path / 'no' / 'map.png'}: the folder {tmp_path / 'no'} does not exist\n")
    status, error = cli_status([*explain_photo, str(tmp_path / "map.png"), "--label", "flu"], capsys)
    assert status == 2 and error.startswith("mdf-mllm: error: --label: unknown class 'flu'; known: ['normal', ")
    # A model path that does not exist (or looks like a Hub id) is reported before anything is loaded.
    monkeypatch.setattr(pipeline_mdf_mllm, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli_status(["predict", str(photo), "--model", "meta-llama/no-such-model"], capsys) == (
        2, "mdf-mllm: error: --model meta-llama/no-such-model: no such model folder\n")


def test_cli_refuses_a_photo_that_is_not_a_fundus_photo_unless_told(model_folder, classifier, tmp_path, capsys):
    from mdf_mllm.cli import main

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(photo)
    assert main(["predict", str(photo), "--model", model_folder]) == 2
    assert capsys.readouterr().err == (
        f"mdf-mllm: error: {photo}: does not look like a colour fundus photograph (fundus score 0.00 < threshold 0.50: "
        "no bright round field of view on a dark surround with retinal colour); --no_fundus_check classifies it "
        "anyway\n")
    assert main(["predict", str(photo), "--model", model_folder, "--no_fundus_check"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"mdf-mllm: warning: {photo}: does not look like") and captured.err.count("\n") == 1
    best = classifier(str(photo), check_fundus=False)[0]
    assert captured.out == f"{photo}\t{best['label']} ({best['disease_type']})\t{best['score']:.3f}\n"


def test_demo_refuses_a_photo_that_is_not_a_fundus_photo_unless_told(model_folder, classifier):
    if os.environ.get("CI") != "true":  # CI installs the demo extra: there, a missing gradio is a failure
        pytest.importorskip("gradio")
    import gradio as gr

    from mdf_mllm.demo import build_demo

    click = next(function.fn for function in build_demo(model_folder).fns.values() if function.name == "predict")
    astronaut = Image.fromarray(data.astronaut()).resize((64, 64))
    with pytest.raises(gr.Error, match=r"The photo: does not look like a colour fundus photograph .*Tick 'Classify "):
        click(astronaut, "", False)
    with pytest.warns(UserWarning, match="The photo: does not look like"):  # gr.Warning outside a request warns
        summary, probabilities, picture = click(astronaut, "", True)
    assert summary.split(" ")[0] == max(probabilities, key=probabilities.get)
    summary, _, _ = click(fundus_photos()[0], "Night blindness.", False)
    assert summary.split(" ")[0] == classifier(fundus_photos()[0], clinical_text="Night blindness.")[0]["label"]


def test_cli_error_in_a_fresh_process_has_no_traceback(model_folder, tmp_path):
    result = run_cli("predict", str(tmp_path / "nope.png"), "--model", model_folder)
    assert result.returncode == 2
    assert result.stderr == f"mdf-mllm: error: {tmp_path / 'nope.png'}: no such image file\n"


# ----------------------------------------------------------------------------------------------------------------
# Explanation maps


def test_answer_positions_are_the_rows_that_score_the_answer():
    labels = torch.tensor([-100, -100, -100, 7, 8, 9])
    assert answer_positions(labels).tolist() == [2, 3, 4]


def test_overlay_puts_each_cell_on_exactly_its_pixels():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for grid, (row, col) in ((2, (1, 0)), (4, (2, 3)), (8, (0, 7))):
        cells = np.zeros((grid, grid))
        cells[row, col] = 1.0
        changed = (overlay(image, cells) != image).any(-1)
        side = 32 // grid
        expected = np.zeros((32, 32), bool)
        expected[row * side : (row + 1) * side, col * side : (col + 1) * side] = True
        np.testing.assert_array_equal(changed, expected)
    with pytest.raises(ValueError, match="3x3 grid does not tile a 32x32 image"):
        upsample_cells(np.ones((3, 3)), 32, 32)


def force_unet_attention_on(cell: int):
    """A hook making every U-Net branch attend only to U-Net token `cell` (its output stays the model's own)."""

    def hook(module, args, output):
        if output[1] is None:  # classify() runs with sdpa, which returns no weights
            return output
        weights = torch.zeros_like(output[1])
        weights[..., cell] = 1.0
        return output[0], weights

    return hook


@pytest.mark.parametrize("cell", [1, 2])
def test_forced_attention_heats_exactly_that_cells_pixels(classifier, cell):
    model, processor = classifier.model, classifier.processor
    grid, size = model.config.fusion_grid, processor.image_processor.unet_image_size
    row, col = divmod(cell, grid)
    # The model is the folder's remote code, so its classes are not this repository's: find the branches by name.
    handles = [m.register_forward_hook(force_unet_attention_on(cell))
               for m in model.modules() if type(m).__name__ == MdfMllmUnetCrossAttention.__name__]
    assert len(handles) == len(model.config.fusion_layers)
    try:
        explanation = explain(model, processor, fundus_photos()[0], "night blindness")
    finally:
        for handle in handles:
            handle.remove()
    side = size // grid
    expected = np.zeros((size, size), bool)
    expected[row * side : (row + 1) * side, col * side : (col + 1) * side] = True
    for depth, cells in explanation.unet_maps.items():
        assert cells.shape == (grid, grid) and cells[row, col] == 1.0 and cells.sum() == 1.0, depth
        np.testing.assert_array_equal((overlay(explanation.crop, cells) != explanation.crop).any(-1), expected)


def test_explanation_of_a_real_forward(classifier):
    model, processor = classifier.model, classifier.processor
    photo = fundus_photos()[0]
    explanation = explain(model, processor, photo, "night blindness")
    probabilities = model.classify(**processor(images=[photo], clinical_text=["night blindness"]))[0]
    assert explanation.label == model.config.id2label[int(probabilities.argmax())]
    assert list(explanation.probabilities.values())[0] == pytest.approx(float(probabilities.max()), abs=1e-6)
    # The crop is the processor's U-Net view: the square around the detected field of view.
    size = processor.image_processor.unet_image_size
    circle = processor.image_processor.field_of_view(photo)
    view = np.asarray(crop_to_circle(to_rgb_image(photo), circle, size, Image.Resampling.BILINEAR))
    assert np.abs(explanation.crop.astype(int) - view).max() <= 1
    # One map per fused depth, each a distribution over the grid, with the layers' gates.
    assert explanation.fused_layers == {1: [1], 3: [3]}
    layers = model.model.language_model.layers
    for depth, cells in explanation.unet_maps.items():
        assert cells.shape == (2, 2) and cells.sum() == pytest.approx(1.0, abs=1e-5) and cells.min() > 0
        layer = layers[explanation.fused_layers[depth][0]]
        assert explanation.gates[depth] == pytest.approx(
            (layer.unet_attn.gate.tanh().item(), layer.cross_attn_attn_gate.tanh().item())
        )
    # Vision branch: 2x2 patches of the one 28-px tile; the CLS token's share is left out.
    assert explanation.vision_map.shape == (2, 2) and explanation.vision_view.shape == (28, 28, 3)
    assert 0 < explanation.vision_map.sum() < 1
    assert model.config.text_config._attn_implementation == "sdpa"  # eager only while explaining
    picture = draw_explanation(explanation)
    assert picture.width > 2 * picture.height


def test_explaining_another_label_changes_the_answer_rows(classifier):
    model, processor = classifier.model, classifier.processor
    photo = fundus_photos()[0]
    predicted = explain(model, processor, photo)
    other = next(name for name in model.config.label_names if name != predicted.label)
    explained = explain(model, processor, photo, label=other)
    assert explained.label == other
    assert any(not np.allclose(predicted.unet_maps[d], explained.unet_maps[d]) for d in predicted.unet_maps)


def test_only_exported_files_and_no_hub(model_folder, tmp_path):
    """A fresh process in an empty directory, offline, with the folder copied: the pipeline loads and runs."""
    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    # The package is installed in the environment (pip install -e .): block its modules, so that exported code
    # importing one fails here instead of passing only where the project is installed.
    script = (
        "import json, sys\n"
        "from importlib.abc import MetaPathFinder\n"
        "class NotThisProject(MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(PROJECT_MODULES)!r}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NotThisProject())\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline({TASK!r}, model={str(copy)!r}, trust_remote_code=True)\n"
        "print(json.dumps(pipe(sys.argv[1])))\n"
    )
    photo = tmp_path / "photo.png"
    fundus_photos()[0].save(photo)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script, str(photo)], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(predictions) == 8 and sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_explanation_titles_name_the_prediction_and_the_gates_as_the_models_own():
    from mdf_mllm.explain import Explanation, _gates_note, _layers, _title

    crop = np.zeros((4, 4, 3), np.uint8)
    probabilities = {"amd": 0.7712, "dr": 0.004, "normal": 0.2248}
    predicted = Explanation("amd", "acquired", probabilities, crop, gates={1: (0.42, -0.1), 3: (0.05, 0.2)})
    assert predicted.predicted == "amd"
    assert _title(predicted) == "Prediction: amd (acquired), p = 0.77"
    asked = Explanation("dr", "acquired", probabilities, crop)
    assert _title(asked) == "Explaining dr (p = 4.0e-03); Prediction: amd, p = 0.77"
    assert _gates_note(predicted) == (
        "Gates are the model's own learned constants, the same for every photo (depth 1: U-Net tanh(g_u) = +0.42, "
        "vision tanh(g_attn) = -0.10; depth 3: U-Net tanh(g_u) = +0.05, vision tanh(g_attn) = +0.20).")
    assert _layers([1]) == "layer 1" and _layers([3, 8]) == "layers 3, 8"
