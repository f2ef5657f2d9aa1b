"""What NaViL refuses, and why: the checks that turn bad inputs into a `ValueError` naming the problem and the fix.

- loading: checkpoint folders (`check_local_checkpoint`, unfinished saves with `check_save_complete`,
  `check_model_folder`, `check_tokenizer_folder`), their weight dtypes (`check_weight_dtypes`), torchao settings
  (`check_torchao_loading`) and the original model card's quantization flags (`with_quantization_config`);
- running: images (`check_pixel_values`, `check_image_tokens`, `check_no_image_tokens`), prompts (`check_prompt`, `check_token_types`),
  generation lengths and settings (`check_generation_length`, `check_generation_settings`) and the special-token ids
  against the tokenizer (`check_special_token_ids`).

The model calls them before any work is done (before the vision tower runs, before generation starts), so that a
bad input never ends in an error deep inside torch or in a silently wrong answer.
"""

import copy
import json
import math
import numbers
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from .compat_navil import DTYPE_KWARG
from .configuration_navil import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
    NaViLConfig,
    NaViLTextConfig,
    NaViLVisionConfig,
)
from .errors_navil import ERROR_KINDS, NaViLInputError  # noqa: F401 (the errors' home; imported from here too)
from .layouts_navil import VE_SUFFIX


def check_placeholder_count(found: int, images: int) -> None:
    """Refuses a prompt whose number of `<image>` placeholders is not the number of images."""
    if found != images:
        raise NaViLInputError(
            f"found {found} {IMAGE_PLACEHOLDER} placeholder{'s' if found != 1 else ''} in the text but {images} "
            f"image{' was' if images == 1 else 's were'} given; put exactly one {IMAGE_PLACEHOLDER} per image in "
            "the text, in image order (build_prompt(question, num_images=...) adds them), or pass as many images as "
            "placeholders.",
            "placeholder count mismatch",
        )


# Written by `navil finetune` into its output folder and each checkpoint: `{"complete": false}` while files are being
# written, `{"complete": true, ...}` once the folder holds the whole model.
RUN_STATUS_FILE = "navil_status.json"


def check_save_complete(folder: Path) -> None:
    """Refuses a folder whose `navil_status.json` says its save did not finish (a run still writing it, or one that
    was killed while writing): its files may mix two runs or miss some. Folders without the file pass."""
    status = Path(folder, RUN_STATUS_FILE)
    if status.is_file() and json.loads(status.read_text() or "{}").get("complete") is not True:
        raise ValueError(
            f"{folder} is an unfinished save ({RUN_STATUS_FILE} says incomplete): the run writing it is still running "
            "or stopped before it finished. Load one of its complete checkpoint-N folders, or finish the run with "
            "`navil finetune ... --resume`."
        )


def check_local_checkpoint(folder: Path, has_config: bool, allow_pickle: bool = False) -> None:
    """Refuses a local checkpoint folder before any model is built: no `config.json` (unless a config is passed),
    only pickled weights (`*.bin`, which can run code when loaded) unless `allow_pickle`, or a `*.safetensors` file
    whose header cannot be read (empty, truncated, not safetensors, oversized header), or an unfinished save
    (`check_save_complete`)."""
    check_save_complete(folder)
    if not allow_pickle and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ValueError(
            f"{folder} holds only pickled weights (*.bin), which can run code when loaded. Convert them to "
            "safetensors, or pass allow_pickle=True if you trust the files."
        )
    if not has_config and not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json, so the model's size is unknown; pass the folder of a saved NaViL checkpoint "
            "(config.json with its weights), or pass config= explicitly."
        )
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (not importable on every version)
            raise NaViLInputError(
                f"{path} is not a readable safetensors file ({error}); it is truncated, empty or not safetensors. "
                "Download or save the checkpoint again.",
                "unreadable safetensors file",
            ) from None


