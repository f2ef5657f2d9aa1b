"""End-to-end training of NaViL, in miniature: the recipe of the paper that produced the embedded `navil-tiny` model.

1. A small text LLM (transformers' own `Qwen3ForCausalLM`) is pre-trained on the text of the synthetic dataset:
   conversations in the chat format where the scene is stated in words. The Qwen3 layout is used because it is a
   native transformers class (no remote code for the text stage), its per-head q/k RMSNorms keep the attention
   logits of a tiny model trained with a high learning rate in range, and it is the layout of NaViL-9B.
2. `upcycle_from_text_model` copies every text weight into the NaViL language model and into its visual-expert twin
   (`q_proj` → `q_proj_ve`, …, `mlp` → `mlp_ve`), and the text embeddings of the NaViL special tokens into
   `special_token_embedding`, so that the upcycled model computes exactly the text model on text.
3. Stage 1 (captioning): the text weights are frozen; the vision encoder, the connector (`mlp1`), the visual experts
   and `special_token_embedding` learn to caption images.
4. Stage 2 (questions about one shape): everything trains on images with a single shape, each with every question
   its scene allows, with the loss on the answer tokens only. The questions are separate branches after the shared
   image tokens (`collate_question_branches`), so each is computed exactly as `chat()` asks it alone while the image
   is encoded once. Here the answer's attention has one object to find.
5. Stage 3 (questions about 1–3 shapes): the same on the full data, where colours must be bound to shapes and shapes
   ordered from left to right.

Each stage uses AdamW with linear warm-up and cosine decay and gradient clipping. `train_tiny_navil` runs the whole
recipe from `TrainingArguments` (the flags of `navil train`) and saves model, processor and tokenizer with
`save_pretrained`; `evaluate` measures exact-match accuracy per question type on freshly generated questions.
"""

import json
import math
import re
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, get_cosine_schedule_with_warmup

from .configuration_navil import NaViLConfig
from .image_processing_navil import NaViLImageProcessor
from .modeling_navil import SPECIAL_TOKENS, NaViLForConditionalGeneration
from .processing_navil import (
    CHAT_TEMPLATES,
    END_OF_TURN_TOKEN,
    IMAGE_PLACEHOLDER,
    NAVIL_SPECIAL_TOKENS,
    NaViLProcessor,
)
from .synthetic_data import (
    COLORS,
    NUMBER_WORDS,
    OUT_OF_RANGE_SIZES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SIZE_RANGE,
    WORDS,
    ShapesDataset,
)

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = PACKAGE_DIR / "tokenizer"
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "checkpoints" / "navil-tiny"
SYSTEM_MESSAGE = "Answer the question about the image."
TEMPLATE = "qwen3-chat"
PAD_TOKEN = "<|endoftext|>"

