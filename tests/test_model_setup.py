"""mdf_mllm/model_setup.py: MDF-MLLM built from a base (its prompt template, its weights, LoRA)."""


import pytest
import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

from conftest import tiny_mllama_config
from mdf_mllm import model_setup, training
from mdf_mllm.job import ModelArguments
from processing_mdf_mllm import build_default_processor


@pytest.mark.parametrize("gate_start", [0.0, 0.5], ids=["closed-gates", "open-gates-zero-values"])
def test_mdf_from_the_base_computes_the_base_at_step_0_for_a_prompt_in_the_base_template(made_base, tiny_data,
                                                                                         gate_start):
    _, _, dataset, _ = tiny_data
    model_args = ModelArguments(base_model=str(made_base / "base"), model_size="tiny", unet_gate_start=gate_start)
    processor = model_setup.base_processor(model_args)
    stock = AutoProcessor.from_pretrained(made_base / "base")
    assert processor.chat_template == stock.chat_template != build_default_processor().chat_template
    example = next(example for example in dataset["train"] if example["text"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": processor.instruction + "\n"
                 + processor.clinical_text_template.format(clinical_text=example["text"])}]}]
    prompt = stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.build_prompt(example["text"]) == prompt
    inputs = processor(images=[example["image"]], clinical_text=[example["text"]])
    stock_inputs = stock(images=[example["image"]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    mdf = model_setup.build_model(model_args, processor).eval()
    base = MllamaForConditionalGeneration.from_pretrained(made_base / "base").eval()
    base_inputs = {k: v for k, v in inputs.items() if k != "unet_pixel_values"}
    with torch.no_grad():
        expected, actual = base(**base_inputs).logits, mdf(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    branches = training.unet_branches(mdf).values()
    assert [branch.gate.item() for branch in branches] == [gate_start] * 2
    with torch.no_grad():  # and the U-Net is really wired in: an open gate and a value projection change the logits
        for branch in branches:
            branch.gate.fill_(0.5)
            torch.nn.init.normal_(branch.value_projection.weight, std=0.1)
        assert (mdf(**inputs).logits - expected).abs().max() > 1e-3


def test_real_base_path_loads_every_weight_of_a_mllama_checkpoint(tmp_path):
    """--base_model with a local Llama 3.2 Vision stand-in: its weights, tokenizer and image settings are used."""
    from processing_mdf_mllm import build_tokenizer

    tokenizer = build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    config = tiny_mllama_config(vocab_size=image_id)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    base = MllamaForConditionalGeneration(config)
    base.save_pretrained(tmp_path / "base")
    image_processor = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=1)
    MllamaProcessor(image_processor, tokenizer).save_pretrained(tmp_path / "base")
    model_args = ModelArguments(
        base_model=str(tmp_path / "base"), unet_image_size=32, fusion_grid=2, lora=True, lora_rank=4
    )
    processor = model_setup.base_processor(model_args)
    assert processor.image_processor.size == {"height": 28, "width": 28}
    assert processor.image_processor.unet_image_size == 32
    model = model_setup.build_model(model_args, processor)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any(".unet." in name for name in trainable) and any("unet_attn" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)
    merged = model_setup.unwrap(model)
    base_weights = base.state_dict()
    assert all(torch.equal(base_weights[key], merged.state_dict()[key]) for key in base_weights)
