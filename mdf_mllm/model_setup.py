"""The models and processors of the main job (train_hf.py): the MDF sizes of its layout (configuration_mdf_mllm's
LAYOUTS), the small and tiny Mllama made here, the stock base's processor, the MDF processor on a base's settings,
and building MDF-MLLM from a base checkpoint or from scratch.

`model_args` is a job's `mdf_mllm.job.ModelArguments` (`job.model`)."""

import copy
import json
from pathlib import Path

import torch
from transformers import AutoProcessor, MllamaConfig, MllamaProcessor
from transformers.utils import logging as transformers_logging

from configuration_mdf_mllm import DEFAULT_LABELS, DEFAULT_SIZES, DEFAULT_UNET_CONFIG, LAYOUTS, MdfMllmConfig
from image_processing_mdf_mllm import MdfMllmImageProcessor
from image_processing_mdf_mllm import MllamaImageProcessor  # the backend AutoImageProcessor picks (PIL or torchvision)
from modeling_mdf_mllm import (
    MdfMllmForConditionalGeneration,
    mdf_parameter_kinds,
    require_unquantized_mdf,
    unet_branches,
)
from pipeline_mdf_mllm import require_finite
from processing_mdf_mllm import LLAMA3_CHAT_TURNS, MdfMllmProcessor, build_default_processor, build_tokenizer


class UsageError(ValueError):
    """A CLI mistake: reported as one line, exit status 2."""


def parse_fusion_layers(spec: str | None) -> dict[int, int] | None:
    """'3:1,8:1' -> {3: 1, 8: 1}; 'none' -> {} (plain Mllama); None -> the config's default spread."""
    if spec is None:
        return None
    if spec.strip().lower() in {"none", "{}"}:
        return {}
    # An empty value is a mistake (a shell variable left unset), not the baseline: that is asked for by name.
    wanted = "expected 'layer:depth,...' such as '3:1,8:1' (or 'none': plain Mllama)"
    try:
        pairs = [tuple(int(part) for part in pair.split(":", 1)) for pair in spec.split(",")]
        fusion = dict(pairs)
    except ValueError:
        raise UsageError(f"--fusion_layers: {wanted}, got {spec!r}") from None
    if len(fusion) < len(pairs):
        twice = sorted({layer for layer, _ in pairs if [p[0] for p in pairs].count(layer) > 1})
        raise UsageError(f"--fusion_layers: got {spec!r}, which gives layer {twice[0]} more than one depth; {wanted}, "
                         "each layer once")
    return fusion


# --model_size's values: the layouts whose Mllama the job builds (its base, or the model from scratch); the 11B
# layout's comes with its checkpoint.
MODEL_SIZES = [name for name, layout in LAYOUTS.items() if "mllama" in layout]

# Llama 3.2 Vision's chat template, abridged: a system turn only for prompts without an image (as Meta's does), so a
# processor that ignored the base's template and used its own would lay text-only prompts out differently.
BASE_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endfor %}"
    "{%- if not ns.has_images and messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{%- endif %}" + LLAMA3_CHAT_TURNS
)


def stock_processor(model_size: str) -> MllamaProcessor:
    """The base's own processor: stock MllamaProcessor, the offline tokenizer, a Llama 3.2 Vision chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = BASE_CHAT_TEMPLATE
    tile = LAYOUTS[model_size]["mllama"]["tile"]
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=1)
    return MllamaProcessor(image_processor, tokenizer, chat_template=BASE_CHAT_TEMPLATE)


def mdf_processor(base: MllamaProcessor, unet_image_size: int) -> MdfMllmProcessor:
    """The MDF processor on a base's tokenizer, chat template and image settings, plus the U-Net view."""
    settings = {k: v for k, v in base.image_processor.to_dict().items() if not k.startswith("_")}
    settings.pop("image_processor_type", None)
    image_processor = MdfMllmImageProcessor(**settings, unet_image_size=unet_image_size)
    return MdfMllmProcessor(image_processor, base.tokenizer, chat_template=base.chat_template)


def default_processor(model_args) -> MdfMllmProcessor:
    """The repository's own processor (offline tokenizer) for a model of the job's layout built from scratch."""
    layout, sizes = mdf_layout(model_args)
    return build_default_processor(image_size=LAYOUTS[layout]["mllama"]["tile"],
                                   unet_image_size=sizes["unet_config"]["image_size"])


def base_processor(model_args) -> MdfMllmProcessor:
    """The base checkpoint's own processor (tokenizer, chat template, image settings), plus the U-Net view."""
    unet_config = mdf_layout(model_args)[1].get("unet_config", DEFAULT_UNET_CONFIG)
    return mdf_processor(AutoProcessor.from_pretrained(model_args.base_model), unet_config["image_size"])