# Text modules and their visual-expert twins, as substrings of state-dict keys (Qwen3 and InternLM2 layouts).
EXPERT_TWINS = (
    (".self_attn.q_proj.", ".self_attn.q_proj_ve."),
    (".self_attn.k_proj.", ".self_attn.k_proj_ve."),
    (".self_attn.v_proj.", ".self_attn.v_proj_ve."),
    (".self_attn.o_proj.", ".self_attn.o_proj_ve."),
    (".self_attn.q_norm.", ".self_attn.q_norm_ve."),
    (".self_attn.k_norm.", ".self_attn.k_norm_ve."),
    (".mlp.", ".mlp_ve."),
    (".attention.wqkv.", ".attention.wqkv_ve."),
    (".attention.wo.", ".attention.wo_ve."),
    (".feed_forward.", ".feed_forward_ve."),
)
# Output heads and input embeddings of the two layouts (a tied text model has no head in its state dict).
HEADS_AND_EMBEDDINGS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("output.weight", "model.tok_embeddings.weight"),
)
# Rotary tables some older checkpoints store; they are recomputed, never loaded.
_IGNORED_KEY = re.compile(r"rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_corpus(num_examples: int = 3000, seed: int = 0) -> list[str]:
    """The text the tokenizer is trained on: questions, answers, captions and scene descriptions of the dataset, the
    vocabulary lists, the system message and the chat-template strings (without their special tokens)."""
    data = ShapesDataset(seed=seed)
    # the fixed strings of every prompt, weighted like the examples so that they become few tokens
    fixed = [SYSTEM_MESSAGE, " ".join([*COLORS, *SHAPES, *WORDS, *NUMBER_WORDS, "left", "right"])]
    for roles in CHAT_TEMPLATES.values():
        fixed += [_strip_special_tokens(value) for value in roles.values()]
    texts = fixed * (num_examples // 10)
    for index in range(num_examples):
        sample_question, sample_answer = data.text_example(index)
        texts += [sample_question, sample_answer, data.caption_scene(index).caption()]
    return texts


def _strip_special_tokens(text: str) -> str:
    for token in NAVIL_SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def build_tokenizer(output_dir: Optional[Union[str, Path]] = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE of the tiny model and appends the NaViL special tokens (deterministic).

    The BPE (`vocab_size` entries including the 256 bytes) is learnt from `tokenizer_corpus()`; the special tokens
    follow, in the order of `NAVIL_SPECIAL_TOKENS`. End of sequence is `<|im_end|>`, padding `<|endoftext|>`, and no
    BOS token is added. With `output_dir` the tokenizer is saved there (`AutoTokenizer.from_pretrained` loads it).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(NAVIL_SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in NAVIL_SPECIAL_TOKENS if t not in (END_OF_TURN_TOKEN, PAD_TOKEN)],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if output_dir is not None:
        wrapped.save_pretrained(output_dir)
    return wrapped


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingArguments:
    """Every setting of `navil train`; the defaults are the recipe of `checkpoints/navil-tiny` (docs/training.md)."""

    output_dir: str = "runs/navil-tiny"
    tokenizer_dir: Optional[str] = None  # default: the packaged tokenizer/
    seed: int = 0
    # model shape
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 384
    vision_num_hidden_layers: int = 4
    vision_num_attention_heads: int = 4
    vision_window_size: int = 32
    vision_fullatt_block_indexes: tuple[int, ...] = (1, 3)
    min_dynamic_patch: int = 144
    max_dynamic_patch: int = 400
    # the connector's output layer starts at this multiple of the standard initialisation (std 0.02)
    connector_init_gain: float = 10.0
    # schedule
    text_steps: int = 150
    text_batch_size: int = 32
    text_learning_rate: float = 3e-3
    caption_steps: int = 300
    caption_batch_size: int = 16
    caption_learning_rate: float = 3e-4
    single_shape_steps: int = 1000
    qa_steps: int = 2200
    qa_batch_size: int = 8
    qa_learning_rate: float = 3e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    single_scale_fraction: float = 0.75
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    threads: int = 2
    eval_every: int = 1100
    eval_questions: int = 60
    size_range: tuple[int, int] = TRAIN_SIZE_RANGE


def tiny_text_config(args: TrainingArguments, vocab_size: int) -> Qwen3Config:
    """The Qwen3 text model of the recipe (untied head, RoPE base 10000)."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
    )


def navil_text_config(text_config: Qwen3Config) -> dict:
    """The NaViL `text_config` (Qwen3-VE layout) whose text experts are exactly `text_config`'s model."""
    rope_theta = (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta")
    return dict(
        architectures=["Qwen3VEForCausalLM"],
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        num_key_value_heads=text_config.num_key_value_heads,
        head_dim=text_config.head_dim,
        hidden_act=text_config.hidden_act,
        max_position_embeddings=text_config.max_position_embeddings,
        rms_norm_eps=text_config.rms_norm_eps,
        rope_theta=rope_theta if rope_theta is not None else getattr(text_config, "rope_theta", 10000.0),
        attention_bias=text_config.attention_bias,
        tie_word_embeddings=False,
        initializer_range=text_config.initializer_range,
    )


def tiny_navil_config(args: TrainingArguments, text_config: Qwen3Config) -> NaViLConfig:
    """The NaViL of the recipe around `text_config`: a small native-resolution ViT (patch 16, 2×2 merge)."""
    return NaViLConfig(
        vision_config=dict(
            hidden_size=args.vision_hidden_size,
            num_attention_heads=args.vision_num_attention_heads,
            num_hidden_layers=args.vision_num_hidden_layers,
            intermediate_size=args.vision_intermediate_size,
            patch_size=16,
            qkv_bias=True,
            qk_normalization=False,
            norm_type="rms_norm",
            layer_norm_eps=1e-6,
            hidden_act="gelu",
            initializer_factor=1.0,
            window_size=args.vision_window_size,
            fullatt_block_indexes=list(args.vision_fullatt_block_indexes),
        ),
        text_config=navil_text_config(text_config),
        template=TEMPLATE,
        system_message=SYSTEM_MESSAGE,
        downsample_ratio=0.5,
        min_dynamic_patch=args.min_dynamic_patch,
        max_dynamic_patch=args.max_dynamic_patch,
        scale_downsample_ratio=0.7071,
    )


def navil_processor(config: NaViLConfig, tokenizer) -> NaViLProcessor:
    """The processor of a NaViL config: its patch/merge sizes, pixel limits, template and system message."""
    patch = config.vision_config.patch_size
    image_processor = NaViLImageProcessor(
        patch_size=patch,
        merge_size=config.vision_config.merge_size,
        min_pixels=config.min_dynamic_patch * patch * patch,
        max_pixels=config.max_dynamic_patch * patch * patch,
        scale_downsample_ratio=config.scale_downsample_ratio,
        multiscale=True,
    )
    return NaViLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        template=config.template,
        system_message=config.system_message,
    )


# ---------------------------------------------------------------------------------------------------------------
# Upcycling
# ---------------------------------------------------------------------------------------------------------------


class UpcycleReport(NamedTuple):
    """What `upcycle_from_text_model` did: NaViL keys written, NaViL language-model keys left untouched, source keys
    with no NaViL counterpart, source keys skipped (rotary tables), and the special tokens whose
    `special_token_embedding` row was set."""

    copied_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    ignored_keys: list[str]
    special_token_rows: list[str]


def _expert_twin(key: str) -> Optional[str]:
    for text_name, visual_name in EXPERT_TWINS:
        if text_name in key:
            return key.replace(text_name, visual_name, 1)
    return None


@torch.no_grad()
def upcycle_from_text_model(
    text_model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    navil_model: NaViLForConditionalGeneration,
    tokenizer=None,
    strict: bool = True,
) -> UpcycleReport:
    """Initialises the language model of `navil_model` from a text-only LLM, in place.

    Every text weight is copied to the NaViL language model (`language_model.` + its key) and, for attention
    projections, q/k norms and feed-forward blocks, also to the visual-expert twin (Qwen3 layout: `q_proj`,
    `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`, `mlp` → `…_ve`; InternLM2 layout: `wqkv`, `wo`, `feed_forward`
    → `…_ve`). The rows of `special_token_embedding` get the text embeddings of their special tokens, so that the
    upcycled model's text-only logits equal the text model's. A text model without an output head (tied
    embeddings) gets its embedding matrix as head.

    Args:
        text_model_or_state_dict: A causal LM (e.g. `Qwen3ForCausalLM`) or its state dict, with keys such as
            `model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight` (Qwen3) or
            `model.tok_embeddings.weight`, `model.layers.0.attention.wqkv.weight`, `output.weight` (InternLM2).
        navil_model ([`NaViLForConditionalGeneration`]): The model to initialise; its special-token ids must be known
            (`init_special_token_ids`) unless `tokenizer` is given.
        tokenizer (*optional*): Passed to `navil_model.init_special_token_ids` first.
        strict (`bool`, *optional*, defaults to `True`): Raise a `ValueError` listing missing and unexpected keys
            instead of only reporting them.

    Returns:
        [`UpcycleReport`]. Shape mismatches always raise a `ValueError` naming the tensors.
    """
    if tokenizer is not None:
        navil_model.init_special_token_ids(tokenizer)
    source = dict(
        text_model_or_state_dict.state_dict()
        if isinstance(text_model_or_state_dict, torch.nn.Module)
        else text_model_or_state_dict
    )
    for head, embeddings in HEADS_AND_EMBEDDINGS:
        if embeddings in source and head not in source:
            source[head] = source[embeddings]
    targets = navil_model.state_dict()
    copied, unexpected, ignored, mismatched = [], [], [], []
    for key, tensor in source.items():
        if _IGNORED_KEY.search(key):
            ignored.append(key)
            continue
        names = [f"language_model.{key}"]
        twin = _expert_twin(key)
        if twin is not None:
            names.append(f"language_model.{twin}")
        if not all(name in targets for name in names):
            unexpected.append(key)
            continue
        for name in names:
            if targets[name].shape != tensor.shape:
                mismatched.append(f"{key} {list(tensor.shape)} -> {name} {list(targets[name].shape)}")
                continue
            targets[name].copy_(tensor.to(dtype=targets[name].dtype, device=targets[name].device))
            copied.append(name)
    if mismatched:
        raise ValueError(
            "The text model does not match the NaViL language model (check hidden size, layers, heads, head_dim and "
            f"vocabulary): {'; '.join(mismatched)}."
        )
    written = set(copied)
    missing = sorted(name for name in targets if name.startswith("language_model.") and name not in written)

    special_ids = navil_model.config.special_token_ids
    if not special_ids:
        raise ValueError(
            "The special-token ids of the NaViL model are unknown: call navil_model.init_special_token_ids(tokenizer) "
            "or pass tokenizer=."
        )
    embeddings = navil_model.get_input_embeddings().weight
    rows = []
    for row, token in enumerate(SPECIAL_TOKENS):
        if token in special_ids:
            navil_model.special_token_embedding.weight[row] = embeddings[special_ids[token]]
            rows.append(token)
    report = UpcycleReport(sorted(copied), missing, sorted(unexpected), sorted(ignored), rows)
    if strict and (missing or unexpected):
        raise ValueError(
            "Upcycling left NaViL language-model weights uninitialised or found text weights with no place in NaViL "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'}). Pass strict=False to accept this."
        )
    return report


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


class Conversation(NamedTuple):
    """One training conversation: an optional image and its (question, answer) turns, in order."""

    image: object
    turns: list[tuple[str, str]]


def collate_conversations(
    processor: NaViLProcessor,
    conversations: list[Conversation],
    multiscale: Union[bool, list[bool]] = True,
    loss_on_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenised, right-padded training batch in the processor's chat format.

    A conversation is tokenised as `chat()` builds its prompts: the first turn is `build_prompt(question)` (with the
    `<image>` prefix expanded into the image's tokens), each later turn adds the user role, the question,
    `<|im_end|>` and the assistant role; every answer is followed by `<|im_end|>`. Answers are tokenised on their own,
    exactly as the model generates them. Labels are -100 except on the answers and their `<|im_end|>` (or everywhere
    but padding with `loss_on_prompt`). `multiscale` (one flag, or one per conversation) chooses the image pyramid or
    the single full-size pass.

    Returns `input_ids`, `attention_mask`, `labels` ([batch, longest]) and, with images, `pixel_values`,
    `image_grid_thw` and `num_scales`.
    """
    tokenizer, roles, end_id = processor.tokenizer, processor.roles, _end_of_turn_id(processor)
    flags = _per_example(multiscale, len(conversations))
    images, sequences = [], []
    for conversation, flag in zip(conversations, flags):
        has_image = conversation.image is not None
        (first_question, _), *later_turns = conversation.turns
        prompts = [processor.build_prompt(first_question, num_images=int(has_image))]
        prompts += [roles["user"] + question + roles["separator"] + roles["assistant"] for question, _ in later_turns]
        if has_image:
            prompts[0] = _add_image(processor, conversation.image, flag, prompts[0], images)
        ids, labels = [], []
        for prompt, (_, answer) in zip(prompts, conversation.turns):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = _answer_ids(tokenizer, answer, end_id)
            ids += prompt_ids + answer_ids
            labels += (prompt_ids if loss_on_prompt else [-100] * len(prompt_ids)) + answer_ids
        sequences.append((ids, labels))

    longest = max(len(ids) for ids, _ in sequences)
    pad_id = _pad_id(tokenizer, end_id)
    batch = {
        "input_ids": torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids, _ in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in sequences]),
        "labels": torch.tensor([labels + [-100] * (longest - len(labels)) for _, labels in sequences]),
    }
    if images:
        batch.update(_image_tensors(images))
    return batch


def _end_of_turn_id(processor: NaViLProcessor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)


def _per_example(flag: Union[bool, list[bool]], count: int) -> list[bool]:
    """One flag for every example: `flag` itself when it is already a list, else `flag` repeated."""
    return flag if isinstance(flag, list) else [flag] * count


def _answer_ids(tokenizer, answer: str, end_id: int) -> list[int]:
    """An answer's tokens as the model generates them (tokenised on its own), then `<|im_end|>`."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]


def _pad_id(tokenizer, end_id: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id


def _add_image(processor: NaViLProcessor, image, multiscale: bool, prompt: str, images: list[dict]) -> str:
    """Runs the image processor on `image`, appends its outputs to `images` and returns `prompt` with the `<image>`
    placeholder expanded into the image's tokens."""
    image_inputs = processor.image_processor(image, return_tensors="pt", multiscale=multiscale)
    images.append(image_inputs)
    return processor.expand_image_placeholders(prompt, image_inputs["image_grid_thw"], image_inputs["num_scales"])


def _image_tensors(images: list[dict]) -> dict[str, torch.Tensor]:
    """The image processor's outputs of several images as one batch."""
    return {
        key: torch.cat([inputs[key] for inputs in images]) for key in ("pixel_values", "image_grid_thw", "num_scales")
    }


def collate_question_branches(
    processor: NaViLProcessor, examples: list[Conversation], multiscale: Union[bool, list[bool]] = True
) -> dict[str, torch.Tensor]:
    """Training batch in which every question about an image is a separate branch after the image's tokens.

    Each row holds one image's prompt up to `</img>`, then one branch per (question, answer) turn: the rest of the
    question's chat prompt (`"\\n" + question`, `<|im_end|>`, the assistant role), the answer and `<|im_end|>`. A 4-D
    attention mask lets a branch see the shared prefix and itself only, and its position ids continue from the
    prefix, so each branch is computed exactly as `chat()` would compute that single question while the vision
    encoder and the image tokens run once for all of them. Labels cover the answers and their `<|im_end|>`.

    Returns `input_ids`, `labels`, `position_ids` ([batch, longest]), a boolean `attention_mask` ([batch, 1,
    longest, longest], True where attention is allowed), `pixel_values`, `image_grid_thw` and `num_scales`.
    """
    tokenizer, roles, end_id = processor.tokenizer, processor.roles, _end_of_turn_id(processor)
    flags = _per_example(multiscale, len(examples))
    images, rows = [], []
    head = processor.build_prompt(None, num_images=1).split(IMAGE_PLACEHOLDER)[0] + IMAGE_PLACEHOLDER
    for example, flag in zip(examples, flags):
        prefix = _add_image(processor, example.image, flag, head, images)
        branches = []
        for question, answer in example.turns:
            prompt = "\n" + question + roles["separator"] + roles["assistant"]
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = _answer_ids(tokenizer, answer, end_id)
            branches.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        rows.append((tokenizer(prefix, add_special_tokens=False)["input_ids"], branches))

    longest = max(len(prefix) + sum(len(ids) for ids, _ in branches) for prefix, branches in rows)
    pad_id = _pad_id(tokenizer, end_id)
    input_ids = torch.full((len(rows), longest), pad_id)
    labels = torch.full((len(rows), longest), -100)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    attention_mask = torch.eye(longest, dtype=torch.bool).repeat(len(rows), 1, 1, 1)  # padding sees itself only
    for row, (prefix, branches) in enumerate(rows):
        length = len(prefix)
        input_ids[row, :length] = torch.tensor(prefix)
        position_ids[row, :length] = torch.arange(length)
        attention_mask[row, 0, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        start = length
        for ids, branch_labels in branches:
            branch = slice(start, start + len(ids))
            input_ids[row, branch] = torch.tensor(ids)
            labels[row, branch] = torch.tensor(branch_labels)
            position_ids[row, branch] = torch.arange(length, length + len(ids))
            attention_mask[row, 0, branch, :length] = True
            attention_mask[row, 0, branch, branch] = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            start += len(ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        **_image_tensors(images),
    }


def _multiscale_flags(seed: int, step: int, size: int, single_scale_fraction: float) -> list[bool]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(size, generator=generator) >= single_scale_fraction).tolist()


def text_batches(processor, data: ShapesDataset, batch_size: int) -> Callable[[int], dict]:
    """Step → batch of text-only conversations (scene stated in words), loss on every token (LM pre-training)."""

    def batch(step: int) -> dict:
        examples = [data.text_example(step * batch_size + i) for i in range(batch_size)]
        conversations = [Conversation(None, [example]) for example in examples]
        return collate_conversations(processor, conversations, loss_on_prompt=True)

    return batch


def caption_batches(processor, data: ShapesDataset, batch_size: int, single_scale_fraction=0.0, num_shapes=None):
    """Step → batch of captioning conversations: the image alone as the question, its caption as the answer
    (`num_shapes` shapes per image, or 1–3)."""

    def batch(step: int) -> dict:
        samples = [data.caption(step * batch_size + i, num_shapes) for i in range(batch_size)]
        conversations = [Conversation(sample.image, [(sample.question, sample.answer)]) for sample in samples]
        flags = _multiscale_flags(data.seed, step, batch_size, single_scale_fraction)
        return collate_conversations(processor, conversations, multiscale=flags)

    return batch


def question_batches(
    processor, data: ShapesDataset, batch_size: int, single_scale_fraction=0.0, num_shapes=None, first_index=0
):
    """Step → batch of images with every question their scenes allow (`ShapesDataset.questions`), each question a
    separate branch after its image (`collate_question_branches`); `num_shapes` shapes per image, or 1–3. Step `s`
    uses examples `first_index + s * batch_size` onwards."""

    def batch(step: int) -> dict:
        indices = range(first_index + step * batch_size, first_index + (step + 1) * batch_size)
        examples = [data.questions(index, num_shapes) for index in indices]
        examples = [Conversation(image, [question[:2] for question in questions]) for image, questions in examples]
        flags = _multiscale_flags(data.seed + 1, first_index + step, batch_size, single_scale_fraction)
        return collate_question_branches(processor, examples, multiscale=flags)

    return batch


# ---------------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------------


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: matrices with weight decay, vectors (norms, biases, layer scales) and embeddings
    without."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or "embed" in name or "special_token_embedding" in name
        (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_loop(
    model: torch.nn.Module,
    batches: Callable[[int], dict],
    steps: int,
    learning_rate: float,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    dtype: str = "float32",
    description: str = "train",
    callback: Optional[Callable[[int], None]] = None,
    callback_every: int = 0,
    progress: bool = True,
) -> list[float]:
    """Trains the parameters of `model` that require gradients for `steps` steps; returns the loss of every step.

    AdamW (β = 0.9, 0.95), linear warm-up over `warmup_ratio` of the steps then cosine decay to 0, gradient clipping
    at `max_grad_norm`; `dtype="bfloat16"` runs the forward under bfloat16 autocast (weights stay float32).
    `callback(step)` runs after every `callback_every` steps (e.g. an evaluation).
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=learning_rate, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=description, disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = {key: value.to(device) for key, value in batches(step).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1)
            model.train()
    model.eval()
    return losses


def set_text_weights_trainable(model: NaViLForConditionalGeneration, trainable: bool) -> None:
    """Freezes (or unfreezes) the text weights of the language model: everything in it but the visual experts."""
    for name, parameter in model.language_model.named_parameters():
        parameter.requires_grad = trainable or _is_visual_expert(name)


def set_activation_checkpointing(model: NaViLForConditionalGeneration, enabled: bool) -> None:
    """Turns activation (gradient) checkpointing on or off, non-reentrant; transformers 5 names it
    `activation_checkpointing_enable`, 4.x `gradient_checkpointing_enable`."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _is_visual_expert(name: str) -> bool:
    return "_ve." in name


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_questions(
    model: NaViLForConditionalGeneration,
    processor: NaViLProcessor,
    images: list,
    questions: list[str],
    batch_size: int = 32,
    multiscale: bool = True,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy replies to (image, question) pairs in left-padded batches (the replies of `model.chat` one by one)."""
    replies = []
    end_id = _end_of_turn_id(processor)
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        prompts = [processor.build_prompt(question, num_images=1) for question in questions[chunk]]
        inputs = processor(images=images[chunk], text=prompts, multiscale=multiscale, return_tensors="pt")
        inputs = inputs.to(model.device)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id, pad_token_id=end_id
        )
        replies += processor.decode_reply(output[:, inputs["input_ids"].shape[1] :])
    return replies


def evaluate(
    model: NaViLForConditionalGeneration,
    processor: NaViLProcessor,
    num_questions: int = 600,
    seed: int = 1234,
    size_range=TRAIN_SIZE_RANGE,
    batch_size: int = 32,
    multiscale: bool = True,
    question_types: Iterable[str] = QUESTION_TYPES,
    progress: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy per question type (and "all") on `num_questions` freshly generated questions.

    Questions cycle through `question_types`; images come from `ShapesDataset(seed, size_range)` (use a seed other
    than training's 0, and `OUT_OF_RANGE_SIZES` for sizes outside the training range).
    """
    data = ShapesDataset(seed=seed, size_range=size_range, question_types=tuple(question_types))
    samples = [data[index] for index in range(num_questions)]
    replies = []
    bar = tqdm(range(0, num_questions, batch_size), desc="eval", disable=not progress, dynamic_ncols=True)
    for start in bar:
        chunk = samples[start : start + batch_size]
        replies += answer_questions(
            model,
            processor,
            [sample.image for sample in chunk],
            [sample.question for sample in chunk],
            batch_size=batch_size,
            multiscale=multiscale,
        )
    correct, total = {}, {}
    for sample, reply in zip(samples, replies):
        total[sample.question_type] = total.get(sample.question_type, 0) + 1
        correct[sample.question_type] = correct.get(sample.question_type, 0) + int(reply == sample.answer)
    accuracy = {kind: correct[kind] / total[kind] for kind in data.question_types if kind in total}
    accuracy["all"] = sum(correct.values()) / max(sum(total.values()), 1)
    return accuracy


def format_accuracy(accuracy: Mapping[str, float]) -> str:
    """A one-line summary: "color 100.0% | shape 98.3% | … | all 97.5%"."""
    return " | ".join(f"{kind} {100 * value:.1f}%" for kind, value in accuracy.items())


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_dir: Optional[Union[str, Path]] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir or TOKENIZER_DIR))


def pretrain_text_model(args: TrainingArguments, tokenizer, processor, progress=True) -> tuple[Qwen3ForCausalLM, list]:
    """Stage 0: a `Qwen3ForCausalLM` trained on the dataset's text conversations (scene stated in words)."""
    torch.manual_seed(args.seed)
    text_model = Qwen3ForCausalLM(tiny_text_config(args, len(tokenizer)))
    data = ShapesDataset(seed=args.seed, size_range=args.size_range)
    losses = train_loop(
        text_model,
        text_batches(processor, data, args.text_batch_size),
        args.text_steps,
        args.text_learning_rate,
        args.warmup_ratio,
        args.weight_decay,
        args.max_grad_norm,
        args.dtype,
        description="text pre-training",
        progress=progress,
    )
    return text_model, losses


def train_tiny_navil(args: TrainingArguments, progress: bool = True, log: Callable[[str], None] = print):
    """Runs the whole recipe and saves model, processor and tokenizer to `args.output_dir`.

    Returns `(model, processor, history)` where history holds the losses of every stage, the evaluations and the
    wall-clock time of each stage.
    """
    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    history = {"arguments": asdict(args), "seconds": {}, "evaluations": []}

    config = tiny_navil_config(args, tiny_text_config(args, len(tokenizer)))
    processor = navil_processor(config, tokenizer)
    text_model, history["text_losses"] = pretrain_text_model(args, tokenizer, processor, progress)
    history["seconds"]["text"] = time.perf_counter() - started

    torch.manual_seed(args.seed + 1)
    model = NaViLForConditionalGeneration(config)
    model.init_special_token_ids(tokenizer)
    upcycle_from_text_model(text_model, model)
    with torch.no_grad():
        # visual tokens start at the scale training gives them (RMS ≈ 0.5 rather than 0.05), so in the language model
        # each keeps its own content instead of being swamped by what it attends to (docs/training.md)
        model.mlp1[-1].weight.mul_(args.connector_init_gain)
    if args.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    data = ShapesDataset(seed=args.seed, size_range=args.size_range)

    def run_eval(step: int) -> None:
        accuracy = evaluate(model, processor, args.eval_questions, seed=args.seed + 100 + step)
        history["evaluations"].append({"step": step, **accuracy})
        log(f"step {step}: {format_accuracy(accuracy)}")

    def stage(name: str, batches, steps: int, learning_rate: float, description: str, **evaluation) -> None:
        stage_start = time.perf_counter()
        history[f"{name}_losses"] = train_loop(
            model,
            batches,
            steps,
            learning_rate,
            args.warmup_ratio,
            args.weight_decay,
            args.max_grad_norm,
            args.dtype,
            description=description,
            progress=progress,
            **evaluation,
        )
        history["seconds"][name] = time.perf_counter() - stage_start

    set_text_weights_trainable(model, False)
    stage(
        "caption",
        caption_batches(processor, data, args.caption_batch_size, args.single_scale_fraction),
        args.caption_steps,
        args.caption_learning_rate,
        "stage 1: captions (text frozen)",
    )
    set_text_weights_trainable(model, True)
    stage(
        "single_shape",
        question_batches(processor, data, args.qa_batch_size, args.single_scale_fraction, num_shapes=1),
        args.single_shape_steps,
        args.qa_learning_rate,
        "stage 2: questions about one shape",
    )
    stage(
        "qa",
        question_batches(
            processor,
            data,
            args.qa_batch_size,
            args.single_scale_fraction,
            first_index=args.single_shape_steps * args.qa_batch_size,
        ),
        args.qa_steps,
        args.qa_learning_rate,
        "stage 3: questions about 1-3 shapes",
        callback=run_eval,
        callback_every=args.eval_every,
    )
    history["seconds"]["total"] = time.perf_counter() - started

    if args.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "training_history.json").write_text(json.dumps(_summary(history), indent=2) + "\n")
    log(f"saved to {output_dir} after {history['seconds']['total'] / 60:.1f} min")
    return model, processor, history


def _summary(history: dict) -> dict:
    """The history without per-step losses, but with the mean loss of each stage's first and last 20 steps."""
    summary = {key: value for key, value in history.items() if not key.endswith("_losses")}
    for key, losses in history.items():
        if key.endswith("_losses") and losses:
            summary[key.replace("_losses", "_loss")] = {
                "first": sum(losses[:20]) / len(losses[:20]),
                "last": sum(losses[-20:]) / len(losses[-20:]),
            }
    return summary


__all__ = [
    "EMBEDDED_MODEL_DIR",
    "OUT_OF_RANGE_SIZES",
    "TrainingArguments",
    "UpcycleReport",
    "answer_questions",
    "build_tokenizer",
    "collate_conversations",
    "collate_question_branches",
    "evaluate",
    "train_loop",
    "train_tiny_navil",
    "upcycle_from_text_model",
]
