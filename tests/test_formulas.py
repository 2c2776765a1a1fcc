"""The U-Net branch, formula by formula, against computations written here from the paper's equations.

Each test recomputes one piece by hand from the module's weights (plain tensor algebra, the stock Mllama parts taken
as given) and compares it with what the model computes in a forward pass:

    FiLM            s <- s * (1 + gamma) + beta, (gamma, beta) = MLP(c); exactly the identity at initialisation
    projector       U_k = LayerNorm(W_2 (W_1 patches(s_k) + b_1) + b_2) + P + E_depth[k]; token i = cell (i // G, i % G)
    branch          a_u = W_o softmax(q_norm(W_q x) k_norm(W_k^u U)^T * tau / sqrt(d)) W_v^u U
    gate, row mask  h <- h + rowmask * tanh(g_u) * a_u (tokens that see no image get no U-Net update)
"""

import copy
import math
import statistics

import pytest
import torch
from conftest import make_inputs, mdf_config, move_off_init

from modeling_mdf_mllm import MdfMllmFiLM, MdfMllmForConditionalGeneration


FUSED = 1  # the first fused cross-attention layer of layout "a" (reads U-Net depth 1)
CLOSE = dict(atol=1e-5, rtol=1e-5)


def open_model(layout="a", **mdf_kwargs):
    """A tiny MDF-MLLM with every gate and FiLM moved off its initial value, as after training."""
    model = MdfMllmForConditionalGeneration(mdf_config(layout, **mdf_kwargs)).eval()
    move_off_init(model)
    return model


class Capture:
    """Records the output (or, with `inputs=True`, the first positional input) of a module in every forward pass."""

    def __init__(self, module, inputs=False):
        self.values = []
        if inputs:
            self.handle = module.register_forward_pre_hook(lambda _, args: self.values.append(args[0]))
        else:
            self.handle = module.register_forward_hook(
                lambda _, __, out: self.values.append(out[0] if isinstance(out, tuple) else out)
            )

    def __enter__(self):
        return self.values

    def __exit__(self, *exc):
        self.handle.remove()


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def sees_an_image(inputs) -> torch.Tensor:
    """(B, T, 1): 1 where the token's cross-attention mask lets it see some image tile, else 0."""
    return inputs["cross_attention_mask"].flatten(2).any(-1, keepdim=True).float()


# ----------------------------------------------------------------------------------------------------------------------
# FiLM


