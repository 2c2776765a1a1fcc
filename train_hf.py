"""Fine-tune MDF-MLLM from a pretrained Llama 3.2 Vision (Mllama) base and compare it with fine-tuning the base alone.

With no arguments the whole study runs offline on the synthetic fundus set (everything under --output_dir):
  base     a small stock MllamaForConditionalGeneration trained on the train split (LM loss on the answer),
           cached in ~/.cache/mdf_mllm/base-<key> ($MDF_MLLM_BASE_CACHE or --base_cache_dir), or --base_model
  stage 1  the U-Net and its decoder warm up on the vessel masks (--no_stage1 skips it)
  stage 2  two arms from the same base weights, data order, steps and learning rate: the baseline (the base
           fine-tuned alone) and MDF-MLLM (base + MDF modules, U-Net gates at 0, U-Net from stage 1)
  then     comparison with 95% CIs, U-Net gate values per step, plots, and the MDF model exported as a Hub
           repository to <output_dir>/mdf-mllm (--export_dir)

    python train_hf.py                          # the main job above
    python train_hf.py job.yaml                 # the same arguments from a YAML or JSON file
    python train_hf.py --make_base --output_dir DIR       # only write the stock Mllama base to DIR/base
    python train_hf.py --from_scratch           # both models from scratch, every gate open (no base, no stage 1)
    python train_hf.py --base_model meta-llama/Llama-3.2-11B-Vision-Instruct --dataset all \\
        --fives FIVES --hrf HRF --stonerounds StoneRounds --lora --bf16 --gradient_checkpointing
    accelerate launch --config_file configs/fsdp_gpu.yaml train_hf.py --base_model ... --bf16
"""

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    AutoProcessor,
    HfArgumentParser,
    IntervalStrategy,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    SchedulerType,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import SaveStrategy
from transformers.utils import logging as transformers_logging

import hub_export
import reporting
from configuration_mdf_mllm import DEFAULT_LABELS, UNET_DEPTHS, MdfMllmConfig
from modeling_mdf_mllm import MdfMllmForConditionalGeneration, is_mdf_parameter
from processing_mdf_mllm import (
    MdfMllmDataCollator,
    MdfMllmImageProcessor,
    MdfMllmProcessor,
    build_default_processor,
    build_tokenizer,
)
from processing_mdf_mllm import MllamaImageProcessor  # the backend AutoImageProcessor picks (PIL or torchvision)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments

DATASETS = ("synthetic", "all", "fives", "hrf", "stonerounds", "manifest")


