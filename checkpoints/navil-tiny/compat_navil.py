"""The differences between the transformers releases NaViL supports, detected once, in one place.

Remote code runs under whatever transformers the user has installed (4.51.0 through the newest 5.x), so the other
files import the version-dependent pieces from here and read as if there were one transformers. Everything is
feature-detected (modules, attributes and signatures), never inferred from version strings.
"""

import inspect
import json
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoProcessor, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import ProcessorMixin
from transformers.utils import ModelOutput

try:  # 4.53+
    from transformers import masking_utils
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
except ImportError:
    masking_utils = create_causal_mask = create_sliding_window_causal_mask = None

# transformers 5 masks packed sequences itself (several examples in a row, their position ids restarting at 0) when
# no 2-D attention mask is given; navil builds the per-example masks elsewhere.
MASKS_DETECT_PACKED_SEQUENCES = hasattr(masking_utils, "find_packed_sequence_indices")

try:  # 4.52+
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:

    class GradientCheckpointingLayer(nn.Module):
        """A layer that `gradient_checkpointing_enable` switches to recomputing its forward in the backward pass
        (pass tensors that need gradients positionally)."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)


# -- cache naming -----------------------------------------------------------------------------------------------

# 5.24 renamed the cache argument and output field `past_key_values` to `cache`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


def pop_cache(past_key_values: Optional[Cache], kwargs: dict) -> Optional[Cache]:
    """The cache a caller passed under either name (`past_key_values`, or `cache` from 5.24 on); removed from kwargs."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


def output_with_cache(output_class, cache: Optional[Cache], **fields):
    """`output_class(**fields)` with `cache` stored under the installed version's field name."""
    return output_class(**fields, **{CACHE_NAME: cache})


def cache_of(outputs) -> Optional[Cache]:
    """The cache held by a model output (under the installed version's name: 5.25 outputs warn about the old one) or
    a dict of generation inputs (under either name)."""
    for name in (CACHE_NAME,) if isinstance(outputs, ModelOutput) else CACHE_NAMES:
        cache = outputs.get(name)
        if cache is not None:
            return cache
    return None


def new_dynamic_cache(config) -> Cache:
    """An empty `DynamicCache` for `config` (5.x sizes its layers from the config; 4.x takes no arguments)."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


# 5.x tells `prepare_inputs_for_generation` whether it prepares the prompt (`is_first_iteration`); 4.x does not.
_GENERATION_TELLS_FIRST_ITERATION = (
    "is_first_iteration" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
)


def generation_step_holds_prompt(generation_kwargs: dict, model_inputs: dict) -> bool:
    """Whether the step `prepare_inputs_for_generation` prepares feeds the prompt (the first step, or every step
    without a cache), rather than generated tokens to a cache that holds the prompt: 5.x says so; 4.x asks the cache."""
    cache = cache_of(model_inputs)
    if cache is None:
        return True
    if _GENERATION_TELLS_FIRST_ITERATION:
        return bool(generation_kwargs.get("is_first_iteration", False))
    return not bool(cache.get_seq_length() > 0)


def generation_step_inputs(model_inputs: dict, generation_kwargs: dict, input_ids: torch.Tensor) -> dict:
    """The inputs of a generation step as 5.25 prepares them in every version: `mm_token_type_ids` cut to the step's
    tokens (those of the sequence so far, `input_ids`, text types (0) for tokens beyond them, such as an assistant's
    candidates), and no `pixel_values` once the cache holds the prompt (4.x and 5.0 pass both whole at every step)."""
    types = generation_kwargs.get("mm_token_type_ids")
    tokens = model_inputs.get("input_ids")
    if tokens is None:
        tokens = model_inputs.get("inputs_embeds")
    if types is not None and tokens is not None:
        types = torch.nn.functional.pad(types, (0, max(input_ids.shape[1] - types.shape[1], 0)))
        model_inputs["mm_token_type_ids"] = types[:, types.shape[1] - tokens.shape[1] :]
    if "pixel_values" in model_inputs and not generation_step_holds_prompt(generation_kwargs, model_inputs):
        model_inputs["pixel_values"] = None
    return model_inputs


def with_generated_token_types(update: Callable, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
    """`_update_model_kwargs_for_generation` (`update`), then `mm_token_type_ids` grown by a text type (0) per new
    token where this transformers does not grow them itself (before 5.25)."""
    types = model_kwargs.get("mm_token_type_ids")
    model_kwargs = update(outputs, model_kwargs, *args, **kwargs)
    if types is not None and model_kwargs.get("mm_token_type_ids") is types:
        arguments = inspect.signature(update).bind(outputs, model_kwargs, *args, **kwargs).arguments
        model_kwargs["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, arguments.get("num_new_tokens", 1)))
    return model_kwargs


def _one_row_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [1, K] x b [K, N] -> [1, N] as a product and a sum over K, for a weight stored as [N, K] (`b` its
    transposed view), which inductor runs as one pass over the weight; `NotImplemented` (aten's mm) otherwise."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    one_row = statically_known_true(a.shape[0] == 1) and statically_known_true(b.stride(0) == 1)
    if a.device.type != "cpu" or not one_row or a.dtype != b.dtype:
        return NotImplemented
    return (b.t() * a).sum(-1).unsqueeze(0)


def _one_row_addmm(bias, a, b, beta=1, alpha=1):
    product = _one_row_matmul(a, b) if beta == 1 and alpha == 1 else NotImplemented
    return product if product is NotImplemented else product + bias


def cpu_decode_backend(graph_module, example_inputs, **kwargs):
    """`torch.compile` backend of compiled decode steps on a CPU: inductor, with one-row matmuls (a batch-1 step's
    linears) as fused multiply-sums. aten's matmul reads a weight at about 60 % of the memory bandwidth for one row;
    inductor's reduction streams it, and a batch-1 step is bound by reading the weights. Plain inductor where this
    torch's `compile_fx` takes no decomposition table."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    if "decompositions" not in inspect.signature(compile_fx).parameters:
        return compile_fx(graph_module, example_inputs, **kwargs)
    table = dict(select_decomp_table())
    table[torch.ops.aten.mm.default] = _one_row_matmul
    table[torch.ops.aten.addmm.default] = _one_row_addmm
    return compile_fx(graph_module, example_inputs, decompositions=table, **kwargs)


