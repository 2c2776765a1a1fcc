"""What the main job (mdf_mllm.train) and the ablation (mdf_mllm.ablation) share: the job's arguments, the base,
stage 1 and one stage-2 model trained and evaluated."""

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import IntervalStrategy, MllamaForConditionalGeneration, SchedulerType, TrainingArguments, set_seed
from transformers.trainer_utils import SaveStrategy

from mdf_mllm import comparison
from mdf_mllm.comparison import Result
from mdf_mllm.model_setup import (
    BASE_CHAT_TEMPLATE,
    BASE_RECORD_FILE,
    build_model,
    mdf_processor,
    open_gates,
    parse_fusion_layers,
    small_mllama_config,
    stock_processor,
    unwrap,
    unwrap_peft,
)
from mdf_mllm.training import (
    UNET_ALONE,
    GateLogger,
    MllamaCollator,
    ProcessedSplit,
    evaluate_model,
    load_data,
    predict,
    process_splits,
    scored,
    train,
    unet_alone_probabilities,
    warm_up_unet,
)
from configuration_mdf_mllm import LAYOUTS
from image_processing_mdf_mllm import MdfMllmImageProcessor
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from processing_mdf_mllm import MdfMllmProcessor


# ----------------------------------------------------------------------------------------------------------------------
# Arguments

DATASETS = ("synthetic", "all", "fives", "hrf", "stonerounds", "manifest")

# The recipe (README "The recipe"; measured in the README's tables). Stage 1 teaches the U-Net the classes from the
# photo alone; stage 2 then keeps it nearly still while the projector and branches learn to carry it into the answer.
STAGE1_EPOCHS = 12.0
STAGE1_LEARNING_RATE = 1e-3
STAGE1_VESSEL_WEIGHT = 0.0
UNET_LEARNING_RATE = 0.0
FILM_LEARNING_RATE = 3e-4


@dataclass
class ModelArguments:
    base_model: str | None = field(default=None, metadata={"help": "A Llama 3.2 Vision checkpoint (Hub id or folder) "
                                                           "to fine-tune; default: the cached small base"})
    model_size: str | None = field(default=None, metadata={"help": "small | tiny: the layout of the base made here "
                                   "and of the MDF modules (default small; with --base_model the MdfMllmConfig defaults)"})
    fusion_layers: str | None = field(default=None, metadata={"help": "'layer:depth,...' e.g. '3:1,8:1' (layers: the "
                                      "base's cross-attention layers, depths 1-4); 'none' = plain Mllama; default: spread"})
    no_film: bool = field(default=False, metadata={"help": "Do not condition the U-Net on the prompt"})
    seg_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the vessel-segmentation loss during "
                                   "fusion (the model config's is 0.1); at 0 the U-Net decoder does not run, which "
                                   "makes an MDF step 1.9x faster here, and stage 1 alone trains it"})
    unet_image_size: int | None = field(default=None, metadata={"help": "U-Net input size S (default per size)"})
    fusion_grid: int | None = field(default=None, metadata={"help": "G: U-Net tokens per fused layer = G*G"})
    mdf_learning_rate: float | None = field(default=3e-3, metadata={"help": "Learning rate of the MDF modules (an "
                                            "optimizer group of their own)"})
    gate_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the U-Net gates g_u "
                                             "(an optimizer group without weight decay; default: the MDF modules')"})
    unet_learning_rate: float | None = field(default=UNET_LEARNING_RATE, metadata={"help": "Learning rate of the "
                                             "U-Net in stage 2 (0 freezes it); None: the MDF modules'"})
    film_learning_rate: float | None = field(default=FILM_LEARNING_RATE, metadata={"help": "Learning rate of FiLM "
                                             "in stage 2 (0 freezes it); None: the MDF modules'"})
    unet_gate_start: float = field(default=0.5, metadata={"help": "Start of the U-Net gates g_u on a base. Above 0, "
                                   "every branch's value projection starts at zero instead, so the model still starts "
                                   "exactly as the base and the first step trains the branch; 0: Flamingo's closed "
                                   "gate, behind which the branch gets no gradient"})
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
    no_stage1: bool = field(default=False, metadata={"help": "Skip stage 1 (the U-Net learning classes and vessels)"})
    stage1_epochs: float = field(default=STAGE1_EPOCHS, metadata={"help": "Epochs of stage 1"})
    stage1_learning_rate: float = field(default=STAGE1_LEARNING_RATE, metadata={"help": "Peak learning rate of stage "
                                        "1 (one-cycle schedule)"})
    stage1_vessel_weight: float = field(default=STAGE1_VESSEL_WEIGHT, metadata={"help": "Weight of the vessel loss "
                                        "beside the class loss in stage 1 (0: the U-Net decoder does not train)"})
    baseline: bool = field(default=True, metadata={"help": "Also train the baseline (plain Mllama, same base)"})
    ablation: bool = field(default=False, metadata={"help": "Run the ablation table instead of the main job"})
    seeds: int = field(default=3, metadata={"help": "Seeds per ablation row"})
    ablation_epochs: float = field(default=2.0, metadata={"help": "Epochs of each ablation run"})
    export_dir: str | None = field(default=None, metadata={"help": "The Hub-ready MDF model folder "
                                                          "(default <output_dir>/mdf-mllm)"})
    overwrite_export: bool = field(default=False, metadata={"help": "Replace an earlier export in --export_dir (a "
                                   "folder holding anything else is never replaced)"})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the 95%% CIs"})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of test-set classification"})
    probe_ladder: bool = field(default=True, metadata={"help": "Write probe_ladder.md: linear probes of the classes "
                               "the photo must tell apart, at every stage of the fusion, before and after stage 2"})


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



