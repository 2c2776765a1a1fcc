"""Launched by tests/test_distributed.py on two CPU processes:

    accelerate launch --config_file configs/fsdp_cpu.yaml --num_processes 2 tests/fsdp_probe.py OUT

Trains the tiny MDF-MLLM for two steps with training.train_model (after mdf_mllm.main_job.shard_on_cpu_processes, as
the main job does) and writes OUT/rank-<r>.json: what this process holds of every parameter once the Trainer has
prepared the model (a DTensor's local shard, or the whole tensor), and the optimizer steps it took.
"""

import json
import os
import sys

import numpy as np
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from dataset_builder import render_fundus
from mdf_mllm import model_setup, main_job as job, training
from mdf_mllm.job import MdfTrainingArguments, ModelArguments
from processing_mdf_mllm import MdfMllmDataCollator


class Holdings(TrainerCallback):
    def __init__(self):
        self.parameters, self.steps = {}, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            self.parameters[name] = {"dtensor": isinstance(param, DTensor), "shape": list(param.shape),
                                     "local_shape": list(local.shape)}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def tiny_split(processor, count: int = 8) -> list[dict]:
    """`count` synthetic fundus photos with labels, processed one by one (batch dimension removed)."""
    items = []
    for i in range(count):
        photo = render_fundus("dr", np.random.default_rng(i), 64)[0]
        inputs = processor(images=[photo], clinical_text=["night blindness"], labels=[i % 8])
        items.append({key: value[0] for key, value in inputs.items()})
    return items


def main(out: str) -> None:
    model_args = ModelArguments(model_size="tiny")
    processor = model_setup.default_processor(model_args)
    model = model_setup.build_model(model_args, processor)
    args = MdfTrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                                eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=0)
    job.shard_on_cpu_processes()  # after the TrainingArguments, as in mdf_mllm.main_job.main: they set up the state
    holdings = Holdings()
    trainer = training.train_model(model, {"train": tiny_split(processor), "validation": []},
                             MdfMllmDataCollator(processor), args, callbacks=[holdings])
    state = trainer.accelerator.state
    finish(out, {"rank": state.process_index, "world_size": state.num_processes,
                 "parameters": holdings.parameters, "steps": holdings.steps})


def finish(out: str, record: dict) -> None:
    """Write this process's record to `out`/rank-<rank>.json and exit: the process group left, and interpreter
    finalization skipped, as tests/test_reporting.py's TOY_SCRIPT does (under FSDP on gloo it now and then aborts a
    process whose work is done)."""
    with open(os.path.join(out, f"rank-{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    job.end_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
