"""Data, training and evaluation for the main job (mdf_mllm.train): the processed splits and collators, the Trainer with
its own learning rates for the MDF modules and gates, gate logging, checkpoints, stage 1's U-Net warm-up and test-set
classification.

`data_args` and `job_args` are mdf_mllm.stages' DataArguments and JobArguments (not imported: a floor above this
one)."""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from configuration_mdf_mllm import MdfMllmConfig
from mdf_mllm.comparison import Result, has_history, score
from mdf_mllm.messages import shown
from mdf_mllm.model_setup import UsageError
from modeling_mdf_mllm import mdf_parameter_kinds
from modeling_mdf_mllm import unet_branches as modeling_unet_branches
from pipeline_mdf_mllm import non_finite_parameters
from processing_mdf_mllm import MdfMllmDataCollator, MdfMllmProcessor


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_data(data_args):
    """The dataset's splits; a source the builder refuses, or a split left without photos to train or test on, is a
    UsageError with the counts."""
    from dataset_builder import load

    if data_args.dataset == "synthetic":
        kwargs = dict(image_size=data_args.image_size)
        if data_args.num_images:
            kwargs["num_images"] = data_args.num_images
        return load("synthetic", seed=data_args.dataset_seed, **kwargs)
    try:
        dataset = load(data_args.dataset, fives=data_args.fives, hrf=data_args.hrf, stonerounds=data_args.stonerounds,
                       data_dir=data_args.data_dir, seed=data_args.dataset_seed)
    except (ValueError, OSError) as error:
        raise UsageError(f"--dataset {data_args.dataset}: {shown(error)}") from None
    counts = {split: len(part) for split, part in dataset.items()}
    if not counts["train"] or not counts["test"]:
        raise UsageError(f"--dataset {data_args.dataset}: {', '.join(f'{s} {n}' for s, n in counts.items())} photos; "
                         "training needs photos in train and test (see the builder's split_report.md)")
    return dataset


class ProcessedSplit(torch.utils.data.Dataset):
    """One split run through the processor once: each item is what the model takes, batch dimension removed.

    `with_answers` appends the verbalizer and returns `labels` (training, validation loss); without it the items are
    prompts for `classify()`, and `label_ids` holds the truth, `cases` each item's case id and file name,
    `has_history` whether the photo has a clinical history in the data (even where `no_text` leaves it out of the
    prompt). Vessel masks are used when every photo has one (`has_masks`).
    """

    def __init__(self, split, processor: MdfMllmProcessor, with_answers: bool, no_text: bool = False):
        self.label_ids = list(split["label"])
        self.has_history = has_history(split["text"])
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
    """Fused layer index (a string: the key of the logged gate history) -> its U-Net branch (the trained copy under
    LoRA's modules_to_save); `modeling_mdf_mllm.unet_branches` finds them by class."""
    return {str(layer): branch for layer, branch in modeling_unet_branches(model).items()}


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


# Optimizer groups: each kind without a rate of its own trains at the rate of the kind it names here.
PARAMETER_KINDS = {"gate": "mdf", "film": "mdf", "unet": "mdf", "mdf": "base", "base": None}
# An MDF parameter's kind (modeling_mdf_mllm.MDF_KINDS) -> its optimizer group: the patch projector and the branches'
# other weights (tau included) train together as "mdf".
OPTIMIZER_KIND = {"gate": "gate", "film": "film", "unet": "unet", "projector": "mdf", "branch": "mdf", "tau": "mdf"}


def parameter_kinds(model) -> dict[str, str]:
    """Every parameter's name in `model` -> its optimizer group: "gate" (a U-Net branch's g_u), "film", "unet" (the
    rest of the U-Net), "mdf" (the patch projector and the branches' other weights) or "base"; the MDF kinds come from
    the module classes (`mdf_parameter_kinds`), not from names."""
    mdf = mdf_parameter_kinds(model)
    return {name: OPTIMIZER_KIND[mdf[name]] if name in mdf else "base" for name, _ in model.named_parameters()}


class Diverged(RuntimeError):
    """Training went non-finite: the run stops, and nothing of it is cached, exported or reported."""


