"""Resuming after a crash, and FSDP over CPU processes, proven from the training state rather than printed lines.

Resume: a run is SIGKILLed (just after a checkpoint, or half-way through writing one); `--resume_from_checkpoint latest`
then starts at the checkpoint's step with the checkpoint's optimizer and scheduler states, runs only the remaining
steps, and ends with weights bit-identical to a run that was never interrupted. A TrainerCallback passed through
mdf_mllm.stages.train_model's `callbacks` counts the steps and snapshots the states the Trainer starts from.

FSDP: `accelerate launch --config_file configs/fsdp_cpu.yaml` over two processes; each process writes what it holds
of every parameter (tests/fsdp_probe.py), and each must hold a disjoint half, not a replica (as DDP would).

DDP: two processes (torch.distributed.run, gloo) train the main job's model with gradient checkpointing and
`ddp_find_unused_parameters=False` (tests/ddp_probe.py), which stops at a trainable parameter without a gradient.
"""

import copy
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import ROOT, launch_two_cpu_processes
from mdf_mllm import stages, main_job as job, training


STEPS, SAVE_EVERY = 6, 3  # 24 training photos in batches of 8: two epochs of three steps
JOB = [
    "--from_scratch", "--no_baseline", "--model_size", "tiny", "--num_images", "40", "--image_size", "64",
    "--per_device_train_batch_size", "8", "--max_steps", str(STEPS), "--save_strategy", "steps",
    "--save_steps", str(SAVE_EVERY), "--eval_strategy", "no", "--logging_steps", "1", "--n_bootstrap", "20",
    "--report_to", "none", "--seed", "7", "--disable_tqdm", "True",
]  # fmt: skip


