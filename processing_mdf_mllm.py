"""MDF-MLLM processing: fundus photo + clinical text -> everything `MdfMllmForConditionalGeneration` takes.

* The image processor (`MdfMllmImageProcessor`) and fundus-photo handling live in `image_processing_mdf_mllm.py`.
* `MdfMllmProcessor`: the chat prompt (image token, instruction, optional clinical history), left-padded token ids,
  Mllama's cross-attention mask, and answer-only `labels` for training.
* `build_tokenizer()`: a small offline Llama-3-style tokenizer for the default model (every number of one to three
  digits one token, as in Llama 3); `build_default_processor()`.
* `MdfMllmDataCollator`: batches already-processed single examples for the `Trainer`.

This file is copied into every exported model folder and imported by `trust_remote_code`, so it imports only
torch/transformers/numpy/PIL/stdlib and does nothing at import time but define things.
"""

import inspect
import warnings

import numpy as np
import torch
from transformers import BatchFeature, MllamaProcessor, PreTrainedTokenizerFast
from transformers.models.mllama.processing_mllama import (
    build_string_from_input,
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)


try:
    from .configuration_mdf_mllm import DEFAULT_LABELS, DISEASE_TYPES
    from .image_processing_mdf_mllm import MdfMllmImageProcessor, nest_images
except ImportError:  # imported as a top-level module from the repository rather than as remote code
    from configuration_mdf_mllm import DEFAULT_LABELS, DISEASE_TYPES
    from image_processing_mdf_mllm import MdfMllmImageProcessor, nest_images


IMAGE_TOKEN = "<|image|>"
END_OF_TURN = "<|eot_id|>"
IGNORE_INDEX = -100
DEFAULT_INSTRUCTION = "What retinal disease does this fundus photograph show?"
DEFAULT_CLINICAL_TEXT_TEMPLATE = "Clinical history: {clinical_text}"
DEFAULT_MAX_CLINICAL_TEXT_TOKENS = 512  # clinical histories run to a few sentences; this bounds memory and time

# Llama 3.2 Vision's chat layout of the turns: each message (text, and `<|image|>` for an image), then the
# assistant's header when a generation prompt is asked for. Written once: the stock base's template (model_setup)
# puts its system turn in front of the same turns.
LLAMA3_CHAT_TURNS = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Llama 3.2 Vision's chat layout, without its system-prompt and tool branches.
LLAMA3_CHAT_TEMPLATE = "{{- bos_token }}" + LLAMA3_CHAT_TURNS


# ----------------------------------------------------------------------------------------------------------------
# Offline tokenizer for the small default model


LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `<|image|>` last: Llama 3.2 Vision's lm_head has vocab_size rows and the image token's id equals vocab_size.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    IMAGE_TOKEN,
]
CLINICAL_VOCABULARY = """
what which does this that the a an of in on with and or to is are was were has had have by for from at as no not yes
fundus photograph photo image retina retinal eye eyes left right both bilateral unilateral optic disc nerve cup
macula macular fovea foveal vessel vessels artery arteries vein veins arteriolar attenuation attenuated narrowing
hemorrhage hemorrhages haemorrhage exudate exudates hard soft cotton wool spots drusen microaneurysm microaneurysms
pigment pigmentary pigmentation bone spicule spicules atrophy atrophic flecks fleck pallor pale waxy cupping notch
notching rim neovascularization edema oedema scar lesion lesions periphery peripheral central
patient male female man woman boy girl child children adult years year old aged age onset early late childhood
adolescence teenage infancy birth history family father mother brother sister son daughter sibling siblings parents
grandfather grandmother uncle aunt cousin consanguineous inherited acquired autosomal dominant recessive linked
x-linked gene genes mutation mutations genetic testing variant variants carrier
night blindness nyctalopia photophobia glare color colour vision visual acuity field fields loss constriction
tunnel scotoma blurred blurry blurring reading difficulty progressive progression slowly slow gradual gradually
sudden decreased decrease reduced poor worse worsening normal mild moderate severe stable diabetes diabetic
type insulin hypertension hypertensive glaucoma intraocular pressure elevated myopia myopic hyperopia cataract
surgery electroretinogram erg extinguished oct thinning presents presented presenting complains complaint reports
noted denies since months weeks days ago first diagnosed diagnosis disease disorder condition findings examination
answer healthy abnormal user assistant system
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with Llama 3's special tokens, built offline and deterministically.

    Trained on the project's label and clinical vocabulary; byte-level, so any text (unicode included) encodes.
    Every special token comes after the BPE vocabulary and `<|image|>` has the last id, as in Llama 3.2 Vision:
    use `text_config.vocab_size = image_token_index = tokenizer.convert_tokens_to_ids("<|image|>")`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    words = CLINICAL_VOCABULARY.split() + DISEASE_TYPES + [w for label in DEFAULT_LABELS for w in label]
    words += (DEFAULT_INSTRUCTION + " " + DEFAULT_CLINICAL_TEXT_TEMPLATE).split()
    words += [word.capitalize() for word in words]
    # Each word after a space and at the start of a line ("\n\n" + answer follows the assistant header).
    # Every number of one to three digits is one token, as in Llama 3's vocabulary: an age is then one embedding that
    # the model can learn to read, not a bag of digits in which 52 and 25 are the same.
    numbers = " ".join(map(str, range(1000)))
    lines = [" ".join(words), "\n\n".join(words), numbers + " 20/20 20/40 20/200 . , : ; ( ) - ? ! ' \""]
    trainer = trainers.BpeTrainer(
        vocab_size=3000, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token=END_OF_TURN,
        pad_token="<|finetune_right_pad_id|>",
        padding_side="left",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


# ----------------------------------------------------------------------------------------------------------------
# Processor


def _per_sample(value, batch_size: int, field: str) -> list:
    """None / one value / a list of `batch_size` values -> a list of `batch_size` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch_size:
            raise ValueError(f"{field}: {len(value)} entries for a batch of {batch_size}")
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return _per_sample(value.tolist(), batch_size, field)
    if value is not None and batch_size != 1:
        raise ValueError(f"{field}: one value for a batch of {batch_size}; give a list with one per sample")
    return [value.item() if isinstance(value, (np.ndarray, torch.Tensor)) else value] * batch_size