def check_loading_info(
    info: dict, checkpoint, model_name: str, text_config: NaViLTextConfig, strict: bool = True
) -> None:
    """Refuses a loaded checkpoint with missing, unexpected or mismatched tensors (`from_pretrained`'s loading info),
    naming them, instead of letting them be initialised at random (only with `strict`). Visual-expert (`_ve`) weights
    and a dense config (`modality_experts=False`) are refused even without `strict`: the model would silently run the
    image tokens through the text weights."""
    unexpected_experts = sorted(key for key in info["unexpected_keys"] if f"{VE_SUFFIX}." in key)
    if not text_config.modality_experts and unexpected_experts:
        raise ValueError(
            f"The checkpoint at {checkpoint} has visual-expert weights ({len(unexpected_experts)} `_ve` tensors, e.g. "
            f"{unexpected_experts[0]}) but the config builds a dense decoder (text_config.modality_experts=False), "
            "which would ignore them. Load it with its own config (without modality_experts=False); a dense model "
            "starts from a text LLM instead (navil.training.upcycle_from_text_model)."
        )
    if not strict:
        return
    missing_experts = sorted(key for key in info["missing_keys"] if f"{VE_SUFFIX}." in key)
    # a dense checkpoint lacks the experts of every layer; a few missing ones are reported below as missing
    layers = {int(match.group(1)) for key in missing_experts if (match := re.search(r"\.layers\.(\d+)\.", key))}
    dense = layers == set(range(text_config.num_hidden_layers))
    if dense and len(missing_experts) == len(info["missing_keys"]) and not info["unexpected_keys"]:
        raise ValueError(
            f"The checkpoint at {checkpoint} has no visual-expert weights (`_ve`, e.g. {missing_experts[0]}): it is a "
            "dense decoder, but the config asks for modality experts. Pass a config with "
            "text_config.modality_experts=False, or pass strict=False to initialise the experts at random."
        )
    problems = {
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": [
            f"{key} (checkpoint {list(saved)}, model {list(expected)})"
            for key, saved, expected in sorted(info["mismatched_keys"])
        ],
    }
    if any(problems.values()):
        details = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
        raise NaViLInputError(
            f"The checkpoint at {checkpoint} does not match {model_name} ({details}). Check that it is a NaViL "
            "checkpoint of this configuration, or pass strict=False to load it anyway (missing and mismatched tensors "
            "are then initialised at random, unexpected ones ignored).",
            "checkpoint does not match the model",
        )


def bitsandbytes_usable() -> bool:
    """Whether bitsandbytes imports and supports a device of this machine (a CUDA GPU, or its CPU backend)."""
    try:
        import bitsandbytes
    except Exception:  # a broken CUDA setup makes the import raise more than ImportError
        return False
    devices = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    # releases before the CPU backend have no `supported_torch_devices` and run on CUDA only
    return bool(devices & set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"})))


def with_quantization_config(kwargs: dict, modules_to_not_quantize: list[str]) -> dict:
    """`from_pretrained` kwargs with the original model card's `load_in_8bit` / `load_in_4bit` turned into a
    `BitsAndBytesConfig` (nf4 for 4 bits), and `modules_to_not_quantize` filled into a quantization config that names
    no modules to skip (torchao's `modules_to_not_convert`, bitsandbytes' `llm_int8_skip_modules`)."""
    bits = [count for count in (8, 4) if kwargs.pop(f"load_in_{count}bit", False)]
    if bits:
        flags = " and ".join(f"load_in_{count}bit=True" for count in bits)
        if len(bits) > 1 or kwargs.get("quantization_config") is not None:
            given = flags if len(bits) > 1 else f"{flags} and quantization_config"
            raise ValueError(f"{given} ask for different quantizations; pass only one of them.")
        if not bitsandbytes_usable():
            raise ValueError(
                f"{flags} quantizes with bitsandbytes, which is not installed or supports no device of this machine. "
                "On a CPU quantize with torchao instead (pip install torchao): from transformers import TorchAoConfig; "
                "from torchao.quantization import Int8WeightOnlyConfig; from_pretrained(..., quantization_config="
                "TorchAoConfig(Int8WeightOnlyConfig())). On a CUDA GPU: pip install bitsandbytes."
            )
        from transformers import BitsAndBytesConfig

        dtype = kwargs.get(DTYPE_KWARG)
        four_bit = dict(bnb_4bit_quant_type="nf4")
        if isinstance(dtype, torch.dtype):
            four_bit["bnb_4bit_compute_dtype"] = dtype
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if bits == [8] else BitsAndBytesConfig(load_in_4bit=True, **four_bit)
        )
    config = kwargs.get("quantization_config")
    for field in ("modules_to_not_convert", "llm_int8_skip_modules"):
        if hasattr(config, field) and getattr(config, field) is None:
            config = copy.copy(config)
            setattr(config, field, list(modules_to_not_quantize))
            kwargs["quantization_config"] = config
    return kwargs


