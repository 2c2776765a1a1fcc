"""Launched by tests/test_distributed.py on two CPU processes:

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py OUT

Trains the main job's tiny MDF-MLLM (its own configuration: no vessel loss, so the U-Net decoder does not run) for
two steps with training.train_model under DistributedDataParallel with gradient checkpointing and
`ddp_find_unused_parameters=False`, which stops at the first trainable parameter that gets no gradient. Writes
OUT/rank-<r>.json: how the Trainer wrapped the model, the optimizer steps taken, and a checksum of every trainable
parameter (DDP keeps the replicas equal).
"""

import sys

import torch
from transformers import TrainerCallback

from fsdp_probe import finish, tiny_split
from mdf_mllm import model_setup, training
from mdf_mllm.job import MdfTrainingArguments, ModelArguments
from processing_mdf_mllm import MdfMllmDataCollator


class Steps(TrainerCallback):
    def __init__(self):
        self.steps, self.wrapper = [], None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)


def main(out: str) -> None:
    model_args = ModelArguments(model_size="tiny")
    processor = model_setup.default_processor(model_args)
    model = model_setup.build_model(model_args, processor)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = MdfTrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2,
                                save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1,
                                disable_tqdm=True, seed=0, gradient_checkpointing=True,
                                ddp_find_unused_parameters=False)
    steps = Steps()
    trainer = training.train_model(model, {"train": tiny_split(processor), "validation": []},
                             MdfMllmDataCollator(processor), args, callbacks=[steps])
    state = trainer.accelerator.state
    wrapped = trainer.model_wrapped
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    record = {"rank": state.process_index, "world_size": state.num_processes,
              "wrapper": type(wrapped).__name__,
              "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
              "gradient_checkpointing": model.is_gradient_checkpointing, "steps": steps.steps,
              "trainable": len(trained), "moved": sum(not torch.equal(p, before[n]) for n, p in trained.items()),
              "checksum": {name: float(p.double().sum()) for name, p in trained.items()}}
    finish(out, record)


if __name__ == "__main__":
    main(sys.argv[1])
