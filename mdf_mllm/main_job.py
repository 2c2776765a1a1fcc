"""Fine-tune MDF-MLLM from a pretrained Llama 3.2 Vision (Mllama) base and compare it with fine-tuning the base alone.

With no arguments the whole study runs offline on the synthetic fundus set (everything under --output_dir):
  base     a small stock MllamaForConditionalGeneration trained on the train split (LM loss on the answer),
           cached in ~/.cache/mdf_mllm/base-<key> ($MDF_MLLM_BASE_CACHE or --base_cache_dir), or --base_model
  stage 1  the U-Net learns the classes from the photo alone (a linear head on its pooled skips; the U-Net with
           that head is the "U-Net alone (image only)" row; --no_stage1 skips it)
  stage 2  two arms from the same base weights, data order, steps and learning rate: the baseline (the base
           fine-tuned alone) and MDF-MLLM (base + MDF modules starting as the identity, the stage-1 U-Net frozen)
  then     comparison with 95% CIs, the probe ladder, U-Net gate values per step, plots, and the MDF model exported
           as a Hub repository to <output_dir>/mdf-mllm (--export_dir; --overwrite_export replaces an earlier one)

    python train_hf.py                          # the main job above (or mdf-mllm-train, python -m mdf_mllm.main_job)
    python train_hf.py job.yaml                 # the same arguments from a YAML or JSON file
    python train_hf.py --make_base --output_dir DIR       # only write the stock Mllama base to DIR/base
    python train_hf.py --max_steps 2 --output_dir DIR     # a smoke run: each training loop 2 steps, every phase
    python train_hf.py --from_scratch           # both models from scratch, every gate open (no base, no stage 1)
    python train_hf.py --base_model meta-llama/Llama-3.2-11B-Vision-Instruct --dataset all \\
        --fives FIVES --hrf HRF --stonerounds StoneRounds --lora --bf16 --gradient_checkpointing
    accelerate launch --config_file configs/fsdp_gpu.yaml train_hf.py --base_model ... --bf16
"""


import argparse
import json
import os
import re
import sys
from pathlib import Path

from transformers import HfArgumentParser

from configuration_mdf_mllm import UNET_DEPTHS
from dataset_builder.sources import PAPER_SOURCES, SOURCES
from mdf_mllm import export, guards, stage1, stages, tables
from mdf_mllm.comparison import Result
from mdf_mllm.job import (STAGE1_OPTIMIZERS, STAGE1_SCHEDULES, DataArguments, Job, MdfTrainingArguments,
                          ModelArguments, RunArguments, dataset_names)
from mdf_mllm.messages import OneStyleHelpFormatter
from mdf_mllm.model_setup import (
    BASE_RECORD_FILE,
    MODEL_SIZES,
    UsageError,
    base_processor,
    build_model,
    cross_attention_layers,
    default_processor,
    describe_mdf_sizes,
    parse_fusion_layers,
)
from mdf_mllm.training import Diverged, Phases, RunContext, checkpoints, load_data, remove_checkpoints
from pipeline_mdf_mllm import require_safetensors
from processing_mdf_mllm import MdfMllmDataCollator


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


