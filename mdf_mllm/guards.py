"""What the main job (mdf_mllm.main_job) checks before it does any work, and how it writes so that nothing is left
half-written: the range of every numeric option (one table, checked where the options are parsed), the options that
must agree with each other (the U-Net layout, the splits a synthetic set gives), the paths it reads and writes, the
checkpoint it resumes, and the one job that may use an output folder at a time (a lock file)."""

import errno
import json
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError

from configuration_mdf_mllm import LAYOUTS, MdfMllmConfig
from dataset_builder.__main__ import MIN_IMAGE_SIZE
from dataset_builder.builder import MdfFundusConfig, assign_splits, collect_records
from mdf_mllm.job import LEARNING_RATE_KINDS, Job
from mdf_mllm.model_setup import UsageError, cross_attention_layers, mdf_layout, parse_fusion_layers
from mdf_mllm.training import checkpoints, is_complete_checkpoint, resolve_checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# Option ranges


@dataclass(frozen=True)
class Range:
    """The values an option accepts: a finite `kind` (int or float) from `low` to `high` (either excluded when
    `open_low` / `open_high`), or one of `also` (a sentinel such as max_steps' -1). None (the option's "default")
    always passes: only options whose default is None can be None."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    also: tuple = ()

    def accepts(self, value) -> bool:
        if value is None or (value in self.also and not isinstance(value, bool)):
            return True
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        shown = lambda bound: str(bound) if self.kind is int else f"{bound:g}"  # noqa: E731
        bounds = [f"{'>' if self.open_low else '>='} {shown(self.low)}" if self.low is not None else "",
                  f"{'<' if self.open_high else '<='} {shown(self.high)}" if self.high is not None else ""]
        text = " ".join([what, " and ".join(bound for bound in bounds if bound)]).strip()
        return text + "".join(f" or {value}" for value in self.also)


SEED = Range(int, 0, 2**32 - 1)  # numpy's seed range, which transformers' set_seed passes it to
RATE = Range(float, 0)  # learning rates, weights, decays: 0 switches the thing off
POSITIVE = Range(int, 1)
POSITIVE_NUMBER = Range(float, 0, open_low=True)

# Every numeric option of the job: its dataclass field -> the values it accepts (the option is --<field>). The
# TrainingArguments fields are those the job reads or passes to the Trainer; tests/test_properties.py checks that no
# numeric field of the job's own dataclasses is missing.
OPTION_RANGES = {
    # ModelArguments
    "seg_loss_weight": RATE,
    "unet_image_size": Range(int, 16),  # the U-Net halves it 4 times; its divisibility by the grid: check_layout
    "fusion_grid": POSITIVE,
    **{f"{kind}_learning_rate": RATE for kind in LEARNING_RATE_KINDS},  # one option per kind of MDF parameter
    "unet_gate_start": Range(float, -10, 10),  # tanh(±10) is ±1 in float32: beyond that the gate cannot train
    "lora_rank": POSITIVE,
    "lora_alpha": POSITIVE,
    # DataArguments
    "num_images": POSITIVE,
    "image_size": Range(int, MIN_IMAGE_SIZE),  # the synthetic photo's side, as `python -m dataset_builder` takes it
    "dataset_seed": SEED,
    # RunArguments
    "base_epochs": POSITIVE_NUMBER,
    "stage1_epochs": POSITIVE_NUMBER,  # no stage 1 is --no_stage1
    "stage1_learning_rate": RATE,
    "stage1_vessel_weight": RATE,
    "stage1_flip": Range(float, 0, 1),  # a probability
    "seeds": POSITIVE,
    "ablation_epochs": POSITIVE_NUMBER,
    "n_bootstrap": POSITIVE,
    "eval_batch_size": POSITIVE,
    # TrainingArguments
    "num_train_epochs": POSITIVE_NUMBER,
    "max_steps": Range(int, 1, also=(-1,)),  # -1: epochs decide
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    "learning_rate": RATE,
    "weight_decay": RATE,
    "adam_beta1": Range(float, 0, 1, open_high=True),
    "adam_beta2": Range(float, 0, 1, open_high=True),
    "adam_epsilon": POSITIVE_NUMBER,
    "max_grad_norm": RATE,
    "warmup_steps": RATE,  # below 1: a fraction of the steps
    "label_smoothing_factor": Range(float, 0, 1, open_high=True),
    "logging_steps": POSITIVE_NUMBER,  # below 1: a fraction of the steps
    "eval_steps": POSITIVE_NUMBER,
    "save_steps": POSITIVE_NUMBER,
    "save_total_limit": POSITIVE,
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": Range(int, 0),
}


def range_problem(values: dict) -> str | None:
    """The first option of `values` (field -> value, as parsed) outside its range, as one line: the option, what it
    got and what it accepts. None when every value is in range."""
    for name, accepted in OPTION_RANGES.items():
        if name in values and not accepted.accepts(values[name]):
            return f"--{name}: got {values[name]!r}; accepts {accepted.describe()}"
    return None


class RangeCheckedParser:
    """A mixin for the job's HfArgumentParser: every option in range (`OPTION_RANGES`) before any settings object is
    built, from the command line or a YAML/JSON file; what TrainingArguments itself refuses, one line too."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        problem = range_problem(vars(namespace))
        if problem:
            self.error(problem)
        return namespace, remaining

    def parse_dict(self, args: dict, allow_extra_keys: bool = False):
        if not isinstance(args, dict):
            self.error(f"expected the options as a mapping (option: value), got {type(args).__name__}")
        problem = range_problem(args)
        if problem:
            self.error(problem)
        try:
            return super().parse_dict(args, allow_extra_keys)
        except (ValueError, TypeError) as error:
            self.error(" ".join(str(error).split()))

    def parse_yaml_file(self, yaml_file, allow_extra_keys: bool = False):
        return self.parse_file(super().parse_yaml_file, yaml_file, allow_extra_keys)

    def parse_json_file(self, json_file, allow_extra_keys: bool = False):
        return self.parse_file(super().parse_json_file, json_file, allow_extra_keys)

    def parse_file(self, parse, path, allow_extra_keys: bool):
        """A settings file that cannot be read, or holds no mapping of options, is one line naming it."""
        import yaml

        try:
            return parse(path, allow_extra_keys)
        except (OSError, yaml.YAMLError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
            self.error(f"{path}: {reason}")

    def parse_args_into_dataclasses(self, *args, **kwargs):
        try:
            return super().parse_args_into_dataclasses(*args, **kwargs)
        except ValueError as error:  # TrainingArguments.__post_init__: options that do not go together
            self.error(" ".join(str(error).split()))


# ----------------------------------------------------------------------------------------------------------------------
# Options that must agree with each other


def check_job(job: Job) -> None:
    """The checks of `check_arguments` that need more than one option or a look at a file: the base, the U-Net
    layout, the synthetic splits, the folders the job writes and the checkpoint it resumes."""
    check_base(job.model.base_model)
    check_layout(job.model)
    check_synthetic_splits(job.data)
    check_writable(job)
    check_resume(job)


def check_layout(model_args) -> None:
    """The MDF config the job will build, made now from the options: what it refuses (the U-Net input size against
    the grid, the fusion map against the base's layers), refused before any training."""
    layout, sizes = mdf_layout(model_args)
    layers = cross_attention_layers(model_args)
    if layout == "11b" and model_args.base_model:  # an MDF-MLLM checkpoint as the base brings its own sizes
        saved = local_config(model_args.base_model)
        unet = {**saved.get("unet_config", {}), **sizes.get("unet_config", {})}
        sizes = {**{k: saved[k] for k in ("fusion_grid",) if k in saved}, **sizes,
                 **({"unet_config": unet} if unet else {})}
    fusion = parse_fusion_layers(model_args.fusion_layers)
    if layers is None:  # a Hub id: its layers are known once it loads
        fusion = {}
    text = {**LAYOUTS.get(layout, LAYOUTS["small"]).get("mllama", {}).get("text", {}),
            **({"cross_attention_layers": layers} if layers else {})}
    try:
        MdfMllmConfig(text_config=text, **sizes, **({} if fusion is None else {"fusion_layers": fusion}))
    except ValueError as error:
        given = [f"--{name} {value}" for name, value in (("unet_image_size", model_args.unet_image_size),
                                                          ("fusion_grid", model_args.fusion_grid),
                                                          ("fusion_layers", model_args.fusion_layers))
                 if value is not None]
        options = ", ".join(given) or f"--model_size {layout}"
        raise UsageError(f"{options}: the MDF config refuses it: {error}") from None


def local_config(folder: str) -> dict:
    """A local model folder's config.json ({} where there is none)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def synthetic_split_sizes(num_images: int | None, seed: int) -> dict[str, int]:
    """The photos per split of the synthetic set of `num_images` (its plan alone: no photo is drawn)."""
    records, _ = collect_records(MdfFundusConfig(name="synthetic", num_images=num_images, seed=seed))
    splits = assign_splits(records, seed)
    return {split: splits.count(split) for split in ("train", "validation", "test")}


def check_synthetic_splits(data_args) -> None:
    """A synthetic set too small to give photos to train and to test on is refused now, not after the base and stage
    1 have trained; the message names the smallest set that would."""
    # Measured: every set of 16 to 400 photos, and the paper's 1,305, gives photos to every split (the plan of a set
    # takes a few milliseconds per 100 photos, so much larger sets are not planned twice).
    if data_args.dataset != "synthetic" or data_args.num_images is None or data_args.num_images > 400:
        return
    sizes = synthetic_split_sizes(data_args.num_images, data_args.dataset_seed)
    if sizes["train"] and sizes["test"]:
        return
    smallest = next(n for n in range(data_args.num_images + 1, 10**4)
                    if all(synthetic_split_sizes(n, data_args.dataset_seed)[s] for s in ("train", "test")))
    raise UsageError(f"--num_images: got {data_args.num_images}, which splits into "
                     f"{', '.join(f'{s} {n}' for s, n in sizes.items())}; training needs photos in train and test "
                     f"(accepts {smallest} or more with --dataset_seed {data_args.dataset_seed})")


# ----------------------------------------------------------------------------------------------------------------------
# Files read: the base, the checkpoint resumed


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be read whole (None: it can): its header, and its size against the end of the
    last tensor the header lists (a copy cut short reads as a valid header followed by too few bytes)."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        end = 8 + length + max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                               default=0)
    except (OSError, struct.error, ValueError, MemoryError, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"{path}: not a readable safetensors file ({type(error).__name__})"
    size = path.stat().st_size
    if size < end:
        return f"{path}: truncated ({size} bytes of the {end} its header lists): copy it again"
    return None


def check_weights(option: str, folder: str | None) -> None:
    """Every .safetensors file of a local `folder` readable whole, or a UsageError naming the option and file."""
    if folder is None or not os.path.isdir(folder):
        return
    for path in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise UsageError(f"{option}: {problem}")


def check_base(base_model: str | None) -> None:
    """A local base whole; a Hub id only where the Hub can be reached or it is in the local Hub cache."""
    if base_model is None:
        return
    if os.path.exists(base_model):
        check_weights("--base_model", base_model)
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(base_model, "config.json"), str):
        raise UsageError(f"--base_model: {base_model} is neither a local folder nor in the Hub cache, and "
                         "HF_HUB_OFFLINE is set (download it first, or unset HF_HUB_OFFLINE)")


# What a run records in its output folder when it starts: the settings a checkpoint of it holds weights for.
RUN_RECORD = "run_settings.json"
RECORDED = {"model": ("base_model", "model_size", "fusion_layers", "no_film", "unet_image_size", "fusion_grid",
                      "lora", "lora_rank", "lora_alpha"),
            "data": ("dataset", "fives", "hrf", "stonerounds", "data_dir", "num_images", "image_size",
                     "dataset_seed", "no_text"),
            "training": ("seed",)}


def run_settings(job: Job) -> dict:
    """The settings of `RECORDED`, as `--option`: value."""
    parts = {"model": asdict(job.model), "data": asdict(job.data), "training": {"seed": job.training.seed}}
    return {f"--{name}": parts[part][name] for part, names in RECORDED.items() for name in names}


def record_run(job: Job) -> None:
    """Write `RUN_RECORD` into the output folder (atomically): what a later resume of its checkpoints compares."""
    atomic_write_text(job.output_dir / RUN_RECORD, json.dumps(run_settings(job), indent=1) + "\n")


def check_resume(job: Job) -> None:
    """A checkpoint is resumed only by a run of its own settings: its run's record (RUN_RECORD beside it) must agree
    with this run's, and its model must be an MDF-MLLM (a baseline checkpoint has no U-Net to resume)."""
    resume = job.training.resume_from_checkpoint
    if resume is None:
        return
    found = [c for c in checkpoints(job.output_dir) if is_complete_checkpoint(c)] if resume == "latest" else \
        [Path(resolve_checkpoint(resume, job.training.output_dir))]  # a UsageError now for one cut short
    if not found:
        return
    checkpoint = found[-1]
    option = f"--resume_from_checkpoint {resume}"
    check_weights(option, str(checkpoint))
    config, fusion = local_config(str(checkpoint)), parse_fusion_layers(job.model.fusion_layers)
    saved = {int(layer): depth for layer, depth in (config.get("fusion_layers") or {}).items()}
    if config.get("model_type") != "mdf_mllm" or (not saved and fusion != {}):
        raise UsageError(f"{option}: {checkpoint} is not an MDF-MLLM checkpoint (a baseline's, or no model at all); "
                         "the MDF arm resumes only its own checkpoints")
    if fusion is not None and saved != fusion:
        raise UsageError(f"{option}: {checkpoint} fuses layers {saved}, this run --fusion_layers "
                         f"{job.model.fusion_layers!r}; resume it with its own settings")
    try:
        recorded = json.loads((checkpoint.parent / RUN_RECORD).read_text())
    except (OSError, ValueError):
        print(f"{option}: no {RUN_RECORD} beside {checkpoint} (a run older than the record): its fusion layout "
              "matches; its data settings cannot be compared")
        return
    ours = run_settings(job)
    differ = [f"{name} {recorded.get(name)!r} (this run: {value!r})" for name, value in ours.items()
              if recorded.get(name) != value]
    if differ:
        raise UsageError(f"{option}: {checkpoint} is of a run with other settings: {', '.join(differ)}; resume it "
                         "with its own settings, or start a new run in another --output_dir")


# ----------------------------------------------------------------------------------------------------------------------
# Files written: writable folders, atomic writes, the disk running full


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder` or, where it does not exist yet, in its nearest existing parent (None:
    they can). Tried with a file, not read from permission bits: a read-only mount or a quota shows only so."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        handle, name = tempfile.mkstemp(prefix=".write-test-", dir=existing)
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror or error})"
    os.close(handle)
    os.unlink(name)
    return None


def check_writable(job: Job) -> None:
    """--output_dir and the export folder writable now, not after the training (and a --make_base whose `base` is a
    file refused)."""
    folders = [("--output_dir", job.output_dir)]
    if not (job.run.make_base or job.run.ablation):
        folders.append(("--export_dir", job.export_dir.parent))
    for option, folder in folders:
        problem = writable_problem(folder)
        if problem:
            raise UsageError(f"{option}: {problem}")
    base = job.output_dir / "base"
    if job.run.make_base and base.exists() and not base.is_dir():
        raise UsageError(f"--make_base: {base} is a file; the base is written to that folder, so move the file or "
                         "choose another --output_dir")


def atomic_write(path: Path, write) -> None:
    """`write(temporary path)` beside `path`, renamed over it once complete: a full disk or a kill leaves the earlier
    file (or none), never a half-written one."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` to `path` (`atomic_write`)."""
    atomic_write(path, lambda temporary: temporary.write_text(text))


# How the writers the job goes through report a full disk: Python's OSError, safetensors' Rust I/O error (a
# SafetensorError "IoError(Os { code: 28, kind: StorageFull, ... })"), torch.save's RuntimeError (which says only "file
# write failed": then the disk itself is asked).
FULL_DISK_WORDS = ("No space left on device", "StorageFull", "QuotaExceeded", "os error 28")


def out_of_space(error: BaseException, folder: Path | None = None) -> bool:
    """Whether `error` is a write that failed because the disk (of `folder`, where given) is full."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    if any(words in text for words in FULL_DISK_WORDS):
        return True
    if folder is not None and isinstance(error, RuntimeError) and "write failed" in text:
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        return shutil.disk_usage(existing).free < 2**20
    return False


def disk_full_message(job: Job, error: BaseException) -> str:
    """One line for a disk that ran full: what was being written, that nothing half-written is left, and what can
    be resumed. Removes the incomplete checkpoints (a checkpoint cut short cannot be resumed)."""
    complete, removed = [], []
    for folder in (job.output_dir, job.output_dir / "baseline"):
        for checkpoint in checkpoints(folder):
            if is_complete_checkpoint(checkpoint):
                complete.append(checkpoint)
            else:
                shutil.rmtree(checkpoint, ignore_errors=True)
                removed.append(checkpoint.name)
    filename = getattr(error, "filename", None)
    parts = [f"no space left on the device{f' writing {filename}' if filename else ''}",
             "the export is written whole or not at all"]
    if removed:
        parts.append(f"the incomplete {', '.join(removed)} was removed")
    parts.append(f"the finished training's checkpoint {complete[-1]} is kept: free some space and resume it with "
                 "--resume_from_checkpoint latest" if complete else "no checkpoint was complete: free some space and "
                 "run the job again")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# One job per output folder


LOCK_FILE = ".mdf_mllm.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class OutputLock:
    """`with OutputLock(folder):` holds `folder/LOCK_FILE`, naming this process (pid, host, start time), for the
    job's whole run, and removes it on exit. A second job on the folder gets a UsageError naming the holder; a lock
    left by a process of this host that no longer runs (a killed job) is taken over, with a line saying so. Only the
    main process of a distributed launch takes it (the others run under it)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.held = int(os.environ.get("RANK", "0")) != 0  # not the main process: nothing to take

    def __enter__(self):
        if self.held:
            self.held = False
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.take_over_if_stale()
                continue
            with os.fdopen(handle, "w") as file:
                json.dump(holder, file)
            self.held = True
            return self
        raise UsageError(f"--output_dir: {self.path} could not be taken")

    def holder(self) -> tuple[dict, int | None, str | None]:
        """The lock file as its holder wrote it, its pid and host (None, None: unreadable)."""
        try:
            other = json.loads(self.path.read_text())
            return other, int(other["pid"]), str(other["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}, None, None

    def check_free(self) -> None:
        """Raise UsageError naming the holder when another job that still runs holds the lock."""
        if not self.path.exists():
            return
        other, pid, host = self.holder()
        if pid is None:
            if self.path.exists() and time.time() - self.path.stat().st_mtime < 10:
                # Being written by a job that has just taken it.
                raise UsageError(f"--output_dir: {self.path.parent} is in use by another job that is starting")
        elif host != socket.gethostname() or pid_alive(pid):
            raise UsageError(f"--output_dir: {self.path.parent} is in use by another job (pid {pid} on {host}, "
                             f"started {other.get('started')}; its lock: {self.path}); wait for it or choose another "
                             "--output_dir")

    def take_over_if_stale(self) -> None:
        """Remove a stale lock (its process gone); raise UsageError naming the holder of a live one."""
        self.check_free()
        other, pid, host = self.holder()
        print(f"{self.path}: taking over the lock of a job that no longer runs "
              f"(pid {pid} on {host}, started {other.get('started')})" if pid is not None else
              f"{self.path}: taking over an unreadable lock file")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


@contextmanager
def job_folder(job: Job):
    """The output folder held by this job (`OutputLock`) while it runs, the settings of a training run recorded
    (`RUN_RECORD`) for a later resume to compare. A disk that runs full ends the job with one line
    (`disk_full_message`) and exit status 1: not the user's mistake, but nothing to show a traceback for."""
    with OutputLock(job.output_dir) as lock:
        if lock.held and not job.run.make_base:
            record_run(job)
        try:
            yield
        except (OSError, RuntimeError, SafetensorError) as error:
            if not out_of_space(error, job.output_dir):
                raise
            print(f"train_hf.py: error: {disk_full_message(job, error)}", file=sys.stderr)
            raise SystemExit(1) from None
