"""The main job: fine-tune MDF-MLLM with the HF Trainer, compare it with plain Mllama, export a Hub model repository.

    python train_hf.py                     # the whole study offline: synthetic set, small MDF-MLLM + Mllama baseline
    python train_hf.py job.yaml            # the same arguments from a YAML or JSON file
    python train_hf.py --ablation          # baseline, all depths, each single depth, no FiLM, no text; N seeds each
    python train_hf.py --base_model meta-llama/Llama-3.2-11B-Vision-Instruct --dataset all \\
        --fives FIVES --hrf HRF --stonerounds StoneRounds --lora --bf16 --gradient_checkpointing
    accelerate launch --config_file configs/fsdp_gpu.yaml train_hf.py --base_model ... --bf16

With no `--base_model` the model is the small default config (same shape as the 11B layout, a few million
parameters) built from scratch with the offline tokenizer; with one, every base weight comes from that checkpoint.
"""

import json
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
from transformers import (
    AutoProcessor,
    IntervalStrategy,
    SchedulerType,
    HfArgumentParser,
    MllamaConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import SaveStrategy

import reporting
from configuration_mdf_mllm import DEFAULT_LABELS, MdfMllmConfig
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from pipeline_mdf_mllm import register_pipeline
from processing_mdf_mllm import MdfMllmDataCollator, MdfMllmImageProcessor, MdfMllmProcessor, build_default_processor


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class ModelArguments:
    base_model: str | None = field(
        default=None, metadata={"help": "A Llama 3.2 Vision checkpoint (Hub id or folder); none = small default"}
    )
    model_size: str = field(default="small", metadata={"help": "Without --base_model: 'small' (default) or 'tiny'"})
    fusion_layers: str | None = field(
        default=None, metadata={"help": "'layer:depth,...' e.g. '3:1,8:1'; 'none' = plain Mllama; default: spread"}
    )
    no_film: bool = field(default=False, metadata={"help": "Do not condition the U-Net on the prompt"})
    seg_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the vessel-segmentation loss"})
    unet_image_size: int | None = field(default=None, metadata={"help": "U-Net input size S (default per size)"})
    fusion_grid: int | None = field(default=None, metadata={"help": "G: U-Net tokens per fused layer = G*G"})
    lora: bool = field(default=False, metadata={"help": "LoRA on the text model; the MDF modules train fully"})
    lora_rank: int = 16
    lora_alpha: int = 32
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze Mllama's vision tower and projector"})
    freeze_unet: bool = field(default=False, metadata={"help": "Freeze the U-Net (FiLM included)"})


@dataclass
class DataArguments:
    dataset: str = field(
        default="synthetic", metadata={"help": "synthetic | all | fives | hrf | stonerounds | manifest"}
    )
    fives: str | None = None
    hrf: str | None = None
    stonerounds: str | None = None
    data_dir: str | None = field(default=None, metadata={"help": "Folder with metadata.jsonl (--dataset manifest)"})
    num_images: int | None = field(
        default=None, metadata={"help": "Synthetic set size (default: the paper's 1,305-pair composition)"}
    )
    image_size: int = field(default=256, metadata={"help": "Synthetic photo side in pixels"})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set and of the splits"})
    no_text: bool = field(default=False, metadata={"help": "Drop the clinical text from every prompt"})


@dataclass
class JobArguments:
    baseline: bool = field(default=True, metadata={"help": "Also train the plain Mllama of the same size"})
    ablation: bool = field(default=False, metadata={"help": "Run the ablation table instead of the main job"})
    seeds: int = field(default=3, metadata={"help": "Seeds per ablation row"})
    export_dir: str = field(default="outputs/mdf-mllm", metadata={"help": "The Hub-ready model folder"})
    n_bootstrap: int = 1000
    eval_batch_size: int = 32


@dataclass
class MdfTrainingArguments(TrainingArguments):
    """TrainingArguments with the main job's defaults."""

    output_dir: str = "outputs/run"
    num_train_epochs: float = 6.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: float = 0.05
    lr_scheduler_type: SchedulerType | str = "cosine"
    logging_steps: int = 10
    eval_strategy: IntervalStrategy | str = "epoch"
    save_strategy: SaveStrategy | str = "epoch"
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = False


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, JobArguments, MdfTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, JobArguments, MdfTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def parse_fusion_layers(spec: str | None) -> dict[int, int] | None:
    """'3:1,8:1' -> {3: 1, 8: 1}; 'none' -> {} (plain Mllama); None -> the config's default spread."""
    if spec is None:
        return None
    if spec.strip().lower() in {"none", "", "{}"}:
        return {}
    try:
        return {int(layer): int(depth) for layer, depth in (pair.split(":") for pair in spec.split(","))}
    except ValueError:
        raise ValueError(f"--fusion_layers: expected 'layer:depth,...' such as '3:1,8:1', got {spec!r}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Model and processor

# Without a base checkpoint: the 11B layout's shape at a size two CPU cores train in minutes.
MODEL_SIZES = {
    "small": dict(
        tile=112,
        unet=dict(in_channels=3, base_channels=16, image_size=128, use_decoder=True),
        grid=8,
        projector_dim=64,
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1, attention_heads=2),
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[1, 3, 5, 7],
        ),
    ),
    "tiny": dict(
        tile=28,
        unet=dict(in_channels=3, base_channels=4, image_size=32, use_decoder=True),
        grid=2,
        projector_dim=8,
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[1, 3],
        ),
    ),
}


