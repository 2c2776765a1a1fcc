"""What the main job (mdf_mllm.main_job) and the ablation (mdf_mllm.ablation) share: the base, the stage-2 models
trained and evaluated, and the comparison of their rows with the references (`comparison.REFERENCES`) and the
counterfactual histories. Stage 1 is mdf_mllm.stage1; every stage takes the `RunContext` (or, for the base, the
`Job`) first."""

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration, set_seed

from mdf_mllm import comparison
from mdf_mllm.calibration import apply_temperature, fit_temperature
from mdf_mllm.comparison import Result
from mdf_mllm.job import Job
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
from mdf_mllm.stage1 import pooled_skips
from mdf_mllm.training import (
    GateLogger,
    MllamaCollator,
    ProcessedSplit,
    RunContext,
    evaluate_model,
    load_data,
    predict,
    process_splits,
    resolve_checkpoint,
    train_model,
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
    args = replace(job.training, output_dir=scratch, num_train_epochs=job.run.base_epochs, **BASE_TRAINING)
    try:
        train_model(base, splits, MllamaCollator(processor), args, label=f"base: stock Mllama ({size})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base.save_pretrained(folder)
    stock.save_pretrained(folder)
    record = dict(model_size=size, epochs=job.run.base_epochs, dataset=job.data.dataset)
    (folder / BASE_RECORD_FILE).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return folder


# The Trainer's settings make_base sets whatever the job's are (its epochs are --base_epochs).
BASE_TRAINING = dict(eval_strategy="no", save_strategy="no", resume_from_checkpoint=None)
# The Trainer's settings that say where and how a run writes, logs or reports (or which process it is), not what it
# trains: the only ones left out of the base's key.
NOT_TRAINING = {"output_dir", "num_train_epochs", *BASE_TRAINING, "report_to", "run_name", "project", "disable_tqdm",
                "push_to_hub", "local_rank", "do_train", "do_eval", "do_predict", "skip_memory_metrics"}
NOT_TRAINING_PREFIXES = ("logging_", "log_", "save_", "hub_", "trackio_", "eval_")


def base_settings(job: Job) -> dict:
    """Every setting the base's training reads: the layout, the data settings, the base's epochs and every Trainer
    setting but those in NOT_TRAINING (a new Trainer setting is in the key unless named there)."""
    training = {f.name: getattr(job.training, f.name) for f in fields(job.training) if f.init and
                f.name not in NOT_TRAINING and not f.name.startswith(NOT_TRAINING_PREFIXES)}
    return {"model_size": job.model.model_size or "small", "data": job.data, "base_epochs": job.run.base_epochs,
            "training": training}


def base_cache_folder(job: Job) -> Path:
    """~/.cache/mdf_mllm/base-<key>: the key hashes every setting (`base_settings`) and the code the base depends
    on."""
    settings = [base_settings(job), LAYOUTS, BASE_CHAT_TEMPLATE,
                [inspect.getsource(f)
                 for f in (make_base, stock_processor, small_mllama_config, open_gates, train_model)]]
    # The processing code the base's inputs come from: the processor's file and, since it moved there, the image
    # processor's (a change to either makes another base).
    code = [Path(sys.modules[cls.__module__].__file__).read_bytes()
            for cls in (MdfMllmProcessor, MdfMllmImageProcessor)]
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


def train_arm(run: RunContext, name: str, resume=None, unet_weights=None) -> Result:
    """Train one model of the run's settings (its U-Net from `unet_weights` when given) and evaluate it on the test
    split. On the processes of a distributed run that do not evaluate, the result has the model and trainer but no
    report."""
    job = run.job
    label = f"stage 2: {name}" if job.model.base_model else name
    with run.phases(label):
        set_seed(job.training.seed)
        model = build_model(job.model, run.processor, bf16=job.training.bf16, checkpoint=resume)
        if unet_weights and not resume:
            start_from_stage1(run, unwrap_peft(model), unet_weights)
        gates = GateLogger()
        start = time.perf_counter()
        trainer = train_model(model, run.splits, run.collator, job.training, resume, [gates],
                              job.model.learning_rates(), label=label)
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
    result = evaluate_model(run, name, model, train_seconds=round(seconds, 1),
                            parameters=sum(p.numel() for p in model.parameters()), gate_history=gates.history)
    result.model, result.trainer = model, trainer
    return result


def start_from_stage1(run: RunContext, model, unet_weights: str, photos: int = 256) -> None:
    """The stage-1 U-Net into `model`, and its projector standardised on `photos` training photos
    (`MdfMllmUnetProjector.standardise_inputs`). Their averages are computed once per run and U-Net: the arm, the
    probe ladder's start and every ablation row of a seed start from the same ones."""
    unet = model.model.unet
    unet.load_state_dict(load_file(unet_weights))
    key = ("stage-1 photo averages", unet_weights, run.job.training.seed, photos)
    model.model.unet_projector.standardise_inputs(run.fit(key, lambda: photo_averages(run, unet, photos)))


@torch.no_grad()
def photo_averages(run: RunContext, unet, photos: int) -> list[torch.Tensor]:
    """Each U-Net depth's skips of `photos` training photos (drawn with the run's seed) averaged over their positions,
    stage 1's pooled skips: [(photos, C_k) for k = 1..4]. FiLM is still the identity, so the photo alone gives them."""
    split = run.splits["train"]
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(run.job.training.seed))[:photos]
    parameter, averages = next(unet.parameters()), []
    for indices in chosen.split(run.job.run.eval_batch_size):  # a batch at a time: 256 photos' skips take 1 GB
        pixels = run.collator([split[i] for i in indices.tolist()])["unet_pixel_values"]
        averages.append(pooled_skips(unet, pixels.to(parameter.device, parameter.dtype))[1])
    return list(torch.cat(averages).split(unet.widths, 1))


def stage2(run: RunContext, unet_alone: Result | None) -> list[Result]:
    """MDF-MLLM (from the stage-1 U-Net, resumed where the job says) and, unless the job leaves it out, the baseline
    from the same base: [MDF-MLLM, baseline]."""
    job = run.job
    resume = resolve_checkpoint(job.training.resume_from_checkpoint, job.training.output_dir)
    if resume:
        print(f"resuming from {resume}")
    arms = [train_arm(run, "MDF-MLLM", resume, unet_alone.weights if unet_alone else None)]
    if job.run.baseline and parse_fusion_layers(job.model.fusion_layers) != {}:
        baseline = job.replace(model={"fusion_layers": "none"}, training={
            "output_dir": str(job.output_dir / "baseline"), "resume_from_checkpoint": None})
        arms.append(train_arm(run.with_job(baseline), "Mllama baseline"))
    return arms


# ----------------------------------------------------------------------------------------------------------------------
# The comparison: the trained rows, the references, paired differences and the counterfactual histories


def compare(run: RunContext, trained: list[Result]) -> tuple[list[Result], dict, dict, Result | None]:
    """Every row (the trained ones, the first ours, then the registered references), the paired differences of ours
    against each other row, the counterfactual-history table and ours temperature-scaled (`calibrate`)."""
    with run.phases("references"):
        results = [*trained, *comparison.references(run, {r.name: r for r in trained})]
    test = run.splits["test"]
    with run.phases("paired differences"):
        differences = comparison.paired_differences(results[0], results[1:], test.label_ids, test.has_history,
                                                    run.job.run.n_bootstrap, age_dependent=test.age_dependent)
    with run.phases("counterfactual pass"):
        table = counterfactual(run, results)
    with run.phases("temperature"):
        return results, differences, table, calibrate(run, results[0])


def calibrate(run: RunContext, ours: Result) -> Result | None:
    """One temperature for our model, fitted on the validation photos (their prompts, as the test photos are asked)
    by `calibration.fit_temperature`, and saved as its `config.classifier_temperature`, so that its `classify()`, and
    the export, answer with it. Returns our test probabilities scaled by it, scored as a row of their own (the same
    answers; only the probabilities move), or None without a model or validation photos."""
    validation = run.dataset["validation"]
    if ours.model is None or not len(validation):
        return None
    split = ProcessedSplit(validation, run.processor, with_answers=False, no_text=run.job.data.no_text)
    ours.model.config.classifier_temperature = None  # the raw probabilities are fitted
    raw = predict(ours.model, split, run.collator, run.job.run.eval_batch_size, run.job.training.bf16)
    temperature = fit_temperature(split.label_ids, probabilities=raw / raw.sum(-1, keepdims=True))
    ours.model.config.classifier_temperature = temperature
    calibrated = run.scored(f"{ours.name}, temperature-scaled",
                            apply_temperature(temperature, probabilities=ours.probabilities))
    calibrated.temperature = temperature
    print(f"{ours.name}: temperature {temperature:.3f} fitted on {len(split)} validation photos")
    return calibrated


def counterfactual(run: RunContext, rows: list[Result]) -> dict:
    """The counterfactual-history table of the synthetic set ({} for other data): each test photo whose look another
    label draws too gets that label's own history (the answer should follow it), each photo whose look only its own
    label draws gets a misleading history (the answer should not move); see
    `dataset_builder.synthetic.counterfactual_history`. Each age-dependent photo is asked once more with its own
    history, the age (and a duration or onset it rules out) moved to the other label's stage of its look ("age
    swap", `synthetic.age_swapped_history`: the answer should move to that label). Asked: every row of `rows` with a
    trained model that reads photo and history (not the U-Net alone), and every registered reference that reads the
    photo.

    Returns {"summary": {name: `comparison.counterfactual_summary` rows}, "photos": one entry per swapped history
    (every test photo, then the age swaps: its case, file, group, kind, the history kind given and its text, the
    labels it points to, and each model's answer with its own input and with the swapped history)}.
    """
    from dataset_builder import synthetic

    job, test = run.job, run.dataset["test"]
    if job.data.dataset != "synthetic":
        return {}
    planned = {(item.case_id, item.label): item
               for item in synthetic.plan(job.data.num_images, job.data.dataset_seed)}
    names = test.features["label"].names
    rng, age_rng = np.random.default_rng(job.data.dataset_seed), np.random.default_rng([job.data.dataset_seed, 1])
    photos, texts, ages = [], [], {}  # ages: test index -> (swapped text, its photo's entry)
    for index, example in enumerate(test.select_columns(["case_id", "file_name", "label", "text", "age_dependent"])):
        label = names[example["label"]]
        item = planned[(example["case_id"], label)]
        look = item.look or label
        kind, history, twin = synthetic.counterfactual_history(label, look)
        texts.append(synthetic.case_text(synthetic.clinical_case(history, rng)))
        pointed = f"history of {twin}" if twin else f"a misleading {history} history"
        case = {"case_id": example["case_id"], "file_name": example["file_name"]}
        photos.append({**case, "kind": kind, "group": f"{label} photo drawn as {look}, {pointed}", "history": history,
                       "points_to": [twin] if twin else synthetic.HISTORY_LABELS[history], "text": texts[-1],
                       "answers": {}})
        swapped = example["age_dependent"] and synthetic.age_swapped_history(label, look, example["text"], age_rng,
                                                                            item.history)
        if swapped:
            ages[index] = (swapped[0], {**case, "kind": "age swap", "history": "age swap", "points_to": [swapped[1]],
                                        "text": swapped[0],
                                        "group": f"{label} photo drawn as {look}, the age of {swapped[1]}'s stage",
                                        "answers": {}})
    own = list(test["text"])
    swapped_ages = [ages[i][0] if i in ages else text for i, text in enumerate(own)]
    answers = [asked(run, rows, texts, range(len(test))), asked(run, rows, swapped_ages, sorted(ages))]
    photos += [ages[i][1] for i in sorted(ages)]
    points_to = [[names.index(label) for label in photo["points_to"]] for photo in photos]
    groups, kinds = [photo["group"] for photo in photos], [photo["kind"] for photo in photos]
    summary = {}
    for name in answers[0]:
        original, changed = (np.concatenate([part[name][k] for part in answers]) for k in (0, 1))
        for photo, before, after in zip(photos, original, changed):
            photo["answers"][name] = [names[before], names[after]]
        summary[name] = comparison.counterfactual_summary(groups, kinds, points_to, original, changed)
    return {"summary": summary, "photos": photos}


def asked(run: RunContext, rows: list[Result], texts: list[str], indices) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{row name: (its answers to the test photos `indices` with their own input, with `texts` (one per test
    photo))}: every row of `rows` with a trained model that reads photo and history, and every registered reference
    that reads the photo."""
    test, indices = run.dataset["test"], np.asarray(list(indices), dtype=int)
    answers = {}
    chosen = test.select(indices).remove_columns("text").add_column("text", [texts[i] for i in indices])
    swapped = ProcessedSplit(chosen, run.processor, with_answers=False) if len(indices) else None
    for result in rows:
        if result.model is not None and result.name != comparison.UNET_ALONE:
            after = (predict(result.model, swapped, run.collator, run.job.run.eval_batch_size,
                             run.job.training.bf16).argmax(-1) if swapped else np.zeros(0, dtype=int))
            answers[result.name] = (result.predictions[indices], after)
    by_name = {result.name: result for result in rows}
    for ref in comparison.REFERENCES.values():
        if ref.reads_photo and all(name in by_name for name in ref.needs):
            answers[ref.name] = tuple(ref.probabilities(run, by_name, given).argmax(-1)[indices]
                                      for given in (test["text"], texts))
    return answers
