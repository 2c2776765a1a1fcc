"""The 11B layout on the `meta` device: parameter counts and forward FLOPs of Mllama and MDF-MLLM, no memory needed.

    python bench/scale_11b.py        # prints one JSON object
"""

import json
import re
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import MllamaConfig, MllamaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_mdf_mllm import MdfMllmConfig  # noqa: E402
from modeling_mdf_mllm import LORA_TARGET_MODULES, MdfMllmForConditionalGeneration  # noqa: E402
from mdf_mllm.job import ModelArguments  # noqa: E402
from mdf_mllm.tables import memory_table_11b  # noqa: E402


LORA_RANK = ModelArguments.lora_rank

TEXT_TOKENS = 128


def llama_32_11b_vision_config() -> MllamaConfig:
    """Llama 3.2 11B Vision's layout: 560 px tiles, up to 4 per image, 40 text layers, 8 cross-attention layers."""
    return MllamaConfig(
        vision_config=dict(image_size=560, max_num_tiles=4),
        text_config=dict(num_hidden_layers=40, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38]),
    )


def forward_inputs(config, unet: bool) -> dict:
    """One image of 4 tiles and 128 text tokens that all see it, as meta tensors."""
    vision = config.vision_config
    meta = dict(device="meta")
    inputs = dict(
        input_ids=torch.zeros(1, TEXT_TOKENS, dtype=torch.long, **meta),
        pixel_values=torch.zeros(1, 1, vision.max_num_tiles, 3, vision.image_size, vision.image_size, **meta),
        aspect_ratio_ids=torch.zeros(1, 1, dtype=torch.long, **meta),
        aspect_ratio_mask=torch.ones(1, 1, vision.max_num_tiles, dtype=torch.long, **meta),
        cross_attention_mask=torch.ones(1, TEXT_TOKENS, 1, vision.max_num_tiles, dtype=torch.long, **meta),
        # A ready 4-D causal mask: building one from a 2-D mask reads its values, which meta tensors do not have.
        attention_mask=torch.zeros(1, 1, TEXT_TOKENS, TEXT_TOKENS, **meta),
        use_cache=False,
    )
    if unet:
        size = config.unet_config["image_size"]
        inputs["unet_pixel_values"] = torch.zeros(1, 3, size, size, **meta)
        inputs["prompt_mask"] = torch.ones(1, TEXT_TOKENS, **meta)
    return inputs


def lora_parameters(model, rank: int = LORA_RANK) -> int:
    """Parameters of train_hf.py's LoRA adapters: r * (in + out) per targeted projection."""
    pattern = re.compile(LORA_TARGET_MODULES)
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    )


def count(model_class, config, unet: bool) -> tuple[int, int, int]:
    """(parameters, forward FLOPs, LoRA parameters) of `model_class(config)` built on the meta device."""
    with torch.device("meta"):
        model = model_class(config).eval()
    flops = FlopCounterMode(display=False)
    with flops, torch.no_grad():
        model(**forward_inputs(config, unet))
    return sum(p.numel() for p in model.parameters()), flops.get_total_flops(), lora_parameters(model)


def measure() -> dict:
    base_config = llama_32_11b_vision_config()
    mdf_config = MdfMllmConfig.from_mllama_config(base_config)
    base_params, base_flops, _ = count(MllamaForConditionalGeneration, base_config, unet=False)
    mdf_params, mdf_flops, lora_params = count(MdfMllmForConditionalGeneration, mdf_config, unet=True)
    return {
        "base_params": base_params,
        "mdf_params": mdf_params,
        "lora_params": lora_params,
        "base_forward_flops": base_flops,
        "mdf_forward_flops": mdf_flops,
        "added_params_pct": round(100 * (mdf_params - base_params) / base_params, 3),
        "added_flops_pct": round(100 * (mdf_flops - base_flops) / base_flops, 3),
        "unet_config": mdf_config.unet_config,
        "fusion_layers": mdf_config.fusion_layers,
        "fusion_grid": mdf_config.fusion_grid,
        "projector_dim": mdf_config.projector_dim,
    }


def run() -> str:
    m = measure()
    return "\n".join(
        [
            "## Real scale (11B layout, meta device)",
            "",
            f"Llama 3.2 11B Vision layout (560 px x 4 tiles, 40 text layers, cross-attention {list(m['fusion_layers'])}), "
            f"U-Net {m['unet_config']}, grid {m['fusion_grid']}x{m['fusion_grid']}, projector_dim {m['projector_dim']}, "
            f"fusion {m['fusion_layers']}. Forward: one image, {TEXT_TOKENS} text tokens (torch.utils.flop_counter).",
            "",
            "| | Mllama | MDF-MLLM | added | target |",
            "|---|---:|---:|---:|---:|",
            f"| parameters | {m['base_params']:,} | {m['mdf_params']:,} | {m['added_params_pct']:.2f}% | <= 3% |",
            f"| forward FLOPs | {m['base_forward_flops']:.4g} | {m['mdf_forward_flops']:.4g} | "
            f"{m['added_flops_pct']:.2f}% | <= 5% |",
            "",
            f"Memory to fine-tune the 11B MDF-MLLM (LoRA rank {LORA_RANK} on the text model: "
            f"{m['lora_params']:,} adapter parameters, plus the MDF modules trained fully):",
            "",
            memory_table_11b(m["base_params"], m["mdf_params"] - m["base_params"], m["lora_params"]),
        ]
    )


if __name__ == "__main__":
    print(json.dumps(measure()))