class HelpFormatter(
    OneStyleHelpFormatter, argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    def _get_help_string(self, action):
        # "(default: None)" says nothing; a help that explains its default already says more.
        documented = action.default is None or "default" in (action.help or "")
        return action.help if documented else super()._get_help_string(action)


class Parser(guards.RangeCheckedParser, HfArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_arguments(argv: list[str]) -> Job:
    """The job's settings from the command line or a YAML/JSON file."""
    dataclasses = (ModelArguments, DataArguments, RunArguments, MdfTrainingArguments)
    parser = Parser(dataclasses, prog="train_hf.py", description=__doc__,
                    usage="python train_hf.py [options] | python train_hf.py job.yaml", formatter_class=HelpFormatter)
    negations = {"--no_baseline": "Train only MDF-MLLM (default: both models)",
                 "--no_stage1_standardise": "Stage 1's class head on the raw pooled skips (default: standardised)"}
    for action in parser._actions:
        for option in set(negations) & set(action.option_strings):
            action.help = negations[option]
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return Job(*parser.parse_yaml_file(argv[0]))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return Job(*parser.parse_json_file(argv[0]))
    *arguments, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return Job(*arguments)


def check_path(option: str, path: str | None, hub_id_allowed: bool = False) -> None:
    # A string shaped like `org/name` may be a Hub id; anything else that does not exist is a local path mistyped,
    # reported now rather than after transformers has retried the Hub.
    if path is None or os.path.exists(path) or (hub_id_allowed and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path)):
        return
    raise UsageError(f"{option}: no such file or folder: {path}")



def check_arguments(job: Job) -> None:
    """Raise UsageError naming the option for a value that would fail later (or silently reach for the Hub)."""
    data, training = job.data, job.training
    for option, value, allowed in (("--model_size", job.model.model_size, MODEL_SIZES),
                                   ("--dataset", data.dataset, dataset_names()),
                                   ("--stage1_optimizer", job.run.stage1_optimizer, STAGE1_OPTIMIZERS),
                                   ("--stage1_schedule", job.run.stage1_schedule, STAGE1_SCHEDULES)):
        if value is not None and value not in allowed:
            raise UsageError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    if data.dataset in SOURCES:
        option = data.dataset if data.dataset in PAPER_SOURCES else "data_dir"
        if not (getattr(data, option) or data.data_dir):
            raise UsageError(f"--dataset {data.dataset}: needs --{option} (the data folder)")
    check_path("--base_model", job.model.base_model, hub_id_allowed=True)
    for option in (*PAPER_SOURCES, "data_dir"):
        check_path(f"--{option}", getattr(data, option))
    if training.resume_from_checkpoint != "latest":
        check_path("--resume_from_checkpoint", training.resume_from_checkpoint)
    if training.push_to_hub:
        check_hub(job)
    check_output_folders(job)
    guards.check_job(job)  # option ranges: guards.OPTION_RANGES, checked by the parser


def check_output_folders(job: Job) -> None:
    """Nothing the job would overwrite or delete belongs to someone else: the base is read as safetensors, the export
    folder is free (export.export_dir_problem), and no checkpoint of another run sits where the job removes its own
    once finished (resuming that run is the way to use them)."""
    out, run = job.output_dir, job.run
    guards.OutputLock(out).check_free()  # another job's folder: said first, whatever it holds
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir: {job.training.output_dir} is a file, not a folder")
    try:
        require_safetensors(job.model.base_model)
    except ValueError as error:
        raise UsageError(f"--base_model: {error}") from None
    base = out / "base"
    if run.make_base and base.is_dir() and any(base.iterdir()) and not (base / BASE_RECORD_FILE).is_file():
        raise UsageError(f"--make_base: {base} holds files a base did not write; choose another --output_dir")
    if not (run.make_base or run.ablation):
        problem = export.export_dir_problem(job.export_dir, run.overwrite_export)
        if problem:
            raise UsageError(problem)
    if job.training.resume_from_checkpoint is None:
        found = [str(path) for folder in (out, out / "baseline") for path in checkpoints(folder)]
        if found:
            raise UsageError(f"--output_dir: {found[0]} is a checkpoint of an earlier run, which the job would remove "
                             "once finished: resume it (--resume_from_checkpoint latest) or choose another --output_dir")
    fusion, layers = parse_fusion_layers(job.model.fusion_layers), cross_attention_layers(job.model)
    bad = {k: v for k, v in (fusion or {}).items() if (layers and k not in layers) or not 1 <= v <= UNET_DEPTHS}
    if bad:
        raise UsageError(f"--fusion_layers: {job.model.fusion_layers!r}: layers must be among the cross-attention "
                         f"layers {layers or '(of the base)'}, depths 1-{UNET_DEPTHS}")


def check_hub(job: Job) -> None:
    """--push_to_hub pushes the export at the end: find out now, not after training, that it cannot."""
    from huggingface_hub import HfApi, constants

    if job.run.make_base or job.run.ablation:
        raise UsageError("--push_to_hub: pushes the exported MDF model, which --make_base and --ablation do not write")
    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed (unset it, or upload the "
                         "export later with `hf upload`)")
    try:
        HfApi().whoami(token=job.training.hub_token)
    except Exception as error:  # no token, a rejected one, no connection: whichever it is, the push would fail
        raise UsageError(f"--push_to_hub: the Hub cannot be used ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})") from None


def push_export(job: Job, export_dir: Path) -> str:
    """Push the export folder to `--hub_model_id` (default: the output folder's name, as the Trainer names it)."""
    from huggingface_hub import HfApi

    training = job.training
    api = HfApi(token=training.hub_token)
    name = training.hub_model_id or job.output_dir.absolute().name
    repo_id = api.create_repo(name, private=training.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=export_dir, commit_message="MDF-MLLM export from train_hf.py")
    return repo_id



# ----------------------------------------------------------------------------------------------------------------------
# The job


def ladder(model, splits) -> dict[str, float]:
    """The probe ladder (probe_ladder.py) of the acquired classes, train photos -> test photos."""
    from mdf_mllm.probe_ladder import probe_ladder, selected  # scikit-learn: imported when used, not for --help

    names = model.config.label_names
    collator = MdfMllmDataCollator(model.config.text_config.pad_token_id)
    return probe_ladder(model, *selected(splits["train"], names), *selected(splits["test"], names), collator)


def probe_ladder_stage(run: RunContext, ours: Result, unet_alone: Result | None) -> None:
    """probe_ladder.md: the ladder of the model stage 2 started from (the stage-1 U-Net in the untrained fusion) and
    of the trained MDF-MLLM."""
    if not (run.job.run.probe_ladder and unet_alone):
        return
    from mdf_mllm.probe_ladder import ACQUIRED_CLASSES, ladder_table

    start = build_model(run.job.replace(model={"lora": False}).model, run.processor)
    stages.start_from_stage1(run, start, unet_alone.weights)
    ladders = {"start of stage 2": ladder(start, run.splits), "MDF-MLLM (trained)": ladder(ours.model, run.splits)}
    path = run.job.output_dir / "probe_ladder.md"
    path.write_text(ladder_table(ladders, chance=1 / len(ACQUIRED_CLASSES)) + "\n")
    print(f"probe ladder (acquired classes, linear probes, test accuracy): {path}")


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


def run(job: Job, phases: Phases | None = None) -> None:
    """The job; `phases` (default: one started now) times each stage for the phase table."""
    # The job pushes its export once at the end; a Trainer pushing each arm's checkpoints would mix them in one repo.
    push, job = job.training.push_to_hub, job.replace(training={"push_to_hub": False})
    if job.run.make_base:
        folder = stages.make_base(job, job.output_dir / "base")
        print(f"base written to {folder}: MllamaForConditionalGeneration + MllamaProcessor, plain transformers")
        return
    shard_on_cpu_processes()
    context = run_context(job, phases or Phases())
    if job.run.ablation:
        from mdf_mllm import ablation  # scipy: imported when used, not for --help

        ablation.run_ablation(context)
        return
    with context.phases("stage 1"):
        unet_alone = stage1.run(context)
    arms = stages.stage2(context, unet_alone)
    if arms[0].report is None:  # not the main process
        return
    with context.phases("probe ladder"):
        probe_ladder_stage(context, arms[0], unet_alone)
    results, differences, counterfactual, calibrated = stages.compare(context,
                                                                      [*arms, *([unet_alone] if unet_alone else [])])
    finish(context, results, differences, counterfactual, unet_alone, push, calibrated)


def run_context(job: Job, phases: Phases) -> RunContext:
    """The data set and the processor of the job's model (on the cached base, made first where needed, unless the
    job names one or trains from scratch), the splits through it."""
    with phases("data"):
        dataset = load_data(job.data)
    with phases("base"):
        if not job.run.from_scratch and not job.model.base_model:
            base = stages.cached_base(job, dataset)
            job = job.replace(model={"base_model": base, "model_size": job.model.model_size or "small"})
        processor = base_processor(job.model) if job.model.base_model else default_processor(job.model)
        if job.model.base_model:
            print(describe_mdf_sizes(job.model))
    context = RunContext(job, dataset, processor, phases=phases)
    with phases("preprocessing"):
        context.splits  # noqa: B018 (processed once here, for every stage to share)
    return context


def finish(run: RunContext, results: list[Result], differences: dict, counterfactual: dict,
           unet_alone: Result | None, push: bool, calibrated: Result | None = None) -> None:
    """comparison.md / .json, the export (pushed with --push_to_hub), checkpoints removed, the closing summary."""
    job, (ours, *others), phases = run.job, results, run.phases
    with phases("export and plots"):
        markdown = export.write_comparison(results, differences, counterfactual, job.output_dir,
                                           unet_alone.losses if unet_alone else [], calibrated)
        write_phases(job.output_dir, phases)  # a job stopped during the export still leaves the table so far
        baseline = next((r for r in others if r.trainer is not None), None)
        rows = [ours, *([calibrated] if calibrated else []), *others]
        export_dir = export.export(job, ours, run.processor, run.dataset, baseline=baseline, comparison=markdown,
                                   calibration={r.name: r.probabilities for r in rows}, counterfactual=counterfactual)
    if push:
        with phases("push to the Hub"):
            print(f"export pushed to https://huggingface.co/{push_export(job, export_dir)}")
    trained = [r.trainer.args.output_dir for r in results if r.trainer is not None]
    removed = [folder for output_dir in trained for folder in remove_checkpoints(output_dir)]
    if removed:
        print(f"checkpoints: {len(removed)} removed once training finished; none kept")
    print(export.summary(job, results, export_dir))
    if counterfactual:
        print("counterfactual histories (follows / changed):\n" + tables.counterfactual_table(
            {name: [row for row in rows if row["group"].startswith("all ")]
             for name, rows in counterfactual["summary"].items()}))
    print(f"phases (wall seconds):\n{write_phases(job.output_dir, phases)}")


def write_phases(out: Path, phases: Phases) -> str:
    """The phase table into comparison.json ("phase_seconds") and at the end of comparison.md, each file replaced
    whole; returns the table."""
    report = json.loads((out / "comparison.json").read_text())
    report["phase_seconds"] = phases.as_json()
    guards.atomic_write_text(out / "comparison.json", json.dumps(report, indent=1, allow_nan=False))
    table = phases.markdown()
    markdown = (out / "comparison.md").read_text().split(PHASES_HEADING)[0].rstrip("\n")
    guards.atomic_write_text(out / "comparison.md", f"{markdown}\n\n{PHASES_HEADING}\n\n{table}")
    return table


PHASES_HEADING = "Phases of this run (wall seconds; a phase inside another is left out of the outer one's):"


def end_process_group() -> None:
    """Under `accelerate launch`, leave the process group before exiting, as torch.distributed asks of a script (the
    Trainer leaves it to the script): a group still alive at exit makes NCCL warn, and can make gloo abort the process
    ("terminate called without an active exception") once its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    phases = Phases()
    try:
        with phases("set-up checks"):
            job = parse_arguments(sys.argv[1:] if argv is None else argv)
            check_arguments(job)
        with guards.job_folder(job):  # one job per output folder; a full disk is one line
            run(job, phases)
        end_process_group()
    except UsageError as error:
        print(f"train_hf.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Diverged as error:  # not the user's mistake, but no model either: one line, and nothing left behind
        print(f"train_hf.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
