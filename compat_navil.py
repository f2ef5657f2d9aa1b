"""The differences between the transformers releases NaViL supports, detected once, in one place.

Remote code runs under whatever transformers the user has installed (4.51.0 through the newest 5.x), so the other
files import the version-dependent pieces from here and read as if there were one transformers. Everything is
feature-detected (attributes and signatures), never inferred from version strings.
"""

import inspect
from typing import Optional

from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

# 5.24 renamed the cache argument and output field `past_key_values` to `cache`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")
_MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def pop_cache(past_key_values: Optional[Cache], kwargs: dict) -> Optional[Cache]:
    """The cache a caller passed under either name (`past_key_values`, or `cache` from 5.24 on); removed from kwargs."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


def output_with_cache(output_class, cache: Optional[Cache], **fields):
    """`output_class(**fields)` with `cache` stored under the installed version's field name."""
    return output_class(**fields, **{CACHE_NAME: cache})


def cache_of(outputs) -> Optional[Cache]:
    """The cache held by a model output or a dict of generation inputs, whichever name it is under."""
    for name in CACHE_NAMES:
        cache = outputs.get(name)
        if cache is not None:
            return cache
    return None


def new_dynamic_cache(config) -> Cache:
    """An empty `DynamicCache` for `config` (5.x sizes its layers from the config; 4.x takes no arguments)."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


def causal_masks(config, inputs_embeds, attention_mask, cache, position_ids, sliding_window: bool):
    """(full-attention mask, sliding-window mask or None) in the form the configured attention implementation takes.

    `attention_mask` is the 2-D padding mask [batch, kv_len] (or None); static caches are handled by the mask
    functions of transformers, which size the mask to the cache.
    """
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        _MASK_CACHE_NAME: cache,
        "position_ids": position_ids,
    }
    full_mask = create_causal_mask(**mask_kwargs)
    window_mask = create_sliding_window_causal_mask(**mask_kwargs) if sliding_window else None
    return full_mask, window_mask


# `from_pretrained(torch_dtype=...)` became `dtype=` in 4.56; the config gained `dtype` with it.
DTYPE_KWARG = "dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype"


def with_dtype_kwarg(kwargs: dict) -> dict:
    """`from_pretrained` kwargs with the dtype under the installed version's name, whichever name the caller used."""
    for name in ("dtype", "torch_dtype"):
        if name != DTYPE_KWARG and name in kwargs:
            kwargs.setdefault(DTYPE_KWARG, kwargs.pop(name))
    return kwargs