def default_processor(model_args: ModelArguments) -> MdfMllmProcessor:
    size = MODEL_SIZES[model_args.model_size]
    return build_default_processor(
        image_size=size["tile"], unet_image_size=model_args.unet_image_size or size["unet"]["image_size"]
    )


def base_processor(model_args: ModelArguments) -> MdfMllmProcessor:
    """The base checkpoint's own tokenizer and image settings, plus the U-Net view."""
    base = AutoProcessor.from_pretrained(model_args.base_model)
    image_settings = {k: v for k, v in base.image_processor.to_dict().items() if not k.startswith("_")}
    image_settings.pop("image_processor_type", None)
    unet_size = model_args.unet_image_size or MdfMllmConfig().unet_config["image_size"]
    image_processor = MdfMllmImageProcessor(**image_settings, unet_image_size=unet_size)
    return MdfMllmProcessor(image_processor, base.tokenizer)


def small_default_config(tokenizer, model_size: str = "small", **mdf_kwargs) -> MdfMllmConfig:
    """The small (or tiny) default MDF-MLLM for `tokenizer`: `<|image|>` is its last id, as in Llama 3.2 Vision."""
    size = MODEL_SIZES[model_size]
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    vision = dict(
        **size["vision"],
        image_size=size["tile"],
        patch_size=14,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[0],
        vision_output_dim=2 * size["vision"]["hidden_size"],
    )
    text = dict(
        **size["text"],
        vocab_size=image_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=2048,
    )
    mllama = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    unet_config = {**size["unet"], **mdf_kwargs.pop("unet_config", {})}
    defaults = dict(fusion_grid=size["grid"], projector_dim=size["projector_dim"], film_hidden_dim=64)
    return MdfMllmConfig.from_mllama_config(mllama, unet_config=unet_config, **{**defaults, **mdf_kwargs})


def mdf_kwargs(model_args: ModelArguments, processor: MdfMllmProcessor) -> dict:
    kwargs = dict(
        use_film=not model_args.no_film,
        verbalizer_token_ids=processor.verbalizer_token_ids,
        id2label=dict(enumerate(processor.label_names)),
        verbalizers=processor.verbalizers,
        disease_types=[kind for _, _, kind in DEFAULT_LABELS],
    )
    if model_args.unet_image_size:
        kwargs["unet_config"] = {"image_size": model_args.unet_image_size}
    if model_args.fusion_grid:
        kwargs["fusion_grid"] = model_args.fusion_grid
    fusion_layers = parse_fusion_layers(model_args.fusion_layers)
    if fusion_layers is not None:
        kwargs["fusion_layers"] = fusion_layers
    if model_args.seg_loss_weight is not None:
        kwargs["seg_loss_weight"] = model_args.seg_loss_weight
    return kwargs


