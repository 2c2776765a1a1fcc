"""Data, training and evaluation for the main job (mdf_mllm.main_job): the processed splits and collators, the
Trainer with its own learning rates for the MDF modules and gates, gate logging, checkpoints and test-set
classification."""

import math
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from mdf_mllm.comparison import Result, has_history, score
from mdf_mllm.job import LEARNING_RATE_KINDS, DataArguments, Job
from mdf_mllm.messages import shown
from mdf_mllm.model_setup import UsageError
from configuration_mdf_mllm import DEFAULT_LABELS
from modeling_mdf_mllm import MDF_KINDS, mdf_parameter_kinds
from modeling_mdf_mllm import unet_branches as modeling_unet_branches
from pipeline_mdf_mllm import non_finite_parameters
from processing_mdf_mllm import MdfMllmDataCollator, MdfMllmProcessor


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_data(data_args: DataArguments):
    """The dataset's splits; a source the builder refuses, or a split left without photos to train or test on, is a
    UsageError with the counts."""
    from dataset_builder import load
    from dataset_builder.sources import PAPER_SOURCES

    if data_args.dataset == "synthetic":
        kwargs = dict(image_size=data_args.image_size)
        if data_args.num_images:
            kwargs["num_images"] = data_args.num_images
        return load("synthetic", seed=data_args.dataset_seed, **kwargs)
    try:
        folders = {name: getattr(data_args, name) for name in PAPER_SOURCES}
        dataset = load(data_args.dataset, **folders, data_dir=data_args.data_dir, seed=data_args.dataset_seed)
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
    prompt), `age_dependent` whether it is age-dependent (the data's field; False where a source has none). Vessel
    masks are used when every photo has one (`has_masks`).
    """

    def __init__(self, split, processor: MdfMllmProcessor, with_answers: bool, no_text: bool = False):
        self.label_ids = list(split["label"])
        self.has_history = has_history(split["text"])
        self.age_dependent = np.array(split["age_dependent"] if "age_dependent" in split.column_names
                                      else [False] * len(split), dtype=bool)
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


clock = time.perf_counter  # what Phases reads (a test replaces it with a counter)


class Phases:
    """The wall seconds of each phase of one run, in the order the phases first ran: `with phases("stage 1"): ...`.

    Each moment counts for the innermost phase open then (a phase timed inside another, such as the scoring of a
    row, is left out of the outer one's seconds), so the phases never overlap and their sum is at most the wall time
    since the object was made (`wall_seconds`); a phase timed again adds to its seconds. `scoped(prefix)` times into
    the same table with names prefixed (the ablation's "seed 0: stage 1").
    """

    def __init__(self, prefix: str = "", shared: dict | None = None):
        self.prefix = prefix
        if shared is None:  # the table, the open phases (innermost last), when time was last handed out: all scopes'
            now = clock()
            shared = {"seconds": {}, "open": [], "since": now, "start": now}
        self.shared = shared

    @property
    def seconds(self) -> dict[str, float]:
        return self.shared["seconds"]

    def scoped(self, prefix: str) -> "Phases":
        return Phases(f"{self.prefix}{prefix}: ", self.shared)

    def _hand_out(self) -> None:
        """The time since the last hand-out to the innermost open phase (none open: to no phase)."""
        now, shared = clock(), self.shared
        if shared["open"]:
            shared["seconds"][shared["open"][-1]] += now - shared["since"]
        shared["since"] = now

    @contextmanager
    def __call__(self, name: str):
        name = self.prefix + name
        self._hand_out()
        self.seconds.setdefault(name, 0.0)
        self.shared["open"].append(name)
        try:
            yield
        finally:
            self._hand_out()
            self.shared["open"].pop()

    def wall_seconds(self) -> float:
        return clock() - self.shared["start"]

    def as_json(self) -> dict:
        wall = self.wall_seconds()
        return {"phases": {name: round(s, 3) for name, s in self.seconds.items()}, "wall_seconds": round(wall, 3),
                "other_seconds": round(wall - sum(self.seconds.values()), 3)}

    def markdown(self) -> str:
        """The phase table: each phase's seconds and share of the wall time, then the time outside every phase."""
        wall = self.wall_seconds()
        rows = [*self.seconds.items(), ("(outside every phase)", wall - sum(self.seconds.values())), ("wall", wall)]
        return "\n".join(["| phase | wall s | share |", "|---|---:|---:|",
                          *(f"| {name} | {s:.1f} | {s / wall if wall else 0:.0%} |" for name, s in rows)]) + "\n"


@dataclass
class RunContext:
    """What every stage of one run reads: the job's settings, the data set and the processor, with the processed
    splits and the collator derived from them. A stage that runs with other settings (the baseline, an ablation row)
    gets `with_job(...)`, which shares the splits already processed and the references already fitted."""

    job: Job
    dataset: Any
    processor: MdfMllmProcessor
    processed: dict[bool, dict[str, "ProcessedSplit"]] = field(default_factory=dict, repr=False)  # by no_text
    fitted: dict = field(default_factory=dict, repr=False)  # what a reference fits once per run, by its key
    phases: Phases = field(default_factory=Phases, repr=False)  # the run's phase table, shared by every stage

    def with_job(self, job: Job) -> "RunContext":
        return replace(self, job=job)

    @property
    def splits(self) -> dict[str, "ProcessedSplit"]:
        """The job's splits through the processor (without the clinical text where the job drops it), made once."""
        no_text = self.job.data.no_text
        if no_text not in self.processed:
            self.processed[no_text] = process_splits(self.dataset, self.processor, no_text=no_text)
        return self.processed[no_text]

    @property
    def collator(self) -> MdfMllmDataCollator:
        return MdfMllmDataCollator(self.processor)

    @property
    def label_names(self) -> list[str]:
        return list(self.processor.label_names)

    def fit(self, key, make):
        """`make()` once per run under `key` (a reference's fitted classifier), then the same object."""
        if key not in self.fitted:
            self.fitted[key] = make()
        return self.fitted[key]

    def scored(self, name: str, probabilities, **timings) -> Result:
        """The `Result` of class probabilities (N, K) on the test photos."""
        test = self.splits["test"]
        with self.phases(f"scoring: {name}"):
            return score(name, probabilities, test.label_ids, test.has_history, self.label_names,
                         [kind for _, _, kind in DEFAULT_LABELS], n_bootstrap=self.job.run.n_bootstrap,
                         items=test.cases, age_dependent=test.age_dependent, **timings)


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


# Optimizer groups (an MDF parameter's is its kind's rate, modeling_mdf_mllm.MDF_KINDS), in that table's order, then
# the base: each group without a rate of its own trains at the rate of the group it names here (the gates, FiLM and
# the U-Net at the other MDF modules' rate, those at the base's).
PARAMETER_KINDS = {**{kind: "mdf" for kind in LEARNING_RATE_KINDS if kind != "mdf"}, "mdf": "base", "base": None}


def parameter_kinds(model) -> dict[str, str]:
    """Every parameter's name in `model` -> its optimizer group: "gate" (a U-Net branch's g_u), "film", "unet" (the
    rest of the U-Net), "mdf" (the patch projector and the branches' other weights) or "base"; the MDF kinds come from
    the module classes (`mdf_parameter_kinds`), not from names."""
    mdf = mdf_parameter_kinds(model)
    return {name: MDF_KINDS[mdf[name]] if name in mdf else "base" for name, _ in model.named_parameters()}


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


def train_model(model, splits, collator, training_args: TrainingArguments, resume_from_checkpoint=None, callbacks=None,
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


def evaluate_model(run: RunContext, name: str, model, **timings) -> Result:
    """`model.classify()` on the test photos, scored as one row of the comparison."""
    with run.phases(f"scoring: {name}"):
        probabilities = predict(model, run.splits["test"], run.collator, run.job.run.eval_batch_size,
                                run.job.training.bf16)
    return run.scored(name, probabilities, **timings)