def check_image_tokens(config: NaViLConfig, input_ids, context_mask, image_grid_thw) -> None:
    """Refuses prompts whose `<IMG_CONTEXT>` tokens do not match the images, before the vision tower runs: in
    total and, when the tokenizer has `<IMG_FRAME_BREAK>` (which ends every frame of every image-scale), frame
    by frame, so that features never land on the tokens of another image."""
    grid = image_grid_thw
    per_frame = (grid[:, 1] * grid[:, 2] // config.vision_config.merge_size**2).repeat_interleave(grid[:, 0])
    found, expected = int(context_mask.sum()), int(per_frame.sum())
    if found != expected:
        raise NaViLInputError(
            f"The prompt has {found} {IMG_CONTEXT_TOKEN} tokens but the images give {expected} features; build "
            "the prompt with the processor (or expand each <image> with the same image_grid_thw).",
            "image tokens do not match the images",
        )
    if input_ids is not None:
        check_image_block_tokens(config.special_token_ids, input_ids, context_mask)
    frame_break = config.special_token_ids.get(IMG_FRAME_BREAK_TOKEN)
    if frame_break is None or not expected or input_ids is None:
        return
    breaks = (input_ids == frame_break).flatten()
    frame_of_token = breaks.cumsum(0) - breaks.long()  # the frame each token belongs to, batch rows in order
    counts = torch.bincount(frame_of_token[context_mask.flatten()], minlength=len(per_frame)).cpu()
    if not torch.equal(counts, per_frame):
        frame = next(i for i, (a, b) in enumerate(zip(counts.tolist(), per_frame.tolist() + [0])) if a != b)
        has = int(counts[frame])
        wants = int(per_frame[frame]) if frame < len(per_frame) else 0
        raise NaViLInputError(
            f"The prompt's image tokens do not follow image_grid_thw: frame {frame} of the image-scales has {has} "
            f"{IMG_CONTEXT_TOKEN} tokens but its grid gives {wants} features, so features would land on another "
            "image's tokens. Take the prompt and the images from one processor call, in the same order.",
            "image tokens do not match the images",
        )


def check_image_block_tokens(special_token_ids: Mapping, input_ids: torch.Tensor, context_mask: torch.Tensor) -> None:
    """Refuses a prompt whose image blocks (`<img>`, per frame rows of `<IMG_CONTEXT>` each ending in
    `<IMG_LINE_BREAK>`, `<IMG_FRAME_BREAK>`, ..., `</img>`) do not read as `config.special_token_ids` say: their ids
    disagree with the tokenizer that built the prompt (swapped `<img>` / `</img>` move the logits without a word).
    The model sees no tokenizer (a pipeline or `generate` hands it token ids), so the prompt is what is checked."""
    tokens = (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_LINE_BREAK_TOKEN, IMG_FRAME_BREAK_TOKEN, IMG_END_TOKEN)
    if not all(token in special_token_ids for token in tokens):
        return
    start, context_id, line_break, frame_break, end = (special_token_ids[token] for token in tokens)
    flat, context = input_ids.flatten(), context_mask.flatten()
    before = torch.cat((flat.new_full((1,), -1), flat[:-1]))
    after = torch.cat((flat[1:], flat.new_full((1,), -1)))
    ends_row = (flat == line_break) & torch.cat((context.new_zeros(1), context[:-1]))
    ends_frame = (flat == frame_break) & torch.cat((ends_row.new_zeros(1), ends_row[:-1]))
    starts_frame = context & (before != context_id) & (before != line_break)
    rules = (  # (positions, their neighbour, the tokens an image block has there, where)
        (context, after, (context_id, line_break), f"after {IMG_CONTEXT_TOKEN}"),
        (ends_row, after, (context_id, frame_break), f"after the {IMG_LINE_BREAK_TOKEN} ending a row"),
        (ends_frame, after, (context_id, end), f"after the {IMG_FRAME_BREAK_TOKEN} ending a frame"),
        (starts_frame, before, (start, frame_break), f"before the first {IMG_CONTEXT_TOKEN} of a frame"),
    )
    names = {token_id: token for token, token_id in special_token_ids.items()}
    for positions, neighbour, allowed, where in rules:
        bad = positions & (neighbour != allowed[0]) & (neighbour != allowed[1])
        if bool(bad.any()):
            found = int(neighbour[bad.nonzero()[0, 0]])
            expected = " or ".join(f"{names[token_id]} (id {token_id})" for token_id in allowed)
            raise NaViLInputError(
                f"The prompt's image tokens do not follow config.special_token_ids: {where} comes id {found} "
                f"({names.get(found, 'not a NaViL special token')} in the config), where an image block has "
                f"{expected}. config.special_token_ids disagree with the tokenizer that built the prompt (or the "
                "prompt was not built by the NaViL processor): use the tokenizer saved with the model, or re-read the "
                "ids with model.init_special_token_ids(tokenizer).",
                "image tokens do not match the images",
            )


def check_prompt(
    config: NaViLConfig, device: torch.device, input_ids=None, inputs_embeds=None, attention_mask=None
) -> None:
    """Clear errors for prompts this model cannot run: wrong shape, dtype or device, an attention mask of another
    shape, unknown token ids, too many positions (`device`: where the model's embeddings are).

    Nothing is converted here: token ids must be int64 (or int32) on the device of the embeddings. Only
    `pixel_values` are moved and cast, to the vision tower (see `get_image_features`).
    """
    text = config.text_config
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens.device != device:
        raise NaViLInputError(
            f"The inputs are on {tokens.device} but the model is on {device}; move them with .to(model.device).",
            "prompt",
        )
    if input_ids is not None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise NaViLInputError(
                f"input_ids must be integer token ids, got {input_ids.dtype}; convert with .long().", "prompt"
            )
        if input_ids.ndim != 2:
            raise NaViLInputError(
                f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}; add the batch dimension "
                "with input_ids[None].",
                "prompt",
            )
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != text.hidden_size:
            raise NaViLInputError(
                f"inputs_embeds must be [batch, seq, {text.hidden_size}], got shape {tuple(inputs_embeds.shape)}.",
                "prompt",
            )
    if tokens.shape[1] == 0:
        raise NaViLInputError(
            "The prompt is empty (0 tokens); pass at least one token, e.g. from build_prompt.", "prompt"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.shape != tokens.shape[:2]:
            raise NaViLInputError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt is [batch, seq] = "
                f"{tuple(tokens.shape[:2])}; pass the attention_mask returned with input_ids by the processor.",
                "prompt",
            )
    if text.rope_type != "dynamic" and tokens.shape[1] > text.max_position_embeddings:
        raise NaViLInputError(
            f"The prompt has {tokens.shape[1]} tokens but the model supports {text.max_position_embeddings} "
            "positions; shorten the prompt or use fewer/smaller images (max_pixels).",
            "prompt",
        )
    if input_ids is not None and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= text.vocab_size:
            raise NaViLInputError(
                f"input_ids must lie in [0, {text.vocab_size}) but range over [{low}, {high}]; was the prompt "
                "tokenized with this model's tokenizer?",
                "prompt",
            )