def by_hand_film(film: MdfMllmFiLM, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    first, last = film.mlp[0], film.mlp[-1]
    hidden = context @ first.weight.T + first.bias
    hidden = hidden * torch.sigmoid(hidden)  # SiLU
    gamma_beta = hidden @ last.weight.T + last.bias  # (B, 2C): gamma first, then beta
    channels = features.shape[1]
    gamma, beta = gamma_beta[:, :channels, None, None], gamma_beta[:, channels:, None, None]
    return features * (1 + gamma) + beta


def test_film_is_x_times_one_plus_gamma_plus_beta():
    film = MdfMllmFiLM(text_dim=12, hidden_dim=8, channels=5)
    with torch.no_grad():
        for param in film.parameters():
            param.copy_(torch.randn_like(param))
    features, context = torch.randn(3, 5, 4, 4), torch.randn(3, 12)
    expected = by_hand_film(film, features, context)
    torch.testing.assert_close(film(features, context), expected, **CLOSE)
    # gamma and beta both matter here: neither x * gamma + beta nor x * (1 + gamma) is within tolerance.
    gamma_beta = film.mlp(context)
    assert (gamma_beta[:, 5:].abs() > 0.1).any() and (features.abs() > 0.1).any()


def test_film_is_exactly_the_identity_in_a_fresh_model():
    model = MdfMllmForConditionalGeneration(mdf_config("a")).eval()
    films = list(model.model.unet.film)
    seen = []
    for film in films:
        film.register_forward_hook(lambda module, args, out: seen.append(torch.equal(out, args[0])))
    inputs = make_inputs(model.config)
    inputs["unet_pixel_values"] = 10 * torch.randn_like(inputs["unet_pixel_values"])
    forward(model, inputs)
    # Stages below the deepest fused depth (3 here) feed nothing without a vessel loss and do not run.
    assert seen == [True] * max(model.config.fusion_layers.values()) == [True] * 3


def test_film_in_the_model_uses_the_prompt_mean_embedding():
    """The FiLM of each stage inside a forward pass is by_hand_film of its input and the mean prompt embedding."""
    model = open_model()
    inputs = make_inputs(model.config)
    mask = inputs["attention_mask"].clone()
    mask[1, :2] = 0  # the second row is left-padded: its padding is not part of the context
    inputs["attention_mask"] = mask
    embeddings = model.get_input_embeddings()(inputs["input_ids"])
    context = (embeddings * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    records = []
    for film in model.model.unet.film:
        film.register_forward_hook(lambda module, args, out: records.append((module, args[0], out)))
    forward(model, inputs)
    assert len(records) == max(model.config.fusion_layers.values())  # the stages that run (see above)
    for film, features, out in records:
        torch.testing.assert_close(out, by_hand_film(film, features, context), **CLOSE)


# ----------------------------------------------------------------------------------------------------------------------
# Patch grid and projector


def cell(features: torch.Tensor, row: int, column: int, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> the (B, C * p * p) patch of grid cell (row, column), channels first."""
    p = features.shape[-1] // grid
    return features[:, :, row * p : (row + 1) * p, column * p : (column + 1) * p].reshape(features.shape[0], -1)


def by_hand_projection(projector, depth: int, skip: torch.Tensor) -> torch.Tensor:
    grid = projector.grid
    patches = torch.stack([cell(skip, i // grid, i % grid, grid) for i in range(grid * grid)], 1)  # (B, G^2, C p^2)
    *linears, norm = projector.projections[str(depth)]
    tokens = patches
    for linear in linears:
        tokens = tokens @ linear.weight.T + linear.bias
    mean = tokens.mean(-1, keepdim=True)
    variance = tokens.var(-1, unbiased=False, keepdim=True)
    tokens = (tokens - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias
    return tokens + projector.position_embedding + projector.depth_embedding[depth - 1]


def random_skips(model, batch=2):
    size, widths = model.config.unet_config["image_size"], model.model.unet.widths
    return [torch.randn(batch, width, size >> k, size >> k) for k, width in enumerate(widths)]


@pytest.mark.parametrize("projector_dim", [8, None])
def test_projector_is_linear_then_layernorm_plus_position_and_depth(projector_dim):
    model = open_model(fusion_layers={1: 2, 3: 4}, fusion_grid=4, projector_dim=projector_dim)
    projector = model.model.unet_projector
    with torch.no_grad():
        for name, param in projector.named_parameters():  # LayerNorm's affine too, so that nothing is 0 or 1
            param.copy_(torch.randn_like(param))
    skips = random_skips(model)
    tokens = projector(skips)
    assert sorted(tokens) == [2, 4]
    for depth in (2, 4):
        assert tokens[depth].shape == (2, 16, model.config.text_config.hidden_size)
        torch.testing.assert_close(tokens[depth], by_hand_projection(projector, depth, skips[depth - 1]), **CLOSE)


@pytest.mark.parametrize("projector_dim", [8, None])
def test_a_standardised_projector_reads_each_channel_minus_its_mean_over_its_spread(projector_dim):
    """standardise_inputs(photo averages) folds each channel's statistics over the photos into the first Linear: the
    projector then gives on any skips what it gave before on (s - mu_c) / sigma_c, mu_c the channel's mean, sigma_c
    the spread between photos of its per-photo average, computed here channel by channel."""
    model = open_model(fusion_layers={1: 2, 3: 4}, fusion_grid=4, projector_dim=projector_dim)
    projector = model.model.unet_projector
    # Channels of very different offsets and spreads, as a trained U-Net's are.
    seen = [skip * torch.rand(1, skip.shape[1], 1, 1) * 10 + torch.randn(1, skip.shape[1], 1, 1) * 5
            for skip in random_skips(model, batch=6)]
    seen[1][:, 0] = 0.25  # a dead channel: its spread is held at 0.001, not divided by zero
    before = copy.deepcopy(projector)
    projector.standardise_inputs([skip.mean((2, 3)) for skip in seen])
    skips = random_skips(model)
    by_hand = []
    for skip, fitted in zip(skips, seen):
        columns = []
        for channel in range(skip.shape[1]):
            values = fitted[:, channel]
            spread = max(statistics.stdev(values[photo].mean().item() for photo in range(len(values))), 1e-3)
            columns.append((skip[:, channel] - values.mean()) / spread)
        by_hand.append(torch.stack(columns, 1))
    with torch.no_grad():
        expected, tokens = before(by_hand), projector(skips)
    for depth in (2, 4):
        torch.testing.assert_close(tokens[depth], expected[depth], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 3])
def test_token_i_covers_grid_cell_i_div_g_i_mod_g(depth):
    """A marker in one cell of one skip changes exactly one U-Net token: row-major over the 4 x 4 grid."""
    grid = 4
    model = open_model(fusion_layers={1: 1, 3: 3}, fusion_grid=grid)
    projector = model.model.unet_projector
    skips = [torch.zeros(1, *s.shape[1:]) for s in random_skips(model, batch=1)]
    blank = projector(skips)[depth]
    p = skips[depth - 1].shape[-1] // grid
    for row, column in [(0, 1), (1, 0), (2, 3), (3, 2), (3, 3)]:
        marked = [s.clone() for s in skips]
        marked[depth - 1][0, 0, row * p, column * p] = 5.0
        changed = (projector(marked)[depth] - blank).abs().amax(-1)[0] > 1e-4  # (G^2,)
        assert changed.nonzero().flatten().tolist() == [row * grid + column], (row, column)


# ----------------------------------------------------------------------------------------------------------------------
# The U-Net branch's attention: tau multiplies the logits


def branch_projections(branch):
    return branch.key_projection, branch.value_projection


def by_hand_branch(layer, x: torch.Tensor, unet_tokens: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) after input_layernorm, U (B, N, D) -> a_u (B, T, D), written out head by head."""
    shared, branch = layer.cross_attn, layer.unet_attn
    key_projection, value_projection = branch_projections(branch)
    heads, kv_heads, d = shared.num_heads, shared.num_key_value_heads, shared.head_dim
    batch, length, _ = x.shape
    count = unet_tokens.shape[1]
    q = shared.q_norm((x @ shared.q_proj.weight.T).view(batch, length, heads, d))
    k = shared.k_norm((unet_tokens @ key_projection.weight.T).view(batch, count, kv_heads, d))
    v = (unet_tokens @ value_projection.weight.T).view(batch, count, kv_heads, d)
    tau = branch.logit_scale
    out = torch.empty(batch, length, heads, d)
    for h in range(heads):
        kv = h // (heads // kv_heads)  # grouped-query attention: consecutive query heads share a key/value head
        logits = torch.einsum("btd,bnd->btn", q[:, :, h], k[:, :, kv]) * tau / math.sqrt(d)
        out[:, :, h] = torch.softmax(logits, -1) @ v[:, :, kv]
    return out.reshape(batch, length, heads * d) @ shared.o_proj.weight.T


@pytest.mark.parametrize("layout", ["a", "b"])
@pytest.mark.parametrize("tau", [1.0, 3.0, 0.25])
def test_branch_attention_scales_the_logits_by_tau(layout, tau):
    model = open_model(layout)
    layer = model.model.language_model.layers[FUSED]
    with torch.no_grad():
        layer.unet_attn.logit_scale.fill_(tau)
    inputs = make_inputs(model.config, image_at=0)
    with (
        Capture(layer.input_layernorm) as normed,
        Capture(model.model.unet_projector) as projected,
        Capture(layer.unet_attn) as branch_out,
    ):
        forward(model, inputs)
    depth = model.config.fusion_layers[FUSED]
    expected = by_hand_branch(layer, normed[0], projected[0][depth])
    torch.testing.assert_close(branch_out[0], expected, **CLOSE)
    # tau changes the attention weights: the branch with tau = 1 differs (so dividing by tau would be seen).
    if tau != 1.0:
        with torch.no_grad():
            layer.unet_attn.logit_scale.fill_(1.0)
            assert (by_hand_branch(layer, normed[0], projected[0][depth]) - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# The tanh gate and the row mask


MASKINGS = ["transformers", "reference"]  # of the stock update; the U-Net update is row-masked in both


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("gate", [1.3, -0.6])
def test_unet_update_is_tanh_gate_times_branch_and_zero_for_text_before_the_image(gate, masking):
    """At the fused layer, switching g_u from 0 to `gate` adds exactly rowmask * tanh(g_u) * a_u to h."""
    model = open_model(pre_image_text_masking=masking)
    layer = model.model.language_model.layers[FUSED]
    inputs = make_inputs(model.config, image_at=4)
    rowmask = sees_an_image(inputs)
    assert rowmask[:, :4].sum() == 0 and rowmask[:, 4:].min() == 1

    def after_attention(value):
        with torch.no_grad():
            layer.unet_attn.gate.fill_(value)
        with Capture(layer.post_attention_layernorm, inputs=True) as h, Capture(layer.unet_attn) as branch:
            forward(model, inputs)
        return h[0], branch[0]

    closed, _ = after_attention(0.0)
    opened, a_u = after_attention(gate)
    assert a_u[:, 4:].abs().amax() > 1e-2  # the branch has something to add
    torch.testing.assert_close(opened - closed, rowmask * math.tanh(gate) * a_u, atol=1e-6, rtol=1e-5)
    assert torch.equal(opened[:, :4], closed[:, :4])  # text before the image: no U-Net update at all


@pytest.mark.parametrize("masking", MASKINGS)
def test_text_before_the_image_is_unchanged_by_the_unet_input(masking):
    """Whole-model view of the row mask: the U-Net's input reaches only tokens that see the image."""
    model = open_model(pre_image_text_masking=masking)
    inputs = make_inputs(model.config, image_at=4)
    reference = forward(model, inputs)
    changed = forward(model, {**inputs, "unet_pixel_values": torch.randn_like(inputs["unet_pixel_values"])})
    assert torch.equal(changed[:, :4], reference[:, :4])
    assert (changed[:, 4:] - reference[:, 4:]).abs().max() > 1e-4