class MdfTrainer(Trainer):
    """Trainer whose optimizer gives each kind of parameter (`parameter_kinds`) a learning rate of its own.

    `learning_rates`: {kind: lr}; a kind without one trains at the rate of the kind it falls back to
    (`PARAMETER_KINDS`: gates, FiLM and U-Net as the other MDF modules, those as the base). A rate of 0 freezes that
    kind. The gates' group has no weight decay, which would pull them shut.
    """

    def __init__(self, *args, learning_rates: dict[str, float] | None = None, label: str = "training", **kwargs):
        super().__init__(*args, **kwargs)
        self.learning_rates = {kind: lr for kind, lr in (learning_rates or {}).items() if lr is not None}
        self.label = label

    def _get_grad_norm(self, model, grad_norm=None):
        # Checked before every optimizer step: a NaN or inf loss gives non-finite gradients, which the step would write
        # into every weight (the Trainer's logging_nan_inf_filter only hides such a loss from the log). The norm is
        # the same on every process, so all of them stop together.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise Diverged(f"{self.label}: diverged at step {self.state.global_step + 1}: the loss or its gradients "
                           f"are not finite (gradient norm {float(grad_norm)}); nothing was exported or cached")
        return grad_norm

    def rate(self, kind: str, base_rate: float) -> float:
        while kind != "base" and kind not in self.learning_rates:
            kind = PARAMETER_KINDS[kind]
        return self.learning_rates.get(kind, base_rate)

    def create_optimizer(self, model=None):
        model = model or self.model
        if self.learning_rates:
            names = parameter_kinds(model)
            for name, param in model.named_parameters():  # frozen before the optimizer sees them
                if self.rate(names[name], self.args.learning_rate) == 0:
                    param.requires_grad_(False)
        optimizer = super().create_optimizer(model)
        if not self.learning_rates or optimizer.state:
            return optimizer
        names = parameter_kinds(model)
        kinds = {id(p): names[name] for name, p in model.named_parameters()}
        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:  # each (weight decay) group split by kind
            for kind in PARAMETER_KINDS:
                params = [p for p in group["params"] if kinds[id(p)] == kind]
                if params:
                    decay = 0.0 if kind == "gate" else group["weight_decay"]
                    optimizer.add_param_group({**group, "params": params, "lr": self.rate(kind, group["lr"]),
                                               "weight_decay": decay, "kind": kind})
        return optimizer


def train(model, splits, collator, training_args: TrainingArguments, resume_from_checkpoint=None, callbacks=None,
          learning_rates: dict[str, float] | None = None, label: str | None = None) -> Trainer:
    """Train with the Trainer (`learning_rates`: see MdfTrainer; `label`: the progress bar's description)."""
    trainer = MdfTrainer(model=model, args=training_args, train_dataset=splits["train"],
                         eval_dataset=splits["validation"] if len(splits["validation"]) else None,
                         data_collator=collator, callbacks=callbacks, learning_rates=learning_rates,
                         label=label or "training")
    if label and not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LabelledProgress(label))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    bad = non_finite_parameters(model)  # a last step can write NaN into weights whose gradients were finite
    if bad:
        raise Diverged(f"{trainer.label}: diverged at step {trainer.state.global_step}: {len(bad)} weight tensors hold "
                       f"NaN or inf (first: {bad[0]}); nothing was exported or cached")
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
        folders = checkpoints(output_dir)
        complete = [folder for folder in folders if is_complete_checkpoint(folder)]
        for folder in sorted(set(folders) - set(complete)):
            print(f"skipping incomplete checkpoint {folder} (no trainer_state.json: the run stopped mid-save)")
        return str(complete[-1]) if complete else None
    if not is_complete_checkpoint(Path(resume)):
        raise UsageError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (no trainer_state.json)")
    return resume


def checkpoints(output_dir) -> list[Path]:
    """The Trainer's checkpoint folders in `output_dir` (`checkpoint-<step>`, oldest first): nothing else of that name
    pattern, such as a user's `checkpoint-best` or a file."""
    found = [path for path in Path(output_dir).glob("checkpoint-*") if path.is_dir() and re.fullmatch(r"checkpoint-\d+",
                                                                                                      path.name)]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def remove_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoints only serve to resume an unfinished arm: once it has finished, they go."""
    folders = checkpoints(output_dir)
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


def evaluate_model(name: str, model, split: ProcessedSplit, collator, config: MdfMllmConfig, job_args, bf16=False,
                   **timings) -> Result:
    """`model.classify()` on the photos of `split` (the test split), scored as one row of the comparison."""
    return scored(name, predict(model, split, collator, job_args.eval_batch_size, bf16), split, config.label_names,
                  config.disease_types, job_args, **timings)


def scored(name: str, probabilities, split: ProcessedSplit, label_names, disease_types, job_args, **timings) -> Result:
    """The `Result` of class probabilities (N, K) on the photos of `split`."""
    return score(name, probabilities, split.label_ids, split.has_history, label_names, disease_types,
                 n_bootstrap=job_args.n_bootstrap, items=split.cases, **timings)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: the U-Net learns what the photo shows before the language model reads it

UNET_ALONE = "U-Net alone (image only)"  # the stage-1 U-Net and class head: what the photo alone gives


def pooled_skips(unet, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The skips of the photo alone (no FiLM) and their average-pooled channels, concatenated: (B, sum_k C_k)."""
    skips = unet.encode(pixel_values, None)
    return skips, torch.cat([skip.mean((2, 3)) for skip in skips], 1)