def check_token_types(mm_token_type_ids, tokens: torch.Tensor) -> None:
    """Refuses `mm_token_type_ids` that are not an integer tensor of the prompt's [batch, seq] (`tokens`: the
    `input_ids` or `inputs_embeds`). Shapes only, so that a compiled decode step runs it without a graph break."""
    if not isinstance(mm_token_type_ids, torch.Tensor) or mm_token_type_ids.dtype not in (torch.int64, torch.int32):
        got = getattr(mm_token_type_ids, "dtype", type(mm_token_type_ids).__name__)
        raise NaViLInputError(
            f"mm_token_type_ids must be an integer tensor, got {got}; leave them unset (generate sets them) or pass "
            "navil's token_types.",
            "prompt",
        )
    if mm_token_type_ids.shape != tokens.shape[:2]:
        raise NaViLInputError(
            f"mm_token_type_ids have shape {tuple(mm_token_type_ids.shape)} but the tokens are [batch, seq] = "
            f"{tuple(tokens.shape[:2])}; pass one type per token, or leave them unset.",
            "prompt",
        )


def check_generation_length(
    text: NaViLTextConfig, generation_config, prompt_length: int, generation_kwargs: dict
) -> None:
    """Refuses `max_new_tokens` / `max_length` that are not whole numbers, and a prompt plus new tokens beyond
    `max_position_embeddings` (not checked for dynamic RoPE scaling), naming the largest `max_new_tokens` that
    fits, rather than running past the positions the model was trained for. Values are read as `generate` reads
    them: the call's arguments (`generation_kwargs`), else `generation_config` (the call's, else the model's)."""

    def setting(name):
        return generation_kwargs[name] if name in generation_kwargs else getattr(generation_config, name, None)

    new_tokens, max_length = setting("max_new_tokens"), setting("max_length")
    for name, value in (("max_new_tokens", new_tokens), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise NaViLInputError(
                f"{name} must be a whole number >= 0, got {value!r:.40}; e.g. {name}=64.", "generation length"
            )
    if new_tokens == 0:
        raise NaViLInputError(
            "max_new_tokens=0 asks for no reply; pass at least 1, e.g. max_new_tokens=64.", "generation length"
        )
    if new_tokens is None and max_length is not None and max_length <= prompt_length:
        raise NaViLInputError(
            f"max_length={max_length} leaves no room for a reply after the prompt's {prompt_length} tokens (it counts "
            "the prompt too); pass max_new_tokens instead, e.g. max_new_tokens=64.",
            "generation length",
        )
    total = prompt_length + new_tokens if new_tokens is not None else max(max_length or 0, prompt_length)
    if text.rope_type != "dynamic" and total > text.max_position_embeddings:
        room = text.max_position_embeddings - prompt_length
        raise NaViLInputError(
            f"The prompt has {prompt_length} tokens and up to {total - prompt_length} new tokens were asked for, "
            f"more than the model's {text.max_position_embeddings} positions; "
            + (f"lower max_new_tokens to at most {room}, or " if room > 0 else "")
            + "shorten the prompt or history, or use fewer/smaller images (max_pixels).",
            "generation length",
        )


def check_pixel_values(pixel_values: torch.Tensor, vision: NaViLVisionConfig) -> None:
    """Refuses pixel values the vision tower cannot take: not floating point, on the meta device, not [patches,
    3·P·P] or [patches, 3, P, P] for this patch size, or not finite."""
    patch_shape = (vision.num_channels, vision.patch_size, vision.patch_size)
    if not torch.is_floating_point(pixel_values):
        raise NaViLInputError(
            f"pixel_values must be floating point (the image processor's output), got {pixel_values.dtype}.",
            "pixel values",
        )
    if pixel_values.device.type == "meta":
        raise NaViLInputError(
            "pixel_values are on the meta device and hold no values; pass the processor's output.", "pixel values"
        )
    if pixel_values.shape[1:] not in ((patch_shape[0] * patch_shape[1] * patch_shape[2],), patch_shape):
        raise NaViLInputError(
            f"pixel_values must be [patches, {patch_shape[0] * patch_shape[1] * patch_shape[2]}] or [patches, "
            f"{', '.join(map(str, patch_shape))}] for this model, got shape {tuple(pixel_values.shape)}; pass the "
            "image processor's pixel_values with the model's patch_size.",
            "pixel values",
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise NaViLInputError(
            "pixel_values contain NaN or infinite values; check the image or preprocessing.", "pixel values"
        )


def check_num_scales(num_scales, image_grid_thw) -> None:
    """Refuses `num_scales` (scales per image) with an image of no scale, or not adding up to the image-scales."""
    if num_scales is None:
        return
    num_scales = torch.as_tensor(num_scales)
    if bool((num_scales < 1).any()):
        raise NaViLInputError(
            f"num_scales must give every image at least one scale, got {num_scales.tolist()}; pass the image "
            "processor's num_scales.",
            "image grid",
        )
    if image_grid_thw is not None and int(num_scales.sum()) != len(image_grid_thw):
        raise NaViLInputError(
            f"num_scales adds up to {int(num_scales.sum())} image-scales but image_grid_thw has "
            f"{len(image_grid_thw)} rows; pass the image processor's outputs together.",
            "image grid",
        )


# -- issue 33: no silently wrong answer -----------------------------------------------------------------------------

# Arguments of `generate` that the chat helpers set themselves, and what to do instead of passing them.
CHAT_OWNED_GENERATION_KEYS = {
    "input_ids": "pass the question (and history) to chat",
    "inputs_embeds": "pass the question (and history) to chat",
    "attention_mask": "chat builds it with the prompt",
    "pixel_values": "pass the images as chat's pixel_values argument",
    "image_grid_thw": "pass it as chat's num_patches_list argument",
    "num_scales": "pass it as chat's num_scales argument",
    "streamer": "pass it as chat's streamer argument, or use stream_chat",
    "return_dict_in_generate": "chat returns the reply text; call model.generate for its output dict",
}

# Generation settings whose values chat checks, as (description, test).
_GENERATION_VALUES = {
    "temperature": ("a positive finite number", lambda v: _real(v) and math.isfinite(v) and v > 0),
    "top_p": ("a number in (0, 1]", lambda v: _real(v) and 0 < v <= 1),
    "min_p": ("a number in [0, 1]", lambda v: _real(v) and 0 <= v <= 1),
    "typical_p": ("a number in (0, 1]", lambda v: _real(v) and 0 < v <= 1),
    "top_k": ("a whole number >= 0", lambda v: _whole(v) and v >= 0),
    "repetition_penalty": ("a positive finite number", lambda v: _real(v) and math.isfinite(v) and v > 0),
    # beam scores are divided by length ** length_penalty, a Python float that overflows (OverflowError) beyond 50
    "length_penalty": ("a number in [-50, 50]", lambda v: _real(v) and -50 <= v <= 50),
    "num_beams": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "num_beam_groups": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "num_return_sequences": ("1 (chat returns one reply per question)", lambda v: _whole(v) and v == 1),
    "no_repeat_ngram_size": ("a whole number >= 0", lambda v: _whole(v) and v >= 0),
    "do_sample": ("True or False", lambda v: isinstance(v, bool)),
    "use_cache": ("True or False", lambda v: isinstance(v, bool)),
}


_FLOAT_GENERATION_SETTINGS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_generation_settings(settings: Mapping, vocab_size: int) -> dict:
    """`settings` with whole-number values of float settings as floats (`repetition_penalty=2`, which `generate`
    refuses), after refusing chat generation settings that would fail deep inside `generate` or run on silently:
    keys that chat sets itself (`CHAT_OWNED_GENERATION_KEYS`), sampling values out of range (`temperature=inf`,
    `top_p=nan`), beam counts below 1, and token ids (`eos_token_id`, `pad_token_id`, `bos_token_id`) outside the
    vocabulary."""
    owned = sorted(key for key in settings if key in CHAT_OWNED_GENERATION_KEYS)
    if owned:
        raise NaViLInputError(
            f"generation_config sets {', '.join(owned)}, which chat sets itself: "
            + "; ".join(f"{key}: {CHAT_OWNED_GENERATION_KEYS[key]}" for key in owned)
            + ".",
            "generation key that chat owns",
        )
    for name, (description, valid) in _GENERATION_VALUES.items():
        if settings.get(name) is not None and not valid(settings[name]):
            raise NaViLInputError(
                f"generation_config[{name!r}] must be {description}, got {settings[name]!r:.40}.",
                "generation setting out of range",
            )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):  # generate takes a list for eos_token_id only
        value = settings.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
        if value is not None and not (ids and all(_whole(i) and 0 <= i < vocab_size for i in ids)):
            lists = " or a non-empty list of them" if name == "eos_token_id" else ""
            raise NaViLInputError(
                f"generation_config[{name!r}] must be a token id in [0, {vocab_size}){lists}, got {value!r:.40}; take "
                "it from the tokenizer (e.g. tokenizer.convert_tokens_to_ids('<|im_end|>')).",
                "generation setting out of range",
            )
    floats = [name for name in _FLOAT_GENERATION_SETTINGS if _whole(settings.get(name))]
    return {**settings, **{name: float(settings[name]) for name in floats}}


def check_special_token_ids(special_token_ids: Mapping, tokenizer) -> None:
    """Refuses a config's `special_token_ids` that disagree with `tokenizer` (a wrong `<|im_end|>` id never stops a
    reply; swapped `<img>` / `</img>` ids move the logits), naming each token with both ids."""
    wrong = []
    for token, token_id in special_token_ids.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != token_id or found is None or found == tokenizer.unk_token_id:
            wrong.append(f"{token} is {token_id} in the config but {found} in the tokenizer")
    if wrong:
        raise NaViLInputError(
            f"config.special_token_ids disagree with the tokenizer: {'; '.join(wrong)}. Use the tokenizer saved with "
            "the model, or re-read the ids with model.init_special_token_ids(tokenizer).",
            "special token ids disagree with the tokenizer",
        )


def check_saved_special_token_ids(folder, tokenizer) -> None:
    """`check_special_token_ids` for the `config.json` of a local model folder that a processor is loaded from (the
    processor of `AutoProcessor` and of pipelines), when it records the ids."""
    path = Path(str(folder)) / "config.json"
    if not path.is_file():
        return
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("special_token_ids")
    except (OSError, ValueError, AttributeError):
        return  # not a model config: `from_pretrained` of the model reports it
    if isinstance(ids, Mapping):
        check_special_token_ids(ids, tokenizer)


def check_weight_dtypes(folder: Path) -> None:
    """Refuses a local checkpoint whose safetensors files hold integer or boolean tensors although the config asks
    for no quantization: every NaViL parameter is floating point, and integer data cast to floats answers garbage."""
    config_file = folder / "config.json"
    try:
        quantized = "quantization_config" in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        quantized = False  # `from_pretrained` reports an unreadable config itself
    if quantized:
        return
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                if not dtype.startswith(("F", "BF")):
                    raise ValueError(
                        f"{path} stores {name} as {dtype}, but the model's parameters are floating point (F32, BF16 or "
                        "F16) and the config names no quantization; the file was written wrongly or relabelled. Save "
                        "or download the checkpoint again."
                    )


def check_no_image_tokens(context_mask: torch.Tensor) -> None:
    """Refuses a prompt with `<IMG_CONTEXT>` tokens but no `pixel_values`: it would be answered without the image."""
    if bool(context_mask.any()):
        raise NaViLInputError(
            f"The prompt has {int(context_mask.sum())} {IMG_CONTEXT_TOKEN} tokens but no pixel_values were given, so "
            "the model would answer without seeing the image; pass the processor's pixel_values and image_grid_thw "
            "with the prompt.",
            "image tokens without images",
        )


def looks_like_local_path(name) -> bool:
    """Whether a model name is meant as a folder rather than a Hub id (`owner/name`): absolute, starting with `.` or
    `~`, or with more than one `/`."""
    text = str(name)
    return Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text


def check_model_folder(name) -> None:
    """Refuses a model name that is meant as a folder but is none (instead of the Hub's "Repo id must be in the
    form ..."), naming it."""
    if looks_like_local_path(name) and not Path(str(name)).expanduser().is_dir():
        state = "is a file, not a folder" if Path(str(name)).expanduser().exists() else "does not exist"
        raise OSError(
            f"The model folder {name} {state}; pass the folder of a saved NaViL checkpoint (config.json, weights and "
            "tokenizer files), or a Hub id such as owner/name."
        )


# Files of which a tokenizer folder needs one (the vocabulary), and its JSON files.
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_folder(folder: Path) -> None:
    """Refuses a local folder without tokenizer files, or with a JSON tokenizer file that is empty, truncated or not
    JSON, naming the folder and the file (instead of "install sentencepiece" or a raw `JSONDecodeError`)."""
    if not any((folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        raise OSError(
            f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_VOCABULARY_FILES)}); save the tokenizer "
            "there with tokenizer.save_pretrained(folder), or copy the files of the original checkpoint."
        )
    for name in TOKENIZER_JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise ValueError(
                    f"{path} is not valid JSON ({error}); it is empty or truncated. Save or download the tokenizer "
                    "again."
                ) from None


