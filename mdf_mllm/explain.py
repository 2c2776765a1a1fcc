"""Explanation maps: where the answer looked, on the U-Net grid of every fused depth and on Mllama's vision patches.

`explain(model, processor, image, clinical_text)` runs the prompt followed by the predicted class's verbalizer once,
with eager attention and hooks on every cross-attention layer, and keeps the attention of the answer positions:

* per fused depth k: the attention over the G x G U-Net tokens of the layers mapped to k, averaged over heads, those
  layers and the answer positions, as a (G, G) map. Token i is grid cell (i // G, i % G) of the U-Net view (the
  field-of-view crop, S x S), so cell (r, c) covers rows r*S/G .. (r+1)*S/G and columns c*S/G .. (c+1)*S/G;
* the gates of those layers: tanh(g_u) (U-Net branch) and tanh(g_attn) (vision branch);
* the stock vision branch's attention over each tile's P x P patches (CLS token left out), averaged over heads,
  every cross-attention layer and the answer positions, laid out as the tiles are on Mllama's canvas.

The answer positions are the rows whose logits score the verbalizer: the last prompt token and every answer token
but the last (what `classify()` sums). `draw_explanation(...)` renders one image with a panel per depth and one for
the vision branch; `overlay(...)` is the exact-geometry heat map it draws.

Imports only torch/transformers/numpy/PIL/stdlib at import time (matplotlib inside `draw_explanation`).
"""

import contextlib
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios


IGNORE_INDEX = -100


@dataclass
class Explanation:
    """What `explain()` returns; every map is a numpy array whose cells tile their image exactly.

    label, disease_type: the explained class (the predicted one unless asked otherwise).
    probabilities: class name -> probability from `classify()`, highest first.
    crop: (S, S, 3) uint8, the U-Net view exactly as the model read it (de-normalised `unet_pixel_values`).
    unet_maps: depth -> (G, G) attention over the U-Net grid (sums to 1).
    fused_layers: depth -> the cross-attention layers that read that depth.
    gates: depth -> (tanh(g_u), tanh(g_attn)) averaged over those layers.
    vision_view: (rows * T, cols * T, 3) uint8, Mllama's tiles (T px) on their canvas.
    vision_map: (rows * P, cols * P) attention over the tiles' patches (P = T / patch size); the CLS tokens' share
        is left out, so it sums to less than 1.
    """

    label: str
    disease_type: str
    probabilities: dict[str, float]
    crop: np.ndarray
    unet_maps: dict[int, np.ndarray] = field(default_factory=dict)
    fused_layers: dict[int, list[int]] = field(default_factory=dict)
    gates: dict[int, tuple[float, float]] = field(default_factory=dict)
    vision_view: np.ndarray | None = None
    vision_map: np.ndarray | None = None

    @property
    def predicted(self) -> str:
        """The predicted class (the most probable), whichever class is explained."""
        return next(iter(self.probabilities))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (L,) with -100 outside the answer -> indices of the rows whose logits score the answer tokens."""
    return torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()


def to_uint8_image(pixels: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (3, H, W) pixels -> (H, W, 3) uint8, undoing `(x / 255 - mean) / std`."""
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    values = (pixels.float().cpu() * std + mean) * 255
    return values.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@contextlib.contextmanager
def eager_text_attention(model):
    """Eager attention in the language model (the only implementation that returns weights), restored after."""
    language_model = model.model.language_model
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)


def unet_branches(model) -> dict:
    """Fused layer -> U-Net branch, found by class by the model's own modeling file (a model loaded with
    trust_remote_code has the classes of its export's copy, not of this checkout's `modeling_mdf_mllm`)."""
    return sys.modules[type(model).__module__].unet_branches(model)


