"""What issue 33 sped up gives what the slower way gave: the probe ladder reading the U-Net's skips from the model's
own pass (not encoding the photo a second time)."""

import numpy as np
import pytest
import torch

from conftest import TINY_MDF, move_off_init, tiny_mllama_config
from mdf_mllm import training
from mdf_mllm.probe_ladder import ladder_features
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from processing_mdf_mllm import MdfMllmDataCollator, build_default_processor


@pytest.fixture(scope="module")
def processed():
    from dataset_builder import load

    processor = build_default_processor(image_size=28, unet_image_size=32)
    split = load("synthetic", num_images=40, image_size=64, seed=0)["train"]
    return processor, training.ProcessedSplit(split, processor, with_answers=True)


def tiny_model(processor, fusion_layers):
    from configuration_mdf_mllm import MdfMllmConfig

    tokenizer = processor.tokenizer
    base = tiny_mllama_config(vocab_size=tokenizer.convert_tokens_to_ids("<|image|>"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(base.text_config, key, getattr(tokenizer, key))
    config = MdfMllmConfig.from_mllama_config(base, **{**TINY_MDF, "fusion_layers": fusion_layers},
                                              image_token_index=base.image_token_index)
    torch.manual_seed(0)
    model = MdfMllmForConditionalGeneration(config).eval()
    move_off_init(model)
    return model


@torch.no_grad()
def skips_encoded_again(model, items, collator, batch_size):
    """Rungs (a) and (b) as the ladder computed them before: the photo encoded once more, outside the model."""
    inner, rungs = model.model, {}
    for start in range(0, len(items), batch_size):
        batch = collator(items[start:start + batch_size])
        prompt = batch["attention_mask"] * (batch["labels"] == -100)
        skips = inner.unet.encode(batch["unet_pixel_values"], inner.text_context(batch["input_ids"], None, prompt))
        values = {f"(a) depth {k + 1} skips": skip.mean((2, 3)) for k, skip in enumerate(skips)}
        values.update({f"(b) U_{d} tokens": tokens.mean(1) for d, tokens in inner.unet_projector(skips).items()})
        for name, value in values.items():
            rungs.setdefault(name, []).append(value)
    return {name: torch.cat(values).numpy() for name, values in rungs.items()}


@pytest.mark.parametrize("fusion_layers", [{1: 4, 3: 2}, {1: 1, 3: 3}], ids=["fuses-depth-4", "stops-at-depth-3"])
def test_the_ladders_skips_are_the_model_pass_own_and_equal_a_second_encoding(processed, fusion_layers):
    processor, split = processed
    model, collator = tiny_model(processor, fusion_layers), MdfMllmDataCollator(processor)
    items = [split[i] for i in range(len(split))]
    encodes = []
    hook = model.model.unet.stages[0].register_forward_hook(lambda *args: encodes.append(1))
    try:
        features = ladder_features(model, items, collator, batch_size=8)
    finally:
        hook.remove()
    batches = -(-len(items) // 8)
    # The model's pass encodes each batch once; only a model that stops short of depth 4 encodes it again.
    assert len(encodes) == batches * (1 if max(fusion_layers.values()) == 4 else 2)
    expected = skips_encoded_again(model, items, collator, batch_size=8)
    assert [name for name in features if name[:3] in ("(a)", "(b)")] == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(features[name], value, err_msg=name)


def test_help_does_not_import_what_only_some_phases_use():
    """`train_hf.py --help` imports what parsing the options needs (transformers' TrainingArguments brings torch),
    not scikit-learn (the probe ladder) or scipy (the ablation)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    check = ("import runpy, sys\nsys.argv = ['train_hf.py', '--help']\ntry:\n    runpy.run_path('train_hf.py', "
             "run_name='__main__')\nexcept SystemExit as end:\n    assert end.code == 0, end.code\n"
             "print(sorted(m for m in ('sklearn', 'scipy.stats', 'matplotlib.pyplot') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--max_steps" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_phase_report_gives_the_jobs_cpu_seconds_beside_its_wall_time():
    """On a busy machine the wall time says little; the child's CPU seconds (user + system) are what it would take
    on a core of its own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import phase_times

    seconds = {"phases": {"stage 1": 4.0, "probe ladder": 5.0}, "wall_seconds": 10.0, "other_seconds": 1.0}
    process = {"wall": 150.0, "peak_gb": 1.5, "cpu": 61.25}
    assert ("- the process: 150.0 s wall (Python start-up and imports included), 61.2 s CPU (user + system: about "
            "the wall time on a core of its own), peak memory 1.50 GB") in phase_times.section(seconds, "", process)
