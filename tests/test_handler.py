"""The Inference Endpoints handler every export ships as handler.py, loaded from an exported folder alone (a fresh
interpreter that cannot import this repository) and called as an endpoint calls it."""

import base64
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from conftest import ROOT, injected_export
from PIL import Image
from skimage import data

from mdf_mllm import export
from pipeline_mdf_mllm import TASK


# Run as Inference Endpoints' toolkit runs a custom handler: handler.py imported by its path, EndpointHandler(folder),
# then one call per request. Prints the answers, and every loaded module of this repository (by name: the venv may
# hold an editable install of it; transformers loads the folder's own copies as transformers_modules.*).
ENDPOINT = """
import importlib.util, json, pickle, sys
folder, requests = sys.argv[1], pickle.load(open(sys.argv[2], "rb"))
spec = importlib.util.spec_from_file_location("handler", f"{folder}/handler.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(folder)
answers = [handler(request) for request in requests]
project = sorted(set(sys.modules) & set(json.loads(sys.argv[3])))
print(json.dumps({"answers": answers, "project_modules": project, "task": module.TASK}))
"""


PROJECT_MODULES = sorted({path.stem for path in ROOT.glob("*.py")} | {"dataset_builder", "mdf_mllm"})


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (decoding it would allocate them)."""
    data = bytearray(png(Image.new("L", (8, 8))))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


@pytest.fixture(scope="module")
def photos():
    fundus = Image.fromarray(data.retina()).resize((64, 64))
    return fundus, Image.fromarray(data.astronaut()).resize((64, 64))


@pytest.fixture(scope="module")
def endpoint(model_folder, photos, tmp_path_factory):
    """The answers of a handler loaded from a copy of the exported folder to REQUESTS (bytes included: pickled)."""
    root = tmp_path_factory.mktemp("endpoint")
    folder = shutil.copytree(model_folder, root / "model")
    shutil.copyfile(export.HANDLER_SOURCE, folder / "handler.py")  # as write_repository ships it
    fundus, astronaut = (png(photo) for photo in photos)
    text = base64.b64encode(fundus).decode()
    requests = [
        {"inputs": text, "parameters": {"clinical_text": "Night blindness since childhood.", "top_k": 3}},
        {"inputs": fundus},
        {"inputs": f"data:image/png;base64,{text}", "parameters": {"clinical_text": None}},
        {"inputs": base64.b64encode(astronaut).decode()},
        {"inputs": astronaut, "parameters": {"check_fundus": False, "top_k": 2}},
        {"inputs": "fundus.png"},
        {"inputs": base64.b64encode(b"not a photo").decode()},
        {"parameters": {"top_k": 3}},
        {"inputs": fundus, "parameters": {"topk": 3}},
        {"inputs": fundus, "parameters": {"top_k": 0}},
        {"inputs": fundus, "parameters": {"top_k": "3"}},
        {"inputs": fundus, "parameters": {"clinical_text": ["two", "texts"]}},
        {"inputs": fundus, "parameters": {"check_fundus": "no"}},
        ["x"],  # issue 25 row 10: payloads of any shape
        "abc",
        {"inputs": bomb_png(13000, 13000)},
    ]
    served = run_endpoint(folder, requests + base64_spellings(fundus))
    served["base64_answers"] = served["answers"][len(requests):]
    served["answers"] = served["answers"][: len(requests)]
    return served


def run_endpoint(folder, requests):
    """What ENDPOINT prints for `requests` served from `folder` in a fresh interpreter (its exit status and stderr
    when it fails)."""
    (folder.parent / "requests.pkl").write_bytes(pickle.dumps(requests))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", ENDPOINT, str(folder), str(folder.parent / "requests.pkl"),
                             json.dumps(PROJECT_MODULES)],
                            cwd=folder.parent, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode:
        return {"returncode": result.returncode, "stderr": result.stderr}
    return json.loads(result.stdout.strip().splitlines()[-1])


def base64_spellings(photo: bytes) -> list[dict]:
    """`photo` as encoders write base64 (each must read as the photo), then text that is not base64."""
    photo += b"\0" * ((1 - len(photo)) % 3)  # after PNG's end chunk (readers ignore it): base64 then ends with ==
    text = base64.b64encode(photo).decode()
    url_safe = base64.urlsafe_b64encode(photo).decode()
    # Each spelling differs from the plain one, or the test would prove nothing.
    assert text.endswith("=") and ("-" in url_safe or "_" in url_safe) and len(text) > 76
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n"  # what GNU base64 writes
    spellings = [wrapped, text + "\n", text.rstrip("="), url_safe, url_safe.rstrip("="),
                 f"data:image/png;base64,{wrapped}", "\r\n".join(text[i : i + 64] for i in range(0, len(text), 64))]
    return [{"inputs": spelling} for spelling in spellings + [text[:40] + "$" + text[40:], text + "é", "fundus.png"]]


def test_handler_loads_from_the_exported_folder_alone(endpoint):
    assert endpoint["project_modules"] == []
    assert endpoint["task"] == TASK


def test_handler_answers_as_the_pipeline_does(endpoint, classifier, photos):
    fundus, astronaut = photos
    answers = endpoint["answers"]
    expected = classifier(fundus, clinical_text="Night blindness since childhood.", top_k=3)
    assert [a["label"] for a in answers[0]] == [e["label"] for e in expected] and len(expected) == 3
    assert [a["score"] for a in answers[0]] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    assert answers[0][0].keys() == {"label", "score", "disease_type"}
    assert answers[1] == answers[2]  # raw bytes and a data: URL of the same photo, no text either way
    assert [a["score"] for a in answers[1]] == pytest.approx([e["score"] for e in classifier(fundus)], abs=1e-6)
    assert [a["label"] for a in answers[4]] == [e["label"] for e in classifier(astronaut, check_fundus=False)][:2]


def test_handler_answers_a_bad_request_or_a_photo_that_is_not_fundus_with_an_error(endpoint):
    errors = endpoint["answers"][3:4] + endpoint["answers"][5:]
    assert all(set(answer) == {"error"} for answer in errors)
    messages = [answer["error"] for answer in errors]
    assert messages[0].startswith("image: does not look like a colour fundus photograph (fundus score 0.0")
    assert messages[1:] == [
        "inputs: text that is not base64; send the photo as base64 text or raw bytes",
        messages[2],
        "inputs: expected a photo as base64 text or raw bytes, got NoneType",
        "parameters: expected an object with some of clinical_text, top_k, check_fundus, got {'topk': 3}",
        "parameters.top_k: expected a whole number >= 1, got 0",
        "parameters.top_k: expected a whole number >= 1, got '3'",
        "parameters.clinical_text: expected text, got ['two', 'texts']",
        "check_fundus: expected True, False or 'warn', got 'no'",
        *messages[-3:],
    ]
    assert messages[2].startswith("inputs: not an image PIL can read (cannot identify image file")


def test_row_10_any_payload_shape_and_a_bomb_get_an_error(endpoint):
    """Issue 25 row 10: a list or a string as the whole payload, and a PNG declaring 13000x13000 pixels (refused from
    its header, before 650 MB are decoded)."""
    messages = [answer["error"] for answer in endpoint["answers"][-3:]]
    assert messages[:2] == ['expected a JSON object {"inputs": ..., "parameters": {...}}, got list',
                            'expected a JSON object {"inputs": ..., "parameters": {...}}, got str']
    assert messages[2] == ("inputs: 13000x13000 pixels exceeds the limit of 89478485; refused as a possible "
                           "decompression bomb")


def test_issue32_base64_as_encoders_write_it_is_read_and_other_text_refused(endpoint):
    """Line breaks (GNU base64), a trailing newline, no padding, the URL-safe alphabet: the photo's answer; a stray
    character or a file name: the clear refusal."""
    answers = endpoint["base64_answers"]
    assert answers[:7] == [endpoint["answers"][1]] * 7
    assert answers[7:] == [{"error": "inputs: text that is not base64; send the photo as base64 text or raw bytes"}] * 3


def test_issue32_handler_never_runs_code_an_edited_auto_map_names(model_folder, photos, tmp_path):
    fundus = png(photos[0])
    refused = run_endpoint(injected_export(model_folder, tmp_path / "a", listed=False), [{"inputs": fundus}])
    assert not (tmp_path / "a" / "marker").exists() and refused.get("returncode") == 1
    assert refused["stderr"].strip().splitlines()[-1] == (
        f"ValueError: {tmp_path / 'a' / 'model'}: holds Python files the export did not write (injected.py); its code "
        "is not run")
    served = run_endpoint(injected_export(model_folder, tmp_path / "b", listed=True), [{"inputs": fundus}])
    assert not (tmp_path / "b" / "marker").exists()
    expected = run_endpoint(shutil.copytree(model_folder, tmp_path / "c" / "model"), [{"inputs": fundus}])
    assert served["answers"] == expected["answers"] and len(expected["answers"][0]) == 8
