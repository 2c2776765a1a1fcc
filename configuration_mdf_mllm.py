"""MDF-MLLM configuration: Mllama's configuration plus the U-Net, the fusion map and the label space.

This file is copied into every exported model folder and imported by `trust_remote_code`, so it imports only
transformers and the standard library and does nothing at import time.
"""

import warnings

import transformers
from huggingface_hub.dataclasses import strict
from packaging.version import Version
from transformers import MllamaConfig


# The transformers releases the model tests pass with (CI runs them on the oldest and the newest). The code subclasses
# Mllama's internals (layers, cache layout, checkpoint key mapping), which may change in any minor release: a newer
# release gets a warning, not a refusal, so that a Hub user is not locked out by next month's release.
SUPPORTED_TRANSFORMERS = (">=5.22", "<5.25")
# Older releases are known not to work: 5.20 lacks `modeling_utils.slice_logits_to_keep`, which the model imports.
# (5.21.1 passed the model tests once, by hand, and gets the untested-release warning.)
MINIMUM_TRANSFORMERS = "5.21"


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Silent within SUPPORTED_TRANSFORMERS; a warning outside it; an ImportError below MINIMUM_TRANSFORMERS."""
    low, high = (Version(bound.lstrip("<>=")) for bound in SUPPORTED_TRANSFORMERS)
    installed = Version(Version(version).base_version)
    supported = ",".join(SUPPORTED_TRANSFORMERS)
    if installed < Version(MINIMUM_TRANSFORMERS):
        raise ImportError(
            f"MDF-MLLM needs transformers>={MINIMUM_TRANSFORMERS} and was tested with {supported}, but transformers "
            f"{version} is installed: pip install 'transformers{supported}'"
        )
    if not low <= installed < high:
        warnings.warn(
            f"MDF-MLLM was tested with transformers {supported}; transformers {version} is installed. It may work; "
            f"if it does not, pip install 'transformers{supported}'",
            stacklevel=2,
        )


check_transformers_version()


# The label space of the paper's "dual-type" task: (name, verbalizer, disease type). The verbalizer is the text the
# model is trained to answer and that `classify()` scores; the type is the second level of the label.
DISEASE_TYPES = ["normal", "acquired", "inherited"]
DEFAULT_LABELS = [
    ("normal", "normal", "normal"),
    ("amd", "age-related macular degeneration", "acquired"),
    ("dr", "diabetic retinopathy", "acquired"),
    ("glaucoma", "glaucoma", "acquired"),
    ("retinitis_pigmentosa", "retinitis pigmentosa", "inherited"),
    ("stargardt", "stargardt disease", "inherited"),
    ("choroideremia", "choroideremia", "inherited"),
    ("best_disease", "best vitelliform macular dystrophy", "inherited"),
]
# The layouts, each size written once: the MDF modules' (`MdfMllmConfig` fields) and, where the main job builds the
# Mllama itself (`train_hf.py --model_size`: its base, or the model from scratch), that Mllama's tile and towers. "11b"
# is Llama 3.2 11B Vision's, whose Mllama comes with its checkpoint: its MDF sizes are the config's defaults. "small"
# and "tiny" are its shape at sizes two CPU cores train in minutes (the main job) and run in seconds (the tests).
LAYOUTS = {
    "11b": dict(
        mdf=dict(unet_config=dict(in_channels=3, base_channels=32, image_size=512, use_decoder=True), fusion_grid=16,
                 projector_dim=256, film_hidden_dim=256),
    ),
    "small": dict(
        mdf=dict(unet_config=dict(in_channels=3, base_channels=16, image_size=128, use_decoder=True), fusion_grid=8,
                 projector_dim=64, film_hidden_dim=64),
        mllama=dict(
            tile=112,
            vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                        attention_heads=2),
            text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, cross_attention_layers=[1, 3, 5, 7]),
        ),
    ),
    "tiny": dict(
        mdf=dict(unet_config=dict(in_channels=3, base_channels=4, image_size=32, use_decoder=True), fusion_grid=2,
                 projector_dim=8, film_hidden_dim=64),
        mllama=dict(
            tile=28,
            vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
                        attention_heads=2),
            text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, cross_attention_layers=[1, 3]),
        ),
    ),
}
DEFAULT_SIZES = LAYOUTS["11b"]["mdf"]
DEFAULT_UNET_CONFIG = DEFAULT_SIZES["unet_config"]
UNET_DEPTHS = 4
PRE_IMAGE_TEXT_MASKINGS = ("transformers", "reference")
MDF_FIELDS = (
    "unet_config",
    "fusion_layers",
    "fusion_grid",
    "projector_dim",
    "use_film",
    "film_hidden_dim",
    "seg_loss_weight",
    "pre_image_text_masking",
    "verbalizers",
    "disease_types",
    "verbalizer_token_ids",
    "classifier_temperature",
    "id2label",
)


def default_fusion_layers(cross_attention_layers: list[int]) -> dict[int, int]:
    """Spread the cross-attention layers over depths 1..4 in order: fine features go to early layers.

    For the 11B layout [3, 8, 13, 18, 23, 28, 33, 38] this gives depths 1, 1, 2, 2, 3, 3, 4, 4.
    """
    n = len(cross_attention_layers)
    return {layer: 1 + (UNET_DEPTHS * i) // n for i, layer in enumerate(sorted(cross_attention_layers))}


def _whole_number(value, field: str) -> int:
    """An int, or a string of one (JSON turns integer keys into strings) -> int; anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"{field}: expected integers (cross-attention layer -> depth), got {value!r}")
    return int(value)