class Recorder(TrainerCallback):
    """The step training starts from, each optimizer step taken, and the optimizer and scheduler states as they are
    when training starts (after the Trainer has loaded a checkpoint's)."""

    def __init__(self):
        self.start, self.steps, self.optimizer, self.scheduler = None, [], None, None

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.start = state.global_step
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.scheduler = copy.deepcopy(lr_scheduler.state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def run_main(monkeypatch, out: Path, *extra: str) -> Recorder:
    """mdf_mllm.main_job.main in this process, with a Recorder added to the callbacks that mdf_mllm.stages.train_model
    gets."""
    recorder, original = Recorder(), stages.train_model
    signature = inspect.signature(original)

    def train(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), recorder]
        return original(*bound.args, **bound.kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(stages, "train_model", train)  # the name train_arm calls (imported from training)
        job.main([*JOB, "--output_dir", str(out), *extra])
    return recorder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = run_main(monkeypatch, out)
    assert (recorder.start, recorder.steps) == (0, list(range(1, STEPS + 1)))
    return load_file(out / "mdf-mllm" / "model.safetensors")


KILL = textwrap.dedent(
    """
    import os, signal, sys
    import transformers
    from mdf_mllm import main_job as job

    step, when = int(os.environ["KILL_AT_STEP"]), os.environ["KILL_WHEN"]

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    class Kill(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if when == "after_save" and state.global_step == step:
                kill()

    init, save_rng_state = transformers.Trainer.__init__, transformers.Trainer._save_rng_state

    def init_with_kill(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Kill())

    def save_rng_state_or_die(self, output_dir):
        # Dies half-way through writing a checkpoint: weights and optimizer written, trainer_state.json not.
        if when == "mid_save" and self.state.global_step == step:
            kill()
        save_rng_state(self, output_dir)

    transformers.Trainer.__init__ = init_with_kill
    transformers.Trainer._save_rng_state = save_rng_state_or_die
    job.main(sys.argv[1:])
    """
)


def killed_run(out: Path, at_step: int, when: str) -> None:
    script = out.parent / "kill.py"
    script.write_text(KILL)
    # The killed run's steps must be computed as the in-process runs compute theirs: same thread count, same sums.
    env = {**os.environ, "KILL_AT_STEP": str(at_step), "KILL_WHEN": when, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, str(script), *JOB, "--output_dir", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not (out / "mdf-mllm").exists()


def states_saved_in(checkpoint: Path) -> tuple[dict, dict]:
    """The optimizer and scheduler states a checkpoint holds (tensors only: weights_only)."""
    return (torch.load(checkpoint / "optimizer.pt", weights_only=True),
            torch.load(checkpoint / "scheduler.pt", weights_only=True))


def assert_same_state(actual, expected, path="state"):
    """Nested dicts/lists of tensors and numbers: equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


@pytest.mark.parametrize("kill_at, when", [(SAVE_EVERY, "after_save"), (2 * SAVE_EVERY, "mid_save")],
                         ids=["after-a-checkpoint", "while-writing-a-checkpoint"])
def test_resume_after_sigkill_continues_from_the_checkpoint(kill_at, when, uninterrupted, tmp_path, monkeypatch,
                                                            capsys):
    out = tmp_path / "run"
    killed_run(out, kill_at, when)
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"  # the last complete one in both cases
    if when == "mid_save":
        assert (out / f"checkpoint-{kill_at}").is_dir() and not training.is_complete_checkpoint(out / f"checkpoint-{kill_at}")
    optimizer, scheduler = states_saved_in(checkpoint)
    assert optimizer["state"] and scheduler["last_epoch"] == SAVE_EVERY  # AdamW moments after 3 steps

    resumed = run_main(monkeypatch, out, "--resume_from_checkpoint", "latest")

    assert f"resuming from {checkpoint}\n" in capsys.readouterr().out
    assert resumed.start == SAVE_EVERY
    assert resumed.steps == list(range(SAVE_EVERY + 1, STEPS + 1))  # only the remaining steps
    assert_same_state(resumed.optimizer, optimizer, "optimizer")
    assert_same_state(resumed.scheduler, scheduler, "scheduler")
    final = load_file(out / "mdf-mllm" / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    assert [key for key in uninterrupted if not torch.equal(final[key], uninterrupted[key])] == []


# ----------------------------------------------------------------------------------------------------------------------
# FSDP


@pytest.fixture(scope="module")
def fsdp_holdings(tmp_path_factory):
    """rank -> what that process held of each parameter, and its optimizer steps (tests/fsdp_probe.py)."""
    out = tmp_path_factory.mktemp("fsdp")
    command = ["--config_file", str(ROOT / "configs" / "fsdp_cpu.yaml"), str(ROOT / "tests" / "fsdp_probe.py"), str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = launch_two_cpu_processes(command, cwd=out, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    assert [record["rank"] for record in records] == [0, 1]
    return records


def test_fsdp_over_two_cpu_processes_gives_each_a_disjoint_half_of_every_weight(fsdp_holdings):
    first, second = fsdp_holdings
    assert first["world_size"] == second["world_size"] == 2
    assert first["steps"] == second["steps"] == [1, 2]  # both trained, in step
    parameters = first["parameters"]
    assert parameters.keys() == second["parameters"].keys() and any("unet_attn" in name for name in parameters)
    held = {0: 0, 1: 0}
    for name, whole in parameters.items():
        other = second["parameters"][name]
        assert whole["dtensor"] and other["dtensor"], f"{name} is not sharded"
        assert whole["shape"] == other["shape"]
        rows = whole["shape"][0]
        # FSDP2 splits dim 0: rank 0 holds the first ceil(n / 2) rows, rank 1 the rest.
        assert whole["local_shape"] == [-(-rows // 2), *whole["shape"][1:]], name
        assert other["local_shape"] == [rows // 2, *whole["shape"][1:]], name
        for rank, record in ((0, whole), (1, other)):
            held[rank] += torch.Size(record["local_shape"]).numel()
    total = sum(torch.Size(p["shape"]).numel() for p in parameters.values())
    assert held[0] + held[1] == total
    assert 0.45 < held[0] / total < 0.55


# ----------------------------------------------------------------------------------------------------------------------
# DDP


def test_ddp_with_gradient_checkpointing_and_no_unused_parameter_search_trains(tmp_path):
    import socket

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    for attempt in range(2):  # as launch_two_cpu_processes: a gloo rendezvous over loopback now and then aborts
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                   str(ROOT / "tests" / "ddp_probe.py"), str(tmp_path)]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 or "SIGABRT" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json")))
    for rank, record in enumerate((first, second)):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["wrapper"] == "DistributedDataParallel" and record["find_unused_parameters"] is False
        assert record["gradient_checkpointing"] and record["steps"] == [1, 2]
        assert record["moved"] > 0.9 * record["trainable"]  # it trained (not a no-op that a frozen model would be)
    assert first["checksum"] == second["checksum"]  # replicas in step: the gradients were all-reduced


def test_the_job_leaves_its_process_group_before_exiting(tmp_path, monkeypatch):
    """Under `accelerate launch` the job destroys the process group once its work is done: a gloo group still alive
    at interpreter exit can abort the process (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(job, "run", lambda settings, phases=None: None)
        job.main(["--output_dir", str(tmp_path / "out")])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