def build_model(model_args: ModelArguments, processor: MdfMllmProcessor, bf16: bool = False, checkpoint=None):
    kwargs = mdf_kwargs(model_args, processor)
    if checkpoint and not model_args.lora:
        # Trainer's resume loads a checkpoint's state dict as saved, in Mllama's on-disk key names, which do not match
        # the module names (transformers 5.24 renames keys only in from_pretrained): load the weights here instead.
        model = MdfMllmForConditionalGeneration.from_pretrained(checkpoint)
    elif model_args.base_model:
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = MdfMllmForConditionalGeneration.from_pretrained(model_args.base_model, dtype=dtype, **kwargs)
    else:
        model = MdfMllmForConditionalGeneration(small_default_config(processor.tokenizer, model_args.model_size, **kwargs))
        open_gates(model)
    if model_args.freeze_vision:
        for module in (model.model.vision_model, model.model.multi_modal_projector):
            module.requires_grad_(False)
    if model_args.freeze_unet and model.model.unet is not None:
        model.model.unet.requires_grad_(False)
    if model_args.lora:
        model = with_lora(model, model_args)
    return model


# Flamingo's zero-initialised gates assume a pretrained language model. From scratch, a closed gate and an untrained
# branch keep each other at zero (the gate's gradient is the branch's output and vice versa), so a model without a base
# checkpoint starts every cross-attention gate, Mllama's and the U-Net branch's alike, at this value.
FROM_SCRATCH_GATE = 0.5


def open_gates(model, value: float = FROM_SCRATCH_GATE) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "unet_attn.gate")):
                param.fill_(value)


