"""Processor for NaViL: the original chat prompt format, image-token expansion, tokenisation and reply decoding."""

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .checks_navil import (
    check_model_folder,
    check_num_scales,
    check_placeholder_count,
    check_saved_special_token_ids,
    check_special_token_ids,
    check_tokenizer_folder,
)
from .compat_navil import (
    PROCESSOR_NAMES_SUBPROCESSOR_CLASSES,
    make_saved_processor_portable,
    register_image_processor,
    register_processor_for_pipelines,
)
from .configuration_navil import (
    END_OF_TURN_TOKEN,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
    NAVIL_SPECIAL_TOKENS,
    NaViLConfig,
    write_model_card,
)

# transformers 4.x copies only the files that the loaded remote module imports itself: import every Hub file it needs.
from .errors_navil import NaViLInputError
from .image_loading_navil import NaViLImageLoader  # noqa: F401
from .image_processing_navil import NaViLImageProcessor, NaViLImageProcessorKwargs
from .image_processing_navil_fast import NaViLImageProcessorFast, wants_fast_image_processor
from .layouts_navil import LAYOUTS  # noqa: F401

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

# What the template and `render_conversation` say of a message of another role (its role follows).
ROLE_ORDER_ERROR = "NaViL chats take user and assistant messages after an optional first system message, got role "

# Keys under which an image content block of a chat message holds its image (as transformers reads them).
_IMAGE_SOURCES = ("image", "url", "path", "base64")
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


def check_texts(text) -> list[str]:
    """`text` (a string or a non-empty list of strings, all valid Unicode) as a list; else a `ValueError` naming the
    problem."""
    if not isinstance(text, (str, list, tuple)):
        raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}.")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("text is an empty list; pass at least one prompt.")
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(f"text {index} must be a string, got {type(item).__name__}.")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as error:
            raise NaViLInputError(
                f"text {index} is not valid Unicode: it holds the lone surrogate {item[error.start]!r} at position "
                f"{error.start}; remove it, or decode the source text with errors='replace'.",
                "text is not valid Unicode",
            ) from None
    return texts


def _as_dicts(value):
    """Message objects (dataclasses, pydantic models), nested in lists and dicts, as the dicts transformers renders
    them as; other values unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    elif callable(getattr(value, "model_dump", None)):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {key: _as_dicts(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_dicts(item) for item in value)
    return value


def check_conversations(conversation, tokenize: bool = True) -> None:
    """Raises a `ValueError` naming the problem unless `conversation` is a non-empty list of role/content messages
    (dicts, or message objects such as dataclasses) or a non-empty list of such lists, whose content blocks the NaViL
    chat template renders faithfully: every block has a `"type"`, text blocks hold a string, and, when the result is
    tokenized (the images are then read from the blocks), image blocks name their image (`image`, `url`, `path` or
    `base64`). Rendered as text, a bare `{"type": "image"}` block is the `<image>` placeholder of an image passed
    later to `processor(images=..., text=prompt)`."""
    conversation = _as_dicts(conversation)
    batched = isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple))
    batch = conversation if batched else [conversation]
    if not isinstance(conversation, (list, tuple)) or not conversation or not all(batch):
        raise ValueError(
            "apply_chat_template needs a non-empty list of messages (or a list of such lists), e.g. "
            "[{'role': 'user', 'content': 'Hello'}]."
        )
    for messages in batch:
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}.")
            content = message.get("content")
            if not isinstance(content, (str, list, tuple)):
                raise ValueError(
                    f"message {index} has content {content!r:.40}; it needs a string or a list of {{'type': ...}} "
                    "blocks (without it the turn would render unterminated)."
                )
            for block in content if isinstance(content, (list, tuple)) else ():
                kind = block.get("type") if isinstance(block, Mapping) else None
                where = f"message {index} has the content block {block!r:.80}"
                if kind == "text" and not isinstance(block.get("text"), str):
                    raise ValueError(f"{where}: a text block needs a string under 'text'.")
                if kind == "image" and tokenize and all(block.get(key) is None for key in _IMAGE_SOURCES):
                    raise ValueError(
                        f"{where}: with tokenize=True an image block needs the image under one of "
                        f"{', '.join(_IMAGE_SOURCES)}; without it the image would be dropped and <image> left as text. "
                        "Or render the prompt with tokenize=False and call processor(images=..., text=prompt)."
                    )
                if kind == "image_url" and not block.get("image_url"):
                    raise ValueError(f"{where}: an image_url block needs its URL under 'image_url'.")
                if kind not in ("text", "image", "image_url"):
                    raise ValueError(
                        f"{where}: NaViL chats take blocks of type 'text' or 'image' (every block needs a 'type'), so "
                        "this block would be dropped."
                    )


def render_content(content) -> str:
    """The text of a message's content as the chat template renders it: a string as is; for a list of blocks, one
    `<image>\\n` per image block (like the original's automatic prefix), then the text blocks joined."""
    if isinstance(content, str):
        return content
    blocks = [block for block in content or () if isinstance(block, Mapping)]
    images = sum(block.get("type") == "image" for block in blocks)
    return f"{IMAGE_PLACEHOLDER}\n" * images + "".join(
        block["text"] for block in blocks if block.get("type") == "text"
    )


def image_processor_of(config: NaViLConfig, multiscale: bool = True) -> NaViLImageProcessor:
    """The image processor of a NaViL config: its patch and merge sizes, pixel limits and scale ratio."""
    patch = config.vision_config.patch_size
    return NaViLImageProcessor(
        patch_size=patch,
        merge_size=config.vision_config.merge_size,
        min_pixels=config.min_dynamic_patch * patch * patch,
        max_pixels=config.max_dynamic_patch * patch * patch,
        scale_downsample_ratio=config.scale_downsample_ratio,
        multiscale=multiscale,
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
        "{%- else -%}{{- raise_exception(" + _jinja_string(ROLE_ORDER_ERROR) + " ~ message['role']) -}}"
        "{%- endif -%}"
        "{%- if role is not none -%}"
        "{%- set text = render(message['content']) -%}"
        "{%- if text -%}{{- role ~ text ~ " + separator + " -}}{%- else -%}{{- role -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + assistant + " -}}{%- endif -%}"
    )