def check_torchao_loading(model_class, name_or_path, kwargs: dict) -> None:
    """Refuses, before any weight is loaded, torchao settings that would fail inside `from_pretrained` ("look at the
    CONVERSION entries") or at the first chat: a group size that does not divide a layer's input features (naming the
    layer), `Int4WeightOnlyConfig` without a CUDA GPU, and a torchao checkpoint reloaded in another dtype than the
    one it was quantized in (its scales keep that dtype)."""
    config = kwargs.get("config")
    quantization = kwargs.get("quantization_config")
    if quantization is None:
        saved = config if isinstance(config, NaViLConfig) else _saved_config(model_class, name_or_path, kwargs)
        quantization = getattr(saved, "quantization_config", None)
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        dtype, saved_dtype = (
            kwargs.get(DTYPE_KWARG),
            getattr(saved, "dtype", None) or getattr(saved, "torch_dtype", None),
        )
        if isinstance(saved_dtype, str):
            saved_dtype = getattr(torch, saved_dtype, None)
        if method == "torchao" and isinstance(dtype, torch.dtype) and saved_dtype not in (None, dtype):
            raise ValueError(
                f"{name_or_path} is a torchao checkpoint quantized in {saved_dtype}, and its scales keep that dtype; "
                f"loading it as {dtype} fails at the first forward pass. Load it with {DTYPE_KWARG}={saved_dtype}, or "
                "quantize the full-precision checkpoint in the dtype you want."
            )
        return
    quant_type = getattr(quantization, "quant_type", None)
    if quant_type is None or isinstance(quant_type, (str, dict)):
        return
    kind = type(quant_type).__name__
    if kind == "Int4WeightOnlyConfig" and not torch.cuda.is_available():
        raise ValueError(
            "torchao's Int4WeightOnlyConfig has no CPU kernels and this machine has no CUDA GPU. On a CPU quantize to "
            "int4 with IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)) (from "
            "torchao.quantization and torchao.quantization.granularity), or to int8 with Int8WeightOnlyConfig()."
        )
    group = getattr(getattr(quant_type, "granularity", None), "group_size", None) or getattr(
        quant_type, "group_size", None
    )
    if not isinstance(group, int) or group <= 1:
        return
    if not isinstance(config, NaViLConfig):
        config = _saved_config(model_class, name_or_path, kwargs)
    if config is None:
        return
    skipped = list(getattr(quantization, "modules_to_not_convert", None) or [])
    with torch.device("meta"):
        model = model_class(config)
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(skip in module_name for skip in skipped):
            if module.in_features % group:
                raise ValueError(
                    f"torchao {kind} with group size {group} cannot quantize {module_name}: its {module.in_features} "
                    f"input features are not a multiple of {group}. Use a group size that divides every layer (e.g. "
                    "32), or leave such layers in full precision with modules_to_not_convert."
                )