@dataclass
class ModelArguments:
    base_model: str | None = field(default=None, metadata={"help": "A Llama 3.2 Vision checkpoint (Hub id or folder) "
                                                           "to fine-tune; default: the cached small base"})
    model_size: str | None = field(default=None, metadata={"help": "small | tiny: the layout of the base made here "
                                   "and of the MDF modules (default small; with --base_model the MdfMllmConfig defaults)"})
    fusion_layers: str | None = field(default=None, metadata={"help": "'layer:depth,...' e.g. '3:1,8:1' (layers: the "
                                      "base's cross-attention layers, depths 1-4); 'none' = plain Mllama; default: spread"})
    no_film: bool = field(default=False, metadata={"help": "Do not condition the U-Net on the prompt"})
    seg_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the vessel-segmentation loss "
                                          "during fusion (default: the config's 0.1; 0 turns it off)"})
    unet_image_size: int | None = field(default=None, metadata={"help": "U-Net input size S (default per size)"})
    fusion_grid: int | None = field(default=None, metadata={"help": "G: U-Net tokens per fused layer = G*G"})
    # The two rates below: the RESEARCH helper's provisional recipe (/tmp/RECIPE.md, run B), gates move but flip sign.
    mdf_learning_rate: float | None = field(default=3e-3, metadata={"help": "Learning rate of the MDF modules (an "
                                            "optimizer group of their own)"})
    gate_learning_rate: float | None = field(default=5e-2, metadata={"help": "Learning rate of the U-Net gates g_u "
                                             "(own group, no weight decay)"})
    lora: bool = field(default=False, metadata={"help": "LoRA on the text model; the MDF modules train fully"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze Mllama's vision tower and projector"})
    freeze_unet: bool = field(default=False, metadata={"help": "Freeze the U-Net (FiLM included)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA (with --lora): the base's linear layers in "
                               "4-bit NF4 (pip install 'mdf-mllm[quantization]'); MDF modules, projector, lm_head "
                               "in full precision"})


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={"help": " | ".join(DATASETS)})
    fives: str | None = field(default=None, metadata={"help": "FIVES folder (--dataset fives or all)"})
    hrf: str | None = field(default=None, metadata={"help": "HRF folder (--dataset hrf or all)"})
    stonerounds: str | None = field(default=None, metadata={"help": "StoneRounds folder (--dataset stonerounds/all)"})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with metadata.jsonl (--dataset manifest)"})
    num_images: int | None = field(
        default=None, metadata={"help": "Synthetic set size (default: the paper's 1,305-pair composition)"}
    )
    image_size: int = field(default=256, metadata={"help": "Synthetic photo side in pixels"})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set and of the splits"})
    no_text: bool = field(default=False, metadata={"help": "Drop the clinical text from every prompt"})


@dataclass
class JobArguments:
    make_base: bool = field(default=False, metadata={"help": "Only train the stock Mllama base into <output_dir>/base"})
    from_scratch: bool = field(default=False, metadata={"help": "Old comparison: both models from scratch, gates open"})
    base_epochs: float = field(default=4.0, metadata={"help": "Epochs of base training"})
    base_cache_dir: str | None = field(default=None, metadata={"help": "Where the main job caches its base "
                                       "(default $MDF_MLLM_BASE_CACHE or ~/.cache/mdf_mllm)"})
    no_stage1: bool = field(default=False, metadata={"help": "Skip the U-Net warm-up on vessel masks"})
    stage1_epochs: float = field(default=1.0, metadata={"help": "Epochs of the U-Net warm-up (stage 1)"})
    stage1_learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of stage 1"})
    baseline: bool = field(default=True, metadata={"help": "Also train the baseline (plain Mllama, same base)"})
    ablation: bool = field(default=False, metadata={"help": "Run the ablation table instead of the main job"})
    seeds: int = field(default=3, metadata={"help": "Seeds per ablation row"})
    ablation_epochs: float = field(default=2.0, metadata={"help": "Epochs of each ablation run"})
    export_dir: str | None = field(default=None, metadata={"help": "The Hub-ready MDF model folder "
                                                          "(default <output_dir>/mdf-mllm)"})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the 95%% CIs"})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of test-set classification"})


@dataclass
class MdfTrainingArguments(TrainingArguments):
    """TrainingArguments with the main job's defaults (each shown in --help)."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Everything the run writes goes here"})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs of each stage-2 arm (main job default)"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size (main job default)"})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Validation batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Base learning rate (main job default)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (main job default)"})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a fraction of them if < 1"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Schedule (main job default)"})
    logging_steps: float = field(default=10, metadata={"help": "Log loss and U-Net gates every N steps"})
    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={"help": "Validation loss: no|steps|epoch"})
    save_strategy: SaveStrategy | str = field(default="epoch", metadata={"help": "Checkpoints: no|steps|epoch; "
                                              "removed once an arm has finished"})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept while training"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers (main job: none)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every processor output"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Items are preprocessed once: no workers"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory for GPU transfer"})


class UsageError(ValueError):
    """A CLI mistake: reported as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # "(default: None)" says nothing; a help that explains its default already says more.
        documented = action.default is None or "default" in (action.help or "")
        return action.help if documented else super()._get_help_string(action)


class Parser(HfArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, JobArguments, MdfTrainingArguments]:
    parser = Parser((ModelArguments, DataArguments, JobArguments, MdfTrainingArguments), prog="train_hf.py",
                    description=__doc__,
                    usage="python train_hf.py [options] | python train_hf.py job.yaml", formatter_class=HelpFormatter)
    for action in parser._actions:
        if "--no_baseline" in action.option_strings:
            action.help = "Train only MDF-MLLM (default: both models)"
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    *arguments, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(arguments)


def parse_fusion_layers(spec: str | None) -> dict[int, int] | None:
    """'3:1,8:1' -> {3: 1, 8: 1}; 'none' -> {} (plain Mllama); None -> the config's default spread."""
    if spec is None:
        return None
    if spec.strip().lower() in {"none", "", "{}"}:
        return {}
    try:
        return {int(layer): int(depth) for layer, depth in (pair.split(":") for pair in spec.split(","))}
    except ValueError:
        raise UsageError(f"--fusion_layers: expected 'layer:depth,...' such as '3:1,8:1', got {spec!r}") from None


def check_path(option: str, path: str | None, hub_id_allowed: bool = False) -> None:
    # A string shaped like `org/name` may be a Hub id; anything else that does not exist is a local path mistyped,
    # reported now rather than after transformers has retried the Hub.
    if path is None or os.path.exists(path) or (hub_id_allowed and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path)):
        return
    raise UsageError(f"{option}: no such file or folder: {path}")