class MdfMllmProcessor(MllamaProcessor):
    r"""Fundus photos + clinical text (+ labels) -> MDF-MLLM's inputs, for training and inference.

    The prompt is the chat template applied to one user turn: the image token, `instruction`, and, when the
    sample has clinical text, `clinical_text_template` on a new line; the assistant header follows. With `labels`
    the answer (the label's verbalizer, then `<|eot_id|>`) is appended and `labels` is -100 everywhere else.
    Padding is on the left, so batched `generate()` continues every row at its end.

    Clinical text is untrusted input, so two rules keep the prompt's structure intact whatever it holds:

    * it may not contain a special token's text (`<|image|>`, `<|eot_id|>`, `<|start_header_id|>`, ...), which the
      tokenizer would read as that token and so add an image slot or end the user turn: a `ValueError` names it;
    * it is truncated to its first `max_clinical_text_tokens` tokens (cut at a token boundary, leading and trailing
      whitespace dropped, a `UserWarning` saying how many tokens were kept), so a 20,000-token history costs what a
      512-token one does. Only the clinical text is cut:
      the image token, the instruction, the assistant header and, in training, the answer are always whole, and a
      prompt is at most `max_clinical_text_tokens` tokens longer than the same prompt with a one-word history.

    Args:
        image_processor ([`MdfMllmImageProcessor`]), tokenizer: any tokenizer with Llama 3's `<|image|>`,
            `<|eot_id|>` tokens and a pad token (`build_tokenizer()`, or a Llama 3.2 Vision tokenizer unchanged).
        chat_template (`str`, *optional*): defaults to the tokenizer's, else a Llama 3 template.
        label_names, verbalizers (`list[str]`, *optional*): label id -> name / answer text; `DEFAULT_LABELS`.
        instruction (`str`), clinical_text_template (`str` with `{clinical_text}`): the prompt's text.
        max_clinical_text_tokens (`int` or `None`, defaults to 512): the clinical text's token budget (`None`: no
            limit); saved with the processor.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template=None,
        label_names=None,
        verbalizers=None,
        instruction=DEFAULT_INSTRUCTION,
        clinical_text_template=DEFAULT_CLINICAL_TEXT_TEMPLATE,
        max_clinical_text_tokens=DEFAULT_MAX_CLINICAL_TEXT_TOKENS,
    ):
        self.label_names = list(label_names or [name for name, _, _ in DEFAULT_LABELS])
        self.verbalizers = list(verbalizers or [verbalizer for _, verbalizer, _ in DEFAULT_LABELS])
        self.instruction = instruction
        self.clinical_text_template = clinical_text_template
        self.max_clinical_text_tokens = max_clinical_text_tokens
        if max_clinical_text_tokens is not None and (
            not isinstance(max_clinical_text_tokens, int) or isinstance(max_clinical_text_tokens, bool)
            or max_clinical_text_tokens < 1
        ):
            raise ValueError(f"max_clinical_text_tokens: expected a positive int or None, got {max_clinical_text_tokens!r}")
        if len(self.label_names) != len(self.verbalizers):
            raise ValueError(f"verbalizers: {len(self.verbalizers)} for {len(self.label_names)} label_names")
        for field in ("label_names", "verbalizers"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"{field}: entries must be unique, got {values}")
        if "{clinical_text}" not in clinical_text_template:
            raise ValueError("clinical_text_template: must contain '{clinical_text}'")
        for token in (IMAGE_TOKEN, END_OF_TURN):
            if token not in tokenizer.get_vocab():
                raise ValueError(f"tokenizer: has no {token} token, which MDF-MLLM's prompts need")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: has no pad token (Llama 3 uses <|finetune_right_pad_id|>)")
        chat_template = chat_template or getattr(tokenizer, "chat_template", None) or LLAMA3_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._verbalizer_token_ids = None

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is this file's own class: loading it through AutoImageProcessor would demand
        # `trust_remote_code` even from `MdfMllmProcessor.from_pretrained`.
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        image_processor = MdfMllmImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]

    # -- labels ---------------------------------------------------------------------------------------------------

    def label_id(self, label) -> int:
        """A label id, name or verbalizer -> the label id."""
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if not 0 <= label < len(self.label_names):
                raise ValueError(f"labels: label id {label} outside 0..{len(self.label_names) - 1}")
            return int(label)
        for names in (self.label_names, self.verbalizers):
            if label in names:
                return names.index(label)
        raise ValueError(f"labels: unknown label {label!r}; known: {self.label_names}")

    def label_from_answer(self, answer: str) -> int | None:
        """Generated answer text -> label id, or None if it is no verbalizer."""
        answer = answer.replace(END_OF_TURN, "").strip().lower()
        matches = [i for i, verbalizer in enumerate(self.verbalizers) if verbalizer.lower() == answer]
        return matches[0] if matches else None

    @property
    def verbalizer_token_ids(self) -> list[list[int]]:
        """For each label id, the token ids of its answer (verbalizer + `<|eot_id|>`) as they follow the prompt."""
        if self._verbalizer_token_ids is None:
            prompt = self.build_prompt()
            prompt_ids = self._encode(prompt)
            answers = []
            for verbalizer in self.verbalizers:
                ids = self._encode(prompt + verbalizer + END_OF_TURN)
                if ids[: len(prompt_ids)] != prompt_ids:
                    raise ValueError(f"verbalizers: the tokenizer merges the answer {verbalizer!r} into the prompt")
                answers.append(ids[len(prompt_ids) :])
            self._verbalizer_token_ids = answers
        return self._verbalizer_token_ids

    # -- prompts --------------------------------------------------------------------------------------------------

    def build_prompt(self, clinical_text: str | None = None, name: str = "clinical_text", num_images: int = 1) -> str:
        """The chat prompt for a sample of `num_images` photos (their image tokens first), up to and including the
        assistant header (clinical text checked and truncated as the class docstring says; errors name `name`)."""
        content = self.instruction
        clinical_text = self.clean_clinical_text(clinical_text, name)
        if clinical_text:
            content += "\n" + self.clinical_text_template.format(clinical_text=clinical_text)
        images = [{"type": "image"}] * num_images
        messages = [{"role": "user", "content": [*images, {"type": "text", "text": content}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def clean_clinical_text(self, clinical_text: str | None, name: str = "clinical_text") -> str:
        """`clinical_text` stripped and cut to `max_clinical_text_tokens` tokens ("" for None; a `UserWarning` naming
        `name` says how many tokens were kept); a `ValueError` naming `name` for a non-string or a text holding a
        special token."""
        if clinical_text is None:
            return ""
        if not isinstance(clinical_text, str):
            raise ValueError(f"{name}: expected a string or None, got {type(clinical_text).__name__}")
        special = [token for token in self.tokenizer.added_tokens_encoder if token in clinical_text]
        if special:
            raise ValueError(f"{name}: contains the special token(s) {special}, which would change the prompt's "
                             "structure; remove them")
        try:
            size = len(clinical_text.encode("utf-8"))
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. from bytes decoded with errors="surrogateescape"
            raise ValueError(f"{name}: not valid Unicode text ({error.reason} at character {error.start})") from None
        clinical_text = clinical_text.strip()
        limit = self.max_clinical_text_tokens
        if limit is None or size <= limit:  # every token holds at least one byte
            return clinical_text
        original = None
        while True:
            offsets = self.tokenizer(clinical_text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = offsets["offset_mapping"]
            original = original or len(offsets)
            if len(offsets) <= limit:
                break
            # Cut before the character where the first token over the budget starts; BPE may merge the cut text
            # differently, so check again (the text shrinks every round).
            clinical_text = clinical_text[: offsets[limit][0]].rstrip()
        if len(offsets) < original:
            warnings.warn(f"{name}: the clinical text ({original} tokens) was cut to its first {len(offsets)} tokens "
                          f"(max_clinical_text_tokens={limit})", UserWarning, stacklevel=3)
        return clinical_text

    def _encode(self, text: str) -> list[int]:
        # Special tokens come from the prompt text itself (the template writes <|begin_of_text|>).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(
        self,
        images=None,
        text=None,
        clinical_text=None,
        labels=None,
        vessel_masks=None,
        return_tensors="pt",
        **images_kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: one fundus photo or a list, one per sample (PIL, array, tensor or path); a sample with several
                photos (e.g. both eyes) is a list of them: `[[left, right], ...]`.
            text (`str` or `list[str]`, *optional*): raw prompts instead of the built ones; each must hold one
                `<|image|>` per image of its sample.
            clinical_text (`str`, `list[str | None]`, *optional*): clinical history per sample; None/"" for none.
            labels (label ids or names, *optional*): append the answer and return answer-only `labels`.
            vessel_masks (*optional*): one vessel mask per image, nested as `images`; returned as `vessel_mask`
                (B, 1, S, S), or (B, N_max, 1, S, S) when a sample has several images.
            images_kwargs: overrides for the image processor (e.g. `max_image_tiles`).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (B, L) left-padded, `pixel_values`,
            `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask` (B, L, 1, max_image_tiles),
            `unet_pixel_values` (B, 3, S, S) -- (B, N_max, 3, S, S), zero-padded, when a sample has several images --,
            and `vessel_mask`, `labels` (B, L) when asked for.
        """
        if images is None and text is None:
            raise ValueError("give images, text or both")
        samples = nest_images(images) if images is not None else None
        batch_size = len(samples) if samples is not None else len(text if isinstance(text, (list, tuple)) else [text])
        if text is None:
            texts = _per_sample(clinical_text, batch_size, "clinical_text")
            counts = [len(sample) for sample in samples] if samples is not None else [1] * batch_size
            prompts = [self.build_prompt(text, f"clinical_text[{i}]", count)
                       for i, (text, count) in enumerate(zip(texts, counts))]
        else:
            if clinical_text is not None:
                raise ValueError("clinical_text: give it or a raw text prompt, not both")
            prompts = self._check_prompts(_per_sample(text, batch_size, "text"), samples)

        sequences = [self._encode(prompt) for prompt in prompts]
        targets = None
        if labels is not None:
            answers = [self.verbalizer_token_ids[self.label_id(label)]
                       for label in _per_sample(labels, batch_size, "labels")]
            targets = [[IGNORE_INDEX] * len(ids) + answer for ids, answer in zip(sequences, answers)]
            sequences = [ids + answer for ids, answer in zip(sequences, answers)]

        data = self._left_pad(sequences, targets)
        if samples is not None:
            image_inputs = self.image_processor(samples, vessel_masks=vessel_masks, **images_kwargs)
            num_tiles = image_inputs.pop("num_tiles")
            data.update(image_inputs)
            data["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
                [get_cross_attention_token_mask(ids, self.image_token_id) for ids in data["input_ids"]],
                num_tiles=num_tiles,
                max_num_tiles=images_kwargs.get("max_image_tiles", self.image_processor.max_image_tiles),
                length=len(data["input_ids"][0]),
            )
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_prompts(self, prompts: list[str], samples: list[list] | None) -> list[str]:
        """Raw prompts must hold one image token per image; <|begin_of_text|> is added as Mllama does."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"text[{i}]: expected a string, got {type(prompt).__name__}")
            found, expected = prompt.count(self.image_token), len(samples[i]) if samples is not None else 0
            if found != expected:
                raise ValueError(f"text[{i}]: the prompt holds {found} {self.image_token} token(s) for {expected} "
                                 f"image(s); put one {self.image_token} where each image goes")
        return [build_string_from_input(prompt, self.bos_token, self.image_token) for prompt in prompts]

    def _left_pad(self, sequences: list[list[int]], targets: list[list[int]] | None) -> dict[str, list]:
        length, pad_id = max(len(ids) for ids in sequences), self.tokenizer.pad_token_id
        padding = [length - len(ids) for ids in sequences]
        data = {
            "input_ids": [[pad_id] * n + ids for n, ids in zip(padding, sequences)],
            "attention_mask": [[0] * n + [1] * len(ids) for n, ids in zip(padding, sequences)],
        }
        if targets is not None:
            data["labels"] = [[IGNORE_INDEX] * n + target for n, target in zip(padding, targets)]
        return data


def build_default_processor(image_size=112, max_image_tiles=1, unet_image_size=128, **kwargs) -> MdfMllmProcessor:
    """The processor of the small default model: `build_tokenizer()`, tiles of `image_size`, U-Net view of
    `unet_image_size`. `kwargs` go to `MdfMllmProcessor` when it takes them (label_names, verbalizers, instruction,
    ...), otherwise to `MdfMllmImageProcessor` (unet_image_mean, fov_detection_size, ...)."""
    processor_args = set(inspect.signature(MdfMllmProcessor.__init__).parameters)
    image_processor = MdfMllmImageProcessor(
        size={"height": image_size, "width": image_size},
        max_image_tiles=max_image_tiles,
        unet_image_size=unet_image_size,
        **{key: value for key, value in kwargs.items() if key not in processor_args},
    )
    return MdfMllmProcessor(
        image_processor, build_tokenizer(), **{key: value for key, value in kwargs.items() if key in processor_args}
    )


# ----------------------------------------------------------------------------------------------------------------
# Data collator


# name -> (dimensions of one example, padding value or None for a U-Net input, pad the first dimension on the left).
# A U-Net input has the given dimensions per image; an example holds one image or (N, ...) several: see `_per_image`.
PAD_TOKEN = "pad_token_id"
_COLLATED_INPUTS = {
    "input_ids": (1, PAD_TOKEN, True),
    "attention_mask": (1, 0, True),
    "labels": (1, IGNORE_INDEX, True),
    "cross_attention_mask": (3, 0, True),  # (L, images, tiles)
    "pixel_values": (5, 0.0, False),  # (images, tiles, 3, tile, tile)
    "aspect_ratio_ids": (1, 0, False),  # (images,)
    "aspect_ratio_mask": (2, 0, False),  # (images, tiles)
    "unet_pixel_values": (3, None, False),  # (3, S, S) per image
    "vessel_mask": (3, None, False),  # (1, S, S) per image
}


def _pad_and_stack(tensors: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Pad every dimension to the batch maximum (the first on the left when `left`, the rest on the right)."""
    shape = [max(sizes) for sizes in zip(*(tensor.shape for tensor in tensors))]
    batch = torch.full((len(tensors), *shape), value, dtype=tensors[0].dtype)
    for row, tensor in zip(batch, tensors):
        start = shape[0] - tensor.shape[0] if left else 0
        row[(slice(start, start + tensor.shape[0]), *(slice(0, size) for size in tensor.shape[1:]))] = tensor
    return batch


