"""Stage 1: the U-Net learns what the photo shows before the language model reads it.

The U-Net encoder, image only (FiLM stays the identity), learns the classes of the training photos through a linear
head on its pooled skips, and the vessels through its decoder when the photos have masks. Without it, the LM loss
alone gives the U-Net too weak and noisy a gradient: fine-tuning left it knowing less about the classes than random
weights. The trained U-Net with its head is also the comparison's image-only reference, "U-Net alone (image only)".
"""

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import set_seed

from mdf_mllm import guards
from mdf_mllm.comparison import UNET_ALONE, Result
from mdf_mllm.job import Job
from mdf_mllm.model_setup import build_model, parse_fusion_layers
from mdf_mllm.training import Diverged, ProcessedSplit, RunContext
from pipeline_mdf_mllm import non_finite_parameters


def run(run: RunContext) -> Result | None:
    """Train the U-Net of the run's model on the training photos and score it with its class head on the test photos.

    Returns the "U-Net alone (image only)" `Result`, whose `model` is the trained U-Net, `weights` its file (what
    stage 2 starts from) and `losses` the loss of each epoch; None where the job has no stage 1 (--from_scratch,
    --no_stage1, no fused layer)."""
    job = run.job
    if job.run.from_scratch or job.run.no_stage1 or parse_fusion_layers(job.model.fusion_layers) == {}:
        return None
    set_seed(job.training.seed)
    # The U-Net trains alone, in fp32, on the training device; the rest of the model (11B for the real base, read in
    # bf16 with --bf16) is dropped.
    model = build_model(job.replace(model={"lora": False, "load_in_4bit": False}).model, run.processor,
                        bf16=job.training.bf16)
    unet, config = model.model.unet.float().to(job.training.device), model.config
    del model
    folder = job.output_dir / "stage1"
    start = time.perf_counter()
    losses = train_unet(job, unet, len(config.label_names), run.splits["train"], run.collator, folder)
    seconds = time.perf_counter() - start
    print(f"stage 1: loss per epoch {[round(loss, 4) for loss in losses]}; U-Net written to {folder}")
    result = unet_alone_result(run, unet, folder, train_seconds=round(seconds, 1))
    result.model, result.weights, result.losses = unet, str(folder / "unet.safetensors"), losses
    return result


