"""MDF-MLLM: Llama 3.2 Vision (Mllama) reading multi-depth U-Net features through extra gated cross-attention.

Reads top to bottom: U-Net building blocks and FiLM, the U-Net, the patch projector, the fused cross-attention
layer, then the models. Everything Mllama already does is inherited; only what the fusion changes is overridden.
This file is copied into every exported model folder and imported by `trust_remote_code`: it imports only torch,
transformers and its sibling configuration file, and does no I/O at import time.
"""

import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, StaticLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
try:
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:  # a release without it: state dicts load in module names only
    revert_weight_conversion = None
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.mllama.configuration_mllama import MllamaTextConfig
from transformers.models.mllama.modeling_mllama import (
    MllamaCrossAttentionDecoderLayer,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaPreTrainedModel,
    MllamaTextCrossAttention,
    MllamaTextModel,
    MllamaVisionModel,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple, logging


try:
    from .configuration_mdf_mllm import UNET_DEPTHS, MdfMllmConfig
except ImportError:  # imported as a top-level module from the repository rather than as remote code
    from configuration_mdf_mllm import UNET_DEPTHS, MdfMllmConfig


logger = logging.get_logger(__name__)

# Differences between the supported transformers releases (configuration_mdf_mllm.SUPPORTED_TRANSFORMERS): 5.24
# renamed Mllama's cache argument and output field from `past_key_values` to `cache`, and its outputs gained the
# vision tower's (`image_outputs`).
CACHE = "cache" if "cache" in inspect.signature(MllamaTextCrossAttention.forward).parameters else "past_key_values"
try:
    from transformers.modeling_outputs import (
        MultimodalBaseModelOutputWithPast as MllamaModelOutput,
        MultimodalCausalLMOutputWithPast as MllamaCausalLMOutput,
    )
except ImportError:  # transformers < 5.24
    from transformers.modeling_outputs import (
        BaseModelOutputWithPast as MllamaModelOutput,
        CausalLMOutputWithPast as MllamaCausalLMOutput,
    )

# Checkpoint key renames are registered per model_type and class: without these a plain Mllama checkpoint's
# `language_model.lm_head.weight`, `language_model.model.*` (etc.) would not be renamed for us and would stay random.
for ours, mllamas in (("mdf_mllm", "mllama"), ("MdfMllmModel", "MllamaModel")):
    register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(mllamas), overwrite=True)