def lora_layers_over_torchao_weights(module: torch.nn.Module) -> list[str]:
    """Names, inside `module`, of the PEFT adapter layers (LoRA and the like: modules with a `get_base_layer`) whose
    base layer holds a torchao-quantized weight (a tensor subclass from torchao)."""
    found = []
    for name, layer in module.named_modules():
        base = layer.get_base_layer() if callable(getattr(layer, "get_base_layer", None)) else None
        weight = getattr(base, "weight", None)
        if weight is not None and any(cls.__module__.startswith("torchao.") for cls in type(weight).__mro__):
            found.append(name)
    return found


class RefusesQuantizedLoraMerge:
    """Mixin of the layers LoRA adapts: refuses PEFT's `merge_and_unload()` into torchao-quantized weights.

    Merging dequantizes the weight, adds the adapter's update and quantizes the sum again, which rounds most of the
    update away (on the golden Qwen3-VE model, int4 moved logits by up to 1.2, int8 by 0.09, without a word). PEFT's
    `merge_and_unload()` and `unload()` ask every module for `unload_and_optionally_merge_module` before they touch
    the adapters under it; a layer holding adapters over torchao weights answers, so that merging is refused naming
    the adapter before any weight of the layer changes, and `unload()` (no merge) drops those adapters as PEFT does.
    """

    @property
    def unload_and_optionally_merge_module(self):
        names = lora_layers_over_torchao_weights(self)
        if not names:
            raise AttributeError("unload_and_optionally_merge_module")  # PEFT handles this layer's adapters itself
        return partial(self._unload_quantized_adapters, names)

    def _unload_quantized_adapters(self, names: list[str], merge: bool, safe_merge: bool = False, adapter_names=None):
        if merge:
            weight = type(self.get_submodule(names[0]).get_base_layer().weight).__name__
            raise ValueError(
                f"Cannot merge LoRA into torchao-quantized weights: the adapter {names[0]} of "
                f"{self.quantized_merge_name} wraps a torchao {weight} weight. Merging dequantizes it, adds the "
                "adapter and quantizes the sum again, which rounds most of the adapter's update away (logits change). "
                "Nothing in this layer was changed. Keep the adapters unmerged (the PeftModel runs them on top of the "
                "quantized weights; save_pretrained saves the adapter alone), or merge into the full-precision model: "
                "load the checkpoint without quantization_config, PeftModel.from_pretrained(model, "
                "ADAPTER).merge_and_unload(), then quantize the result."
            )
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, self.get_submodule(name).get_base_layer())
        return self


