"""A job's settings: the command-line arguments in four groups and the `Job` that holds them, built once from the
parsed arguments (`mdf_mllm.main_job.parse_arguments`) and handed to every stage as its first argument."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import IntervalStrategy, SchedulerType, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from dataset_builder.sources import SOURCES
from modeling_mdf_mllm import MDF_KINDS


# The recipe (measured in docs/results.md, "The recipe, and how it was found"). Stage 1 teaches the U-Net the classes
# from the photo alone; stage 2 then keeps it nearly still while the projector and branches learn to carry it into the
# answer.
STAGE1_EPOCHS = 6.0
STAGE1_LEARNING_RATE = 1e-3
STAGE1_VESSEL_WEIGHT = 0.0
STAGE1_STANDARDISE = True
STAGE1_OPTIMIZERS = ("AdamW", "Adam", "SGD")  # torch.optim classes that take lr and weight_decay
STAGE1_SCHEDULES = ("one_cycle", "constant")
UNET_LEARNING_RATE = 0.0
FILM_LEARNING_RATE = 3e-4
# The learning rates of the MDF parameters, one per kind (modeling_mdf_mllm.MDF_KINDS's rates), each set by its option
# `--<kind>_learning_rate` (ModelArguments).
LEARNING_RATE_KINDS = tuple(dict.fromkeys(MDF_KINDS.values()))


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
                                   "fusion; at 0 (the model config's default too) the U-Net decoder does not run, which "
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

    def learning_rates(self) -> dict[str, float | None]:
        """The stage-2 rate of each kind of MDF parameter (training.MdfTrainer; None: the rate of the kind it falls
        back to)."""
        return {kind: getattr(self, f"{kind}_learning_rate") for kind in LEARNING_RATE_KINDS}


def dataset_names() -> tuple[str, ...]:
    """--dataset's values: the synthetic set, the paper's sources together, each source registered with
    dataset_builder (`dataset_builder.sources.SOURCES`)."""
    return ("synthetic", "all", *SOURCES)


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={"help": " | ".join(dataset_names())})
    fives: str | None = field(default=None, metadata={"help": "FIVES folder (--dataset fives or all)"})
    hrf: str | None = field(default=None, metadata={"help": "HRF folder (--dataset hrf or all)"})
    stonerounds: str | None = field(default=None, metadata={"help": "StoneRounds folder (--dataset stonerounds/all)"})
    data_dir: str | None = field(default=None, metadata={"help": "The source's folder: an image folder with "
                                 "metadata.jsonl for --dataset manifest, the folder of a source without an option of "
                                 "its own"})
    num_images: int | None = field(
        default=None, metadata={"help": "Synthetic set size (default: the paper's 1,305-pair composition)"}
    )
    image_size: int = field(default=256, metadata={"help": "Synthetic photo side in pixels"})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set and of the splits"})
    no_text: bool = field(default=False, metadata={"help": "Drop the clinical text from every prompt"})


@dataclass
class RunArguments:
    """What the job runs: which stages, their epochs and rates, the ablation, evaluation and export."""

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
    stage1_optimizer: str = field(default="AdamW", metadata={"help": f"Stage 1's optimizer, a torch.optim class: "
                                  f"{' | '.join(STAGE1_OPTIMIZERS)} (weight decay: --weight_decay)"})
    stage1_schedule: str = field(default="one_cycle", metadata={"help": "Stage 1's learning-rate schedule: "
                                 f"{' | '.join(STAGE1_SCHEDULES)} (one_cycle peaks at --stage1_learning_rate)"})
    stage1_standardise: bool = field(default=STAGE1_STANDARDISE, metadata={"help": "Standardise the pooled skips "
                                     "(a batch norm) before stage 1's linear class head, folded into the head once "
                                     "trained: raw, they differ little between photos and stage 1 learns slowly"})
    stage1_flip: float = field(default=0.5, metadata={"help": "Probability that a stage-1 batch is mirrored left-right "
                               "(as the other eye is photographed)"})
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
    max_steps: int = field(default=-1, metadata={"help": "A smoke run: every training loop of the job (base, stage "
                           "1, both arms; each ablation run) stops after N optimizer steps, and every other phase "
                           "still runs (scoring, references, counterfactual pass, probe ladder, export); -1: the "
                           "epochs decide"})
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




@dataclass(frozen=True)
class Job:
    """A job's settings: the model (`ModelArguments`), the data (`DataArguments`), what runs (`RunArguments`) and the
    Trainer's settings (`MdfTrainingArguments`). A stage that needs other settings than the job's (the baseline's
    model, an ablation row's seed) gets a copy from `replace`."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training: MdfTrainingArguments

    def replace(self, **parts: dict) -> "Job":
        """A copy with some settings changed, e.g. `job.replace(model={"lora": False}, training={"seed": 1})`."""
        return replace(self, **{part: replace(getattr(self, part), **changes) for part, changes in parts.items()})

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    @property
    def export_dir(self) -> Path:
        """Where the trained MDF model is exported: --export_dir, else <output_dir>/mdf-mllm."""
        return Path(self.run.export_dir or self.output_dir / "mdf-mllm")