# The language model's attention and MLP projections: LoRA's targets in `mdf_lora_config()` (the U-Net branch's own
# projections are named otherwise and train in full).
LORA_TARGET_MODULES = (
    r".*language_model.*\.(self_attn|cross_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def require_safetensors(model) -> None:
    """Refuse a local model folder whose weights are only a pickle (`pytorch_model*.bin`): unpickling runs whatever
    code the file holds, so MDF-MLLM reads weights as safetensors only. A `ValueError` names the file."""
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
        return
    names = sorted(os.listdir(model))
    pickles = [name for name in names if name.startswith("pytorch_model") and name.endswith(".bin")]
    if pickles and not any(name.endswith(".safetensors") for name in names):
        raise ValueError(
            f"{os.path.join(model, pickles[0])}: weights stored as a pickle; MDF-MLLM loads safetensors only (convert "
            "with model.save_pretrained(folder), which writes model.safetensors)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# U-Net building blocks


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: batches are small and sharded, and statistics must not depend on them.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class MdfMllmConvBlock(nn.Sequential):
    """Two 3x3 conv + GroupNorm + SiLU. `stride=2` on the first conv halves the resolution (a down-sampling stage)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
        )


class MdfMllmZeroLinear(nn.Linear):
    """A Linear initialised to zero (see `MdfMllmPreTrainedModel._init_weights`)."""


class MdfMllmFiLM(nn.Module):
    """Text-conditioned feature-wise modulation of one U-Net stage: `x * (1 + gamma) + beta`.

    The last layer is zero-initialised, so FiLM is the identity until training moves it.
    """

    def __init__(self, text_dim: int, hidden_dim: int, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.SiLU(), MdfMllmZeroLinear(hidden_dim, 2 * channels))

    def forward(self, features: torch.Tensor, text_context: torch.Tensor) -> torch.Tensor:
        """features (B, C, H, W), text_context (B, D) -> (B, C, H, W)."""
        scale, shift = self.mlp(text_context.to(features.dtype))[:, :, None, None].chunk(2, dim=1)
        return features * (1 + scale) + shift


class MdfMllmUNet(nn.Module):
    """Plain U-Net: four encoder stages (base * (1, 2, 4, 8) channels at S, S/2, S/4, S/8), FiLM after each, and an
    optional bottleneck + decoder with skip concatenation ending in a 1-channel vessel-segmentation head."""

    def __init__(self, config: MdfMllmConfig):
        super().__init__()
        unet = config.unet_config
        widths = [unet["base_channels"] * 2**k for k in range(UNET_DEPTHS)]
        self.widths = widths
        self.stages = nn.ModuleList(
            MdfMllmConvBlock(c_in, c_out, stride=1 if k == 0 else 2)
            for k, (c_in, c_out) in enumerate(zip([unet["in_channels"], *widths[:-1]], widths))
        )
        text_dim = config.text_config.hidden_size
        self.film = (
            nn.ModuleList(MdfMllmFiLM(text_dim, config.film_hidden_dim, width) for width in widths)
            if config.use_film
            else None
        )
        if unet["use_decoder"]:
            self.bottleneck = MdfMllmConvBlock(widths[-1], 2 * widths[-1], stride=2)
            self.upsample = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in reversed(widths))
            self.decoder = nn.ModuleList(MdfMllmConvBlock(2 * w, w) for w in reversed(widths))
            self.vessel_head = nn.Conv2d(widths[0], 1, 1)

    def encode(
        self, pixel_values: torch.Tensor, text_context: torch.Tensor | None, depths: int = UNET_DEPTHS
    ) -> list[torch.Tensor]:
        """pixel_values (B, C_in, S, S), text_context (B, D) -> skips s_1..s_depths, s_k of shape
        (B, C_k, S/2^(k-1), S/2^(k-1)). `text_context` None: the photo alone, no FiLM (stage 1's image-only
        pre-training). `depths` < 4 stops early: the deeper stages feed nothing then."""
        skips, features = [], pixel_values
        for k, stage in enumerate(self.stages[:depths]):
            features = stage(features)
            if self.film is not None and text_context is not None:
                features = self.film[k](features, text_context)
            skips.append(features)
        return skips

    def parameter_kinds(self) -> dict[str, str]:
        """Parameter name -> "film" (inside an `MdfMllmFiLM`) or "unet" (the rest): see `mdf_parameter_kinds`."""
        films = [name for name, module in self.named_modules() if isinstance(module, MdfMllmFiLM)]
        return {name: "film" if any(name.startswith(f"{film}.") for film in films) else "unet"
                for name, _ in self.named_parameters()}

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """skips -> vessel logits (B, 1, S, S)."""
        features = self.bottleneck(skips[-1])
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            features = block(torch.cat([upsample(features), skip], dim=1))
        return self.vessel_head(features)


class MdfMllmUnetProjector(nn.Module):
    """Cuts each fused depth's skip features into a G x G grid of patches and projects them to the text width.

    s_k (B, C_k, S_k, S_k) -> patches (B, G^2, C_k * p_k^2), p_k = S_k / G -> Linear (through `projector_dim`
    when set) -> LayerNorm -> + 2-D position embedding + depth embedding -> U_k (B, G^2, D).
    """

    def __init__(self, config: MdfMllmConfig, widths: list[int]):
        super().__init__()
        grid, size, hidden = config.fusion_grid, config.unet_config["image_size"], config.text_config.hidden_size
        self.grid = grid
        self.depths = sorted(set(config.fusion_layers.values()))
        self.projections = nn.ModuleDict()
        for depth in self.depths:
            patch = size // 2 ** (depth - 1) // grid
            patch_dim = widths[depth - 1] * patch * patch
            linears = (
                [nn.Linear(patch_dim, config.projector_dim), nn.Linear(config.projector_dim, hidden)]
                if config.projector_dim
                else [nn.Linear(patch_dim, hidden)]
            )
            self.projections[str(depth)] = nn.Sequential(*linears, nn.LayerNorm(hidden))
        self.position_embedding = nn.Parameter(torch.empty(grid * grid, hidden))
        self.depth_embedding = nn.Parameter(torch.empty(UNET_DEPTHS, hidden))

    def parameter_kinds(self) -> dict[str, str]:
        """Parameter name -> "projector": see `mdf_parameter_kinds`."""
        return {name: "projector" for name, _ in self.named_parameters()}

    def patchify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, G^2, C * p * p), row-major over the grid: token i covers grid cell (i // G, i % G)."""
        batch, channels, height, width = features.shape
        grid = self.grid
        patches = features.reshape(batch, channels, grid, height // grid, grid, width // grid)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, -1)

    @torch.no_grad()
    def standardise_inputs(self, photo_averages: list[torch.Tensor]) -> None:
        """Fold each fused depth's channel statistics into its first Linear, which then reads (s_k - mu_c) / sigma_c.

        photo_averages[k - 1] (N, C_k): each of N photos' skip s_k averaged over its positions. mu_c is their mean
        (the channel's mean: every photo has as many positions), sigma_c their spread from one photo to the next (what
        stage 1's standardised class head divides by). A data-dependent initialisation for a U-Net trained before the
        fusion: its channels' averages differ between photos by a few hundredths against a size of tenths, and a fresh
        projection reads the size, not the photo."""
        for depth in self.depths:
            averages = photo_averages[depth - 1].float()
            mean, spread = averages.mean(0), averages.std(0).clamp(min=1e-3)  # a dead channel: 1e-3
            linear = self.projections[str(depth)][0]
            pixels = linear.in_features // len(mean)  # a patch flattens (channel, row, column): channel-major
            linear.weight.mul_(spread.reciprocal().repeat_interleave(pixels).to(linear.weight.dtype))
            linear.bias.sub_(linear.weight @ mean.repeat_interleave(pixels).to(linear.weight.dtype))

    def forward(self, skips: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """skips s_1..s_4 -> {depth k: U_k (B, G^2, D)} for every depth some fusion layer reads."""
        return {
            depth: self.projections[str(depth)](self.patchify(skips[depth - 1]))
            + self.position_embedding
            + self.depth_embedding[depth - 1]
            for depth in self.depths
        }


# ----------------------------------------------------------------------------------------------------------------------
# The fused cross-attention layer


def vision_tokens_per_image(config: MdfMllmConfig) -> int:
    """How many vision tokens (keys of the stock cross-attention) one image gives: its tiles' patches plus class token."""
    vision = config.vision_config
    return vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)


def _unet_attention_mask(cross_attention_mask: torch.Tensor | None, num_images: int, tokens_per_image: int):
    """The stock additive mask over vision tokens (B, 1, T, N * tiles * P) -> the same over U-Net tokens
    (B, 1, T, N * G^2): a text token sees image n's U-Net tokens exactly when it sees some tile of image n.

    Rows that see no image arrive all zero from Mllama (uniform attention, finite); they stay so and the caller
    zeroes their update.
    """
    if cross_attention_mask is None:
        return None
    batch, _, length, _ = cross_attention_mask.shape
    sees = cross_attention_mask.view(batch, 1, length, num_images, -1).eq(0).any(-1)
    hidden = torch.finfo(cross_attention_mask.dtype).min
    mask = torch.zeros_like(sees, dtype=cross_attention_mask.dtype).masked_fill(~sees, hidden)
    return mask.repeat_interleave(tokens_per_image, dim=-1)


class MdfMllmUnetCrossAttention(nn.Module):
    """The U-Net branch of a fused layer: the layer's own queries over the U-Net tokens, scaled by a learnable tau.

    a_u = softmax(q_norm(W_q x) . k_norm(W_k^u U)^T * tau / sqrt(d)) . W_v^u U, then W_o. W_q, q_norm, k_norm and
    W_o are the stock cross-attention's (passed in, not owned); W_k^u, W_v^u, tau and the branch's tanh gate g_u
    (zero-initialised, applied by the layer) are this module's, so that one module holds every new weight of a layer.

    Its keys and values live in the layer's own cache entry, in front of the stock branch's vision keys and values:
    `[U-Net tokens (N_images * G^2); vision tokens (N_images * tiles * P)]`. The cache keeps one entry per decoder
    layer, as Mllama's does, so static caches, beam-search reordering and the other cache utilities handle it as is.
    """

    def __init__(self, config: MllamaTextConfig, tokens_per_image: int, vision_tokens_per_image: int):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        # Not `k_proj` / `v_proj`: a generic PEFT target list such as ["q_proj", "v_proj"] must not wrap these by
        # accident (and so freeze the rest of the branch); `mdf_lora_config()` trains them in full.
        self.key_projection = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=False)
        self.value_projection = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.gate = nn.Parameter(torch.zeros(1))
        self.tokens_per_image = tokens_per_image
        self.vision_tokens_per_image = vision_tokens_per_image

    def parameter_kinds(self) -> dict[str, str]:
        """Parameter name -> "gate" (g_u), "tau" (the logit scale) or "branch" (W_k^u, W_v^u): see
        `mdf_parameter_kinds`. By identity, not by name, so that a renamed attribute is still found."""
        kinds = {id(self.gate): "gate", id(self.logit_scale): "tau"}
        return {name: kinds.get(id(param), "branch") for name, param in self.named_parameters()}

    def keys_values(
        self, unet_states: torch.Tensor | None, shared: MllamaTextCrossAttention, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """unet_states (B, N_images * G^2, D) -> keys, values (B, H_kv, N_images * G^2, d); written to the front of
        the layer's cache entry (before the stock branch adds its own), or, when `unet_states` is None (a decoding
        step), read from there."""
        if unet_states is not None:
            batch = unet_states.shape[0]
            key = self.key_projection(unet_states).view(batch, -1, shared.num_key_value_heads, shared.head_dim)
            value = self.value_projection(unet_states).view(batch, -1, shared.num_key_value_heads, shared.head_dim)
            key, value = shared.k_norm(key.transpose(1, 2)), value.transpose(1, 2)
            if cache is not None:
                cache.update(key, value, shared.layer_idx)
            return key, value
        layer = cache.layers[shared.layer_idx]
        # Shapes only (static under torch.compile): each image holds G^2 U-Net and tiles * P vision tokens.
        num_images = layer.keys.shape[2] // (self.tokens_per_image + self.vision_tokens_per_image)
        unet_tokens = num_images * self.tokens_per_image
        return layer.keys[:, :, :unet_tokens], layer.values[:, :, :unet_tokens]

    def forward(
        self,
        hidden_states: torch.Tensor,
        shared: MllamaTextCrossAttention,
        key: torch.Tensor,
        value: torch.Tensor,
        cross_attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> "BranchOutput":
        """hidden_states (B, T, D), key/value (B, H_kv, N_images * G^2, d) from `keys_values`,
        cross_attention_mask: the stock branch's (B, 1, T, N_images * tiles * P) -> (B, T, D) and the attention
        weights (eager attention only)."""
        batch, length, _ = hidden_states.shape
        query = shared.q_proj(hidden_states).view(batch, length, shared.num_heads, shared.head_dim).transpose(1, 2)
        query = shared.q_norm(query) * self.logit_scale
        num_images = key.shape[2] // self.tokens_per_image
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            shared.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            shared,
            query,
            key,
            value,
            _unet_attention_mask(cross_attention_mask, num_images, self.tokens_per_image),
            dropout=0.0 if not self.training else shared.dropout,
            scaling=shared.scaling,
            is_causal=False,
            **kwargs,
        )
        return BranchOutput(shared.o_proj(attn_output.reshape(batch, length, -1)), attn_weights)


class BranchOutput(NamedTuple):
    """A U-Net branch's output, by name for readers outside (probes, explanation maps), a tuple for the layer."""

    hidden_states: torch.Tensor  # (B, T, D), before the gate
    attention_weights: torch.Tensor | None  # (B, heads, T, N_images * G^2); None but with eager attention


def _hide_unet_tokens(
    cross_attention_mask: torch.Tensor | None, unet_tokens: int, vision_tokens: int, hidden_states: torch.Tensor
) -> torch.Tensor:
    """The stock branch's additive mask (B, 1, T, N_v) widened to a cache entry holding [U-Net; vision] keys
    (B, 1, T, N_u + N_v): the U-Net columns hidden, so the stock branch attends to the vision tokens only."""
    if cross_attention_mask is None:
        batch, length = hidden_states.shape[:2]
        cross_attention_mask = hidden_states.new_zeros(batch, 1, length, vision_tokens)
    hidden = cross_attention_mask.new_full(
        (*cross_attention_mask.shape[:-1], unet_tokens), torch.finfo(cross_attention_mask.dtype).min
    )
    return torch.cat([hidden, cross_attention_mask], dim=-1)


class MdfMllmCrossAttentionDecoderLayer(MllamaCrossAttentionDecoderLayer):
    """Mllama's tanh-gated cross-attention layer, plus (when the layer is in `fusion_layers`) a gated, scaled U-Net
    branch reading the U-Net tokens of the images each text token may see:

        h <- h + [rowmask *] tanh(g_attn) * a_v + rowmask * tanh(g_u) * a_u
        h <- h + rowmask * tanh(g_mlp) * MLP(post_attention_layernorm(h))

    `rowmask` is 0 for text tokens that may see no image (those before the first image token). The bracketed mask
    of the stock update is `config.pre_image_text_masking`: absent for "transformers" (what transformers'
    `MllamaCrossAttentionDecoderLayer` computes, so that closed U-Net gates give exactly the stock model), present
    for "reference" (Meta's reference implementation; transformers issue #39379). The U-Net branch is always masked:
    a token that sees no image reads no U-Net token either. g_u starts at 0, so a fresh layer is the stock layer.
    """

    def __init__(self, config: MllamaTextConfig, layer_idx: int, mdf_config: MdfMllmConfig):
        super().__init__(config, layer_idx)
        self.unet_depth = mdf_config.fusion_layers.get(layer_idx)
        self.mask_stock_update = mdf_config.pre_image_text_masking == "reference"
        if self.unet_depth is not None:
            self.unet_attn = MdfMllmUnetCrossAttention(
                config, mdf_config.fusion_grid**2, vision_tokens_per_image(mdf_config)
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cross_attention_states: torch.Tensor,
        cross_attention_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        full_text_row_masked_out_mask: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: torch.Tensor | None = None,
        unet_states: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """As Mllama's layer; `kwargs` carries the cache under Mllama's own name for it (`CACHE`)."""
        row_mask = full_text_row_masked_out_mask[:, 0] if full_text_row_masked_out_mask is not None else 1.0
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        stock_mask = cross_attention_mask
        if self.unet_depth is not None:
            cache = kwargs.get(CACHE)
            unet = unet_states[self.unet_depth] if unet_states is not None else None
            unet_key, unet_value = self.unet_attn.keys_values(unet, self.cross_attn, cache)
            if cache is not None:
                # The stock branch reads the whole cache entry, [U-Net; vision]: hide the U-Net part from it.
                vision_tokens = (
                    cross_attention_states.numel() // (hidden_states.shape[0] * cross_attention_states.shape[-1])
                    if cross_attention_states is not None
                    else cache.layers[self.layer_idx].keys.shape[2] - unet_key.shape[2]
                )
                stock_mask = _hide_unet_tokens(cross_attention_mask, unet_key.shape[2], vision_tokens, hidden_states)
        vision_update, _ = self.cross_attn(
            hidden_states=hidden_states,
            attention_mask=stock_mask,
            cross_attention_states=cross_attention_states,
            **kwargs,
        )
        update = self.cross_attn_attn_gate.tanh() * vision_update
        if self.mask_stock_update:
            update = row_mask * update
        if self.unet_depth is not None:
            attention_kwargs = {key: value for key, value in kwargs.items() if key != CACHE}
            unet_update, _ = self.unet_attn(
                hidden_states, self.cross_attn, unet_key, unet_value, cross_attention_mask, **attention_kwargs
            )
            update = update + row_mask * self.unet_attn.gate.tanh() * unet_update
        hidden_states = residual + update

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + row_mask * self.cross_attn_mlp_gate.tanh() * hidden_states


# ----------------------------------------------------------------------------------------------------------------------
# The MDF parameters, found by class
#
# Every MDF parameter's kind comes from the class of the module holding it, never from its name: optimizer groups,
# LoRA's modules_to_save, 4-bit loading, checkpoint loading, opening the gates and the probe ladder all ask here, so
# renaming an attribute (self.unet, self.unet_attn, ...) moves nothing. Names are those `model.named_parameters()`
# gives, wrappers included (PEFT's original and trained copies, DDP's `module.`, FSDP2), because `named_modules()`
# and `named_parameters()` walk the same tree.

# Every kind of MDF parameter (what the classes' `parameter_kinds()` return) -> the learning rate it trains at in the
# recipe (`--<rate>_learning_rate`, mdf_mllm.training.MdfTrainer): the patch projector and the branches' other weights
# (tau included) train together as "mdf". The rates come in the order of the optimizer's groups, which a checkpoint's
# optimizer state is indexed by.
MDF_KINDS = {"gate": "gate", "film": "film", "unet": "unet", "projector": "mdf", "branch": "mdf", "tau": "mdf"}
MDF_MODULE_CLASSES = (MdfMllmUNet, MdfMllmUnetProjector, MdfMllmUnetCrossAttention)


def mdf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> MDF module (U-Net with FiLM, patch projector, each fused layer's U-Net branch): every module of
    an `MDF_MODULE_CLASSES` class (under PEFT both the frozen original and the trained copy), in `named_modules`
    order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MDF_MODULE_CLASSES)}


def mdf_parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Every MDF parameter's name in `model` -> its kind, one of `MDF_KINDS` (each MDF class says which of its
    parameters is which: `parameter_kinds()`). A parameter absent here belongs to the Mllama base."""
    return {f"{prefix}.{name}" if prefix else name: kind for prefix, module in mdf_modules(model).items()
            for name, kind in module.parameter_kinds().items()}


def mdf_module_attributes(model: nn.Module) -> list[str]:
    """The attribute names the MDF modules hang under in `model` (["unet", "unet_projector", "unet_attn"]), in the
    order of `MDF_MODULE_CLASSES`: LoRA's `modules_to_save`, and how a checkpoint key the model lacks is told MDF."""
    names = {}
    for name, module in mdf_modules(model).items():
        # Under PEFT the class sits below the wrapper ("unet.modules_to_save.default"): the attribute is above it.
        attribute = re.sub(r"\.(original_module|modules_to_save\.[^.]+)$", "", name).rsplit(".", 1)[-1]
        index = next(k for k, cls in enumerate(MDF_MODULE_CLASSES) if isinstance(module, cls))
        names.setdefault(attribute, index)
    return sorted(names, key=names.get)


def is_mdf_parameter(name: str, model: nn.Module, attributes: list[str] | None = None) -> bool:
    """Whether a parameter or checkpoint key of `model` belongs to the MDF modules rather than to the Mllama base: it
    lies under one of the attributes MDF modules hang under (`mdf_module_attributes`, or `attributes` computed once
    by a caller that asks for many keys), so a checkpoint's tensor for a module the model lacks is told too."""
    attributes = mdf_module_attributes(model) if attributes is None else attributes
    return not set(name.split(".")).isdisjoint(attributes)


def unet_branches(model: nn.Module) -> dict[int, "MdfMllmUnetCrossAttention"]:
    """Fused layer index -> its U-Net branch, in layer order. Under PEFT the trained copy: `ModulesToSaveWrapper`
    registers it after the frozen original, so it is the last branch found inside the layer."""
    branches = {}
    for module in model.modules():
        if isinstance(module, MdfMllmCrossAttentionDecoderLayer) and module.unet_depth is not None:
            found = [inner for inner in module.modules() if isinstance(inner, MdfMllmUnetCrossAttention)]
            if not found:
                raise ValueError(f"fused layer {module.layer_idx} holds no {MdfMllmUnetCrossAttention.__name__}")
            branches[module.layer_idx] = found[-1]
    return branches


def require_unquantized_mdf(model: nn.Module) -> None:
    """Refuse a model whose MDF modules were quantized (4-bit / 8-bit weights are integers): they train in full, and
    the quantizer's skip list is a name pattern that a renamed attribute would slip past. A `ValueError` names them."""
    quantized = [name for name, module in mdf_modules(model).items()
                 for param in module.parameters() if not param.dtype.is_floating_point]
    if quantized:
        raise ValueError(f"MDF modules quantized: {sorted(set(quantized))}; they must be left out of quantization "
                         "(llm_int8_skip_modules)")


# ----------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class MdfMllmModelOutputWithPast(MllamaModelOutput):
    """Mllama's output plus `vessel_logits` (B, [N_images,] 1, S, S), present when the decoder ran."""

    vessel_logits: torch.FloatTensor | None = None


@dataclass
class MdfMllmCausalLMOutputWithPast(MllamaCausalLMOutput):
    """Mllama's output plus `vessel_logits` (B, [N_images,] 1, S, S); `loss` includes the weighted segmentation loss."""

    vessel_logits: torch.FloatTensor | None = None


class MdfMllmPreTrainedModel(MllamaPreTrainedModel):
    config: MdfMllmConfig
    # Exactly the layer classes the model holds (every cross-attention layer is ours): accelerate's auto-wrap looks
    # each name up and fails on one it cannot find.
    _no_split_modules = ["MllamaVisionEncoderLayer", "MllamaSelfAttentionDecoderLayer", "MdfMllmCrossAttentionDecoderLayer"]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, for a state dict in the module names or in the names a checkpoint stores (`save_pretrained`'s,
        Mllama's `language_model.model.*`...): the Trainer's resume loads a checkpoint's model.safetensors as saved,
        and would otherwise find every renamed tensor both missing and unexpected."""
        own = self.state_dict()
        if revert_weight_conversion is not None and not set(state_dict) <= set(own):
            # transformers' own renaming for saving, read back: each stored name -> the module name of its tensor.
            module_names = {id(tensor): name for name, tensor in own.items()}
            stored = {key: module_names[id(tensor)] for key, tensor in revert_weight_conversion(self, own).items()
                      if id(tensor) in module_names}
            state_dict = {stored.get(key, key): value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load an MDF-MLLM checkpoint, or a plain Mllama one with `unet_config=...`, `fusion_layers=...`, from
        safetensors only (`require_safetensors`). A `ValueError` naming the tensors when:

        - a base weight is missing or of another shape (even with `ignore_mismatched_sizes=True`): the pretrained
          base must load whole. Two exceptions, as on stock Mllama: weights tied to one that loaded, and the
          language-model head when the checkpoint is a base model's (`MdfMllmModel` / `MllamaModel`), which is
          initialised and reported missing;
        - the checkpoint is an MDF-MLLM one (`model_type` "mdf_mllm") and an MDF tensor is missing, unexpected or of
          another shape: its MDF modules must load whole too.

        The MDF modules a plain Mllama checkpoint lacks are initialised, reported missing and logged in one line.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs.pop("ignore_mismatched_sizes", None)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        require_safetensors(source)
        kwargs["use_safetensors"] = True  # whatever was asked: a pickle can run code when loaded
        # Mismatches are let through transformers (whose error points to a report in the log) to be named here.
        model, loading_info = super().from_pretrained(
            *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        missing = set(loading_info["missing_keys"]) - _tied_to_loaded(model, loading_info["missing_keys"])
        attributes = mdf_module_attributes(model)
        base_missing = sorted(key for key in missing if not is_mdf_parameter(key, model, attributes))
        head = getattr(model, "_checkpoint_head_keys", ())
        architectures = getattr(model.config, "architectures", None) or []
        if head and set(base_missing) <= set(head) and any(name in BASE_ARCHITECTURES for name in architectures):
            base_missing = []  # a base model's checkpoint: the head is new, as stock Mllama does
        wrong_shape = sorted(map(str, loading_info["mismatched_keys"]))
        if base_missing or wrong_shape:
            raise ValueError(f"base weights did not load from {source}: missing {base_missing}, wrong shape {wrong_shape}")
        mdf_missing = sorted(key for key in missing if is_mdf_parameter(key, model, attributes))
        if _checkpoint_model_type(source, kwargs) == MdfMllmConfig.model_type:
            unexpected = sorted(
                key for key in loading_info["unexpected_keys"] if is_mdf_parameter(key, model, attributes)
            )
            if mdf_missing or unexpected:
                raise ValueError(
                    f"{source}: an MDF-MLLM checkpoint (config.json model_type {MdfMllmConfig.model_type!r}) whose MDF "
                    f"tensors do not match the model: missing in {_modules_of(mdf_missing, attributes)}, unexpected "
                    f"in {_modules_of(unexpected, attributes)}; only a plain Mllama checkpoint gets freshly "
                    "initialised MDF modules"
                )
        loading_info["missing_keys"] = missing
        for module in model.modules():
            if isinstance(module, MdfMllmModel):
                module.freeze_idle_unet_modules()
        if mdf_missing:
            # One line per module, not per tensor: a Mllama checkpoint lacks every MDF tensor (over a hundred).
            logger.warning(
                "Initialised %d MDF-MLLM tensors the checkpoint does not hold, in %s",
                len(mdf_missing),
                ", ".join(_modules_of(mdf_missing, attributes)),
            )
        return (model, loading_info) if output_loading_info else model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, MdfMllmUnetCrossAttention):
            init.ones_(module.logit_scale)
            init.zeros_(module.gate)
        elif isinstance(module, MdfMllmZeroLinear):
            # A marker class rather than a branch on MdfMllmFiLM: transformers skips the init of custom-code modules
            # that hold no parameters of their own, which FiLM is.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # The U-Net's convolutions (the vision tower initialises its own) take PyTorch's default, Kaiming-uniform,
            # rather than transformers' N(0, 0.02): at a quarter of that scale every Adam step moved them four times
            # as far relative to their size, and stage 1 stalled (class loss 1.2 against 0.6 in 8 epochs).
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, MdfMllmUnetProjector):
            init.normal_(module.position_embedding, std=std)
            init.normal_(module.depth_embedding, std=std)


# The classes whose checkpoints hold no language-model head: loading one into the generation model initialises it.
BASE_ARCHITECTURES = ("MdfMllmModel", "MllamaModel")


def _tied_to_loaded(model: nn.Module, missing) -> set[str]:
    """The missing keys whose parameter is the same tensor as a parameter that did load (tied weights)."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = set(missing)
    return {name for names in names_of.values() if not set(names) <= missing for name in names if name in missing}


def _modules_of(keys, attributes: list[str]) -> list[str]:
    """MDF tensor names -> the MDF modules holding them ("model.unet", "model.language_model.layers.3.unet_attn"):
    each name up to its first part that is an MDF module's attribute (`mdf_module_attributes`)."""
    modules = set()
    for key in keys:
        parts = key.split(".")
        end = next(k for k, part in enumerate(parts) if part in attributes)
        modules.add(".".join(parts[: end + 1]))
    return sorted(modules)


def _checkpoint_model_type(source, kwargs: dict) -> str | None:
    """The `model_type` in the checkpoint's own config.json (a config passed to from_pretrained does not count)."""
    hub = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
    try:
        config_dict, _ = MdfMllmConfig.get_config_dict(source, **{key: kwargs[key] for key in hub if key in kwargs})
    except (OSError, ValueError, TypeError):  # no config.json (or no path): nothing says it is an MDF-MLLM checkpoint
        return None
    return config_dict.get("model_type")


class MdfMllmVisionModel(MllamaVisionModel):
    """Mllama's vision tower, declaring only the layer class it holds.

    A composite model gathers its children's `_no_split_modules`; Mllama's vision tower inherits a list that also
    names `MllamaCrossAttentionDecoderLayer`, which MDF-MLLM does not contain (accelerate's auto-wrap then fails).
    """

    _no_split_modules = ["MllamaVisionEncoderLayer"]


class MdfMllmTextModel(MdfMllmPreTrainedModel, MllamaTextModel):
    """Mllama's text model with every cross-attention layer an `MdfMllmCrossAttentionDecoderLayer`.

    Its own `PreTrainedModel` (as Mllama's is), so that `from_pretrained` initialises the new gates and scales.
    """

    config: MllamaTextConfig

    def __init__(self, config: MllamaTextConfig, mdf_config: MdfMllmConfig):
        super().__init__(config)
        for layer_idx in config.cross_attention_layers:
            self.layers[layer_idx] = MdfMllmCrossAttentionDecoderLayer(config, layer_idx, mdf_config)
        self.post_init()


class MdfMllmModel(MdfMllmPreTrainedModel, MllamaModel):
    """Mllama plus the U-Net (FiLM-conditioned on the prompt) whose skips the fused layers read."""

    def __init__(self, config: MdfMllmConfig):
        # MllamaModel.__init__ would build a stock text model only for us to replace it: build the parts here.
        MllamaPreTrainedModel.__init__(self, config)
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.max_num_tiles = config.vision_config.max_num_tiles
        self.vision_output_dim = config.vision_config.vision_output_dim
        self.vision_model = MdfMllmVisionModel._from_config(config.vision_config)
        self.language_model = MdfMllmTextModel(config.text_config, config)
        self.multi_modal_projector = nn.Linear(self.vision_output_dim, self.hidden_size, bias=True)
        # An empty fusion map is plain Mllama (the baseline): no U-Net at all.
        self.unet = MdfMllmUNet(config) if config.fusion_layers else None
        self.unet_projector = MdfMllmUnetProjector(config, self.unet.widths) if config.fusion_layers else None
        self.post_init()
        self.freeze_idle_unet_modules()

    def freeze_idle_unet_modules(self) -> None:
        """Built (so that every checkpoint and the stage-1 U-Net load alike, and construction draws the same random
        numbers) but not trainable: a trainable parameter that gets no gradient stops DDP with
        find_unused_parameters=False (what the Trainer sets with gradient checkpointing). Called on construction and
        again by `from_pretrained`, whose loading makes every parameter trainable."""
        for module in self.idle_unet_modules():
            module.requires_grad_(False)

    def idle_unet_modules(self) -> list[nn.Module]:
        """The U-Net parts no forward pass of this configuration runs: without a vessel loss (`use_decoder` and
        `seg_loss_weight` > 0) the bottleneck, decoder and vessel head, and the encoder stages (with their FiLM)
        below the deepest depth `fusion_layers` reads. Stage 1 (`mdf_mllm.stage1`), which trains the
        U-Net on its own, makes them trainable again."""
        if self.unet is None or (self.config.unet_config["use_decoder"] and self.config.seg_loss_weight > 0):
            return []
        deepest = max(self.config.fusion_layers.values())
        idle = list(self.unet.stages[deepest:])
        if self.unet.film is not None:
            idle += list(self.unet.film[deepest:])
        if self.config.unet_config["use_decoder"]:
            idle += [self.unet.bottleneck, self.unet.upsample, self.unet.decoder, self.unet.vessel_head]
        return idle

    def text_context(self, input_ids, inputs_embeds, prompt_mask) -> torch.Tensor:
        """c = sum_t m_t E[x_t] / sum_t m_t over the prompt tokens m (B, T); every token when m is None -> (B, D)."""
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        if prompt_mask is None:
            prompt_mask = torch.ones(embeds.shape[:2], device=embeds.device)
        if prompt_mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"prompt_mask: expected shape (batch, sequence_length) = {tuple(embeds.shape[:2])}, got "
                f"{tuple(prompt_mask.shape)}; pass a 2-D prompt_mask when attention_mask is not 2-D"
            )
        mask = prompt_mask.to(embeds.dtype).unsqueeze(-1)
        return (embeds * mask).sum(1) / mask.sum(1).clamp(min=1)

    def check_unet_views(self, unet_pixel_values, pixel_values, cross_attention_states, batch_size: int) -> None:
        """Raise a `ValueError` naming the argument when the U-Net views do not go one to one with the images."""
        for name, value in (("pixel_values", pixel_values), ("unet_pixel_values", unet_pixel_values)):
            if value is not None and not value.is_meta and not torch.isfinite(value).all():
                raise ValueError(f"{name}: contains NaN or Inf; MdfMllmProcessor gives finite values")
        if self.unet is None:  # the baseline reads no U-Net view
            return
        images = pixel_values if pixel_values is not None else cross_attention_states
        if images is None:
            if unet_pixel_values is not None:
                raise ValueError("unet_pixel_values: given without pixel_values or cross_attention_states (no image)")
            return
        if unet_pixel_values is None:
            raise ValueError(
                "unet_pixel_values: MDF-MLLM needs one U-Net view per image with pixel_values or "
                "cross_attention_states; MdfMllmProcessor returns it"
            )
        channels, size = self.config.unet_config["in_channels"], self.config.unet_config["image_size"]
        if (
            unet_pixel_values.ndim not in (4, 5)
            or unet_pixel_values.shape[0] != batch_size
            or tuple(unet_pixel_values.shape[-3:]) != (channels, size, size)
        ):
            raise ValueError(
                f"unet_pixel_values: expected shape ({batch_size}, [num_images,] {channels}, {size}, {size}), got "
                f"{tuple(unet_pixel_values.shape)}"
            )
        if pixel_values is not None:
            num_images = pixel_values.shape[1]
        else:  # (B, N * tiles * P, D) or (B * N * tiles, P, D)
            num_images = cross_attention_states.numel() // (
                batch_size * self.max_num_tiles * self.vision_model.num_patches * self.hidden_size
            )
        num_views = unet_pixel_values.shape[1] if unet_pixel_values.ndim == 5 else 1
        if num_views != num_images:
            raise ValueError(
                f"unet_pixel_values: {num_views} U-Net view(s) per sample for {num_images} image(s); give one view "
                f"per image, shape (batch, num_images, {channels}, {size}, {size})"
            )

    def unet_forward(self, unet_pixel_values, text_context, output_vessel_logits: bool):
        """U-Net views (B, [N,] 3, S, S), text context (B, D) -> ({depth k: U_k (B, N * G^2, D)}, vessel logits
        (B, [N,] 1, S, S) or None). Every view of a sample is conditioned by that sample's prompt."""
        views = unet_pixel_values if unet_pixel_values.ndim == 5 else unet_pixel_values[:, None]
        batch, num_views = views.shape[:2]
        # The decoder reads every depth; without it, the stages below the deepest fused depth feed nothing.
        depths = UNET_DEPTHS if output_vessel_logits else max(self.config.fusion_layers.values())
        skips = self.unet.encode(
            views.flatten(0, 1).to(self.dtype), text_context.repeat_interleave(num_views, 0), depths
        )
        unet_states = {
            depth: tokens.reshape(batch, -1, tokens.shape[-1]) for depth, tokens in self.unet_projector(skips).items()
        }
        if not output_vessel_logits:
            return unet_states, None
        vessel_logits = self.unet.decode(skips)
        return unet_states, vessel_logits.reshape(*unet_pixel_values.shape[:-3], *vessel_logits.shape[1:])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        unet_pixel_values: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        output_vessel_logits: bool = False,
        **kwargs,
    ) -> MdfMllmModelOutputWithPast:
        r"""
        unet_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_images, 3, S, S)` or `(batch_size, 3, S, S)`):
            The field-of-view crop the U-Net reads, one per image (`MdfMllmProcessor` makes it; the 4-D form is one
            image per sample). Required with `pixel_values` or `cross_attention_states`. A text token's U-Net branch
            reads the U-Net tokens of the images its `cross_attention_mask` lets it see.
        prompt_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 on the tokens whose mean embedding conditions the U-Net (FiLM). Defaults to `attention_mask`;
            the causal-LM head removes the answer tokens (labels != -100) and `generate` the generated ones, so that
            the answer never steers the U-Net.
        output_vessel_logits (`bool`):
            Run the U-Net decoder and return `vessel_logits`.
        """
        embeds_or_ids = inputs_embeds if inputs_embeds is not None else input_ids
        self.check_unet_views(unet_pixel_values, pixel_values, cross_attention_states, embeds_or_ids.shape[0])
        unet_states, vessel_logits = None, None
        if unet_pixel_values is not None and self.unet is not None:
            prompt_mask = prompt_mask if prompt_mask is not None else attention_mask
            text_context = self.text_context(input_ids, inputs_embeds, prompt_mask)
            unet_states, vessel_logits = self.unet_forward(unet_pixel_values, text_context, output_vessel_logits)

        outputs = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cross_attention_states=cross_attention_states,
            unet_states=unet_states,
            return_dict=True,  # `can_return_tuple` above makes the tuple, with `vessel_logits`, when asked
            **kwargs,
        )
        return MdfMllmModelOutputWithPast(**outputs, vessel_logits=vessel_logits)


