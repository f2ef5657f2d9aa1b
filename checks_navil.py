"""What NaViL refuses, and why: the checks that turn bad inputs into a `ValueError` naming the problem and the fix.

- loading: checkpoint folders (`check_local_checkpoint`, unfinished saves with `check_save_complete`) and the original model card's quantization flags
  (`with_quantization_config`);
- running: images (`check_pixel_values`, `check_image_tokens`), prompts (`check_prompt`) and generation lengths
  (`check_generation_length`).

The model calls them before any work is done (before the vision tower runs, before generation starts), so that a
bad input never ends in an error deep inside torch or in a silently wrong answer.
"""

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .compat_navil import DTYPE_KWARG
from .configuration_navil import (
    IMG_CONTEXT_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    NaViLConfig,
    NaViLTextConfig,
    NaViLVisionConfig,
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
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); it is truncated, empty or not safetensors. "
                "Download or save the checkpoint again."
            ) from None


def check_loading_info(
    info: dict, checkpoint, model_name: str, text_config: NaViLTextConfig, strict: bool = True
) -> None:
    """Refuses a loaded checkpoint with missing, unexpected or mismatched tensors (`from_pretrained`'s loading info),
    naming them, instead of letting them be initialised at random (only with `strict`). Visual-expert (`_ve`) weights
    and a dense config (`modality_experts=False`) are refused even without `strict`: the model would silently run the
    image tokens through the text weights."""
    unexpected_experts = sorted(key for key in info["unexpected_keys"] if "_ve." in key)
    if not text_config.modality_experts and unexpected_experts:
        raise ValueError(
            f"The checkpoint at {checkpoint} has visual-expert weights ({len(unexpected_experts)} `_ve` tensors, e.g. "
            f"{unexpected_experts[0]}) but the config builds a dense decoder (text_config.modality_experts=False), "
            "which would ignore them. Load it with its own config (without modality_experts=False); a dense model "
            "starts from a text LLM instead (navil.training.upcycle_from_text_model)."
        )
    if not strict:
        return
    missing_experts = sorted(key for key in info["missing_keys"] if "_ve." in key)
    if missing_experts and len(missing_experts) == len(info["missing_keys"]) and not info["unexpected_keys"]:
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
        raise ValueError(
            f"The checkpoint at {checkpoint} does not match {model_name} ({details}). Check that it is a NaViL "
            "checkpoint of this configuration, or pass strict=False to load it anyway (missing and mismatched tensors "
            "are then initialised at random, unexpected ones ignored)."
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
        raise ValueError(
            f"The prompt has {found} {IMG_CONTEXT_TOKEN} tokens but the images give {expected} features; build "
            "the prompt with the processor (or expand each <image> with the same image_grid_thw)."
        )
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
        raise ValueError(
            f"The prompt's image tokens do not follow image_grid_thw: frame {frame} of the image-scales has {has} "
            f"{IMG_CONTEXT_TOKEN} tokens but its grid gives {wants} features, so features would land on another "
            "image's tokens. Take the prompt and the images from one processor call, in the same order."
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
        raise ValueError(
            f"The inputs are on {tokens.device} but the model is on {device}; move them with .to(model.device)."
        )
    if input_ids is not None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}; convert with .long().")
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}; add the batch dimension "
                "with input_ids[None]."
            )
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != text.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, seq, {text.hidden_size}], got shape {tuple(inputs_embeds.shape)}."
            )
    if tokens.shape[1] == 0:
        raise ValueError("The prompt is empty (0 tokens); pass at least one token, e.g. from build_prompt.")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt is [batch, seq] = "
                f"{tuple(tokens.shape[:2])}; pass the attention_mask returned with input_ids by the processor."
            )
    if text.rope_type != "dynamic" and tokens.shape[1] > text.max_position_embeddings:
        raise ValueError(
            f"The prompt has {tokens.shape[1]} tokens but the model supports {text.max_position_embeddings} "
            "positions; shorten the prompt or use fewer/smaller images (max_pixels)."
        )
    if input_ids is not None and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= text.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {text.vocab_size}) but range over [{low}, {high}]; was the prompt "
                "tokenized with this model's tokenizer?"
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
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r:.40}; e.g. {name}=64.")
    total = prompt_length + new_tokens if new_tokens is not None else max(max_length or 0, prompt_length)
    if text.rope_type != "dynamic" and total > text.max_position_embeddings:
        room = text.max_position_embeddings - prompt_length
        raise ValueError(
            f"The prompt has {prompt_length} tokens and up to {total - prompt_length} new tokens were asked for, "
            f"more than the model's {text.max_position_embeddings} positions; "
            + (f"lower max_new_tokens to at most {room}, or " if room > 0 else "")
            + "shorten the prompt or history, or use fewer/smaller images (max_pixels)."
        )


def check_pixel_values(pixel_values: torch.Tensor, vision: NaViLVisionConfig) -> None:
    """Refuses pixel values the vision tower cannot take: not floating point, on the meta device, not [patches,
    3·P·P] or [patches, 3, P, P] for this patch size, or not finite."""
    patch_shape = (vision.num_channels, vision.patch_size, vision.patch_size)
    if not torch.is_floating_point(pixel_values):
        raise ValueError(
            f"pixel_values must be floating point (the image processor's output), got {pixel_values.dtype}."
        )
    if pixel_values.device.type == "meta":
        raise ValueError("pixel_values are on the meta device and hold no values; pass the processor's output.")
    if pixel_values.shape[1:] not in ((patch_shape[0] * patch_shape[1] * patch_shape[2],), patch_shape):
        raise ValueError(
            f"pixel_values must be [patches, {patch_shape[0] * patch_shape[1] * patch_shape[2]}] or [patches, "
            f"{', '.join(map(str, patch_shape))}] for this model, got shape {tuple(pixel_values.shape)}; pass the "
            "image processor's pixel_values with the model's patch_size."
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values contain NaN or infinite values; check the image or preprocessing.")


def check_num_scales(num_scales, image_grid_thw) -> None:
    """Refuses `num_scales` (scales per image) with an image of no scale, or not adding up to the image-scales."""
    if num_scales is not None and bool((torch.as_tensor(num_scales) < 1).any()):
        raise ValueError(f"num_scales must give every image at least one scale, got {num_scales.tolist()}.")
    if num_scales is not None and image_grid_thw is not None and int(num_scales.sum()) != len(image_grid_thw):
        raise ValueError(
            f"num_scales adds up to {int(num_scales.sum())} image-scales but image_grid_thw has "
            f"{len(image_grid_thw)} rows."
        )
