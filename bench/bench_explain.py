"""Do the explanation maps look at the lesions? The trained model's answer attention over the U-Net grid, on lesion
cells against lesion-free cells of the field of view, for synthetic DR / AMD / Stargardt photos whose lesion masks
are known.

    python train_hf.py && python bench/bench_explain.py

Uses the exported main-job model at outputs/mdf-mllm. The lesion mask goes through the processor's own
field-of-view crop (as a vessel mask does), so it lands on the grid exactly as the photo does.
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataset_builder.synthetic import render_fundus  # noqa: E402
from mdf_mllm.explain import explain  # noqa: E402


MODEL = ROOT / "outputs" / "mdf-mllm"
LABELS, PER_LABEL, SIZE = ("dr", "amd", "stargardt"), 8, 256


def cell_fractions(mask: np.ndarray, grid: int) -> np.ndarray:
    """(S, S) in [0, 1] -> (G, G) mean per grid cell."""
    side = mask.shape[0] // grid
    return mask[: side * grid, : side * grid].reshape(grid, side, grid, side).mean(axis=(1, 3))


def measure() -> dict[int, list[float]]:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)
    grid = model.config.fusion_grid
    ratios: dict[int, list[float]] = {}
    for label in LABELS:
        for seed in range(PER_LABEL):
            image, _, lesions = render_fundus(label, np.random.default_rng(1000 + seed), SIZE, return_lesions=True)
            view = processor.image_processor([image], vessel_masks=[lesions.astype(np.uint8) * 255], return_tensors="np")
            field = processor.image_processor([image], vessel_masks=[np.full(lesions.shape, 255, np.uint8)], return_tensors="np")
            lesion_cells = cell_fractions(view["vessel_mask"][0, 0], grid) > 0.02
            background = (cell_fractions(field["vessel_mask"][0, 0], grid) > 0.5) & ~lesion_cells
            if not lesion_cells.any() or not background.any():
                continue
            with torch.no_grad():
                maps = explain(model, processor, image).unet_maps
            for depth, cells in maps.items():
                ratios.setdefault(depth, []).append(float(cells[lesion_cells].mean() / cells[background].mean()))
    return ratios


def run() -> str:
    if not (MODEL / "config.json").is_file():
        return "## Explanation maps on lesions\n\nSkipped: no exported model at outputs/mdf-mllm (run `python train_hf.py`)."
    ratios = measure()
    rows = [
        "## Explanation maps on lesions",
        "",
        f"The main job's exported MDF-MLLM, {PER_LABEL} synthetic photos each of {', '.join(LABELS)} ({SIZE} px, "
        "unseen seeds): mean answer attention per U-Net grid cell on cells holding a lesion (> 2% of the cell) "
        "divided by the mean on lesion-free cells inside the field of view. Above 1: the map favours lesions.",
        "",
        "| depth | photos | median ratio | mean ratio | photos with ratio > 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for depth in sorted(ratios):
        values = np.array(ratios[depth])
        rows.append(
            f"| {depth} | {len(values)} | {np.median(values):.2f} | {values.mean():.2f} | "
            f"{int((values > 1).sum())}/{len(values)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(run())