def _with_keyword_parameters(signature: inspect.Signature, *names: str) -> inspect.Signature:
    """`signature` with keyword-only parameters `names` (default None) added before its `**kwargs`."""
    parameters = list(signature.parameters.values())
    position = next(
        (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters)
    )
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    return signature.replace(parameters=parameters[:position] + added + parameters[position:])


def last_prompt_token(prompt_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the prompt tokens -> (B,) index of each row's last one (left or right padding alike): where the
    answer's first token is predicted."""
    return prompt_mask.shape[1] - 1 - prompt_mask.flip(-1).argmax(-1)


def pack_verbalizers(verbalizer_ids: list[list[int]], device) -> tuple[torch.Tensor, ...]:
    """The K verbalizers side by side in one row of P = sum_k (n_k - 1) input tokens (each verbalizer but its last
    token) -> tokens (P,), the token each predicts (P,), its verbalizer k (P,), its offset after the prompt (P,), and
    which packed tokens each may attend to (P, P): itself and the earlier tokens of its own verbalizer."""
    tokens, targets, owner, offsets = [], [], [], []
    for k, ids in enumerate(verbalizer_ids):
        tokens += ids[:-1]
        targets += ids[1:]
        owner += [k] * (len(ids) - 1)
        offsets += range(len(ids) - 1)
    tokens, targets, owner, offsets = (
        torch.tensor(values, dtype=torch.long, device=device) for values in (tokens, targets, owner, offsets)
    )
    sees = (owner[:, None] == owner[None, :]) & (offsets[:, None] >= offsets[None, :])
    return tokens, targets, owner, offsets, sees


# GenerationMixin named among the direct bases too (it comes with MllamaForConditionalGeneration already), as
# transformers asks of every generative class and checks in its model tests (`test_inherits_generation_mixin`).
class MdfMllmForConditionalGeneration(MdfMllmPreTrainedModel, MllamaForConditionalGeneration, GenerationMixin):
    """MDF-MLLM with Mllama's language-modelling head, a vessel-segmentation loss and `classify()`."""

    # What a base model's checkpoint (MdfMllmModel, MllamaModel) lacks; see `MdfMllmPreTrainedModel.from_pretrained`.
    _checkpoint_head_keys = ("lm_head.weight",)

    def __init__(self, config: MdfMllmConfig):
        # As in MdfMllmModel: Mllama's __init__ would build a stock MllamaModel to be thrown away.
        MllamaPreTrainedModel.__init__(self, config)
        self.model = MdfMllmModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def mdf_lora_config(self, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
        """A `peft.LoraConfig` for MDF-MLLM: LoRA on the language model's attention and MLP projections, and every
        MDF module (U-Net with FiLM, patch projector, each fused layer's U-Net branch with its gate and tau) trained
        in full through `modules_to_save`. Extra `modules_to_save` (e.g. `["multi_modal_projector", "lm_head"]`) and
        other LoraConfig fields pass through `kwargs`.

        A generic config would not do: `get_peft_model` freezes every parameter it does not target, the U-Net gates
        included, and a closed frozen gate keeps the U-Net out of the model for good (the model trains as the
        baseline; `train()` warns).
        """
        # Imported here, inside a try block: transformers' remote-code check imports every package a model file names
        # outside one, and peft pulls in bitsandbytes, which loading a model for inference must not.
        try:
            from peft import LoraConfig
        except ImportError as error:
            raise ImportError(f"mdf_lora_config needs peft (pip install peft): {error}") from None

        # LoRA's targets are the base's projections by name (transformers' names): an MDF module they would reach
        # would be wrapped and frozen, so refuse that here rather than train a model without its U-Net.
        pattern = re.compile(LORA_TARGET_MODULES)
        reached = [f"{prefix}.{name}" for prefix, module in mdf_modules(self).items()
                   for name, _ in module.named_modules() if pattern.fullmatch(f"{prefix}.{name}")]
        if reached:
            raise ValueError(f"LORA_TARGET_MODULES matches MDF modules {reached}: they must train in full")
        modules_to_save = [*mdf_module_attributes(self), *(kwargs.pop("modules_to_save", None) or [])]
        return LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=LORA_TARGET_MODULES,
            modules_to_save=modules_to_save,
            **kwargs,
        )

    def train(self, mode: bool = True):
        """`nn.Module.train`, warning once when training starts with U-Net gates frozen (what a generic PEFT config
        does): a frozen gate keeps its branch's contribution fixed, at zero when the gate is closed."""
        gates = [module.gate for module in self.modules() if isinstance(module, MdfMllmUnetCrossAttention)]
        trainable = sum(gate.requires_grad for gate in gates)
        if mode and trainable < len(self.config.fusion_layers) and not getattr(self, "_warned_frozen_gates", False):
            logger.warning(
                "Training MDF-MLLM with %d of its %d U-Net gates frozen: a frozen gate fixes how much its layer reads "
                "the U-Net (nothing while it is closed, i.e. the baseline). A generic PEFT config freezes every MDF "
                "parameter; use get_peft_model(model, model.mdf_lora_config(r=...)).",
                len(self.config.fusion_layers) - trainable,
                len(self.config.fusion_layers),
            )
            self._warned_frozen_gates = True
        return super().train(mode)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        unet_pixel_values: torch.Tensor | None = None,
        vessel_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MdfMllmCausalLMOutputWithPast:
        r"""
        Mllama's inputs (the cache under Mllama's name for it, `CACHE`, in `kwargs`), plus `unet_pixel_values` and
        `prompt_mask` (see `MdfMllmModel.forward`) and:

        vessel_mask (`torch.FloatTensor` of shape `(batch_size, [num_images,] 1, S, S)`, *optional*):
            The vessel mask cropped like `unet_pixel_values`; adds `config.seg_loss_weight` x BCE of the U-Net
            decoder's vessel logits to the loss (with a weight of 0 the decoder does not run).
        """
        if prompt_mask is None and labels is not None:
            keep = attention_mask if attention_mask is not None else torch.ones_like(labels)
            prompt_mask = keep * (labels == -100)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            aspect_ratio_mask=aspect_ratio_mask,
            aspect_ratio_ids=aspect_ratio_ids,
            attention_mask=attention_mask,
            cross_attention_mask=cross_attention_mask,
            cross_attention_states=cross_attention_states,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            unet_pixel_values=unet_pixel_values,
            prompt_mask=prompt_mask,
            # The decoder costs twice the encoder: it runs only for a loss that counts.
            output_vessel_logits=vessel_mask is not None and self.model.unet is not None
            and self.config.unet_config["use_decoder"] and self.config.seg_loss_weight > 0,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)
        if outputs.vessel_logits is not None:
            if vessel_mask.shape != outputs.vessel_logits.shape:
                raise ValueError(
                    f"vessel_mask: expected shape {tuple(outputs.vessel_logits.shape)} (one mask per U-Net view), got "
                    f"{tuple(vessel_mask.shape)}"
                )
            per_pixel = F.binary_cross_entropy_with_logits(
                outputs.vessel_logits.float(), vessel_mask.to(outputs.vessel_logits.device, torch.float32),
                reduction="none",
            )
            if per_pixel.ndim == 5 and cross_attention_mask is not None:
                # A sample with fewer images than the batch's widest has zero-padded views that no token sees: they
                # hold no vessels to learn, so the loss counts only the views of real images.
                real_views = cross_attention_mask.ne(0).any(dim=3).any(dim=1).to(per_pixel.device)  # (B, N)
                segmentation_loss = per_pixel.mean(dim=(2, 3, 4))[real_views].mean()
            else:
                segmentation_loss = per_pixel.mean()
            segmentation_loss = self.config.seg_loss_weight * segmentation_loss
            loss = segmentation_loss if loss is None else loss + segmentation_loss

        # Every field of the model's output but its last hidden state (the cache, image outputs, vessel logits...).
        passed_on = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return MdfMllmCausalLMOutputWithPast(loss=loss, logits=logits, **passed_on)

    def generate(self, inputs=None, *args, prompt_mask=None, **kwargs):
        """`GenerationMixin.generate`, with the FiLM context fixed to the prompt.

        `prompt_mask` (B, prompt length) defaults here to the prompt's own `attention_mask` (ones when there is none),
        before `generate` drops an all-ones mask or turns it 4-D for a static cache. It stays the prompt's length: the
        forward passes that run the U-Net (pre-fill, or every step without a cache) get it padded with zeros over the
        tokens generated so far (`prepare_inputs_for_generation`), and cached decoding steps get none, so no input
        grows step by step (a compiled forward does not recompile per token).
        """
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt_mask is None and prompt is not None:
            attention_mask = kwargs.get("attention_mask")
            prompt_mask = (
                attention_mask
                if attention_mask is not None
                else torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
            )
        return super().generate(inputs, *args, prompt_mask=prompt_mask, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids=None, *args, inputs_embeds=None, unet_pixel_values=None, prompt_mask=None, **kwargs
    ):
        # `inputs_embeds` by name: `generate` supports `inputs_embeds` only when this signature names it.
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        # Like pixel_values: the U-Net runs at pre-fill; decoding steps read its cached keys/values.
        if kwargs.get("use_cache") and not kwargs.get("is_first_iteration"):
            unet_pixel_values, prompt_mask = None, None
        if prompt_mask is not None:
            # The forward's tokens start at the prompt's first (pre-fill, or the whole sequence without a cache):
            # generated tokens, drafted ones included, lie after the prompt and outside the FiLM context.
            tokens = model_inputs.get("input_ids")
            if model_inputs.get("inputs_embeds") is not None:
                tokens = model_inputs["inputs_embeds"]
            length = tokens.shape[1]
            prompt_mask = F.pad(prompt_mask, (0, max(0, length - prompt_mask.shape[1])))[:, :length]
        model_inputs["unet_pixel_values"] = unet_pixel_values
        model_inputs["prompt_mask"] = prompt_mask
        return model_inputs

    # `generate` reads this signature to route model inputs (`inputs_embeds`, and the cache under the name the
    # installed release gives it, which an assistant model is handed): Mllama's, plus the two inputs added here.
    prepare_inputs_for_generation.__signature__ = _with_keyword_parameters(
        inspect.signature(MllamaForConditionalGeneration.prepare_inputs_for_generation), "unet_pixel_values", "prompt_mask"
    )

    def _prepare_static_cache(self, *args, model_kwargs, **kwargs) -> Cache:
        cache = super()._prepare_static_cache(*args, model_kwargs=model_kwargs, **kwargs)
        # Mllama sizes each cross-attention layer for its vision tokens; a fused layer's entry also holds the U-Net
        # branch's G^2 tokens per image, in front of them (`MdfMllmUnetCrossAttention`).
        pixel_values = model_kwargs.get("pixel_values")
        num_images = pixel_values.shape[1] if pixel_values is not None else 1
        per_image = vision_tokens_per_image(self.config) + self.config.fusion_grid**2
        for layer_idx in self.config.fusion_layers:
            cache.layers[layer_idx] = StaticLayer(max_cache_len=num_images * per_image)
        return cache

    @torch.no_grad()
    def classify(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        verbalizer_ids: list[list[int]] | None = None,
        **inputs,
    ) -> torch.Tensor:
        """Per-class probabilities (B, K) from the summed log-likelihood of each class's verbalizer given the prompt.

        The prompt runs once, with logits at its last real token only. Then the K verbalizers of a sample run in one
        row over that single prompt cache (no copy per class): all but the last token of each, side by side, each
        at the position it would have right after the prompt and attending to the prompt and to the earlier tokens
        of its own verbalizer (a block-causal mask). No text is generated or parsed. `verbalizer_ids` defaults to
        `config.verbalizer_token_ids` (the processor's `verbalizer_token_ids`). With `config.classifier_temperature`
        T, the scores are divided by T before the softmax: softmax(log p / T), the calibrated probabilities.
        """
        verbalizer_ids = verbalizer_ids or self.config.verbalizer_token_ids
        if not verbalizer_ids or not all(verbalizer_ids):
            raise ValueError(
                "verbalizer_ids: pass processor.verbalizer_token_ids or set config.verbalizer_token_ids (one non-empty "
                "list of token ids per class)"
            )
        temperature = self.config.classifier_temperature or 1.0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        rows = torch.arange(batch, device=input_ids.device)
        last = last_prompt_token(attention_mask)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        prompt = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cross_attention_mask=cross_attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=last[:, None],  # the only prompt logits read
            **inputs,
        )
        first = prompt.logits[:, 0].float().log_softmax(-1)  # (B, V)
        scores = first[:, [ids[0] for ids in verbalizer_ids]]  # (B, K)

        tokens, targets, owner, offsets, sees_packed = pack_verbalizers(verbalizer_ids, input_ids.device)
        if len(tokens) == 0:  # every verbalizer is one token long
            return (scores / temperature).softmax(-1)
        packed = len(tokens)
        sees = torch.cat([attention_mask.bool()[:, None].expand(-1, packed, -1), sees_packed.expand(batch, -1, -1)], -1)
        step = self(
            input_ids=tokens.expand(batch, -1),
            # Additive, as Mllama's own masks: (B, 1, P, L + P).
            attention_mask=torch.zeros(sees.shape, dtype=self.dtype, device=sees.device)
            .masked_fill(~sees, torch.finfo(self.dtype).min)[:, None],
            position_ids=position_ids[rows, last][:, None] + 1 + offsets,
            # Answer tokens see the images exactly as the last prompt token does.
            cross_attention_mask=None
            if cross_attention_mask is None
            else cross_attention_mask[rows, last][:, None].expand(-1, packed, -1, -1),
            use_cache=True,
            **{CACHE: prompt[CACHE]},
        )
        logprobs = step.logits.float().log_softmax(-1).gather(-1, targets.expand(batch, -1)[..., None])[..., 0]
        return (scores.index_add(1, owner, logprobs) / temperature).softmax(-1)


MdfMllmConfig.register_for_auto_class()
MdfMllmForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "MdfMllmPreTrainedModel",
    "MdfMllmTextModel",
    "MdfMllmModel",
    "MdfMllmForConditionalGeneration",
    "MdfMllmCrossAttentionDecoderLayer",
]