def mdf_layout(model_args) -> tuple[str, dict]:
    """The layout of the MDF modules and the sizes the job sets on their config: the layout's, --unet_image_size and
    --fusion_grid applied. The layout is --model_size, else the one a base made here records (small without a base),
    else "11b": any other base, whose config.json gives every size the job does not set (a Mllama checkpoint the
    config's defaults, the 11B layout's; an MDF-MLLM checkpoint its own, so that it loads whole)."""
    if model_args.model_size or not model_args.base_model:
        layout = model_args.model_size or "small"
    else:
        layout = base_record(model_args.base_model).get("model_size", "11b")
    sizes = {} if layout == "11b" else copy.deepcopy(LAYOUTS[layout]["mdf"])
    if model_args.unet_image_size:
        sizes["unet_config"] = {**sizes.get("unet_config", {}), "image_size": model_args.unet_image_size}
    if model_args.fusion_grid:
        sizes["fusion_grid"] = model_args.fusion_grid
    return layout, sizes


def cross_attention_layers(model_args) -> list[int] | None:
    """The base's cross-attention layer indices (None for a Hub id, or a config.json that does not say: read when
    loaded, where transformers names what is wrong with it)."""
    if model_args.base_model is None:
        return LAYOUTS[model_args.model_size or "small"]["mllama"]["text"]["cross_attention_layers"]
    try:
        return json.loads((Path(model_args.base_model) / "config.json").read_text())["text_config"][
            "cross_attention_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_mdf_sizes(model_args) -> str:
    """One line: the U-Net, grid and projector the MDF modules get on `model_args.base_model`, where they come from,
    and the options that change them (the 11B defaults on a small base cost minutes per step on a CPU)."""
    layout, sizes = mdf_layout(model_args)
    sizes = {**DEFAULT_SIZES, **sizes}  # the config's defaults for what the job leaves to the base
    unet = {**DEFAULT_UNET_CONFIG, **sizes["unet_config"]}
    grid, projector = sizes["fusion_grid"], sizes["projector_dim"]
    origin = "the defaults for Llama 3.2 11B Vision" if layout == "11b" else f"the {layout} layout"
    return (f"MDF modules: U-Net {unet['image_size']} px of base width {unet['base_channels']}, fusion grid "
            f"{grid}x{grid}, projector {projector} ({origin}); --model_size, --unet_image_size and --fusion_grid "
            "change them")


# `train_hf.py --make_base` writes this beside the base's config.json (plain transformers ignores the file): the layout
# it was made in, so that `--base_model` gives the base MDF modules of its size rather than the 11B defaults.
BASE_RECORD_FILE = "mdf_mllm_base.json"


def base_record(base_model: str) -> dict:
    """What `train_hf.py --make_base` recorded about a base it made ({} for any other base, a Hub id included)."""
    path = Path(base_model) / BASE_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def describe_base(base_model: str) -> str | None:
    """How a base made by `train_hf.py --make_base` was made, for a model card; None for any other base."""
    record = base_record(base_model)
    if not record:
        return None
    return (f"a stock Mllama of this repository's {record['model_size']} layout, trained from scratch by "
            f"`train_hf.py --make_base` for {record['epochs']:g} epochs on the {record['dataset']} data (no "
            "pretrained weights)")


def small_mllama_config(tokenizer, model_size: str = "small") -> MllamaConfig:
    """The small (or tiny) Mllama for `tokenizer`: `<|image|>` is its last id, as in Llama 3.2 Vision."""
    shape = LAYOUTS[model_size]["mllama"]
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    vision = dict(**shape["vision"], image_size=shape["tile"], patch_size=14, max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                  vision_output_dim=2 * shape["vision"]["hidden_size"])
    text = dict(**shape["text"], vocab_size=image_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=2048)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


def small_default_config(tokenizer, model_size: str = "small", **mdf_kwargs) -> MdfMllmConfig:
    """The small (or tiny) MDF-MLLM for `tokenizer`, built from scratch."""
    kwargs = {**LAYOUTS[model_size]["mdf"], **mdf_kwargs}
    return MdfMllmConfig.from_mllama_config(small_mllama_config(tokenizer, model_size), **kwargs)


def mdf_kwargs(model_args, processor: MdfMllmProcessor) -> dict:
    kwargs = dict(use_film=not model_args.no_film, verbalizer_token_ids=processor.verbalizer_token_ids,
                  id2label=dict(enumerate(processor.label_names)), verbalizers=processor.verbalizers,
                  disease_types=[kind for _, _, kind in DEFAULT_LABELS], seg_loss_weight=model_args.seg_loss_weight,
                  **mdf_layout(model_args)[1])
    fusion_layers = parse_fusion_layers(model_args.fusion_layers)
    if fusion_layers is not None:
        kwargs["fusion_layers"] = fusion_layers
    return kwargs


def build_model(model_args, processor: MdfMllmProcessor, bf16: bool = False, checkpoint=None):
    if model_args.load_in_4bit and not (model_args.lora and model_args.base_model):
        raise UsageError("--load_in_4bit: needs --lora and a base checkpoint (the 4-bit weights stay frozen; QLoRA "
                         "trains the LoRA adapters and the MDF modules)")
    kwargs = mdf_kwargs(model_args, processor)
    if checkpoint and not model_args.lora:
        # Trainer's resume loads a checkpoint's state dict as saved, in Mllama's on-disk key names, which do not match
        # the module names (transformers 5.24 renames keys only in from_pretrained): load the weights here instead.
        model = MdfMllmForConditionalGeneration.from_pretrained(checkpoint)
    elif model_args.base_model:
        if model_args.load_in_4bit:
            from transformers import BitsAndBytesConfig

            # QLoRA's NF4 with double quantisation and bf16 compute. Left out of 4-bit: the MDF modules (a name
            # pattern here, as the model does not exist yet; require_unquantized_mdf checks them by class once it
            # does), the vision projector and lm_head.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=[".*unet.*", "multi_modal_projector", "lm_head"],
            )
        model, initialised = from_base(model_args.base_model, torch.bfloat16 if bf16 else torch.float32, **kwargs)
        require_unquantized_mdf(model)
        open_unet_branches(model, model_args.unet_gate_start, initialised)
        if model_args.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            # Freezes everything and puts every weight left out of 4-bit in fp32; LoRA then unfreezes the adapters
            # and the MDF modules. Gradient checkpointing stays with --gradient_checkpointing (the Trainer's).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, model_args.model_size or
                                                                     "small", **kwargs))
        open_gates(model)
    if checkpoint or model_args.base_model:
        try:
            require_finite(model, checkpoint or model_args.base_model)
        except ValueError as error:
            raise UsageError(f"{'--resume_from_checkpoint' if checkpoint else '--base_model'}: {error}") from None
    if model_args.freeze_vision:
        for module in (model.model.vision_model, model.model.multi_modal_projector):
            module.requires_grad_(False)
    if model_args.freeze_unet and model.model.unet is not None:
        model.model.unet.requires_grad_(False)
    if model_args.lora:
        model = with_lora(model, model_args)
    return model


