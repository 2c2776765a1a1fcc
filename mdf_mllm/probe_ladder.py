"""The probe ladder: how much of the photo's class each stage of MDF-MLLM's fusion still carries.

For every rung a logistic regression is fitted on the training photos and scored on the test photos:
  (a) each U-Net depth's skip features, average-pooled (FiLM conditioned on the prompt, as in the model),
  (b) each fused depth's projected U-Net tokens U_k, averaged over the G x G grid,
  (c) each fused layer's U-Net branch output (before its gate) at the answer position (the last prompt token),
  (d) the language model's last hidden state at the answer position.
A rung near the image-only ceiling followed by one at chance shows where the photo's information is lost. By default
only the classes the photo must tell apart (normal, AMD, DR, glaucoma: their prompts carry no clinical text) count.
The main job writes the ladder of the model at the start and at the end of stage 2 to `probe_ladder.md`.
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from configuration_mdf_mllm import UNET_DEPTHS
from modeling_mdf_mllm import last_prompt_token, unet_branches

ACQUIRED_CLASSES = ("normal", "amd", "dr", "glaucoma")


@torch.no_grad()
def ladder_features(model, items: list[dict], collator, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every rung's features of the processed prompts `items` (the processor's outputs, one photo each):
    {rung name: (N, F)}."""
    model.eval()
    inner = model.model
    branches = unet_branches(model)
    captured = {}
    hooks = [branch.register_forward_hook(lambda module, args, output, layer=layer: captured.__setitem__(layer, output.hidden_states))
             for layer, branch in branches.items()]
    # The model's own pass already encodes the photo and projects its skips: read them there, not a second time.
    hooks.append(inner.unet_projector.register_forward_hook(
        lambda module, args, output: captured.__setitem__("unet", (args[0], output))))
    features: dict[str, list] = {}
    try:
        for start in range(0, len(items), batch_size):
            batch = collator(items[start:start + batch_size])
            labels = batch.pop("labels", None)
            batch.pop("vessel_mask", None)
            # Training items end with their answer: the prompt is what precedes it (causal attention: the prompt's
            # hidden states do not see the answer; FiLM must not either).
            prompt = batch["attention_mask"] * (labels == -100) if labels is not None else batch["attention_mask"]
            last = last_prompt_token(prompt)  # the answer position
            rows = torch.arange(len(last))
            hidden = model(**batch, prompt_mask=prompt, output_hidden_states=True).hidden_states[-1]
            skips, projected = captured.pop("unet")
            if len(skips) < UNET_DEPTHS:  # the model stops at the deepest depth it fuses; the ladder reads them all
                skips = inner.unet.encode(batch["unet_pixel_values"].to(model.dtype),
                                          inner.text_context(batch["input_ids"], None, prompt))
            rungs = {f"(a) depth {k + 1} skips": skip.mean((2, 3)) for k, skip in enumerate(skips)}
            rungs.update({f"(b) U_{depth} tokens": tokens.mean(1) for depth, tokens in projected.items()})
            rungs.update({f"(c) layer {layer} branch": captured[layer][rows, last] for layer in sorted(captured)})
            rungs["(d) last hidden state"] = hidden[rows, last]
            for name, value in rungs.items():
                features.setdefault(name, []).append(value.float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values).numpy() for name, values in features.items()}


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a standardised logistic regression fitted on the training features."""
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=3000).fit(scaler.transform(train_x), train_y)
    return float((classifier.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())


def probe_ladder(model, train_items, train_labels, test_items, test_labels, collator) -> dict[str, float]:
    """{rung: test accuracy} of a linear probe per rung (see the module docstring)."""
    train, test = ladder_features(model, train_items, collator), ladder_features(model, test_items, collator)
    return {name: probe_accuracy(train[name], train_labels, test[name], test_labels) for name in train}


def ladder_table(ladders: dict[str, dict[str, float]], chance: float) -> str:
    """Markdown: one row per rung, one column per model (e.g. stage 1 and final)."""
    names = list(ladders)
    rungs = list(dict.fromkeys(rung for ladder in ladders.values() for rung in ladder))
    lines = [f"| rung | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for rung in rungs:
        cells = [f"{ladders[name][rung]:.3f}" if rung in ladders[name] else "–" for name in names]
        lines.append(f"| {rung} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n\nLinear-probe test accuracy; chance {chance:.2f}."


def selected(split, label_names: list[str], classes=ACQUIRED_CLASSES) -> tuple[list[dict], list[int]]:
    """The items of a processed split whose label is one of `classes`, and their labels."""
    keep = [i for i, label in enumerate(split.label_ids) if label_names[label] in classes]
    return [split[i] for i in keep], [split.label_ids[i] for i in keep]