@contextlib.contextmanager
def capture_cross_attention(model, positions: torch.Tensor):
    """Record, per cross-attention layer, the weights of rows `positions` averaged over heads and those rows.

    Yields {"unet": {layer: (G^2,)}, "vision": {layer: (K,)}}, filled by the forward passes run inside.
    """
    captured = {"unet": {}, "vision": {}}

    def recorder(branch, layer_idx):
        def hook(module, args, output):
            weights = output[1]  # (B=1, heads, T, keys): the stock branch's tuple, a U-Net branch's attention_weights
            if weights is None:
                raise RuntimeError("attention weights are None: run with eager attention")
            captured[branch][layer_idx] = weights[0, :, positions].float().mean(dim=(0, 1)).cpu()

        return hook

    handles = []
    for layer_idx in model.config.text_config.cross_attention_layers:
        layer = model.model.language_model.layers[layer_idx]
        handles.append(layer.cross_attn.register_forward_hook(recorder("vision", layer_idx)))
    for layer_idx, branch in unet_branches(model).items():  # found by class
        handles.append(branch.register_forward_hook(recorder("unet", layer_idx)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def tile_canvas(tiles: np.ndarray, aspect_ratio_id: int, max_tiles: int) -> np.ndarray:
    """tiles (max_tiles, h, w, ...) -> (rows * h, cols * w, ...): the tiles where Mllama cut them from (row-major)."""
    columns, rows = get_all_supported_aspect_ratios(max_tiles)[aspect_ratio_id - 1]  # (width, height) in tiles
    grid = tiles[: rows * columns].reshape(rows, columns, *tiles.shape[1:])
    grid = np.moveaxis(grid, 1, 2)  # (rows, h, columns, w, ...)
    return grid.reshape(rows * tiles.shape[1], columns * tiles.shape[2], *tiles.shape[3:])


def _inputs_on(model, inputs) -> dict:
    return {
        key: value.to(model.device, model.dtype if torch.is_floating_point(value) else value.dtype)
        for key, value in inputs.items()
    }


@torch.no_grad()
def explain(model, processor, image, clinical_text: str | None = None, label=None) -> Explanation:
    """Explain `model`'s answer for one fundus photo (see the module docstring). `label` (id or name) picks the
    class to explain; default: the predicted one."""
    config = model.config
    prompt = processor(images=[image], clinical_text=[clinical_text], return_tensors="pt")
    probabilities = model.classify(**_inputs_on(model, prompt))[0].float().cpu()
    label_id = int(probabilities.argmax()) if label is None else processor.label_id(label)

    answered = processor(images=[image], clinical_text=[clinical_text], labels=[label_id], return_tensors="pt")
    labels = answered.pop("labels")
    # The U-Net is conditioned on the prompt only, as in classify() and training.
    answered["prompt_mask"] = answered["attention_mask"] * (labels != IGNORE_INDEX).logical_not()
    positions = answer_positions(labels[0])
    with eager_text_attention(model), capture_cross_attention(model, positions) as captured:
        # No cache: a cached fused layer's stock branch attends over its whole cache entry (U-Net tokens masked out)
        model(**_inputs_on(model, answered), use_cache=False)

    order = probabilities.argsort(descending=True).tolist()
    explanation = Explanation(
        label=config.id2label[label_id],
        disease_type=config.disease_types[label_id],
        probabilities={config.id2label[i]: float(probabilities[i]) for i in order},
        crop=to_uint8_image(answered["unet_pixel_values"][0], *unet_normalisation(processor.image_processor)),
    )
    _add_unet_maps(explanation, model, captured["unet"])
    _add_vision_map(explanation, model, processor.image_processor, answered, captured["vision"])
    return explanation


def unet_normalisation(image_processor) -> tuple:
    return image_processor.unet_image_mean, image_processor.unet_image_std


def _add_unet_maps(explanation: Explanation, model, unet_weights: dict[int, torch.Tensor]) -> None:
    grid = model.config.fusion_grid
    layers, branches = model.model.language_model.layers, unet_branches(model)
    for layer_idx, depth in sorted(model.config.fusion_layers.items()):
        explanation.fused_layers.setdefault(depth, []).append(layer_idx)
    for depth, layer_ids in sorted(explanation.fused_layers.items()):
        weights = torch.stack([unet_weights[i] for i in layer_ids]).mean(0)
        explanation.unet_maps[depth] = weights.view(grid, grid).numpy()
        gates = [(branches[i].gate.tanh().item(), layers[i].cross_attn_attn_gate.tanh().item())
                 for i in layer_ids]
        explanation.gates[depth] = tuple(float(np.mean(g)) for g in zip(*gates))


def _add_vision_map(explanation, model, image_processor, inputs, vision_weights: dict[int, torch.Tensor]) -> None:
    vision = model.config.vision_config
    patches = vision.image_size // vision.patch_size
    max_tiles = inputs["pixel_values"].shape[2]
    weights = torch.stack(list(vision_weights.values())).mean(0).view(max_tiles, patches * patches + 1)
    per_tile = weights[:, 1:].reshape(max_tiles, patches, patches).numpy()  # token 0 of each tile is its CLS
    aspect_ratio_id = int(inputs["aspect_ratio_ids"][0, 0])
    tiles = np.stack([
        to_uint8_image(tile, image_processor.image_mean, image_processor.image_std)
        for tile in inputs["pixel_values"][0, 0]
    ])
    explanation.vision_map = tile_canvas(per_tile, aspect_ratio_id, max_tiles)
    explanation.vision_view = tile_canvas(tiles, aspect_ratio_id, max_tiles)


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def upsample_cells(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """(g_h, g_w) -> (height, width) by repeating each cell over its block: cell (r, c) covers exactly rows
    r*height/g_h .. (r+1)*height/g_h and the matching columns. The image side must be a multiple of the grid side."""
    g_h, g_w = cells.shape
    if height % g_h or width % g_w:
        raise ValueError(f"cells: a {g_h}x{g_w} grid does not tile a {height}x{width} image exactly")
    return np.repeat(np.repeat(cells, height // g_h, axis=0), width // g_w, axis=1)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """heat (..., ) in 0..1 -> (..., 3) float RGB along a dark-red-yellow-white ramp (matplotlib's 'hot')."""
    return np.clip(np.stack([3 * heat, 3 * heat - 1, 3 * heat - 2], axis=-1), 0, 1)


def overlay(image: np.ndarray, cells: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a cell map onto `image` (H, W, 3) uint8: each cell's colour and opacity grow with its share of the
    maximum, so a cell with no attention leaves its pixels untouched. -> (H, W, 3) uint8."""
    heat = upsample_cells(np.asarray(cells, np.float64), *image.shape[:2])
    top = heat.max()
    heat = heat / top if top > 0 else heat
    weight = (alpha * heat)[..., None]
    blended = (1 - weight) * image + weight * 255 * heat_colours(heat)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _layers(layer_ids: list[int]) -> str:
    return f"layer {layer_ids[0]}" if len(layer_ids) == 1 else f"layers {', '.join(map(str, layer_ids))}"


def _probability(p: float) -> str:
    return f"p = {p:.2f}" if p >= 0.01 else f"p = {p:.1e}"


def _title(explanation: Explanation) -> str:
    """The prediction, and the explained class when it is another one."""
    probabilities = explanation.probabilities
    if explanation.label == explanation.predicted:
        probability = _probability(probabilities[explanation.label])
        return f"Prediction: {explanation.label} ({explanation.disease_type}), {probability}"
    return (f"Explaining {explanation.label} ({_probability(probabilities[explanation.label])}); "
            f"Prediction: {explanation.predicted}, {_probability(probabilities[explanation.predicted])}")


def _gates_note(explanation: Explanation) -> str:
    gates = "; ".join(f"depth {depth}: U-Net tanh(g_u) = {u:+.2f}, vision tanh(g_attn) = {v:+.2f}"
                      for depth, (u, v) in explanation.gates.items())
    return f"Gates are the model's own learned constants, the same for every photo ({gates})." if gates else ""


def draw_explanation(explanation: Explanation, path=None) -> Image.Image:
    """One figure: a panel per fused depth (U-Net attention over the crop) and one for the vision branch (attention
    over Mllama's tiles), each with a colour bar of its attention weights; the title names the prediction (and the
    explained class when another one was asked for), the footer the model's gates. Saved to `path` when given, in
    the format its suffix names (.png, .jpg, ...); returned as a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure

    panels = [(explanation.crop, cells,
               f"U-Net depth {depth}\n(cross-attention {_layers(explanation.fused_layers[depth])})")
              for depth, cells in explanation.unet_maps.items()]
    if explanation.vision_map is not None:
        panels.append((explanation.vision_view, explanation.vision_map,
                       "Mllama vision branch\n(all cross-attention layers)"))
    # The colour bar shows the ramp `overlay` paints with, from no attention to the panel's maximum.
    ramp = LinearSegmentedColormap.from_list("overlay", heat_colours(np.linspace(0, 1, 256)))
    figure = Figure(figsize=(max(3.2 * len(panels), 6.4), 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, (picture, cells, title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        blended = overlay(picture, cells)
        # extent: pixel (i, j) spans [j, j+1) x [i, i+1), so grid cells land on the pixels they were computed from.
        axes.imshow(blended, interpolation="nearest", extent=(0, blended.shape[1], blended.shape[0], 0))
        axes.set_title(title, fontsize=8)
        axes.set_axis_off()
        bar = figure.colorbar(ScalarMappable(Normalize(0, float(np.max(cells)) or 1.0), ramp), ax=axes,
                              orientation="horizontal", fraction=0.05, pad=0.02)
        bar.set_label("attention weight", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    figure.suptitle(_title(explanation), fontsize=10)
    note = _gates_note(explanation)
    if note:
        figure.supxlabel(note, fontsize=6.5, wrap=True)
    figure.canvas.draw()
    rendered = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())
    if path is not None:
        rendered.save(path)
    return rendered


__all__ = ["Explanation", "explain", "draw_explanation", "overlay", "upsample_cells", "answer_positions"]