def cross_attention_layers(model_args: ModelArguments) -> list[int] | None:
    """The base's cross-attention layer indices (None for a Hub id, read when loaded)."""
    if model_args.base_model is None:
        return LAYOUTS[model_args.model_size or "small"]["mllama"]["text"]["cross_attention_layers"]
    config = Path(model_args.base_model) / "config.json"
    return json.loads(config.read_text())["text_config"]["cross_attention_layers"] if config.is_file() else None



# ----------------------------------------------------------------------------------------------------------------------
# Stages


def make_base(model_args, data_args, job_args, training_args, folder: Path, dataset=None) -> Path:
    """Base: a stock MllamaForConditionalGeneration of the small layout, trained on the train split with the LM loss
    on the answer and written with its stock MllamaProcessor to `folder` (plain transformers loads both), with a record
    of its layout (BASE_RECORD_FILE) from which `--base_model folder` sizes the MDF modules."""
    size = model_args.model_size or "small"
    stock = stock_processor(size)
    processor = mdf_processor(stock, LAYOUTS[size]["mdf"]["unet_config"]["image_size"])
    splits = process_splits(dataset or load_data(data_args), processor, no_text=data_args.no_text)
    set_seed(training_args.seed)
    base = MllamaForConditionalGeneration(small_mllama_config(stock.tokenizer, size))
    open_gates(base)  # a pretrained base's cross-attention gates are open; ours are trained from scratch
    folder.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".training-", dir=folder)  # its own: removing it deletes nothing of the user's
    args = replace(training_args, output_dir=scratch, num_train_epochs=job_args.base_epochs,
                   eval_strategy="no", save_strategy="no", resume_from_checkpoint=None)
    try:
        train(base, splits, MllamaCollator(processor), args, label=f"base: stock Mllama ({size})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base.save_pretrained(folder)
    stock.save_pretrained(folder)
    record = dict(model_size=size, epochs=job_args.base_epochs, dataset=data_args.dataset)
    (folder / BASE_RECORD_FILE).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return folder


def base_cache_folder(model_args, data_args, job_args, training_args) -> Path:
    """~/.cache/mdf_mllm/base-<key>: the key hashes every setting and the code the base depends on."""
    settings = [model_args.model_size or "small", data_args, job_args.base_epochs, training_args.learning_rate,
                training_args.per_device_train_batch_size, training_args.seed, training_args.weight_decay,
                training_args.warmup_steps, str(training_args.lr_scheduler_type), LAYOUTS, BASE_CHAT_TEMPLATE,
                [inspect.getsource(f) for f in (make_base, stock_processor, small_mllama_config, open_gates, train)]]
    # The processing code the base's inputs come from: the processor's file and, since it moved there, the image
    # processor's (a change to either makes another base).
    code = [Path(sys.modules[cls.__module__].__file__).read_bytes()
            for cls in (MdfMllmProcessor, MdfMllmImageProcessor)]
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


def learning_rates(model_args) -> dict[str, float | None]:
    """The stage-2 rate of each kind of MDF parameter (training.MdfTrainer; None: the rate of the kind above)."""
    return {"mdf": model_args.mdf_learning_rate, "gate": model_args.gate_learning_rate,
            "unet": model_args.unet_learning_rate, "film": model_args.film_learning_rate}


def run_one(name, model_args, splits, collator, processor, job_args, training_args, resume=None,
            unet_weights=None) -> Result:
    """Train one model (its U-Net from `unet_weights` when given) and evaluate it on the test split. On the processes
    of a distributed run that do not evaluate, the result has the model and trainer but no report."""
    set_seed(training_args.seed)
    model = build_model(model_args, processor, bf16=training_args.bf16, checkpoint=resume)
    if unet_weights and not resume:
        unwrap_peft(model).model.unet.load_state_dict(load_file(unet_weights))
    gates = GateLogger()
    start = time.perf_counter()
    rates = learning_rates(model_args)
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
        return Result(name, None, None, model=model, trainer=trainer)
    state = trainer.accelerator.state
    print(f"{name}: trained with {state.distributed_type.value} over {state.num_processes} process(es)"
          if state.num_processes > 1 else f"{name}: trained in one process")
    result = evaluate_model(name, model, splits["test"], collator, model.config, job_args, bf16=training_args.bf16,
                            train_seconds=round(seconds, 1), parameters=sum(p.numel() for p in model.parameters()),
                            gate_history=gates.history)
    result.model, result.trainer = model, trainer
    return result


def stage1(model_args, splits, collator, processor, job_args, training_args) -> tuple[str | None, list[float],
                                                                                    Result | None]:
    """Stage 1: the U-Net file (None where there is no stage 1), its loss per epoch, and the result of the stage-1
    U-Net with its class head on the test photos ("U-Net alone (image only)"; None without stage 1)."""
    if job_args.from_scratch or job_args.no_stage1 or parse_fusion_layers(model_args.fusion_layers) == {}:
        return None, [], None
    set_seed(training_args.seed)
    # The U-Net trains alone, in fp32, on the training device; the rest of the model (11B for the real base, read in
    # bf16 with --bf16) is dropped.
    model = build_model(replace(model_args, lora=False, load_in_4bit=False), processor, bf16=training_args.bf16)
    unet, config = model.model.unet.float().to(training_args.device), model.config
    del model
    folder = Path(training_args.output_dir) / "stage1"
    start = time.perf_counter()
    losses = warm_up_unet(unet, len(config.label_names), splits["train"], collator, job_args, training_args, folder)
    seconds = time.perf_counter() - start
    print(f"stage 1: loss per epoch {[round(loss, 4) for loss in losses]}; U-Net written to {folder}")
    result = unet_alone_result(unet, folder, splits["test"], collator, config, job_args, train_seconds=round(seconds, 1))
    return str(folder / "unet.safetensors"), losses, result


def unet_alone_result(unet, folder: Path, split: ProcessedSplit, collator, config, job_args, **timings) -> Result:
    """The stage-1 U-Net encoder and class head (read from `folder`) on the photos of `split`, scored like the
    models."""
    head = torch.nn.Linear(sum(unet.widths), len(config.label_names), device=next(unet.parameters()).device)
    head.load_state_dict(load_file(folder / "class_head.safetensors", device=str(head.weight.device)))
    encoder = sum(p.numel() for name, p in unet.named_parameters() if name.startswith("stages."))
    return scored(UNET_ALONE, unet_alone_probabilities(unet, head, split, collator, job_args.eval_batch_size), split,
                  config.label_names, config.disease_types, job_args,
                  parameters=encoder + sum(p.numel() for p in head.parameters()), **timings)


# ----------------------------------------------------------------------------------------------------------------------
# The references beside the trained models, and the counterfactual histories


def text_only_reference(dataset) -> "comparison.TextOnly":
    """The text-only reference fitted on the training split's histories."""
    num_classes = len(dataset["train"].features["label"].names)
    return comparison.TextOnly(dataset["train"]["text"], dataset["train"]["label"], num_classes)


def references(dataset, split: ProcessedSplit, unet_alone: Result | None, text_only: "comparison.TextOnly",
               label_names: list[str], disease_types: list[str], job_args) -> list[Result]:
    """Text only and, with a U-Net alone, late fusion: their results on the photos of `split` (the test split of
    `dataset`)."""
    text_probabilities = text_only.probabilities(dataset["test"]["text"])
    results = [scored(comparison.TEXT_ONLY, text_probabilities, split, label_names, disease_types, job_args)]
    if unet_alone is not None:
        prior = comparison.class_prior(dataset["train"]["label"], len(label_names))
        fused = comparison.late_fusion(unet_alone.probabilities, text_probabilities, prior)
        results.append(scored(comparison.LATE_FUSION, fused, split, label_names, disease_types, job_args))
    return results


def counterfactual(dataset, data_args, processor, collator, models: dict, text_only: "comparison.TextOnly",
                   unet_alone: Result | None, job_args, bf16: bool = False) -> dict:
    """The counterfactual-history table of the synthetic set ({} for other data): each test photo whose look another
    label draws too gets that label's own history (the answer should follow it), each photo whose look only its own
    label draws gets a misleading history (the answer should not move); see
    `dataset_builder.synthetic.counterfactual_history`. `models`: name -> (model, its answers (N,) to the photos' own
    inputs); late fusion is added from the U-Net alone and `text_only`.

    Returns {"summary": {name: `comparison.counterfactual_summary` rows}, "photos": one entry per test photo (its
    case, file, group, kind, the history kind given, the labels it points to, and each model's answer with its own
    input and with the swapped history)}.
    """
    from dataset_builder import synthetic

    if data_args.dataset != "synthetic":
        return {}
    test = dataset["test"]
    looks = {(item.case_id, item.label): item.look or item.label
             for item in synthetic.plan(data_args.num_images, data_args.dataset_seed)}
    names = test.features["label"].names
    rng = np.random.default_rng(data_args.dataset_seed)
    photos, texts = [], []
    for example in test.select_columns(["case_id", "file_name", "label"]):
        label = names[example["label"]]
        look = looks[(example["case_id"], label)]
        kind, history, twin = synthetic.counterfactual_history(label, look)
        texts.append(synthetic.case_text(synthetic.clinical_case(history, rng)))
        pointed = f"history of {twin}" if twin else f"a misleading {history} history"
        photos.append({"case_id": example["case_id"], "file_name": example["file_name"], "kind": kind,
                       "group": f"{label} photo drawn as {look}, {pointed}", "history": history,
                       "points_to": [twin] if twin else synthetic.HISTORY_LABELS[history], "answers": {}})
    answers = {}
    swapped = ProcessedSplit(test.remove_columns("text").add_column("text", texts), processor, with_answers=False)
    for name, (model, original) in models.items():
        answers[name] = (np.asarray(original), predict(model, swapped, collator, job_args.eval_batch_size,
                                                       bf16).argmax(-1))
    if unet_alone is not None:
        prior = comparison.class_prior(dataset["train"]["label"], len(names))
        fuse = lambda text_probabilities: comparison.late_fusion(  # noqa: E731
            unet_alone.probabilities, text_probabilities, prior).argmax(-1)
        answers[comparison.LATE_FUSION] = (fuse(text_only.probabilities(test["text"])),
                                           fuse(text_only.probabilities(texts)))
    points_to = [[names.index(label) for label in photo["points_to"]] for photo in photos]
    groups, kinds = [photo["group"] for photo in photos], [photo["kind"] for photo in photos]
    for name, (original, changed) in answers.items():
        for photo, before, after in zip(photos, original, changed):
            photo["answers"][name] = [names[before], names[after]]
    return {"summary": {name: comparison.counterfactual_summary(groups, kinds, points_to, *pair)
                        for name, pair in answers.items()}, "photos": photos}