# README.md written next to a saved processor: the Hub model card ({name} is the folder's name).
def load_navil_tokenizer(pretrained_model_name_or_path, **kwargs):
    """`AutoTokenizer.from_pretrained` on a NaViL folder or Hub id without asking for remote code: `AutoTokenizer`
    reads the folder's config first, and registering this module's `NaViLConfig` for its model type lets it resolve
    that config (the tokenizer itself is a standard one)."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_folder(pretrained_model_name_or_path)
    if Path(str(pretrained_model_name_or_path)).is_dir():
        check_tokenizer_folder(Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or ""))
    AutoConfig.register(NaViLConfig.model_type, NaViLConfig, exist_ok=True)
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)


def image_block_tokens(grids: list[list[int]], merge: int, image_index: int = 0) -> list[str]:
    """The tokens of one image in the prompt, given the (t, h, w) patch grids of its scales: `<img>`, then per scale
    and frame one line of `<IMG_CONTEXT>` per merged row, each line ending in a line break, and a frame break; `</img>`.
    """
    tokens = [IMG_START_TOKEN]
    for frames, height, width in grids:
        if height % merge or width % merge:
            raise ValueError(
                f"Image {image_index} has a {height}x{width} patch grid, not a multiple of merge_size={merge}; "
                "use grids from the NaViL image processor with the model's merge size."
            )
        line = [IMG_CONTEXT_TOKEN] * (width // merge) + [IMG_LINE_BREAK_TOKEN]
        tokens += (line * (height // merge) + [IMG_FRAME_BREAK_TOKEN]) * frames
    return tokens + [IMG_END_TOKEN]


class NaViLProcessorKwargs(ProcessingKwargs, total=False):
    """Call settings of [`NaViLProcessor`], flat or nested per modality (`text_kwargs`, `images_kwargs`): the
    tokenizer's text settings and [`NaViLImageProcessorKwargs`]. Prompts are padded on the left to the longest one
    and come back as torch tensors unless the call (or the tokenizer it was built with) says otherwise."""

    images_kwargs: NaViLImageProcessorKwargs
    _defaults = {
        "text_kwargs": {"padding": "longest", "padding_side": "left", "return_token_type_ids": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


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
            The tokenizer; it must know the NaViL special tokens (see [`add_navil_special_tokens`]). It is set to pad
            on the left, as batched generation needs (the pipeline pads batches with it).
        chat_template (`str`, *optional*):
            Jinja template for `apply_chat_template`; by default the one matching `template` and `system_message`.
        template (`str`, *optional*, defaults to `"internlm2-chat"`):
            Conversation template of the checkpoint: `"internlm2-chat"` or `"qwen3-chat"`.
        system_message (`str`, *optional*):
            System message of the prompts; `None` means the templates' default ([`DEFAULT_SYSTEM_MESSAGE`]).
    """

    attributes = ["image_processor", "tokenizer"]
    if PROCESSOR_NAMES_SUBPROCESSOR_CLASSES:  # 4.x; 5.x maps the config to the image processor (end of this file)
        # the Auto names check the base classes: NaViLImageProcessor may come both from navil and from a folder's copy
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
    valid_processor_kwargs = NaViLProcessorKwargs
    image_token = IMAGE_PLACEHOLDER  # the text marking one image, expanded into its tokens

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`, refusing a tokenizer whose ids of the NaViL special tokens disagree with
        the `special_token_ids` of the folder's model config."""
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        check_saved_special_token_ids(folder, processor.tokenizer)
        return processor

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
        tokenizer = copy.copy(tokenizer)  # padded on the left here; the caller's tokenizer keeps its settings
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_model_config(cls, config: NaViLConfig, tokenizer, multiscale: bool = True, **kwargs) -> "NaViLProcessor":
        """The processor of a NaViL config: the image processor of its patch/merge sizes and pixel limits
        ([`image_processor_of`]), its template and system message. `tokenizer` is left unchanged (the processor
        holds a copy); `kwargs` go to the constructor. Refuses `config.special_token_ids` that disagree with
        `tokenizer`."""
        check_special_token_ids(config.special_token_ids, tokenizer)
        return cls(
            image_processor=image_processor_of(config, multiscale=multiscale),
            tokenizer=tokenizer,
            template=config.template,
            system_message=config.system_message,
            **kwargs,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, in files that every supported transformers release reads (see
        [`make_saved_processor_portable`]), plus a model card (README.md) unless the folder has one."""
        push_to_hub = kwargs.pop("push_to_hub", False)
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        vars(self).pop("auto_map", None)  # written to the folder; saving leaves the processor unchanged
        make_saved_processor_portable(save_directory)
        write_model_card(save_directory)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", Path(save_directory).name), **kwargs)
        return saved

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # `push_to_hub` has just put transformers' generic card (or the repo's) there; the card names the repo
        write_model_card(working_dir, name=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Loads the sub-processors: the sibling [`NaViLImageProcessor`] class, or [`NaViLImageProcessorFast`] under
        `use_fast=True`, `backend="torchvision"` or transformers' default for these, directly (so that a plain
        `NaViLProcessor.from_pretrained` needs no remote code for it) and the tokenizer with `load_navil_tokenizer`."""
        fast = wants_fast_image_processor(kwargs.get("use_fast"), kwargs.get("backend"))
        image_processor_class = NaViLImageProcessorFast if fast else NaViLImageProcessor
        image_processor = image_processor_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = load_navil_tokenizer(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "num_scales"]

    @property
    def roles(self) -> dict[str, str]:
        """Role strings and separator of this processor's template."""
        return CHAT_TEMPLATES[self.template]

    def apply_chat_template(self, conversation, *args, **kwargs):
        """`ProcessorMixin.apply_chat_template`, refusing first what the template would render wrongly: an empty
        conversation, a content block without a `"type"` (dropped) and, with `tokenize=True`, an image block that
        does not say where its image is (rendered as `<image>` text with no image); see `check_conversations`. With
        `tokenize=False` (the default) a bare `{"type": "image"}` block renders as the `<image>` placeholder, for
        `processor(images=..., text=prompt)`."""
        check_conversations(conversation, tokenize=kwargs.get("tokenize", False))
        return super().apply_chat_template(conversation, *args, **kwargs)

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
        if history is None and num_images and IMAGE_PLACEHOLDER not in (question or ""):
            question = f"{IMAGE_PLACEHOLDER}\n" * num_images + (question or "")
        turns = []
        for old_question, old_answer in history or []:
            turns += [("user", old_question), ("assistant", old_answer)]
        turns += [("user", question), ("assistant", None)]
        prompt = self._system_header(system_message)
        for role, message in turns:
            prompt += self._render_message(roles[role], message)
        return prompt

    def render_conversation(self, messages, add_generation_prompt: bool = False) -> str:
        """Transformers-format messages as text, as the chat template renders them (one renderer, the template
        proven equal to it in tests/test_prompt_format.py): an optional first system message replaces the system
        message, then each user and assistant message is its role, its content (see [`render_content`]) and the
        separator (an empty message is its bare role); `add_generation_prompt` appends the assistant header."""
        check_conversations(messages, tokenize=False)
        messages = _as_dicts(list(messages))
        system_message = None
        if messages[0]["role"] == "system":
            system_message, messages = render_content(messages[0]["content"]), messages[1:]
        turns = []
        for message in messages:
            if message["role"] not in ("user", "assistant"):
                raise ValueError(ROLE_ORDER_ERROR + str(message["role"]))
            turns.append((message["role"], render_content(message["content"])))
        if add_generation_prompt:
            turns.append(("assistant", None))
        prompt = self._system_header(system_message)
        return prompt + "".join(self._render_message(self.roles[role], text) for role, text in turns)

    def turn_prompts(self, questions: Sequence[str], num_images: int = 0, system_message: Optional[str] = None):
        """The text a conversation adds before each of its answers, as `chat()` builds it turn by turn:
        `build_prompt` for the first question (with `num_images`), `next_turn_prompt` for each later one. Each
        prompt, followed by its answer and the separator, adds up to [`~NaViLProcessor.render_conversation`]."""
        first, *later = questions
        prompts = [self.build_prompt(first, num_images=num_images, system_message=system_message)]
        return prompts + [self.next_turn_prompt(question) for question in later]

    def next_turn_prompt(self, question: str) -> str:
        """What a conversation adds for a new `question` after the previous answer and its separator: the user
        message and the assistant header. `build_prompt(question, history)` is the prompt of the first question,
        then for each later question the previous answer, the separator and this text."""
        return self._render_message(self.roles["user"], question) + self.roles["assistant"]

    def _system_header(self, system_message: Optional[str]) -> str:
        """The system turn a prompt starts with: `system_message`, else the processor's, else the default one."""
        if system_message is None:
            system_message = DEFAULT_SYSTEM_MESSAGE if self.system_message is None else self.system_message
        return self.roles["system"] + system_message + self.roles["separator"]

    def _render_message(self, role: str, message: Optional[str]) -> str:
        """One message of a prompt: its role, the message and the separator; an empty message is its bare role."""
        return role + message + self.roles["separator"] if message else role

    def expand_image_placeholders(
        self,
        text: str,
        image_grid_thw: Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]]],
        num_scales: Union[torch.Tensor, np.ndarray, Sequence[int]],
        merge_size: Optional[int] = None,
        return_offsets: bool = False,
    ) -> Union[str, tuple[str, list[dict]]]:
        """Replaces the `<image>` placeholders of `text`, in order, by the tokens of each image.

        Args:
            text (`str`): Prompt with one `<image>` per image.
            image_grid_thw (`[image_scales, 3]`): (t, h, w) patch grids of all scales of all images, smallest scale
                first per image (as returned by the image processor).
            num_scales (`[images]`): Number of scales of each image.
            merge_size (`int`, *optional*): Patches merged per side into one token; the image processor's by default.
            return_offsets (`bool`, *optional*): Also return where each placeholder was, as transformers' processors
                report `text_replacement_offsets`: per image a dict with `type`, `span` (in `text`), `new_span` (in
                the result), `text` and `replacement`.
        """
        merge = self.image_processor.merge_size if merge_size is None else merge_size
        grids = torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64)).view(-1, 3).tolist()
        scales = torch.as_tensor(np.asarray(num_scales, dtype=np.int64)).view(-1).tolist()
        check_num_scales(scales, grids)
        check_placeholder_count(text.count(IMAGE_PLACEHOLDER), len(scales))
        expanded, offsets = self._expand(text, grids, scales, merge)
        return (expanded, offsets) if return_offsets else expanded

    def _expand(self, text: str, grids: list, scales: list, merge: int) -> tuple[str, list[dict]]:
        """`expand_image_placeholders` of checked inputs: one `<image>` per image, `scales` adding up to `grids`."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        expanded, offsets, row = [pieces[0]], [], 0
        start, new_start = len(pieces[0]), len(pieces[0])
        for image_index, count in enumerate(scales):
            replacement = self._image_tokens(grids[row : row + count], merge, image_index)
            offsets.append(
                {
                    "type": "image",
                    "span": (start, start + len(IMAGE_PLACEHOLDER)),
                    "new_span": (new_start, new_start + len(replacement)),
                    "text": IMAGE_PLACEHOLDER,
                    "replacement": replacement,
                }
            )
            expanded.extend((replacement, pieces[image_index + 1]))
            start += len(IMAGE_PLACEHOLDER) + len(pieces[image_index + 1])
            new_start += len(replacement) + len(pieces[image_index + 1])
            row += count
        return "".join(expanded), offsets

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The tokens that replace the `image_idx`-th `<image>`, given the image processor's outputs for all images
        (`image_grid_thw` and `num_scales`)."""
        scales = torch.as_tensor(image_inputs["num_scales"]).view(-1).tolist()
        first = sum(scales[:image_idx])
        grids = torch.as_tensor(image_inputs["image_grid_thw"]).view(-1, 3)[first : first + scales[image_idx]].tolist()
        return self._image_tokens(grids, self.image_processor.merge_size, image_idx)

    @staticmethod
    def _image_tokens(grids: list[list[int]], merge: int, image_index: int) -> str:
        return "".join(image_block_tokens(grids, merge, image_index))

    # -- encoding ------------------------------------------------------------------------------------------------

    def __call__(
        self, images: Optional[ImageInput] = None, text: Optional[Union[str, list[str]]] = None, **kwargs
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
            kwargs ([`NaViLProcessorKwargs`], *optional*):
                Flat or nested per modality (`text_kwargs`, `images_kwargs`, `common_kwargs`), e.g.
                `padding_side` (`"left"` by default, for generation), `padding` (`"longest"` by default,
                `"max_length"` with `max_length`, or `False`), `truncation`, `add_special_tokens`, `return_tensors`
                (`"pt"` by default), and the image processor's `multiscale`, `min_pixels`, `max_pixels`,
                `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`. The pad id is the
                tokenizer's pad token, else its eos token.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` and, with images, `pixel_values`, `image_grid_thw` and
            `num_scales`.
        """
        # empty lists are no input: evaluation harnesses (lmms-eval's huggingface model) pass every modality
        for modality in ("videos", "audio", "audios"):
            value = kwargs.pop(modality, None)
            if value is not None and not (isinstance(value, (list, tuple)) and not value):
                raise ValueError(f"NaViL takes text and images only; got {modality}.")
        if isinstance(images, (list, tuple)) and not images:
            images = None
        if text is None:
            raise ValueError(
                "NaViLProcessor needs text with one <image> per image (see build_prompt); for images alone call "
                "processor.image_processor(images)."
            )
        settings = self._merge_kwargs(NaViLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = settings["text_kwargs"], settings["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        # None, passed explicitly, leaves a setting at its default
        padding = text_kwargs.pop("padding", None)
        padding = "longest" if padding is None else padding
        padding_side = text_kwargs.pop("padding_side", None) or "left"
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if text_kwargs.pop("return_mm_token_type_ids", None) or settings.get("return_mm_token_type_ids"):
            raise ValueError("NaViLProcessor does not return mm_token_type_ids; leave return_mm_token_type_ids unset.")
        return_offsets = bool(
            text_kwargs.pop("return_text_replacement_offsets", None) or settings.get("return_text_replacement_offsets")
        )
        if not text_kwargs.get("truncation"):
            text_kwargs.pop("truncation", None)
            max_length = text_kwargs.pop("max_length", None)  # only a padding target without truncation
        else:
            max_length = text_kwargs.get("max_length")
        texts = check_texts(text)

        data, replacement_offsets = {}, [[] for _ in texts]
        if images is not None:
            for index, item in enumerate(texts):
                if IMG_CONTEXT_TOKEN in item:
                    raise NaViLInputError(
                        f"text {index} already contains {IMG_CONTEXT_TOKEN}, the token reserved for image features; "
                        f"mark each image with {IMAGE_PLACEHOLDER} (expanded here), or pass an already expanded text "
                        "without images.",
                        "text contains <IMG_CONTEXT>",
                    )
            per_text = self._images_per_text(images, [item.count(IMAGE_PLACEHOLDER) for item in texts])
            image_inputs = self.image_processor(
                [image for group in per_text for image in group], return_tensors="pt", **images_kwargs
            )
            grids, scales = image_inputs["image_grid_thw"].tolist(), image_inputs["num_scales"].tolist()
            offsets = np.cumsum([0, *scales]).tolist()
            expanded, first = [], 0
            for index, (item, group) in enumerate(zip(texts, per_text)):
                last = first + len(group)
                item_grids = grids[offsets[first] : offsets[last]]
                merge = self.image_processor.merge_size
                item, replacement_offsets[index] = self._expand(item, item_grids, scales[first:last], merge)
                expanded.append(item)
                first = last
            texts = expanded
            data.update(image_inputs)

        encoded = self.tokenizer(texts, **text_kwargs)
        padded = self._pad(encoded["input_ids"], padding_side, padding, max_length, pad_to_multiple_of)
        for key, fill in (("offset_mapping", (0, 0)), ("special_tokens_mask", 1)):
            if key in encoded:  # per-token outputs asked of the tokenizer, padded like the ids
                rows = [
                    (list(row), [fill] * (len(ids) - len(row))) for row, ids in zip(encoded[key], padded["input_ids"])
                ]
                padded[key] = [pad + row if padding_side == "left" else row + pad for row, pad in rows]
        if return_tensors is not None:
            lengths = {len(ids) for ids in padded["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    f"The prompts have different lengths {sorted(lengths)} and padding={padding!r}; pad them "
                    "(padding='longest', the default) or pass return_tensors=None."
                )
            # int64 even when every prompt is empty
            padded = {key: torch.tensor(value, dtype=torch.long) for key, value in padded.items()}
        data.update(padded)
        if return_tensors != "pt":
            data = {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in data.items()}
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets:
            batch["text_replacement_offsets"] = replacement_offsets  # dicts per image: never converted to tensors
        return batch

    @staticmethod
    def _images_per_text(images, counts: list[int]) -> list[list]:
        """Splits `images` (one image, a flat list, or one list per text) into one list per text."""
        if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(counts):
                raise NaViLInputError(
                    f"Got {len(images)} image lists for {len(counts)} texts, but the {IMAGE_PLACEHOLDER} tokens in the "
                    "prompts should be the same as the number of images of each text; pass one list per text or a flat "
                    "list of images in placeholder order.",
                    "placeholder count mismatch",
                )
            for index, (group, count) in enumerate(zip(images, counts)):
                if len(group) != count:
                    raise NaViLInputError(
                        f"found {count} {IMAGE_PLACEHOLDER} placeholders in text {index} but {len(group)} images were "
                        f"given for it; put exactly one {IMAGE_PLACEHOLDER} per image in each text.",
                        "placeholder count mismatch",
                    )
            return [list(group) for group in images]
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if any(isinstance(item, (list, tuple)) for item in flat):
            raise NaViLInputError(
                "images mixes single images and lists; pass a flat list or one list per text.", "images per text"
            )
        check_placeholder_count(sum(counts), len(flat))
        per_text, start = [], 0
        for count in counts:
            per_text.append(flat[start : start + count])
            start += count
        return per_text

    def _pad(
        self,
        input_ids: list[list[int]],
        padding_side: str,
        padding="longest",
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
    ) -> dict[str, list[list[int]]]:
        """Pads token id lists as the tokenizer's `padding` says: to the longest one (`True`/`"longest"`), to
        `max_length` (`"max_length"`; longer lists stay as they are) or not at all (`False`/`"do_not_pad"`), then up
        to a multiple of `pad_to_multiple_of`. Returns `input_ids` and `attention_mask`."""
        strategy = getattr(padding, "value", padding)  # a PaddingStrategy member or its value
        strategy = {True: "longest", False: "do_not_pad"}.get(strategy, strategy)
        if strategy not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}.")
        if strategy == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length; pass e.g. max_length=512.")
        longest = max((len(ids) for ids in input_ids), default=0)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        targets = []
        for ids in input_ids:
            target = longest if strategy == "longest" else len(ids)
            if strategy == "max_length":
                target = max(max_length, len(ids))
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            targets.append(target)
        if pad_id is None and any(len(ids) != target for ids, target in zip(input_ids, targets)):
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad prompts of different lengths.")
        padded, masks = [], []
        for ids, target in zip(input_ids, targets):
            fill = target - len(ids)
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
        check_token_ids(rows)
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


def check_token_ids(rows: list[list]) -> None:
    """Raises a `ValueError` unless every id is a whole number in [0, 2**32) (what tokenizers decode; ids beyond
    the vocabulary decode to nothing)."""
    for row_index, row in enumerate(rows):
        for index, token_id in enumerate(row):
            if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
                raise ValueError(
                    f"token ids must be integers, got {token_id!r:.40} at position {index} of row {row_index}; pass "
                    "the ids generate() returned."
                )
            if not 0 <= token_id < 2**32:
                raise ValueError(
                    f"token id {token_id} at position {index} of row {row_index} is not a token id (ids are in [0, "
                    "vocabulary size)); pass the ids generate() returned."
                )


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
register_image_processor(NaViLConfig, NaViLImageProcessor, NaViLImageProcessorFast)
register_processor_for_pipelines(NaViLConfig, NaViLProcessor)