def compiled_decode_settings(device: torch.device) -> dict:
    """`generate` arguments that run decode steps compiled (static cache, one graph per step), on CPUs too (transformers
    compiles on accelerators only unless `CompileConfig._compile_all_devices`, present since 4.47, is set)."""
    from transformers import CompileConfig

    if device.type == "cpu":
        config = CompileConfig(fullgraph=True, dynamic=None, backend=cpu_decode_backend, mode="default")
    else:
        config = CompileConfig(fullgraph=True, dynamic=None)
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


# -- attention ----------------------------------------------------------------------------------------------------


def attention_function(implementation: str, eager_function: Callable) -> Callable:
    """The attention function registered for `implementation`, `eager_function` for "eager"."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # 5.x
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_function)
    return eager_function if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


if create_causal_mask is not None:
    _MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
    # 5.24 names the cache `cache`; 5.4 renamed `input_embeds` to `inputs_embeds` and dropped `cache_position`.
    _MASK_CACHE_NAME = "cache" if "cache" in _MASK_PARAMETERS else "past_key_values"
    _MASK_EMBEDS_NAME = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"
    _MASK_TAKES_CACHE_POSITION = "cache_position" in _MASK_PARAMETERS


def _past_length(cache: Optional[Cache]):
    """Tokens already in `cache` (a device tensor for static caches, so compiled steps need no host sync)."""
    return cache.get_seq_length() if cache is not None else 0


try:
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    # varlen flash attention reads a packed row's boundaries from these keyword arguments (else from position ids)
    _FLASH_TAKES_VARLEN_KWARGS = "cu_seq_lens_q" in inspect.signature(_flash_attention_forward).parameters
except ImportError:
    _FLASH_TAKES_VARLEN_KWARGS = False


def flash_packed_kwargs(packed: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The keyword arguments with which transformers' flash attention runs the examples of one packed row
    (`packed_sequence_ids` [1, seq]) as separate sequences: the position ids and, where it takes them, the examples'
    boundaries (`cu_seq_lens_q/k`) and longest length (`max_length_q/k`), computed once for all layers."""
    kwargs = {"position_ids": position_ids}
    if _FLASH_TAKES_VARLEN_KWARGS:
        lengths = torch.bincount(packed[0])
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
    return kwargs