def cross_attention_layers(model_args: ModelArguments) -> list[int] | None:
    """The base's cross-attention layer indices (None for a Hub id, read when loaded)."""
    if model_args.base_model is None:
        return MODEL_SIZES[model_args.model_size or "small"]["text"]["cross_attention_layers"]
    config = Path(model_args.base_model) / "config.json"
    return json.loads(config.read_text())["text_config"]["cross_attention_layers"] if config.is_file() else None


def check_arguments(model_args, data_args, job_args, training_args) -> None:
    """Raise UsageError naming the option for a value that would fail later (or silently reach for the Hub)."""
    for option, value, allowed in (("--model_size", model_args.model_size, MODEL_SIZES),
                                   ("--dataset", data_args.dataset, DATASETS)):
        if value is not None and value not in allowed:
            raise UsageError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    check_path("--base_model", model_args.base_model, hub_id_allowed=True)
    for option in ("fives", "hrf", "stonerounds", "data_dir"):
        check_path(f"--{option}", getattr(data_args, option))
    if training_args.resume_from_checkpoint != "latest":
        check_path("--resume_from_checkpoint", training_args.resume_from_checkpoint)
    fusion, layers = parse_fusion_layers(model_args.fusion_layers), cross_attention_layers(model_args)
    bad = {k: v for k, v in (fusion or {}).items() if (layers and k not in layers) or not 1 <= v <= UNET_DEPTHS}
    if bad:
        raise UsageError(f"--fusion_layers: {model_args.fusion_layers!r}: layers must be among the cross-attention "
                         f"layers {layers or '(of the base)'}, depths 1-{UNET_DEPTHS}")


# ----------------------------------------------------------------------------------------------------------------------
# Model and processor

# Without a real base: the 11B layout's shape at a size two CPU cores train in minutes.
MODEL_SIZES = {
    "small": dict(
        tile=112,
        unet=dict(in_channels=3, base_channels=16, image_size=128, use_decoder=True),
        grid=8,
        projector_dim=64,
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1, attention_heads=2),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3, 5, 7]),
    ),
    "tiny": dict(
        tile=28,
        unet=dict(in_channels=3, base_channels=4, image_size=32, use_decoder=True),
        grid=2,
        projector_dim=8,
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3]),
    ),
}

# Llama 3.2 Vision's chat template, abridged: a system turn only for prompts without an image (as Meta's does), so a
# processor that ignored the base's template and used its own would lay text-only prompts out differently.
BASE_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endfor %}"
    "{%- if not ns.has_images and messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def stock_processor(model_size: str) -> MllamaProcessor:
    """The base's own processor: stock MllamaProcessor, the offline tokenizer, a Llama 3.2 Vision chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = BASE_CHAT_TEMPLATE
    tile = MODEL_SIZES[model_size]["tile"]
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=1)
    return MllamaProcessor(image_processor, tokenizer, chat_template=BASE_CHAT_TEMPLATE)


def mdf_processor(base: MllamaProcessor, unet_image_size: int) -> MdfMllmProcessor:
    """The MDF processor on a base's tokenizer, chat template and image settings, plus the U-Net view."""
    settings = {k: v for k, v in base.image_processor.to_dict().items() if not k.startswith("_")}
    settings.pop("image_processor_type", None)
    image_processor = MdfMllmImageProcessor(**settings, unet_image_size=unet_image_size)
    return MdfMllmProcessor(image_processor, base.tokenizer, chat_template=base.chat_template)


def default_processor(model_args: ModelArguments) -> MdfMllmProcessor:
    size = MODEL_SIZES[model_args.model_size or "small"]
    return build_default_processor(
        image_size=size["tile"], unet_image_size=model_args.unet_image_size or size["unet"]["image_size"]
    )


def base_processor(model_args: ModelArguments) -> MdfMllmProcessor:
    """The base checkpoint's own processor (tokenizer, chat template, image settings), plus the U-Net view."""
    unet_config = {**MdfMllmConfig().unet_config, **mdf_sizes(model_args).get("unet_config", {})}
    return mdf_processor(AutoProcessor.from_pretrained(model_args.base_model), unet_config["image_size"])


def mdf_sizes(model_args: ModelArguments) -> dict:
    """The MDF modules' sizes: MODEL_SIZES for our own layouts, the config's defaults for a real base."""
    size = model_args.model_size or (None if model_args.base_model else "small")
    sizes = {} if size is None else dict(unet_config=dict(MODEL_SIZES[size]["unet"]), fusion_grid=MODEL_SIZES[size][
        "grid"], projector_dim=MODEL_SIZES[size]["projector_dim"], film_hidden_dim=64)
    if model_args.unet_image_size:
        sizes["unet_config"] = {**sizes.get("unet_config", {}), "image_size": model_args.unet_image_size}
    if model_args.fusion_grid:
        sizes["fusion_grid"] = model_args.fusion_grid
    return sizes


