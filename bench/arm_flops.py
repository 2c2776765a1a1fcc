"""One stage-2 training step of each arm of the main job, MDF-MLLM and the Mllama baseline: its FLOPs
(`torch.utils.flop_counter.FlopCounterMode`, forward and backward) and its wall seconds (the median of several steps
taken in turn), on a real batch of the small layout (the cached base, the job's optimizer groups), so that the FLOP
ratio stands beside the time ratio. `--profile` adds the top operations of one MDF-MLLM step (`torch.profiler`).

    python bench/arm_flops.py                     # the table (the base cached as the main job caches it)
    python bench/arm_flops.py --profile 15        # and the 15 costliest operations of an MDF-MLLM step
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mdf_mllm.main_job import parse_arguments  # noqa: E402
from mdf_mllm.model_setup import base_processor, build_model  # noqa: E402
from mdf_mllm.stages import cached_base  # noqa: E402
from mdf_mllm.training import MdfTrainer, ProcessedSplit, load_data  # noqa: E402
from processing_mdf_mllm import MdfMllmDataCollator  # noqa: E402

ARMS = ("MDF-MLLM", "Mllama baseline")


def arms(options: list[str]) -> tuple[dict, dict]:
    """{arm: (model, optimizer)} as the main job builds them, and one training batch of the job's size."""
    job = parse_arguments(options)
    dataset = load_data(job.data)
    job = job.replace(model={"base_model": cached_base(job, dataset), "model_size": job.model.model_size or "small"})
    processor = base_processor(job.model)
    items = ProcessedSplit(dataset["train"].select(range(job.training.per_device_train_batch_size)), processor,
                           with_answers=True)
    batch = MdfMllmDataCollator(processor)([items[i] for i in range(len(items))])
    built = {}
    for name, model_args in zip(ARMS, (job.model, job.replace(model={"fusion_layers": "none"}).model)):
        model = build_model(model_args, processor).train()
        trainer = MdfTrainer(model=model, args=job.training, eval_dataset=items,
                             learning_rates=model_args.learning_rates())
        built[name] = (model, trainer.create_optimizer())  # freezes what a rate of 0 freezes, as in the job
    return built, batch


def step(model, optimizer, batch) -> None:
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each arm (after one untimed)")
    parser.add_argument("--profile", type=int, default=0, help="show the N costliest operations of an MDF step")
    args, options = parser.parse_known_args()
    built, batch = arms(["--output_dir", "/tmp/arm-flops", *options])
    flops, seconds = {}, {name: [] for name in ARMS}
    for name, (model, optimizer) in built.items():
        with FlopCounterMode(display=False) as counter:
            step(model, optimizer, batch)
        flops[name] = counter.get_total_flops()
    for _ in range(args.steps):  # in turn, so that other work on the machine weighs on both alike
        for name, (model, optimizer) in built.items():
            start = time.perf_counter()
            step(model, optimizer, batch)
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"one training step, batch {len(batch['input_ids'])}, torch threads {torch.get_num_threads()}, "
          f"median of {args.steps}:")
    print("| arm | GFLOPs (forward + backward) | wall s |\n|---|---:|---:|")
    for name in ARMS:
        print(f"| {name} | {flops[name] / 1e9:.2f} | {median[name]:.3f} |")
    print(f"\nMDF-MLLM / baseline: FLOPs {flops[ARMS[0]] / flops[ARMS[1]]:.2f}x, "
          f"time {median[ARMS[0]] / median[ARMS[1]]:.2f}x")
    if args.profile:
        model, optimizer = built[ARMS[0]]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step(model, optimizer, batch)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()