def packed_sequence_ids(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[batch, seq]: the index of the packed example each token belongs to, where the position ids restart (a new
    example starts wherever a position is not its predecessor + 1); None when every row is one sequence."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    steps = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    sequence_ids = (steps != 1).cumsum(-1)
    return sequence_ids if bool(sequence_ids[:, -1].any()) else None


def causal_masks(config, inputs_embeds, attention_mask, cache, position_ids, sliding_window: bool, packed=None):
    """(full-attention mask, sliding-window mask or None) in the form the configured attention implementation takes.

    `attention_mask` is the 2-D padding mask [batch, kv_len] (or None); masks are sized to the cache's keys (the
    maximum length for static caches). `packed` (`packed_sequence_ids`, without mask or cache) makes the masks
    per-example: transformers' own where it detects packed sequences, navil's otherwise.
    """
    if create_causal_mask is None or (packed is not None and not MASKS_DETECT_PACKED_SEQUENCES):
        return _fallback_causal_masks(config, inputs_embeds, attention_mask, cache, sliding_window, packed)
    mask_kwargs = {
        "config": config,
        _MASK_EMBEDS_NAME: inputs_embeds,
        "attention_mask": attention_mask,
        _MASK_CACHE_NAME: cache,
        "position_ids": position_ids,
    }
    if _MASK_TAKES_CACHE_POSITION:
        seq_len = inputs_embeds.shape[1]
        mask_kwargs["cache_position"] = torch.arange(seq_len, device=inputs_embeds.device) + _past_length(cache)
    full_mask = create_causal_mask(**mask_kwargs)
    window_mask = create_sliding_window_causal_mask(**mask_kwargs) if sliding_window else None
    return full_mask, window_mask


def _fallback_causal_masks(config, inputs_embeds, attention_mask, cache, sliding_window: bool, packed=None):
    """`causal_masks` for releases without `masking_utils` (4.51, 4.52) or without its packed sequences, built as
    those releases' attention functions take them: eager an additive float mask [batch, 1, q, kv], sdpa a boolean one
    (None where `is_causal` suffices), flash attention the 2-D padding mask (None for packed rows, which it reads
    from the position ids). `packed` (`packed_sequence_ids`) keeps each token within its example."""
    if attention_mask is not None and attention_mask.ndim == 4:  # already a mask in the implementation's form
        return attention_mask, attention_mask if sliding_window else None
    batch, seq_len = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    past_length = _past_length(cache)
    # static caches hand attention all `max_cache_len` keys; dynamic ones the past and the new tokens
    max_length = cache.get_max_cache_shape() if cache is not None else None
    kv_length = max_length if max_length is not None and max_length > 0 else int(past_length) + seq_len
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()[:, :kv_length]
        # positions the 2-D mask does not reach are future slots of a static cache, hidden by causality anyway
        padding = nn.functional.pad(padding, (0, kv_length - padding.shape[1]), value=True)
    implementation = config._attn_implementation or "sdpa"

    def mask(window: Optional[int]):
        query_positions = torch.arange(seq_len, device=device) + past_length  # [q]
        key_positions = torch.arange(kv_length, device=device)  # [kv]
        allowed = key_positions[None, :] <= query_positions[:, None]  # [q, kv]
        if window is not None:
            allowed = allowed & (key_positions[None, :] > query_positions[:, None] - window)
        allowed = allowed[None, None].expand(batch, 1, seq_len, kv_length)
        if padding is not None:
            allowed = allowed & padding[:, None, None, :]
        if implementation.startswith("flash"):
            return None if padding is None or bool(padding.all()) else attention_mask
        if packed is not None:  # no cache: queries and keys are the same tokens
            allowed = allowed & (packed[:, None, :, None] == packed[:, None, None, :])
        if implementation == "eager":
            dtype = inputs_embeds.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        no_padding = packed is None and (padding is None or bool(padding.all()))
        fits_window = window is None or kv_length < window
        if no_padding and fits_window and (seq_len == 1 or seq_len == kv_length):
            return None  # sdpa's own causal masking
        return allowed

    return mask(None), mask(config.sliding_window) if sliding_window else None


# -- loading and saving -------------------------------------------------------------------------------------------


def register_processor_for_pipelines(config_class, processor_class) -> None:
    """Lets `pipeline(task, model=folder)` find the processor: 4.x pipelines load one only for config classes that
    `AutoProcessor` maps (5.x reads processor_config.json)."""
    AutoProcessor.register(config_class, processor_class, exist_ok=True)


# 5.x finds a processor's sub-processors from its `__init__` parameters and loads each through its Auto class (5.25
# warns about an `image_processor_class` attribute); 4.x reads the class names from `<attribute>_class` attributes.
PROCESSOR_NAMES_SUBPROCESSOR_CLASSES = not hasattr(ProcessorMixin, "get_attributes")
# 5.25 maps a config to one image processor per backend ("pil", "torchvision") and loads the one asked for.
IMAGE_PROCESSOR_BACKENDS = "image_processor_classes" in inspect.signature(AutoImageProcessor.register).parameters


def register_image_processor(config_class, image_processor_class, fast_image_processor_class) -> None:
    """Maps `config_class` to its image processors in `AutoImageProcessor`, so that loading a folder's image
    processor finds these (local) classes instead of asking for remote code. 5.25 takes a dict per backend (a
    `BaseImageProcessor` is the PIL one, the torch one is "torchvision"'s). Earlier releases take the slow one only:
    their fast slot wants a `BaseImageProcessorFast`, and `NaViLProcessor` picks the fast class itself there."""
    if IMAGE_PROCESSOR_BACKENDS:
        classes = {
            "image_processor_classes": {"pil": image_processor_class, "torchvision": fast_image_processor_class}
        }
    else:
        classes = {"slow_image_processor_class": image_processor_class}
    AutoImageProcessor.register(config_class, **classes, exist_ok=True)


# `from_pretrained(torch_dtype=...)` became `dtype=` in 4.56; the config gained `dtype` with it.
DTYPE_KWARG = "dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype"


def with_dtype_kwarg(kwargs: dict) -> dict:
    """`from_pretrained` kwargs with the dtype under the installed version's name, whichever name the caller used."""
    for name in ("dtype", "torch_dtype"):
        if name != DTYPE_KWARG and name in kwargs:
            kwargs.setdefault(DTYPE_KWARG, kwargs.pop(name))
    return kwargs


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _portable_tokenizer_config(config: dict) -> dict:
    """The config of a tokenizer saved as tokenizer.json, in the form every release reads.

    5.x names the class `TokenizersBackend` and lists `extra_special_tokens`, which 4.x cannot read; 4.x names it
    `PreTrainedTokenizer`, which 4.x itself then loads as a slow tokenizer under `use_fast=False` (as the original model
    card asks) and fails. `PreTrainedTokenizerFast` (an alias of `TokenizersBackend` in 5.x) and
    `additional_special_tokens` read the same on both."""
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizer"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        additional = config.setdefault("additional_special_tokens", [])
        additional.extend(token for token in extra if token not in additional)
    return config


def make_saved_processor_portable(save_directory) -> None:
    """Rewrites the processor files a `save_pretrained` just wrote so that every supported release loads them.

    - The tokenizer config gets the class name and special-token list that 4.x also reads.
    - 5.x nests the image processor's settings in `processor_config.json`; 4.x reads them from
      `preprocessor_config.json` and passes every key of `processor_config.json` to the processor's `__init__`. The
      settings move to `preprocessor_config.json`, which 5.x reads too when `processor_config.json` has none.
    """
    directory = Path(save_directory)
    tokenizer_file = directory / "tokenizer_config.json"
    if tokenizer_file.is_file() and (directory / "tokenizer.json").is_file():
        _write_json(tokenizer_file, _portable_tokenizer_config(json.loads(tokenizer_file.read_text(encoding="utf-8"))))
    processor_file = directory / "processor_config.json"
    if not processor_file.is_file():
        return
    processor_config = json.loads(processor_file.read_text(encoding="utf-8"))
    image_processor_config = processor_config.pop("image_processor", None)
    if image_processor_config is not None:
        _write_json(directory / "preprocessor_config.json", image_processor_config)
        _write_json(processor_file, processor_config)


# -- training -----------------------------------------------------------------------------------------------------

_CHECKPOINTING_NAMES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def with_checkpointing_names(training_arguments: dict) -> dict:
    """`TrainingArguments` keyword arguments with activation checkpointing under the installed release's names,
    whichever the caller used: 5.24 renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)`
    and warns about the old names."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    for old, new in _CHECKPOINTING_NAMES:
        given, installed = (old, new) if new in fields else (new, old)
        if given in training_arguments:
            training_arguments.setdefault(installed, training_arguments.pop(given))
    return training_arguments