def _saved_config(model_class, name_or_path, kwargs: dict):
    """The config saved with a checkpoint, or None where it cannot be read (`from_pretrained` reports why)."""
    try:
        return model_class.config_class.from_pretrained(
            name_or_path, subfolder=kwargs.get("subfolder") or "", revision=kwargs.get("revision")
        )
    except (OSError, ValueError):
        return None


# (config field, header name pattern, axis, rank): the config's sizes each weight file states too, at `axis` of a
# tensor of `rank` dimensions; a layer count (axis None) is the number of distinct layer indices matched.
_SHAPE_FIELDS = (
    ("text_config.vocab_size", r"language_model\.model\.(embed_tokens|tok_embeddings)\.weight", 0, 2),
    ("text_config.hidden_size", r"language_model\.model\.(embed_tokens|tok_embeddings)\.weight", 1, 2),
    (
        "text_config.intermediate_size",
        r"language_model\.model\.layers\.0\.(mlp\.gate_proj|feed_forward\.w1)\.weight",
        0,
        2,
    ),
    ("text_config.num_hidden_layers", r"language_model\.model\.layers\.(\d+)\.", None, None),
    ("vision_config.hidden_size", r"vision_model\.embeddings\.patch_embedding\.weight", 0, 4),
    ("vision_config.patch_size", r"vision_model\.embeddings\.patch_embedding\.weight", 2, 4),
    ("vision_config.intermediate_size", r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight", 0, 2),
    ("vision_config.num_hidden_layers", r"vision_model\.encoder\.layers\.(\d+)\.", None, None),
)


# Bytes per element of the safetensors float dtypes.
_FLOAT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


# The config sizes a memory refusal lists, per section.
_SIZE_NAMES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux `MemAvailable`), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parameter_estimate(config: NaViLConfig) -> dict:
    """`{config field: parameters it multiplies}` of the largest parameter groups the config builds: the token
    embeddings and LM head, the decoder and vision layers (both experts of a routed decoder). Python integers: no
    overflow, nothing allocated."""
    text, vision = config.text_config, config.vision_config
    experts = 2 if text.modality_experts else 1
    heads_width = text.num_attention_heads * text.head_dim + 2 * text.num_key_value_heads * text.head_dim
    decoder_layer = experts * (2 * heads_width * text.hidden_size + 3 * text.hidden_size * text.intermediate_size)
    vision_layer = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
    return {
        "text_config.vocab_size": 2 * text.vocab_size * text.hidden_size,
        "text_config.num_hidden_layers": text.num_hidden_layers * decoder_layer,
        "vision_config.num_hidden_layers": vision.num_hidden_layers * vision_layer,
    }


