"""Processor for NaViL: the original chat prompt format, image-token expansion, tokenisation and reply decoding."""

import json
from typing import Optional, Sequence, Union

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_navil import NaViLConfig
from .image_processing_navil import NaViLImageProcessor

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_LINE_BREAK_TOKEN = "<IMG_LINE_BREAK>"
IMG_FRAME_BREAK_TOKEN = "<IMG_FRAME_BREAK>"
END_OF_TURN_TOKEN = "<|im_end|>"

# The special tokens of the NaViL tokenizers, in the order the original appends them.
NAVIL_SPECIAL_TOKENS = [
    "<|im_start|>",
    END_OF_TURN_TOKEN,
    "<|endoftext|>",
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<img_uncond>",
    "<think>",
    "</think>",
]

DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

# Role strings of the original conversation templates (MPT separator style: no newline after the separator).
CHAT_TEMPLATES = {
    "internlm2-chat": {
        "system": "<|im_start|>system\n",
        "user": "<|im_start|>user\n",
        "assistant": "<|im_start|>assistant\n",
        "separator": END_OF_TURN_TOKEN,
    },
    "qwen3-chat": {
        "system": "<|im_start|>system\n",
        "user": "<|im_start|>user\n",
        "assistant": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "separator": END_OF_TURN_TOKEN,
    },
}

# Leftovers of a partially generated end-of-turn token that the original strips from replies, in this order.
_REPLY_DEBRIS = ("<|im_end|", "<|im_end", "<|im")


def clean_reply(text: str) -> str:
    """The original `chat()`'s reply clean-up of decoded text: keep what precedes `<|im_end|>`, strip, and remove
    leftovers of a partial `<|im_end|>`."""
    text = text.split(END_OF_TURN_TOKEN)[0].strip()
    for debris in _REPLY_DEBRIS:
        text = text.replace(debris, "")
    return text


def add_navil_special_tokens(tokenizer) -> int:
    """Adds the NaViL special tokens that `tokenizer` lacks (as special tokens) and returns how many were added."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in NAVIL_SPECIAL_TOKENS if token not in vocab]
    if not missing:
        return 0
    return tokenizer.add_tokens(missing, special_tokens=True)


def check_history(history) -> None:
    """Raises a `ValueError` naming the problem unless `history` is `None` or a list of (question, answer) pairs of
    strings (or `None`)."""
    if history is None:
        return
    if not isinstance(history, (list, tuple)):
        raise ValueError(
            f"history must be a list of (question, answer) pairs, got {type(history).__name__}; pass the history "
            "returned by chat(..., return_history=True), or None."
        )
    for index, turn in enumerate(history):
        if isinstance(turn, dict):
            raise ValueError(
                f"history[{index}] is a dict; history holds (question, answer) string pairs. For role/content "
                "messages use processor.apply_chat_template(messages) instead."
            )
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(
                f"history[{index}] must be a (question, answer) pair, got {turn!r:.80}; pass the history returned "
                "by chat(..., return_history=True)."
            )
        for part, text in zip(("question", "answer"), turn):
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"The {part} of history[{index}] must be a string, got {type(text).__name__}; convert it to text."
                )


def _jinja_string(value: str) -> str:
    """`value` as a Jinja string literal."""
    return json.dumps(value, ensure_ascii=False)


def build_chat_template(template: str, system_message: Optional[str] = None) -> str:
    """Jinja chat template rendering transformers-format messages exactly as `NaViLProcessor.build_prompt`.

    Image blocks of a message become `<image>\\n` before its text (like the original's automatic prefix); a leading
    "system" message replaces the system message; an empty message renders as its bare role, as in the original.
    """
    roles = CHAT_TEMPLATES[template]
    system_message = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
    user, assistant = _jinja_string(roles["user"]), _jinja_string(roles["assistant"])
    separator = _jinja_string(roles["separator"])
    image = _jinja_string(IMAGE_PLACEHOLDER + "\n")
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{- content -}}"
        "{%- elif content is iterable -%}"
        "{%- for block in content if block['type'] == 'image' -%}{{- " + image + " -}}{%- endfor -%}"
        "{%- for block in content if block['type'] == 'text' -%}{{- block['text'] -}}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- set ns = namespace(system=" + _jinja_string(system_message) + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = render(messages[0]['content']) -%}"
        "{%- endif -%}"
        "{{- " + _jinja_string(roles["system"]) + " ~ ns.system ~ " + separator + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{%- set role = " + user + " -%}"
        "{%- elif message['role'] == 'assistant' -%}{%- set role = " + assistant + " -%}"
        "{%- elif message['role'] == 'system' and loop.first -%}{%- set role = none -%}"
        "{%- else -%}{{- raise_exception('NaViL chats take user and assistant messages after an optional first "
        "system message, got role ' ~ message['role']) -}}"
        "{%- endif -%}"
        "{%- if role is not none -%}"
        "{%- set text = render(message['content']) -%}"
        "{%- if text -%}{{- role ~ text ~ " + separator + " -}}{%- else -%}{{- role -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + assistant + " -}}{%- endif -%}"
    )


def load_navil_tokenizer(pretrained_model_name_or_path, **kwargs):
    """`AutoTokenizer.from_pretrained` on a NaViL folder or Hub id without asking for remote code: `AutoTokenizer`
    reads the folder's config first, and registering this module's `NaViLConfig` for its model type lets it resolve
    that config (the tokenizer itself is a standard one)."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.register(NaViLConfig.model_type, NaViLConfig, exist_ok=True)
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)