def stage1_loss(unet, class_head, batch: dict, class_ids: torch.Tensor, vessel_weight: float) -> torch.Tensor:
    """Cross-entropy of the class head on the pooled skips, plus `vessel_weight` x the decoder's vessel BCE (the
    decoder runs only when that weight counts and the batch has masks)."""
    skips, pooled = pooled_skips(unet, batch["unet_pixel_values"])
    loss = F.cross_entropy(class_head(pooled), class_ids)
    if vessel_weight and "vessel_mask" in batch:
        loss = loss + vessel_weight * F.binary_cross_entropy_with_logits(
            unet.decode(skips), batch["vessel_mask"].float())
    return loss


def on_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def mirrored(batch: dict) -> dict:
    """Every photo (and vessel mask) mirrored left-right, as the other eye would be photographed."""
    return {**batch, **{key: batch[key].flip(-1) for key in ("unet_pixel_values", "vessel_mask") if key in batch}}


def warm_up_unet(unet, num_classes: int, split: ProcessedSplit, collator, job_args, training_args,
                 folder: Path) -> list[float]:
    """Stage 1: the U-Net encoder, image only (FiLM stays the identity), learns the classes of the training photos
    through a linear head on its pooled skips, and the vessels through its decoder when the photos have masks.
    Without it, the LM loss alone gives the U-Net too weak and noisy a gradient: fine-tuning left it knowing less
    about the classes than random weights. Writes `unet.safetensors` and `class_head.safetensors` to `folder`;
    returns the mean loss of each epoch."""
    device = next(unet.parameters()).device
    class_head = torch.nn.Linear(sum(unet.widths), num_classes, device=device)
    kinds = unet.parameter_kinds()  # FiLM by class (modeling_mdf_mllm), not by its attribute's name
    parameters = [p for name, p in unet.named_parameters() if kinds[name] != "film"]
    for param in parameters:  # the model leaves what its own forward does not run (decoder, deep stages) frozen
        param.requires_grad_(True)
    parameters += list(class_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=job_args.stage1_learning_rate, weight_decay=training_args.weight_decay)
    generator = torch.Generator().manual_seed(training_args.seed)
    batch_size = training_args.per_device_train_batch_size
    steps_per_epoch = math.ceil(len(split) / batch_size)
    steps = max(1, math.ceil(job_args.stage1_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, job_args.stage1_learning_rate, total_steps=steps)
    vessel_weight = job_args.stage1_vessel_weight if split.has_masks else 0.0
    bar, losses, step = tqdm(total=steps, desc="stage 1: U-Net classes and vessels",
                             disable=training_args.disable_tqdm), [], 0
    unet.train()
    while step < steps:  # counted here: a disabled tqdm bar (disable_tqdm) does not count
        epoch = []
        for indices in torch.randperm(len(split), generator=generator).split(batch_size):
            batch = on_device(collator([split[i] for i in indices]), device)
            if torch.rand((), generator=generator) < 0.5:
                batch = mirrored(batch)
            class_ids = torch.tensor([split.label_ids[i] for i in indices], device=device)
            loss = stage1_loss(unet, class_head, batch, class_ids, vessel_weight)
            if not math.isfinite(loss.item()):
                raise Diverged(f"stage 1: diverged at step {step + 1}: the loss is {loss.item()}; nothing was exported "
                               "or cached")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, training_args.max_grad_norm)  # as the Trainer clips stage 2
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            epoch.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step == steps:
                break
        losses.append(float(np.mean(epoch)))
    bar.close()
    bad = non_finite_parameters(unet) + non_finite_parameters(class_head)
    if bad:
        raise Diverged(f"stage 1: diverged at step {step}: {len(bad)} weight tensors hold NaN or inf "
                       f"(first: {bad[0]}); nothing was exported or cached")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, folder / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in class_head.state_dict().items()}, folder / "class_head.safetensors")
    return losses


@torch.no_grad()
def unet_alone_probabilities(unet, class_head, split: ProcessedSplit, collator, batch_size: int) -> np.ndarray:
    """The stage-1 U-Net and class head on a split of photos, image only: (N, K) class probabilities."""
    unet.eval()
    probabilities, device = [], next(unet.parameters()).device
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        pixels = batch["unet_pixel_values"].to(device)
        probabilities.append(class_head(pooled_skips(unet, pixels)[1]).softmax(-1).cpu())
    return torch.cat(probabilities).numpy()