def check_config_against_weights(folder: Path, config_class, kwargs: dict, strict: bool = True) -> None:
    """Refuses, before any tensor is allocated, a local checkpoint whose `config.json` states sizes its
    `*.safetensors` headers contradict (`text_config.vocab_size` = 5 000 000 against a 1024-row embedding; with
    `strict`, as the mismatch would be refused after loading anyway), and a config whose parameters would not fit
    in the available memory (`hidden_size` = 1e12), naming the field. Quantized loads are not checked (their
    weight files store packed shapes)."""
    config = kwargs.get("config")
    if config is None:
        try:
            config = config_class.from_pretrained(folder)
        except (OSError, ValueError):
            return  # from_pretrained reports it
    if not isinstance(config, NaViLConfig) or kwargs.get("quantization_config") is not None:
        return
    if getattr(config, "quantization_config", None) is not None:
        return
    shapes, itemsize = {}, 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_slice(key)
                shapes[key] = (tensor.get_shape(), path.name)
                itemsize = max(itemsize, _FLOAT_BYTES.get(tensor.get_dtype(), 0))
    if strict:
        for field, pattern, axis, rank in _SHAPE_FIELDS:
            section, name = field.split(".")
            value = getattr(getattr(config, section), name)
            matches = [(key, shape, file) for key, (shape, file) in shapes.items() if re.match(pattern, key)]
            if not matches:
                continue
            if axis is None:
                found = len({re.match(pattern, key).group(1) for key, _, _ in matches})
                where = f"the weight files hold {found} layers"
            else:
                key, shape, file = matches[0]
                if len(shape) != rank:
                    continue  # a damaged tensor, not a size of the config: the load names it as mismatched
                found = shape[axis]
                where = f"{file} stores {key} with shape {list(shape)}"
            if found != value:
                raise NaViLInputError(
                    f"{folder / 'config.json'} says {field} = {value!r:.40}, but {where} (so {field} = {found}); the "
                    f"config does not describe these weights. Fix {field} in config.json, or load with the config "
                    "saved with the weights.",
                    "config contradicts the weights",
                )
    dtype = kwargs.get(DTYPE_KWARG)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else itemsize or 4
    available = _available_memory()
    estimate = parameter_estimate(config)
    total = sum(estimate.values()) * itemsize
    if available is not None and total > available:
        largest = max(estimate, key=estimate.get)
        sizes = "; ".join(
            f"{section}: "
            + ", ".join(f"{name} = {getattr(part, name)}" for name in _SIZE_NAMES if hasattr(part, name))
            for section, part in (("text_config", config.text_config), ("vision_config", config.vision_config))
        )
        raise NaViLInputError(
            f"{folder / 'config.json'} describes a model of about {total / 2**30:.3g} GiB ({itemsize}-byte "
            f"parameters), more than the {available / 2**30:.3g} GiB of memory available; most of it in the part "
            f"that {largest} multiplies ({sizes}). Check these sizes in config.json, or load on a machine with more "
            "memory (or in a smaller dtype).",
            "config too large for the memory",
        )