def from_base(base: str, dtype, **kwargs) -> tuple[MdfMllmForConditionalGeneration, list[str]]:
    """The base's weights (every one must load) plus freshly initialised MDF modules, reported in one line rather
    than transformers' table of the (expected) missing keys. Returns the model and the names of the initialised
    tensors (none when the base is an MDF-MLLM checkpoint)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = MdfMllmForConditionalGeneration.from_pretrained(
            base, dtype=dtype, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    print(f"loaded every base weight from {base}; {len(info['missing_keys'])} MDF tensors initialised")
    return model, sorted(info["missing_keys"])


# Flamingo's zero-initialised gates assume a pretrained language model. From scratch, a closed gate and an untrained
# branch keep each other at zero (the gate's gradient is the branch's output and vice versa), so a model without a base
# checkpoint (our stock base included) starts every cross-attention gate, Mllama's and the U-Net branch's, here.
FROM_SCRATCH_GATE = 0.5


def open_gates(model, value: float = FROM_SCRATCH_GATE) -> None:
    """Every cross-attention gate to `value`: Mllama's own (by transformers' names for them) and the U-Net branches'
    (by class, `mdf_parameter_kinds`)."""
    kinds = mdf_parameter_kinds(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")) or kinds.get(name) == "gate":
                param.fill_(value)


def open_unet_branches(model, gate: float, initialised: list[str]) -> None:
    """Every freshly initialised U-Net branch (its gate among the `initialised` tensor names; a branch loaded from an
    MDF-MLLM checkpoint keeps its weights) gets g_u = `gate` and a zero value projection: the model still computes
    exactly the base, but the first step already trains the value projections. Behind a zero gate every branch tensor
    gets a zero gradient and the gate's own gradient reads a random branch; a zero value projection behind an open
    gate is ControlNet's zero convolution in place of Flamingo's zero gate. `gate` 0 leaves the branches as they are."""
    if not gate:
        return
    names = {id(param): name for name, param in model.named_parameters()}
    with torch.no_grad():
        for branch in unet_branches(model).values():
            if names[id(branch.gate)] in initialised:
                branch.gate.fill_(gate)
                branch.value_projection.weight.zero_()


def with_lora(model, model_args):
    """LoRA on the text model's attention and MLP projections; every MDF module trains fully and is saved."""
    from peft import get_peft_model

    return get_peft_model(model, model.mdf_lora_config(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha))


def unwrap(model):
    """The plain MdfMllmForConditionalGeneration (LoRA merged in) for evaluation and export."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def unwrap_peft(model):
    """The model under a PEFT wrapper (the same modules, not merged)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