@strict
class MdfMllmConfig(MllamaConfig):
    r"""
    unet_config (`dict`, *optional*):
        The U-Net beside Mllama: `in_channels`, `base_channels` (stage k has `base_channels * 2**(k-1)` channels),
        `image_size` S (the side of `unet_pixel_values`), `use_decoder` (bottleneck, decoder and vessel head).
    fusion_layers (`dict[int, int]`, *optional*):
        Cross-attention layer index -> U-Net depth (1..4) it reads. Defaults to the cross-attention layers spread
        over the four depths in order. `{}` is plain Mllama (the baseline).
    fusion_grid (`int`, defaults to 16):
        G: every depth is cut into a G x G grid of patches, so each fused layer reads G**2 U-Net tokens.
    projector_dim (`int`, *optional*, defaults to 256):
        Bottleneck width of the patch projector (flattened patch -> projector_dim -> hidden size); `None` projects
        straight to the hidden size.
    use_film (`bool`, defaults to `True`):
        Condition the U-Net on the prompt's mean token embedding with FiLM.
    film_hidden_dim (`int`, defaults to 256):
        Width of each FiLM MLP.
    seg_loss_weight (`float`, defaults to 0.0):
        Weight of the vessel-segmentation loss added when `vessel_mask` is given (needs `use_decoder`). At 0 the
        decoder and vessel head neither run nor train (they are frozen), so that every trainable parameter gets a
        gradient; set it above 0 (e.g. 0.1) and pass `vessel_mask` to train them.
    pre_image_text_masking (`str`, defaults to `"transformers"`):
        What the stock cross-attention does for text tokens that may see no image (those before the first image
        token, e.g. a chat header). `"transformers"`: exactly transformers' `MllamaCrossAttentionDecoderLayer`, whose
        attention update reaches those tokens (attending uniformly to the image) while only the MLP update is masked,
        so MDF-MLLM with closed U-Net gates computes what `MllamaForConditionalGeneration` computes for every prompt.
        `"reference"`: Meta's reference implementation, which masks the whole cross-attention update of those tokens
        (transformers issue #39379); a checkpoint trained one way is best used the same way. In both modes the U-Net
        branch never updates a token that sees no image.
    verbalizers (`list[str]`, *optional*):
        The answer text of each label id, scored by `classify()`.
    disease_types (`list[str]`, *optional*):
        The disease type of each label id, one of `DISEASE_TYPES` (the evaluation's second level). Defaults to the
        MDF label set's; `None` for labels of your own (`num_labels` / `id2label`) given without them.
    verbalizer_token_ids (`list[list[int]]`, *optional*):
        Each verbalizer tokenised as it appears in an answer (with the end-of-turn token), written by the training
        script so that `classify()` needs no tokenizer.
    classifier_temperature (`float`, *optional*):
        The temperature T of `classify()`'s class probabilities, softmax(log p / T), fitted on the validation split
        after training (temperature scaling, `mdf_mllm.calibration.fit_temperature`) so that a stated confidence is
        the accuracy that comes with it: T > 1 softens over-confident probabilities. The predicted class never
        changes. `None` (the default) leaves the probabilities as the verbalizers score them (T = 1).
    """

    model_type = "mdf_mllm"

    unet_config: dict | None = None
    fusion_layers: dict | None = None
    fusion_grid: int = DEFAULT_SIZES["fusion_grid"]
    projector_dim: int | None = DEFAULT_SIZES["projector_dim"]
    use_film: bool = True
    film_hidden_dim: int = DEFAULT_SIZES["film_hidden_dim"]
    seg_loss_weight: float = 0.0
    pre_image_text_masking: str = "transformers"
    verbalizers: list[str] | None = None
    disease_types: list[str] | None = None
    verbalizer_token_ids: list[list[int]] | None = None
    classifier_temperature: float | None = None

    def __post_init__(self, **kwargs):
        # The MDF label space is the default only: when nobody asked for labels (none given, or transformers' generic
        # LABEL_0/LABEL_1 that every Mllama config.json carries). A `num_labels` passed here is the user's and wins,
        # as do generic labels saved with their verbalizers (an MDF-MLLM config.json of such labels, which for two
        # labels transformers writes without id2label).
        given = kwargs.get("id2label", self.id2label)
        generic = given is None or all(str(name) == f"LABEL_{i}" for i, name in dict(given).items())
        saved = self.verbalizers is not None and self.verbalizers == [f"LABEL_{i}" for i in range(len(self.verbalizers))]
        if saved and given is None:
            kwargs["num_labels"] = len(self.verbalizers)
        if generic and "num_labels" not in kwargs and not saved:
            kwargs.pop("num_labels", None)
            kwargs.pop("label2id", None)
            kwargs["id2label"] = {i: name for i, (name, _, _) in enumerate(DEFAULT_LABELS)}
            self.verbalizers = self.verbalizers or [verbalizer for _, verbalizer, _ in DEFAULT_LABELS]
            self.disease_types = self.disease_types or [kind for _, _, kind in DEFAULT_LABELS]
        # A config read from a Mllama config.json arrives with model_type="mllama": it is an MDF config now.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.label2id = {name: i for i, name in self.id2label.items()}
        self.unet_config = {**DEFAULT_UNET_CONFIG, **(self.unet_config or {})}
        if self.fusion_layers is None:
            self.fusion_layers = default_fusion_layers(self.text_config.cross_attention_layers)
        # JSON turns integer keys into strings; anything else that is not a whole number is an error, not truncated.
        self.fusion_layers = {
            _whole_number(layer, "fusion_layers"): _whole_number(depth, "fusion_layers")
            for layer, depth in self.fusion_layers.items()
        }
        if self.verbalizers is None:
            self.verbalizers = [self.id2label[i] for i in range(self.num_labels)]
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_mdf_mllm.MdfMllmConfig",
                "AutoModel": "modeling_mdf_mllm.MdfMllmForConditionalGeneration",
                "AutoModelForImageTextToText": "modeling_mdf_mllm.MdfMllmForConditionalGeneration",
            }
        self.validate_fusion()

    def validate_fusion(self):
        """Raise a `ValueError` naming the field for a fusion map, grid or label space that cannot work."""
        cross_layers = self.text_config.cross_attention_layers
        for layer, depth in self.fusion_layers.items():
            if layer not in cross_layers:
                raise ValueError(
                    f"fusion_layers: layer {layer} is not a cross-attention layer (those are {cross_layers})"
                )
            if not 1 <= depth <= UNET_DEPTHS:
                raise ValueError(f"fusion_layers: layer {layer} maps to depth {depth}, outside 1..{UNET_DEPTHS}")
        unknown_keys = sorted(set(self.unet_config) - set(DEFAULT_UNET_CONFIG))
        if unknown_keys:
            raise ValueError(f"unet_config: unknown keys {unknown_keys}; the keys are {sorted(DEFAULT_UNET_CONFIG)}")
        positive = {f"unet_config.{key}": self.unet_config[key] for key in ("in_channels", "base_channels", "image_size")}
        positive.update(fusion_grid=self.fusion_grid, film_hidden_dim=self.film_hidden_dim)
        if self.projector_dim is not None:
            positive["projector_dim"] = self.projector_dim
        for field, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        if self.pre_image_text_masking not in PRE_IMAGE_TEXT_MASKINGS:
            raise ValueError(
                f"pre_image_text_masking: expected one of {PRE_IMAGE_TEXT_MASKINGS}, got {self.pre_image_text_masking!r}"
            )
        temperature = self.classifier_temperature
        if temperature is not None and not 0 < temperature < float("inf"):  # also refuses NaN
            raise ValueError(f"classifier_temperature: expected a positive finite number or None, got {temperature!r}")
        if not 0 <= self.seg_loss_weight < float("inf"):  # also refuses NaN
            raise ValueError(f"seg_loss_weight: expected a finite weight >= 0, got {self.seg_loss_weight!r}")
        size, grid = self.unet_config["image_size"], self.fusion_grid
        if size % (grid * 2 ** (UNET_DEPTHS - 1)):
            raise ValueError(
                f"unet_config.image_size: {size} must be divisible by fusion_grid * 8 = {grid * 8}, so that "
                f"every U-Net depth (S, S/2, S/4, S/8) is cut into the same {grid}x{grid} grid"
            )
        if self.unet_config["use_decoder"] and size % 2**UNET_DEPTHS:
            raise ValueError(f"unet_config.image_size: {size} must be divisible by 16 for the U-Net decoder")
        for field in ("verbalizers", "disease_types"):
            if getattr(self, field) is not None and len(getattr(self, field)) != self.num_labels:
                raise ValueError(f"{field}: {len(getattr(self, field))} entries for {self.num_labels} labels")
        if not all(isinstance(v, str) and v.strip() for v in self.verbalizers):
            raise ValueError(f"verbalizers: every verbalizer must be non-empty text, got {self.verbalizers}")
        duplicates = sorted({v for v in self.verbalizers if self.verbalizers.count(v) > 1})
        if duplicates:
            raise ValueError(f"verbalizers: duplicate verbalizers {duplicates}; each label needs its own answer")
        unknown = sorted(set(self.disease_types or []) - set(DISEASE_TYPES))
        if unknown:
            raise ValueError(f"disease_types: {unknown} not in {DISEASE_TYPES}")

    @property
    def label_names(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "MdfMllmConfig":
        # MDF fields given to from_pretrained (e.g. a Mllama checkpoint with unet_config=...) go through __init__,
        # which merges defaults and validates, rather than being set on the finished config.
        mdf_fields = {key: kwargs.pop(key) for key in MDF_FIELDS if key in kwargs}
        return super().from_dict({**config_dict, **mdf_fields}, **kwargs)

    @classmethod
    def from_mllama_config(cls, config: MllamaConfig, **mdf_kwargs) -> "MdfMllmConfig":
        """An MDF-MLLM config with `config`'s vision and text towers and the given MDF fields."""
        config_dict = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            config_dict.pop(key, None)
        return cls.from_dict({**config_dict, **mdf_kwargs})


__all__ = ["MdfMllmConfig", "DEFAULT_LABELS", "DISEASE_TYPES"]