def pooled_skips(unet, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The skips of the photo alone (no FiLM) and their average-pooled channels, concatenated: (B, sum_k C_k)."""
    skips = unet.encode(pixel_values, None)
    return skips, torch.cat([skip.mean((2, 3)) for skip in skips], 1)


def loss(unet, class_head, batch: dict, class_ids: torch.Tensor, vessel_weight: float) -> torch.Tensor:
    """Cross-entropy of the class head on the pooled skips, plus `vessel_weight` x the decoder's vessel BCE (the
    decoder runs only when that weight counts and the batch has masks)."""
    skips, pooled = pooled_skips(unet, batch["unet_pixel_values"])
    total = F.cross_entropy(class_head(pooled), class_ids)
    if vessel_weight and "vessel_mask" in batch:
        total = total + vessel_weight * F.binary_cross_entropy_with_logits(
            unet.decode(skips), batch["vessel_mask"].float())
    return total


def make_class_head(width: int, num_classes: int, standardised: bool, device) -> torch.nn.Module:
    """Stage 1's class head on the pooled skips; `standardised` puts each pooled channel through a batch norm (no
    affine: the linear layer scales) first. After GroupNorm the pooled channels differ between photos by about a
    tenth of their size, so a plain linear head starts near blind to them and its rate sets how fast stage 1 learns
    (it stalled on some seeds at 12 epochs); standardised, every channel starts at unit spread (the default)."""
    linear = torch.nn.Linear(width, num_classes, device=device)
    if not standardised:
        return linear
    return torch.nn.Sequential(torch.nn.BatchNorm1d(width, affine=False, device=device), linear)


@torch.no_grad()
def folded(head: torch.nn.Module) -> torch.nn.Linear:
    """The head as one linear layer on the raw pooled skips (a standardised head's running statistics folded into
    its weights), as `unet_alone_result` and the files read it."""
    if isinstance(head, torch.nn.Linear):
        return head
    norm, linear = head
    scale = (norm.running_var + norm.eps).rsqrt()
    one = torch.nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    one.weight.copy_(linear.weight * scale)
    one.bias.copy_(linear.bias - linear.weight @ (norm.running_mean * scale))
    return one


def on_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def mirrored(batch: dict) -> dict:
    """Every photo (and vessel mask) mirrored left-right, as the other eye would be photographed."""
    return {**batch, **{key: batch[key].flip(-1) for key in ("unet_pixel_values", "vessel_mask") if key in batch}}


def train_unet(job: Job, unet, num_classes: int, split: ProcessedSplit, collator, folder: Path) -> list[float]:
    """Train `unet` and a class head on `split` (`--stage1_optimizer`, `--stage1_schedule`, the photos mirrored at
    random, `--stage1_flip`); write
    `unet.safetensors` and `class_head.safetensors` to `folder`. Returns the mean loss of each epoch."""
    settings, args = job.run, job.training
    device = next(unet.parameters()).device
    head = make_class_head(sum(unet.widths), num_classes, settings.stage1_standardise, device)
    kinds = unet.parameter_kinds()  # FiLM by class (modeling_mdf_mllm), not by its attribute's name
    parameters = [p for name, p in unet.named_parameters() if kinds[name] != "film"]
    for param in parameters:  # the model leaves what its own forward does not run (decoder, deep stages) frozen
        param.requires_grad_(True)
    parameters += list(head.parameters())
    optimizer = getattr(torch.optim, settings.stage1_optimizer)(parameters, lr=settings.stage1_learning_rate,
                                                                weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = args.per_device_train_batch_size
    steps_per_epoch = math.ceil(len(split) / batch_size)
    # --max_steps bounds this loop as it bounds the Trainer's.
    steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(settings.stage1_epochs * steps_per_epoch))
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.stage1_learning_rate, total_steps=steps)
                if settings.stage1_schedule == "one_cycle" else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0))
    vessel_weight = settings.stage1_vessel_weight if split.has_masks else 0.0
    bar, losses, step = tqdm(total=steps, desc="stage 1: U-Net classes and vessels", disable=args.disable_tqdm), [], 0
    unet.train()
    while step < steps:  # counted here: a disabled tqdm bar (disable_tqdm) does not count
        epoch = []
        for indices in torch.randperm(len(split), generator=generator).split(batch_size):
            batch = on_device(collator([split[i] for i in indices]), device)
            if torch.rand((), generator=generator) < settings.stage1_flip:
                batch = mirrored(batch)
            class_ids = torch.tensor([split.label_ids[i] for i in indices], device=device)
            head.train(len(indices) > 1)  # a batch norm needs two photos: a batch of one uses its running statistics
            value = loss(unet, head, batch, class_ids, vessel_weight)
            if not math.isfinite(value.item()):
                raise Diverged(f"stage 1: diverged at step {step + 1}: the loss is {value.item()}; nothing was "
                               "exported or cached")
            value.backward()
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)  # as the Trainer clips stage 2
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            epoch.append(value.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{value.item():.4f}")
            if step == steps:
                break
        losses.append(float(np.mean(epoch)))
    bar.close()
    head = folded(head)
    bad = non_finite_parameters(unet) + non_finite_parameters(head)
    if bad:
        raise Diverged(f"stage 1: diverged at step {step}: {len(bad)} weight tensors hold NaN or inf "
                       f"(first: {bad[0]}); nothing was exported or cached")
    folder.mkdir(parents=True, exist_ok=True)
    for module, name in ((unet, "unet.safetensors"), (head, "class_head.safetensors")):
        weights = {k: v.contiguous() for k, v in module.state_dict().items()}
        guards.atomic_write(folder / name, lambda temporary: save_file(weights, temporary))  # noqa: B023 (called now)
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


def unet_alone_result(run: RunContext, unet, folder: Path, **timings) -> Result:
    """The stage-1 U-Net encoder and class head (read from `folder`) on the test photos, scored like the models
    (with its class probabilities of the training photos)."""
    head = torch.nn.Linear(sum(unet.widths), len(run.label_names), device=next(unet.parameters()).device)
    head.load_state_dict(load_file(folder / "class_head.safetensors", device=str(head.weight.device)))
    encoder = sum(p.numel() for p in unet.stages.parameters())
    with run.phases(f"scoring: {UNET_ALONE}"):
        probabilities = {split: unet_alone_probabilities(unet, head, run.splits[split], run.collator,
                                                         run.job.run.eval_batch_size) for split in ("train", "test")}
    parameters = encoder + sum(p.numel() for p in head.parameters())
    result = run.scored(UNET_ALONE, probabilities["test"], parameters=parameters, **timings)
    result.train_probabilities = probabilities["train"]  # what the joint reference learns from
    return result
