"""What the main job (mdf_mllm.train) and the ablation (mdf_mllm.ablation) share: the base, one stage-2 model trained
and evaluated, the references beside the trained models and the counterfactual histories. Stage 1 is
mdf_mllm.stage1; every stage takes the `Job` first."""

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration, set_seed

from mdf_mllm import comparison
from mdf_mllm.comparison import Result
from mdf_mllm.job import Job
from mdf_mllm.model_setup import (
    BASE_CHAT_TEMPLATE,
    BASE_RECORD_FILE,
    build_model,
    mdf_processor,
    open_gates,
    small_mllama_config,
    stock_processor,
    unwrap,
    unwrap_peft,
)
from mdf_mllm.training import (
    GateLogger,
    MllamaCollator,
    ProcessedSplit,
    evaluate_model,
    load_data,
    predict,
    process_splits,
    scored,
    train,
)
from configuration_mdf_mllm import LAYOUTS
from image_processing_mdf_mllm import MdfMllmImageProcessor
from modeling_mdf_mllm import MdfMllmForConditionalGeneration
from processing_mdf_mllm import MdfMllmProcessor


# ----------------------------------------------------------------------------------------------------------------------
# Stages


def make_base(job: Job, folder: Path, dataset=None) -> Path:
    """Base: a stock MllamaForConditionalGeneration of the small layout, trained on the train split with the LM loss
    on the answer and written with its stock MllamaProcessor to `folder` (plain transformers loads both), with a record
    of its layout (BASE_RECORD_FILE) from which `--base_model folder` sizes the MDF modules."""
    size = job.model.model_size or "small"
    stock = stock_processor(size)
    processor = mdf_processor(stock, LAYOUTS[size]["mdf"]["unet_config"]["image_size"])
    splits = process_splits(dataset or load_data(job.data), processor, no_text=job.data.no_text)
    set_seed(job.training.seed)
    base = MllamaForConditionalGeneration(small_mllama_config(stock.tokenizer, size))
    open_gates(base)  # a pretrained base's cross-attention gates are open; ours are trained from scratch
    folder.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".training-", dir=folder)  # its own: removing it deletes nothing of the user's
    args = replace(job.training, output_dir=scratch, num_train_epochs=job.run.base_epochs,
                   eval_strategy="no", save_strategy="no", resume_from_checkpoint=None)
    try:
        train(base, splits, MllamaCollator(processor), args, label=f"base: stock Mllama ({size})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base.save_pretrained(folder)
    stock.save_pretrained(folder)
    record = dict(model_size=size, epochs=job.run.base_epochs, dataset=job.data.dataset)
    (folder / BASE_RECORD_FILE).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return folder


def base_cache_folder(job: Job) -> Path:
    """~/.cache/mdf_mllm/base-<key>: the key hashes every setting and the code the base depends on."""
    args = job.training
    settings = [job.model.model_size or "small", job.data, job.run.base_epochs, args.learning_rate,
                args.per_device_train_batch_size, args.seed, args.weight_decay, args.warmup_steps,
                str(args.lr_scheduler_type), LAYOUTS, BASE_CHAT_TEMPLATE,
                [inspect.getsource(f) for f in (make_base, stock_processor, small_mllama_config, open_gates, train)]]
    # The processing code the base's inputs come from: the processor's file and, since it moved there, the image
    # processor's (a change to either makes another base).
    code = [Path(sys.modules[cls.__module__].__file__).read_bytes()
            for cls in (MdfMllmProcessor, MdfMllmImageProcessor)]
    if args.max_steps > 0:  # a smoke run's base is its own (and the key of every other base stays as it was)
        settings.append(f"max_steps={args.max_steps}")
    key = hashlib.sha256(repr(settings).encode() + b"".join(code) + torch.__version__.encode()).hexdigest()[:16]
    root = job.run.base_cache_dir or os.environ.get("MDF_MLLM_BASE_CACHE") or Path.home() / ".cache" / "mdf_mllm"
    return Path(root) / f"base-{key}"


def cached_base(job: Job, dataset) -> str:
    """The main job's base: made once per key (into a temporary folder renamed when complete), then reused."""
    folder = base_cache_folder(job)
    if (folder / "config.json").is_file():
        print(f"base: reusing {folder}")
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        make_base(job.replace(training={"output_dir": str(staging)}), staging, dataset)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"base: trained and cached in {folder}")
    return str(folder)