def small_mllama_config(tokenizer, model_size: str = "small") -> MllamaConfig:
    """The small (or tiny) Mllama for `tokenizer`: `<|image|>` is its last id, as in Llama 3.2 Vision."""
    size = MODEL_SIZES[model_size]
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    vision = dict(**size["vision"], image_size=size["tile"], patch_size=14, max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                  vision_output_dim=2 * size["vision"]["hidden_size"])
    text = dict(**size["text"], vocab_size=image_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=2048)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


def small_default_config(tokenizer, model_size: str = "small", **mdf_kwargs) -> MdfMllmConfig:
    """The small (or tiny) MDF-MLLM for `tokenizer`, built from scratch."""
    kwargs = {**mdf_sizes(ModelArguments(model_size=model_size)), **mdf_kwargs}
    return MdfMllmConfig.from_mllama_config(small_mllama_config(tokenizer, model_size), **kwargs)


def mdf_kwargs(model_args: ModelArguments, processor: MdfMllmProcessor) -> dict:
    kwargs = dict(use_film=not model_args.no_film, verbalizer_token_ids=processor.verbalizer_token_ids,
                  id2label=dict(enumerate(processor.label_names)), verbalizers=processor.verbalizers,
                  disease_types=[kind for _, _, kind in DEFAULT_LABELS], **mdf_sizes(model_args))
    fusion_layers = parse_fusion_layers(model_args.fusion_layers)
    if fusion_layers is not None:
        kwargs["fusion_layers"] = fusion_layers
    if model_args.seg_loss_weight is not None:
        kwargs["seg_loss_weight"] = model_args.seg_loss_weight
    return kwargs


def build_model(model_args: ModelArguments, processor: MdfMllmProcessor, bf16: bool = False, checkpoint=None):
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

            # QLoRA's NF4 with double quantisation and bf16 compute. Left out of 4-bit: every module with "unet" in its
            # name (the MDF modules, as is_mdf_parameter tells them), the vision projector and lm_head.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=[".*unet.*", "multi_modal_projector", "lm_head"],
            )
        model = from_base(model_args.base_model, torch.bfloat16 if bf16 else torch.float32, **kwargs)
        if model_args.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            # Freezes everything and puts every weight left out of 4-bit in fp32; LoRA then unfreezes the adapters
            # and the MDF modules. Gradient checkpointing stays with --gradient_checkpointing (the Trainer's).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, model_args.model_size or
                                                                     "small", **kwargs))
        open_gates(model)
    if model_args.freeze_vision:
        for module in (model.model.vision_model, model.model.multi_modal_projector):
            module.requires_grad_(False)
    if model_args.freeze_unet and model.model.unet is not None:
        model.model.unet.requires_grad_(False)
    if model_args.lora:
        model = with_lora(model, model_args)
    return model


def from_base(base: str, dtype, **kwargs) -> MdfMllmForConditionalGeneration:
    """The base's weights (every one must load) plus freshly initialised MDF modules, reported in one line rather
    than transformers' table of the (expected) missing keys."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = MdfMllmForConditionalGeneration.from_pretrained(base, dtype=dtype, output_loading_info=True,
                                                                      **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    print(f"loaded every base weight from {base}; {len(info['missing_keys'])} MDF tensors initialised")
    return model


# Flamingo's zero-initialised gates assume a pretrained language model. From scratch, a closed gate and an untrained
# branch keep each other at zero (the gate's gradient is the branch's output and vice versa), so a model without a base
# checkpoint (our stock base included) starts every cross-attention gate, Mllama's and the U-Net branch's, here.
FROM_SCRATCH_GATE = 0.5


def open_gates(model, value: float = FROM_SCRATCH_GATE) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "unet_attn.gate")):
                param.fill_(value)


def with_lora(model, model_args: ModelArguments):
    """LoRA on the text model's attention and MLP projections; every MDF module trains fully and is saved."""
    from peft import get_peft_model

    return get_peft_model(model, model.mdf_lora_config(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha))


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_data(data_args: DataArguments):
    from dataset_builder import load

    if data_args.dataset == "synthetic":
        kwargs = dict(image_size=data_args.image_size)
        if data_args.num_images:
            kwargs["num_images"] = data_args.num_images
        return load("synthetic", seed=data_args.dataset_seed, **kwargs)
    return load(data_args.dataset, fives=data_args.fives, hrf=data_args.hrf, stonerounds=data_args.stonerounds,
                data_dir=data_args.data_dir, seed=data_args.dataset_seed)