# The text model's attention and MLP projections (not the U-Net branch's k/v, which train fully).
LORA_TARGETS = r".*language_model.*\.(self_attn|cross_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def with_lora(model, model_args: ModelArguments):
    """LoRA on the text model's attention and MLP projections; every MDF module trains fully and is saved."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        modules_to_save=["unet", "unet_projector", "unet_attn"],
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_data(data_args: DataArguments):
    from dataset_builder import load

    if data_args.dataset == "synthetic":
        kwargs = dict(image_size=data_args.image_size)
        if data_args.num_images:
            kwargs["num_images"] = data_args.num_images
        return load("synthetic", seed=data_args.dataset_seed, **kwargs)
    return load(
        data_args.dataset,
        fives=data_args.fives,
        hrf=data_args.hrf,
        stonerounds=data_args.stonerounds,
        data_dir=data_args.data_dir,
        seed=data_args.dataset_seed,
    )


class ProcessedSplit(torch.utils.data.Dataset):
    """One split run through the processor once: each item is what the model takes, batch dimension removed.

    `with_answers` appends the verbalizer and returns `labels` (training, validation loss); without it the items are
    prompts for `classify()`, and `label_ids` holds the truth. Vessel masks are used when every photo has one.
    """

    def __init__(self, split, processor: MdfMllmProcessor, with_answers: bool, no_text: bool = False):
        self.label_ids = list(split["label"])
        use_masks = len(split) > 0 and all(mask is not None for mask in split["vessel_mask"])
        self.items = []
        for example in split:
            inputs = processor(
                images=[example["image"]],
                clinical_text=[None if no_text else example["text"]],
                labels=[example["label"]] if with_answers else None,
                vessel_masks=[example["vessel_mask"]] if use_masks else None,
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


# ----------------------------------------------------------------------------------------------------------------------
# Train, evaluate, export


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
        raise ValueError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (no trainer_state.json)")
    return resume


def train(model, splits, collator, training_args: MdfTrainingArguments, resume_from_checkpoint=None) -> Trainer:
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"] if len(splits["validation"]) else None,
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


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
        splits["test"].label_ids,
        probabilities.argmax(-1).tolist(),
        config.label_names,
        config.disease_types,
        n_bootstrap=job_args.n_bootstrap,
    )
    report["probabilities"] = probabilities.tolist()
    return report


def unwrap(model):
    """The plain MdfMllmForConditionalGeneration (LoRA merged in) for evaluation and export."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def export(model, processor, report, trainer, dataset, data_args, model_args, export_dir: str) -> Path:
    """Write a complete Hub model repository into `export_dir`, atomically: everything goes to a temporary folder
    beside it that replaces the old one only once complete, so a crash never leaves a half-written model."""
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-", dir=export_dir.parent))
    try:
        write_repository(staging, model, processor, report, trainer, dataset, data_args, model_args)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = export_dir.with_name(f".{export_dir.name}-previous")
    if export_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        export_dir.rename(previous)
    staging.rename(export_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return export_dir


def write_repository(folder: Path, model, processor, report, trainer, dataset, data_args, model_args) -> None:
    """Weights, code, processor, pipeline registration, results, plots and the model card."""
    model.config.verbalizer_token_ids = processor.verbalizer_token_ids
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    register_pipeline(folder)
    reporting.write_results(report, folder)
    if any("loss" in entry or "eval_loss" in entry for entry in trainer.state.log_history):
        reporting.plot_training_curve(trainer.state.log_history, folder / "training_curve.png")
    widgets = _widget_examples(folder, dataset["test"], report, model.config)
    reporting.write_model_card(
        folder,
        base_model=model_args.base_model or "meta-llama/Llama-3.2-11B-Vision-Instruct",
        metrics_report=report,
        datasets=[data_args.dataset],
        widget_examples=widgets,
        training_args_summary=_training_summary(trainer, model_args, data_args),
        synthetic_data=data_args.dataset == "synthetic",
    )


def _widget_examples(folder: Path, test_split, report, config, count: int = 3) -> list[dict]:
    """The first test photos of distinct classes, shipped in the folder with the model's (static) outputs."""
    (folder / "examples").mkdir()
    widgets, seen = [], set()
    for index, example in enumerate(test_split):
        if example["label"] in seen or len(widgets) == count:
            continue
        seen.add(example["label"])
        path = folder / "examples" / f"{config.label_names[example['label']]}.png"
        example["image"].convert("RGB").save(path)
        scores = report["probabilities"][index]
        widgets.append(
            {
                "image_path": str(path.relative_to(folder)),
                "text": example["text"],
                "output": {name: round(float(score), 4) for name, score in zip(config.label_names, scores)},
            }
        )
    return widgets


def _training_summary(trainer, model_args, data_args) -> dict:
    args = trainer.args
    return {
        "base_model": model_args.base_model or f"none (small default config, {model_args.model_size})",
        "dataset": data_args.dataset,
        "train_examples": len(trainer.train_dataset),
        "epochs": args.num_train_epochs,
        "batch_size": args.per_device_train_batch_size,
        "learning_rate": args.learning_rate,
        "lora": model_args.lora,
        "bf16": args.bf16,
        "seed": args.seed,
        "train_runtime_s": round(trainer.state.log_history[-1].get("train_runtime", float("nan")), 1),
    }


def run_one(name, model_args, splits, collator, processor, training_args, job_args, resume=None):
    """Train one model and evaluate it on the test split."""
    set_seed(training_args.seed)
    model = build_model(model_args, processor, bf16=training_args.bf16, checkpoint=resume)
    start = time.perf_counter()
    trainer = train(model, splits, collator, training_args, resume_from_checkpoint=resume)
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
    print(f"{name}: trained with {state.distributed_type.value} over {state.num_processes} process(es)")
    report = evaluate_model(model, splits, collator, model.config, job_args, bf16=training_args.bf16)
    report["train_seconds"] = round(seconds, 1)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["name"] = name
    return model, trainer, report


def comparison_table(reports: list[dict]) -> str:
    rows = [
        "| model | parameters | accuracy (95% CI) | macro F1 (95% CI) | type accuracy | type macro F1 | train s |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in reports:
        d, t = r["disease"], r["type"]
        rows.append(
            f"| {r['name']} | {r['parameters']:,} | {d['accuracy']:.3f} ({d['ci95']['accuracy'][0]:.3f}-"
            f"{d['ci95']['accuracy'][1]:.3f}) | {d['macro_f1']:.3f} ({d['ci95']['macro_f1'][0]:.3f}-"
            f"{d['ci95']['macro_f1'][1]:.3f}) | {t['accuracy']:.3f} | {t['macro_f1']:.3f} | {r['train_seconds']} |"
        )
    return "\n".join(rows)


ABLATIONS = {
    "Mllama baseline": dict(fusion_layers="none"),
    "MDF, all depths": dict(),
    **{f"MDF, depth {k} only": dict(fusion_layers=f"depth:{k}") for k in range(1, 5)},
    "MDF, no FiLM": dict(no_film=True),
    "MDF, no clinical text": dict(no_text=True),
}


def ablation_model_args(model_args: ModelArguments, change: dict) -> ModelArguments:
    change = {k: v for k, v in change.items() if k != "no_text"}
    if str(change.get("fusion_layers", "")).startswith("depth:"):
        depth = change["fusion_layers"].split(":")[1]
        layers = MODEL_SIZES[model_args.model_size]["text"]["cross_attention_layers"]
        change["fusion_layers"] = ",".join(f"{layer}:{depth}" for layer in layers)
    return replace(model_args, **change)


def run_ablation(model_args, data_args, job_args, training_args, dataset, processor, collator) -> None:
    out = Path(training_args.output_dir)
    with_text = process_splits(dataset, processor, no_text=False)
    without_text = process_splits(dataset, processor, no_text=True)
    rows = []
    for name, change in ABLATIONS.items():
        for seed in range(job_args.seeds):
            run_dir = out / re.sub(r"[^A-Za-z0-9]+", "_", f"{name}-{seed}")
            args = replace(training_args, seed=seed, output_dir=str(run_dir))
            splits = without_text if change.get("no_text") else with_text
            _, _, report = run_one(name, ablation_model_args(model_args, change), splits, collator,
                                   processor, args, job_args)
            if report is None:  # not the main process
                continue
            rows.append({"name": name, "seed": seed, "accuracy": report["disease"]["accuracy"],
                         "macro_f1": report["disease"]["macro_f1"], "type_accuracy": report["type"]["accuracy"],
                         "type_macro_f1": report["type"]["macro_f1"]})
            (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    if not rows:
        return
    table = reporting.ablation_table(rows)
    (out / "ablation.md").write_text(table + "\n")
    reporting.plot_ablation(rows, out / "ablation.png")
    print(table)


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


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, job_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    shard_on_cpu_processes()
    processor = base_processor(model_args) if model_args.base_model else default_processor(model_args)
    collator = MdfMllmDataCollator(processor)
    dataset = load_data(data_args)
    if job_args.ablation:
        run_ablation(model_args, data_args, job_args, training_args, dataset, processor, collator)
        return
    splits = process_splits(dataset, processor, no_text=data_args.no_text)
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume:
        print(f"resuming from {resume}")
    mdf, trainer, mdf_report = run_one("MDF-MLLM", model_args, splits, collator, processor, training_args, job_args,
                                       resume)
    reports = [mdf_report]
    if job_args.baseline and parse_fusion_layers(model_args.fusion_layers) != {}:
        baseline_args = replace(training_args, output_dir=os.path.join(training_args.output_dir, "baseline"))
        _, _, baseline_report = run_one("Mllama baseline", replace(model_args, fusion_layers="none"), splits,
                                        collator, processor, baseline_args, job_args)
        reports.append(baseline_report)
    if mdf_report is None:
        return
    table = comparison_table(reports)
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "probabilities"}
                                                     for r in reports], indent=1))
    folder = export(mdf, processor, mdf_report, trainer, dataset, data_args, model_args, job_args.export_dir)
    if training_args.push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=training_args.hub_model_id, folder_path=str(folder), repo_type="model")
    print(table)
    print(f"\nexported to {folder}")


if __name__ == "__main__":
    main()