class MdfMllmDataCollator:
    """Batches examples the processor made one at a time (dicts of tensors or lists, with or without their batch
    dimension of 1) for the `Trainer`, without recomputing anything: left-pads token ids, masks and labels; pads
    images and tiles with zeros as Mllama does; stacks `unet_pixel_values` (B, 3, S, S) and `vessel_mask`
    (B, 1, S, S) when every example has one image, else pads them with zeros to (B, N_max, 3, S, S) and
    (B, N_max, 1, S, S), as the processor does. Keys that are no model input (e.g. `num_tiles`, dataset columns)
    are dropped.
    """

    def __init__(self, processor_or_pad_token_id):
        if isinstance(processor_or_pad_token_id, (int, np.integer)):
            self.pad_token_id = int(processor_or_pad_token_id)
        else:
            self.pad_token_id = processor_or_pad_token_id.tokenizer.pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key, (ndim, value, left) in _COLLATED_INPUTS.items():
            present = [key in feature for feature in features]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"{key}: present in {sum(present)} of {len(features)} examples; give it in all")
            if value is None:
                batch[key] = self._per_image([f[key] for f in features], ndim, key)
            else:
                tensors = [self._example(f[key], ndim, f"features[{i}][{key!r}]") for i, f in enumerate(features)]
                batch[key] = _pad_and_stack(tensors, self.pad_token_id if value == PAD_TOKEN else value, left)
        if "aspect_ratio_mask" in batch:
            # Mllama marks the first tile of every image slot, padded slots included.
            batch["aspect_ratio_mask"][:, :, 0] = 1
        return batch

    @classmethod
    def _per_image(cls, values: list, ndim: int, key: str) -> torch.Tensor:
        """Examples of one image (`ndim` dimensions, or `ndim + 1` with the batch dimension of 1) or of N images
        (`ndim + 1`, or `ndim + 2` with the batch dimension) -> (B, ...) or (B, N_max, ...) zero-padded."""
        tensors = [cls._example(value, ndim + 1, f"features[{i}][{key!r}]", one_image=ndim)
                   for i, value in enumerate(values)]
        shapes = {tuple(tensor.shape[1:]) for tensor in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{key}: examples have different image shapes {sorted(shapes)}")
        if all(len(tensor) == 1 for tensor in tensors):
            return torch.cat(tensors)
        return _pad_and_stack(tensors, 0, left=False)

    @staticmethod
    def _example(value, ndim: int, name: str, one_image: int | None = None) -> torch.Tensor:
        """One example's tensor with `ndim` dimensions: a leading batch dimension of 1 is dropped; with
        `one_image`, a tensor of that many dimensions is one image and gains the image dimension."""
        tensor = torch.as_tensor(np.asarray(value) if isinstance(value, list) else value)
        if tensor.ndim == ndim + 1 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if one_image is not None and tensor.ndim == one_image:
            tensor = tensor[None]
        if tensor.ndim != ndim:
            raise ValueError(f"{name}: expected one example with {ndim} dimensions, got shape {tuple(tensor.shape)}")
        return tensor


__all__ = [
    "MdfMllmProcessor",
    "MdfMllmDataCollator",
    "build_tokenizer",
    "build_default_processor",
]

MdfMllmProcessor.register_for_auto_class("AutoProcessor")