class ProcessedSplit(torch.utils.data.Dataset):
    """One split run through the processor once: each item is what the model takes, batch dimension removed.

    `with_answers` appends the verbalizer and returns `labels` (training, validation loss); without it the items are
    prompts for `classify()`, and `label_ids` holds the truth, `cases` each item's case id and file name. Vessel
    masks are used when every photo has one (`has_masks`).
    """

    def __init__(self, split, processor: MdfMllmProcessor, with_answers: bool, no_text: bool = False):
        self.label_ids = list(split["label"])
        self.cases = [{key: example.get(key) for key in ("case_id", "file_name")} for example in
                      split.select_columns([c for c in ("case_id", "file_name") if c in split.column_names])]
        self.has_masks = len(split) > 0 and all(mask is not None for mask in split["vessel_mask"])
        self.items = []
        for example in tqdm(split, desc=f"preprocessing the {split.split or ''} split", leave=False):
            inputs = processor(
                images=[example["image"]],
                clinical_text=[None if no_text else example["text"]],
                labels=[example["label"]] if with_answers else None,
                vessel_masks=[example["vessel_mask"]] if self.has_masks else None,
            )
            self.items.append({key: value[0] for key, value in inputs.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def process_splits(dataset, processor, no_text: bool) -> dict[str, ProcessedSplit]:
    return {
        "train": ProcessedSplit(dataset["train"], processor, with_answers=True, no_text=no_text),
        "validation": ProcessedSplit(dataset["validation"], processor, with_answers=True, no_text=no_text),
        "test": ProcessedSplit(dataset["test"], processor, with_answers=False, no_text=no_text),
    }


class MllamaCollator(MdfMllmDataCollator):
    """The MDF collator's batches without the U-Net inputs, for a stock Mllama."""

    def __call__(self, features):
        return {k: v for k, v in super().__call__(features).items() if k not in ("unet_pixel_values", "vessel_mask")}


# ----------------------------------------------------------------------------------------------------------------------
# Training


def unet_branches(model) -> dict[str, torch.nn.Module]:
    """Fused layer index -> its U-Net branch (the trained copy under LoRA's modules_to_save)."""
    pattern = re.compile(r".*layers\.(\d+)\.unet_attn(\.modules_to_save\.default)?")
    return {match[1]: module for name, module in model.named_modules() if (match := pattern.fullmatch(name))}


def gate_values(model) -> dict:
    """{"gates": {layer: tanh(g_u)}, "tau": {layer: tau}} of every fused layer."""
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float()  # noqa: E731 (FSDP2)
    branches = unet_branches(model)
    return {"gates": {layer: full(b.gate).tanh().item() for layer, b in branches.items()},
            "tau": {layer: full(b.logit_scale).item() for layer, b in branches.items()}}


class GateLogger(TrainerCallback):
    """Every fused layer's tanh(g_u) and tau at the start, at every logging step and at the end of training."""

    def __init__(self):
        self.history = []

    def record(self, state, model):
        if model is not None and unet_branches(model) and (not self.history or self.history[-1]["step"] !=
                                                          state.global_step):
            self.history.append({"step": state.global_step, **gate_values(model)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(state, model)

    on_log = on_train_end = on_train_begin


class LabelledProgress(ProgressCallback):
    """The Trainer's progress bar, labelled with what is training."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label)


def parameter_kind(name: str) -> str:
    """"gate" (a U-Net branch's g_u), "mdf" (any other MDF parameter) or "base"."""
    return "gate" if re.search(r"unet_attn\.(modules_to_save\.default\.)?gate$", name) else (
        "mdf" if is_mdf_parameter(name) else "base")


class MdfTrainer(Trainer):
    """Trainer whose optimizer gives the MDF parameters, and the U-Net gates among them, learning rates of their own.

    `learning_rates`: {"mdf": lr, "gate": lr}, either may be missing (then that kind trains at the rate of the kind
    above it: gates as MDF, MDF as base). The gates' own group has no weight decay, which would pull them shut.
    """

    def __init__(self, *args, learning_rates: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.learning_rates = {kind: lr for kind, lr in (learning_rates or {}).items() if lr is not None}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not self.learning_rates or optimizer.state:
            return optimizer
        names = {id(p): name for name, p in (model or self.model).named_parameters()}
        rates = self.learning_rates

        def kind(param) -> str:
            found = parameter_kind(names[id(param)])
            return "mdf" if found == "gate" and "gate" not in rates else found

        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:  # each (weight decay) group split by kind
            for name in ("base", "mdf", "gate"):
                params = [p for p in group["params"] if kind(p) == name]
                lr = group["lr"] if name == "base" else rates.get(name, rates.get("mdf", group["lr"]))
                decay = 0.0 if name == "gate" else group["weight_decay"]
                if params:
                    optimizer.add_param_group({**group, "params": params, "lr": lr, "weight_decay": decay})
        return optimizer


def train(model, splits, collator, training_args: MdfTrainingArguments, resume_from_checkpoint=None, callbacks=None,
          learning_rates: dict[str, float] | None = None, label: str | None = None) -> Trainer:
    """Train with the Trainer (`learning_rates`: see MdfTrainer; `label`: the progress bar's description)."""
    trainer = MdfTrainer(model=model, args=training_args, train_dataset=splits["train"],
                         eval_dataset=splits["validation"] if len(splits["validation"]) else None,
                         data_collator=collator, callbacks=callbacks, learning_rates=learning_rates)
    if label and not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LabelledProgress(label))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def is_complete_checkpoint(folder: Path) -> bool:
    # Trainer writes trainer_state.json last: a process killed while saving leaves a folder without it.
    return (folder / "trainer_state.json").is_file()


def resolve_checkpoint(resume: str | None, output_dir: str) -> str | None:
    """`latest`: the newest complete checkpoint in `output_dir` (None if there is none); a path: that checkpoint,
    which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        folders = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        complete = [folder for folder in folders if is_complete_checkpoint(folder)]
        for folder in sorted(set(folders) - set(complete)):
            print(f"skipping incomplete checkpoint {folder} (no trainer_state.json: the run stopped mid-save)")
        return str(complete[-1]) if complete else None
    if not is_complete_checkpoint(Path(resume)):
        raise UsageError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (no trainer_state.json)")
    return resume


def remove_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoints only serve to resume an unfinished arm: once it has finished, they go."""
    folders = list(Path(output_dir).glob("checkpoint-*"))
    for folder in folders:
        shutil.rmtree(folder)
    return folders


@torch.no_grad()
def predict(model, split: ProcessedSplit, collator, batch_size: int, bf16: bool = False) -> np.ndarray:
    """classify() over a split of prompts: (N, K) class probabilities."""
    model.eval()
    device = next(model.parameters()).device
    probabilities = []
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {key: value.to(device) for key, value in batch.items() if key != "vessel_mask"}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probabilities.append(model.classify(**batch).float().cpu())
    return torch.cat(probabilities).numpy()


def evaluate_model(model, splits, collator, config: MdfMllmConfig, job_args: JobArguments, bf16=False) -> dict:
    probabilities = predict(model, splits["test"], collator, job_args.eval_batch_size, bf16)
    report = reporting.classification_report(
        splits["test"].label_ids, probabilities.argmax(-1).tolist(), config.label_names, config.disease_types,
        n_bootstrap=job_args.n_bootstrap, items=splits["test"].cases, probabilities=probabilities,
    )
    report["probabilities"] = probabilities.tolist()
    return report


def unwrap(model):
    """The plain MdfMllmForConditionalGeneration (LoRA merged in) for evaluation and export."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ----------------------------------------------------------------------------------------------------------------------
# Stages


def make_base(model_args, data_args, job_args, training_args, folder: Path, dataset=None) -> Path:
    """Base: a stock MllamaForConditionalGeneration of the small layout, trained on the train split with the LM loss
    on the answer and written with its stock MllamaProcessor to `folder` (plain transformers loads both)."""
    size = model_args.model_size or "small"
    stock = stock_processor(size)
    processor = mdf_processor(stock, MODEL_SIZES[size]["unet"]["image_size"])
    splits = process_splits(dataset or load_data(data_args), processor, no_text=data_args.no_text)
    set_seed(training_args.seed)
    base = MllamaForConditionalGeneration(small_mllama_config(stock.tokenizer, size))
    open_gates(base)  # a pretrained base's cross-attention gates are open; ours are trained from scratch
    args = replace(training_args, output_dir=str(folder / "training"), num_train_epochs=job_args.base_epochs,
                   eval_strategy="no", save_strategy="no", resume_from_checkpoint=None)
    train(base, splits, MllamaCollator(processor), args, label=f"base: stock Mllama ({size})")
    shutil.rmtree(folder / "training", ignore_errors=True)
    base.save_pretrained(folder)
    stock.save_pretrained(folder)
    return folder


def base_cache_folder(model_args, data_args, job_args, training_args) -> Path:
    """~/.cache/mdf_mllm/base-<key>: the key hashes every setting and the code the base depends on."""
    settings = [model_args.model_size or "small", data_args, job_args.base_epochs, training_args.learning_rate,
                training_args.per_device_train_batch_size, training_args.seed, training_args.weight_decay,
                training_args.warmup_steps, str(training_args.lr_scheduler_type), MODEL_SIZES, BASE_CHAT_TEMPLATE,
                [inspect.getsource(f) for f in (make_base, stock_processor, small_mllama_config, open_gates, train)]]
    code = [Path(module.__file__).read_bytes() for module in (sys.modules[MdfMllmProcessor.__module__],)]
    key = hashlib.sha256(repr(settings).encode() + b"".join(code) + torch.__version__.encode()).hexdigest()[:16]
    root = job_args.base_cache_dir or os.environ.get("MDF_MLLM_BASE_CACHE") or Path.home() / ".cache" / "mdf_mllm"
    return Path(root) / f"base-{key}"


def cached_base(model_args, data_args, job_args, training_args, dataset) -> str:
    """The main job's base: made once per key (into a temporary folder renamed when complete), then reused."""
    folder = base_cache_folder(model_args, data_args, job_args, training_args)
    if (folder / "config.json").is_file():
        print(f"base: reusing {folder}")
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        make_base(model_args, data_args, job_args, replace(training_args, output_dir=str(staging)), staging, dataset)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"base: trained and cached in {folder}")
    return str(folder)


def vessel_loss(model, batch: dict) -> torch.Tensor:
    """BCE of the U-Net decoder's vessel logits, FiLM conditioned on the prompt (answer excluded) as in fusion."""
    with torch.no_grad():
        prompt_mask = batch["attention_mask"] * (batch["labels"] == -100)
        context = model.model.text_context(batch["input_ids"], None, prompt_mask)
    unet = model.model.unet
    logits = unet.decode(unet.encode(batch["unet_pixel_values"].to(model.dtype), context))
    return F.binary_cross_entropy_with_logits(logits.float(), batch["vessel_mask"].float())


def warm_up_unet(model, split, collator, job_args, training_args, path: Path) -> list[float]:
    """Stage 1: the U-Net (FiLM and decoder included) learns vessel segmentation alone, so that the gates of stage 2
    open onto features that mean something. Writes its weights to `path`; returns the mean loss of each epoch."""
    optimizer = torch.optim.AdamW(model.model.unet.parameters(), lr=job_args.stage1_learning_rate)
    loader = torch.utils.data.DataLoader(split, batch_size=training_args.per_device_train_batch_size, shuffle=True,
                                         collate_fn=collator, generator=torch.Generator().manual_seed(training_args.seed))
    steps = max(1, math.ceil(job_args.stage1_epochs * len(loader)))
    bar, losses = tqdm(total=steps, desc="stage 1: U-Net vessel warm-up", disable=training_args.disable_tqdm), []
    model.train()
    step = 0  # counted here: a disabled tqdm bar (disable_tqdm) does not count
    while step < steps:
        epoch = []
        for batch in loader:
            loss = vessel_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            epoch.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step == steps:
                break
        losses.append(float(np.mean(epoch)))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.model.unet.state_dict().items()}, path)
    return losses


def run_one(name, model_args, splits, collator, processor, training_args, job_args, resume=None, unet_weights=None):
    """Train one model (its U-Net from `unet_weights` when given) and evaluate it on the test split."""
    set_seed(training_args.seed)
    model = build_model(model_args, processor, bf16=training_args.bf16, checkpoint=resume)
    if unet_weights and not resume:
        unwrap_peft(model).model.unet.load_state_dict(load_file(unet_weights))
    gates = GateLogger()
    start = time.perf_counter()
    rates = {"mdf": model_args.mdf_learning_rate, "gate": model_args.gate_learning_rate}
    trainer = train(model, splits, collator, training_args, resume, [gates], rates,
                    label=f"stage 2: {name}" if model_args.base_model else name)
    seconds = time.perf_counter() - start
    model = unwrap(trainer.model)
    if trainer.is_fsdp_enabled:
        # Sharded over processes: gather one checkpoint (every process takes part) for the main process to reload.
        final = os.path.join(training_args.output_dir, "final-model")
        trainer.save_model(final)
        if trainer.is_world_process_zero():
            model = MdfMllmForConditionalGeneration.from_pretrained(final)
    if not trainer.is_world_process_zero():  # under accelerate launch, the main process evaluates and exports
        return model, trainer, None
    state = trainer.accelerator.state
    print(f"{name}: trained with {state.distributed_type.value} over {state.num_processes} process(es)"
          if state.num_processes > 1 else f"{name}: trained in one process")
    report = evaluate_model(model, splits, collator, model.config, job_args, bf16=training_args.bf16)
    report.update(name=name, train_seconds=round(seconds, 1), parameters=sum(p.numel() for p in model.parameters()),
                  gate_history=gates.history)
    return model, trainer, report


def unwrap_peft(model):
    """The model under a PEFT wrapper (the same modules, not merged)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----------------------------------------------------------------------------------------------------------------------
# The job


def shard_on_cpu_processes() -> None:
    """Let `accelerate launch` with an FSDP config shard the model over CPU processes (gloo).

    accelerate 1.15 turns FSDP on only for GPU-like process groups and silently falls back to DDP on CPU, although
    torch's FSDP2 runs on gloo; marking the CPU process group as a multi-device one before the Trainer builds its
    Accelerator keeps the FSDP plugin, and every tensor stays on the CPU.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def stage1(model_args, splits, collator, processor, job_args, training_args) -> tuple[str | None, list[float]]:
    """The stage-1 U-Net file (None where there is no stage 1) and its loss per epoch."""
    if job_args.from_scratch or job_args.no_stage1 or parse_fusion_layers(model_args.fusion_layers) == {}:
        return None, []
    if not splits["train"].has_masks:
        print("stage 1 skipped: the training photos have no vessel masks")
        return None, []
    set_seed(training_args.seed)
    model = build_model(replace(model_args, lora=False), processor, bf16=training_args.bf16)
    path = Path(training_args.output_dir) / "stage1" / "unet.safetensors"
    losses = warm_up_unet(model, splits["train"], collator, job_args, training_args, path)
    print(f"stage 1: vessel loss per epoch {[round(loss, 4) for loss in losses]}; U-Net written to {path}")
    return str(path), losses


def run(model_args, data_args, job_args, training_args) -> None:
    out = Path(training_args.output_dir)
    if job_args.make_base:
        folder = make_base(model_args, data_args, job_args, training_args, out / "base")
        print(f"base written to {folder}: MllamaForConditionalGeneration + MllamaProcessor, plain transformers")
        return
    shard_on_cpu_processes()
    dataset = load_data(data_args)
    if not job_args.from_scratch and not model_args.base_model:
        base = cached_base(model_args, data_args, job_args, training_args, dataset)
        model_args = replace(model_args, base_model=base, model_size=model_args.model_size or "small")
    processor = base_processor(model_args) if model_args.base_model else default_processor(model_args)
    collator = MdfMllmDataCollator(processor)
    if job_args.ablation:
        import ablation  # it imports this module

        ablation.run_ablation(model_args, data_args, job_args, training_args, dataset, processor, collator,
                              epochs=job_args.ablation_epochs)
        return
    splits = process_splits(dataset, processor, no_text=data_args.no_text)
    unet_weights, stage1_losses = stage1(model_args, splits, collator, processor, job_args, training_args)
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume:
        print(f"resuming from {resume}")
    arms = [run_one("MDF-MLLM", model_args, splits, collator, processor, training_args, job_args, resume,
                    unet_weights)]
    if job_args.baseline and parse_fusion_layers(model_args.fusion_layers) != {}:
        baseline_args = replace(training_args, output_dir=str(out / "baseline"), resume_from_checkpoint=None)
        arms.append(run_one("Mllama baseline", replace(model_args, fusion_layers="none"), splits, collator,
                            processor, baseline_args, job_args))
    if arms[0][2] is None:  # not the main process
        return
    hub_export.write_comparison(arms, out, stage1_losses)
    model, trainer, report = arms[0]
    export_dir = Path(job_args.export_dir or out / "mdf-mllm")
    hub_export.export(model, processor, report, trainer, dataset, data_args, model_args, str(export_dir),
                      baseline=(arms[1][2], arms[1][1]) if len(arms) > 1 else None, gate_history=report["gate_history"])
    if training_args.push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=training_args.hub_model_id, folder_path=str(export_dir), repo_type="model")
    removed = [folder for _, trainer, _ in arms for folder in remove_checkpoints(trainer.args.output_dir)]
    if removed:
        print(f"checkpoints: {len(removed)} removed once training finished; none kept")
    print(hub_export.summary([r for _, _, r in arms], model_args, data_args, out, export_dir))


def main(argv: list[str] | None = None) -> None:
    try:
        arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
        check_arguments(*arguments)
        run(*arguments)
    except UsageError as error:
        print(f"train_hf.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