class NaViLProcessor(ProcessorMixin):
    r"""
    Processor of NaViL: a tokenizer and a [`NaViLImageProcessor`], plus the prompt format of the original `chat()`.

    Prompts use the original MPT-style templates ("internlm2-chat" or "qwen3-chat"): `<|im_start|>role\n` headers,
    `<|im_end|>` separators with no newline after them. Each `<image>` placeholder in a text is expanded into the
    image's tokens (`<img>`, per scale and merged row `<IMG_CONTEXT>` tokens and `<IMG_LINE_BREAK>`, a
    `<IMG_FRAME_BREAK>` per scale, `</img>`); the model puts its image features on the `<IMG_CONTEXT>` positions.

    Args:
        image_processor ([`NaViLImageProcessor`], *optional*):
            The image processor; a default one (multi-scale) when omitted.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer; it must know the NaViL special tokens (see [`add_navil_special_tokens`]).
        chat_template (`str`, *optional*):
            Jinja template for `apply_chat_template`; by default the one matching `template` and `system_message`.
        template (`str`, *optional*, defaults to `"internlm2-chat"`):
            Conversation template of the checkpoint: `"internlm2-chat"` or `"qwen3-chat"`.
        system_message (`str`, *optional*):
            System message of the prompts; `None` means the templates' default ([`DEFAULT_SYSTEM_MESSAGE`]).
    """

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        template: str = "internlm2-chat",
        system_message: Optional[str] = None,
        **kwargs,
    ):
        if template not in CHAT_TEMPLATES:
            raise ValueError(f"Unknown NaViL template {template!r}; use one of {sorted(CHAT_TEMPLATES)}.")
        if tokenizer is None:
            raise ValueError("NaViLProcessor needs a tokenizer (e.g. AutoTokenizer.from_pretrained(checkpoint)).")
        self.template = template
        self.system_message = system_message
        if image_processor is None:
            image_processor = NaViLImageProcessor()
        if chat_template is None:
            chat_template = build_chat_template(template, system_message)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Loads the sub-processors: the sibling [`NaViLImageProcessor`] class directly (so that a plain
        `NaViLProcessor.from_pretrained` needs no remote code for it) and the tokenizer with `load_navil_tokenizer`."""
        image_processor = NaViLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = load_navil_tokenizer(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "num_scales"]

    @property
    def roles(self) -> dict[str, str]:
        """Role strings and separator of this processor's template."""
        return CHAT_TEMPLATES[self.template]

    # -- prompts -------------------------------------------------------------------------------------------------

    def build_prompt(
        self,
        question: Optional[str],
        history: Optional[Sequence[tuple[Optional[str], Optional[str]]]] = None,
        num_images: int = 0,
        system_message: Optional[str] = None,
    ) -> str:
        """The prompt the original `chat()` builds, before image expansion.

        Args:
            question (`str`): The new user message.
            history (`list[tuple[str, str]]`, *optional*): Earlier (question, answer) pairs.
            num_images (`int`): Number of images of the question. When `history` is `None` (not merely empty) and
                the question has no `<image>`, `"<image>\\n" * num_images` is prefixed to it, as in the original.
            system_message (`str`, *optional*): Overrides the processor's system message for this prompt.

        Raises `ValueError` when `question` is not a string (or `None`) or `history` is not a list of
        (question, answer) pairs of strings (or `None`, rendered as a bare role like empty strings).
        """
        if question is not None and not isinstance(question, str):
            raise ValueError(f"The question must be a string, got {type(question).__name__}.")
        check_history(history)
        roles = self.roles
        if system_message is None:
            system_message = DEFAULT_SYSTEM_MESSAGE if self.system_message is None else self.system_message
        if history is None and num_images and IMAGE_PLACEHOLDER not in (question or ""):
            question = f"{IMAGE_PLACEHOLDER}\n" * num_images + (question or "")
        turns = []
        for old_question, old_answer in history or []:
            turns += [(roles["user"], old_question), (roles["assistant"], old_answer)]
        turns += [(roles["user"], question), (roles["assistant"], None)]
        prompt = roles["system"] + system_message + roles["separator"]
        for role, message in turns:
            prompt += role + message + roles["separator"] if message else role
        return prompt

    def expand_image_placeholders(
        self,
        text: str,
        image_grid_thw: Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]]],
        num_scales: Union[torch.Tensor, np.ndarray, Sequence[int]],
        merge_size: Optional[int] = None,
    ) -> str:
        """Replaces the `<image>` placeholders of `text`, in order, by the tokens of each image.

        Args:
            text (`str`): Prompt with one `<image>` per image.
            image_grid_thw (`[image_scales, 3]`): (t, h, w) patch grids of all scales of all images, smallest scale
                first per image (as returned by the image processor).
            num_scales (`[images]`): Number of scales of each image.
            merge_size (`int`, *optional*): Patches merged per side into one token; the image processor's by default.
        """
        merge = self.image_processor.merge_size if merge_size is None else merge_size
        grids = torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64)).view(-1, 3).tolist()
        scales = torch.as_tensor(np.asarray(num_scales, dtype=np.int64)).view(-1).tolist()
        if sum(scales) != len(grids):
            raise ValueError(
                f"num_scales adds up to {sum(scales)} image-scales but image_grid_thw has {len(grids)} rows; pass the "
                "image processor's outputs together."
            )
        pieces = text.split(IMAGE_PLACEHOLDER)
        found = len(pieces) - 1
        if found != len(scales):
            raise ValueError(
                f"found {found} {IMAGE_PLACEHOLDER} placeholder{'s' if found != 1 else ''} in the text but "
                f"{len(scales)} image{' was' if len(scales) == 1 else 's were'} given; put exactly one "
                f"{IMAGE_PLACEHOLDER} per image in the text, in image order (build_prompt(question, num_images=...) "
                "adds them), or pass as many images as placeholders."
            )
        expanded, row = [pieces[0]], 0
        for image_index, count in enumerate(scales):
            expanded.append(self._image_tokens(grids[row : row + count], merge, image_index))
            expanded.append(pieces[image_index + 1])
            row += count
        return "".join(expanded)

    @staticmethod
    def _image_tokens(grids: list[list[int]], merge: int, image_index: int) -> str:
        """`<img>`, then per scale and frame one line of `<IMG_CONTEXT>` per merged row and a frame break, `</img>`."""
        tokens = [IMG_START_TOKEN]
        for frames, height, width in grids:
            if height % merge or width % merge:
                raise ValueError(
                    f"Image {image_index} has a {height}x{width} patch grid, not a multiple of merge_size={merge}; "
                    "use grids from the NaViL image processor with the model's merge size."
                )
            line = IMG_CONTEXT_TOKEN * (width // merge) + IMG_LINE_BREAK_TOKEN
            tokens.append((line * (height // merge) + IMG_FRAME_BREAK_TOKEN) * frames)
        tokens.append(IMG_END_TOKEN)
        return "".join(tokens)

    # -- encoding ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text: Optional[Union[str, list[str]]] = None,
        padding_side: str = "left",
        return_tensors="pt",
        multiscale: Optional[bool] = None,
        min_pixels: Optional[float] = None,
        max_pixels: Optional[float] = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Tokenises prompts, expanding their `<image>` placeholders, and preprocesses the images.

        Args:
            images (*optional*):
                The images, in placeholder order: one image, a flat list over all texts, or one list per text (as
                `apply_chat_template` and the pipeline pass them). Anything [`NaViLImageProcessor`] accepts, paths and
                URLs included. Without images, `<image>` in a text stays literal text (as in the original text chat).
            text (`str` or `list[str]`):
                Prompts (e.g. from [`~NaViLProcessor.build_prompt`]) with one `<image>` per image. With images, a
                text that already contains `<IMG_CONTEXT>` is refused (its features would land on the wrong tokens).
            padding_side (`str`, *optional*, defaults to `"left"`):
                Side of the padding of shorter prompts (`"left"` for generation). The pad id is the tokenizer's pad
                token, else its eos token.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                Tensor type of the outputs.
            multiscale, min_pixels, max_pixels (*optional*):
                Per-call overrides of the image processor's settings.
            kwargs:
                Passed to the tokenizer (e.g. `add_special_tokens`). Prompts are always padded to the longest one.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` and, with images, `pixel_values`, `image_grid_thw` and
            `num_scales`.
        """
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"NaViL takes text and images only; got {modality}.")
        images_kwargs = kwargs.pop("images_kwargs", None) or {}
        kwargs.update(kwargs.pop("text_kwargs", None) or {})
        kwargs.pop("padding", None)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if text is None:
            raise ValueError(
                "NaViLProcessor needs text with one <image> per image (see build_prompt); for images alone call "
                "processor.image_processor(images)."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(item, str) for item in texts):
            raise ValueError("text must be a string or a list of strings.")

        data = {}
        if images is not None:
            for index, item in enumerate(texts):
                if IMG_CONTEXT_TOKEN in item:
                    raise ValueError(
                        f"text {index} already contains {IMG_CONTEXT_TOKEN}, the token reserved for image features; "
                        f"mark each image with {IMAGE_PLACEHOLDER} (expanded here), or pass an already expanded text "
                        "without images."
                    )
            per_text = self._images_per_text(images, [item.count(IMAGE_PLACEHOLDER) for item in texts])
            image_kwargs = {"multiscale": multiscale, "min_pixels": min_pixels, "max_pixels": max_pixels}
            image_kwargs.update(images_kwargs)
            image_inputs = self.image_processor(
                [image for group in per_text for image in group], return_tensors="pt", **image_kwargs
            )
            grids, scales = image_inputs["image_grid_thw"], image_inputs["num_scales"]
            offsets = torch.cat([scales.new_zeros(1), scales.cumsum(0)]).tolist()
            expanded, first = [], 0
            for item, group in zip(texts, per_text):
                last = first + len(group)
                item_grids = grids[offsets[first] : offsets[last]]
                expanded.append(self.expand_image_placeholders(item, item_grids, scales[first:last]))
                first = last
            texts = expanded
            data.update(image_inputs)

        kwargs.setdefault("return_token_type_ids", False)
        encoded = self.tokenizer(texts, **kwargs)
        padded = self._pad(encoded["input_ids"], padding_side)
        if return_tensors is not None:  # int64 even when every prompt is empty
            padded = {key: torch.tensor(value, dtype=torch.long) for key, value in padded.items()}
        data.update(padded)
        if return_tensors != "pt":
            data = {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _images_per_text(images, counts: list[int]) -> list[list]:
        """Splits `images` (one image, a flat list, or one list per text) into one list per text."""
        if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(counts):
                raise ValueError(
                    f"Got {len(images)} image lists for {len(counts)} texts; pass one list per text or a flat list "
                    "of images in placeholder order."
                )
            for index, (group, count) in enumerate(zip(images, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"found {count} {IMAGE_PLACEHOLDER} placeholders in text {index} but {len(group)} images were "
                        f"given for it; put exactly one {IMAGE_PLACEHOLDER} per image in each text."
                    )
            return [list(group) for group in images]
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if any(isinstance(item, (list, tuple)) for item in flat):
            raise ValueError("images mixes single images and lists; pass a flat list or one list per text.")
        total = sum(counts)
        if len(flat) != total:
            raise ValueError(
                f"found {total} {IMAGE_PLACEHOLDER} placeholder{'s' if total != 1 else ''} in the text but "
                f"{len(flat)} image{' was' if len(flat) == 1 else 's were'} given; put exactly one "
                f"{IMAGE_PLACEHOLDER} per image in the text, in image order (build_prompt(question, num_images=...) "
                "adds them), or pass as many images as placeholders."
            )
        per_text, start = [], 0
        for count in counts:
            per_text.append(flat[start : start + count])
            start += count
        return per_text

    def _pad(self, input_ids: list[list[int]], padding_side: str) -> dict[str, list[list[int]]]:
        """Pads token id lists to the longest one; returns `input_ids` and `attention_mask`."""
        longest = max((len(ids) for ids in input_ids), default=0)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None and any(len(ids) != longest for ids in input_ids):
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad prompts of different lengths.")
        padded, masks = [], []
        for ids in input_ids:
            fill = longest - len(ids)
            ids, mask = list(ids), [1] * len(ids)
            if padding_side == "left":
                padded.append([pad_id] * fill + ids)
                masks.append([0] * fill + mask)
            else:
                padded.append(ids + [pad_id] * fill)
                masks.append(mask + [0] * fill)
        return {"input_ids": padded, "attention_mask": masks}

    # -- decoding ------------------------------------------------------------------------------------------------

    @staticmethod
    def _rows(token_ids) -> tuple[list[list[int]], bool]:
        """Token ids as a list of rows, and whether the input was a single sequence."""
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            token_ids = token_ids.tolist()
        token_ids = list(token_ids)
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return [list(row) for row in token_ids], False
        return [token_ids], True

    def decode_reply(self, token_ids) -> Union[str, list[str]]:
        """Generated token ids → reply text, as the original `chat()`: decode without special tokens, keep what comes
        before `<|im_end|>`, strip, and remove leftovers of a partial `<|im_end|>`.

        Returns a string for one sequence and a list of strings for a batch ([batch, new_tokens]).
        """
        rows, single = self._rows(token_ids)
        replies = [clean_reply(text) for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        return replies[0] if single else replies

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated sequences (prompt + new tokens), as the `image-text-to-text` pipeline needs.

        The text after the prompt's last assistant header gets the reply clean-up of [`~NaViLProcessor.decode_reply`]
        (with `skip_special_tokens`), so the pipeline's replies equal `chat()`'s; the prompt part is decoded as is.
        Returns a string for one sequence and a list of strings for a batch.
        """
        header = self.tokenizer(self.roles["assistant"], add_special_tokens=False)["input_ids"]
        rows, single = self._rows(generated_outputs)
        texts = []
        for row in rows:
            start = _find_last(row, header)
            if start is None:
                texts.append(self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens, **kwargs))
                continue
            prompt, reply = row[: start + len(header)], row[start + len(header) :]
            text = self.tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens, **kwargs)
            if skip_special_tokens:
                text += self.decode_reply(reply)
            else:
                text += self.tokenizer.decode(reply, skip_special_tokens=False, **kwargs)
            texts.append(text)
        return texts[0] if single else texts


def _find_last(sequence: list[int], pattern: list[int]) -> Optional[int]:
    """Start of the last occurrence of `pattern` in `sequence`, or None."""
    size = len(pattern)
    if not size:
        return None
    for start in range(len(sequence) - size, -1, -1):
        if sequence[start : start + size] == pattern:
            return start
    return None


NaViLProcessor.register_for_auto_class()