def run_one(job: Job, name: str, splits, processor, collator, resume=None, unet_weights=None) -> Result:
    """Train one model of the job's settings (its U-Net from `unet_weights` when given) and evaluate it on the test
    split. On the processes of a distributed run that do not evaluate, the result has the model and trainer but no
    report."""
    set_seed(job.training.seed)
    model = build_model(job.model, processor, bf16=job.training.bf16, checkpoint=resume)
    if unet_weights and not resume:
        unwrap_peft(model).model.unet.load_state_dict(load_file(unet_weights))
    gates = GateLogger()
    start = time.perf_counter()
    trainer = train(model, splits, collator, job.training, resume, [gates], job.model.learning_rates(),
                    label=f"stage 2: {name}" if job.model.base_model else name)
    seconds = time.perf_counter() - start
    model = unwrap(trainer.model)
    if trainer.is_fsdp_enabled:
        # Sharded over processes: gather one checkpoint (every process takes part) for the main process to reload.
        final = os.path.join(job.training.output_dir, "final-model")
        trainer.save_model(final)
        if trainer.is_world_process_zero():
            model = MdfMllmForConditionalGeneration.from_pretrained(final)
    if not trainer.is_world_process_zero():  # under accelerate launch, the main process evaluates and exports
        return Result(name, None, None, model=model, trainer=trainer)
    state = trainer.accelerator.state
    print(f"{name}: trained with {state.distributed_type.value} over {state.num_processes} process(es)"
          if state.num_processes > 1 else f"{name}: trained in one process")
    result = evaluate_model(job, name, model, splits["test"], collator, train_seconds=round(seconds, 1),
                            parameters=sum(p.numel() for p in model.parameters()), gate_history=gates.history)
    result.model, result.trainer = model, trainer
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The references beside the trained models, and the counterfactual histories


def text_only_reference(dataset) -> "comparison.TextOnly":
    """The text-only reference fitted on the training split's histories."""
    num_classes = len(dataset["train"].features["label"].names)
    return comparison.TextOnly(dataset["train"]["text"], dataset["train"]["label"], num_classes)


def references(job: Job, dataset, split: ProcessedSplit, unet_alone: Result | None, text_only: "comparison.TextOnly",
               label_names: list[str], disease_types: list[str]) -> list[Result]:
    """Text only and, with a U-Net alone, late fusion: their results on the photos of `split` (the test split of
    `dataset`)."""
    text_probabilities = text_only.probabilities(dataset["test"]["text"])
    results = [scored(job, comparison.TEXT_ONLY, text_probabilities, split, label_names, disease_types)]
    if unet_alone is not None:
        prior = comparison.class_prior(dataset["train"]["label"], len(label_names))
        fused = comparison.late_fusion(unet_alone.probabilities, text_probabilities, prior)
        results.append(scored(job, comparison.LATE_FUSION, fused, split, label_names, disease_types))
    return results


def counterfactual(job: Job, dataset, processor, collator, models: list[Result], text_only: "comparison.TextOnly",
                   unet_alone: Result | None) -> dict:
    """The counterfactual-history table of the synthetic set ({} for other data): each test photo whose look another
    label draws too gets that label's own history (the answer should follow it), each photo whose look only its own
    label draws gets a misleading history (the answer should not move); see
    `dataset_builder.synthetic.counterfactual_history`. `models`: the trained models' results on the photos' own
    inputs; late fusion is added from the U-Net alone and `text_only`.

    Returns {"summary": {name: `comparison.counterfactual_summary` rows}, "photos": one entry per test photo (its
    case, file, group, kind, the history kind given, the labels it points to, and each model's answer with its own
    input and with the swapped history)}.
    """
    from dataset_builder import synthetic

    if job.data.dataset != "synthetic":
        return {}
    test = dataset["test"]
    looks = {(item.case_id, item.label): item.look or item.label
             for item in synthetic.plan(job.data.num_images, job.data.dataset_seed)}
    names = test.features["label"].names
    rng = np.random.default_rng(job.data.dataset_seed)
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
    for result in models:
        answers[result.name] = (result.predictions, predict(result.model, swapped, collator, job.run.eval_batch_size,
                                                            job.training.bf16).argmax(-1))
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
