"""What serving NaViL needs whatever the engine: it imports no engine, so that an engine's model (`serving/vllm.py`;
an SGLang one would be a second file beside it) only wraps these in its own layers, scheduler and registry.

- the architectures to register and the refusals of configs the served model does not cover;
- the processor classes to register with transformers' Auto classes (a folder is then served with the installed code);
- the image sizes to profile and the number of tokens of an image's block;
- weight transforms from the checkpoint's tensors to fused layers (InternLM2's interleaved `wqkv`), named by the layout
  spec (`layouts_navil`);
- the embeddings of an image block (its `special_token_embedding` rows with the connector's features over the
  `<IMG_CONTEXT>` rows);
- the embeddings and modality routing of one step, given which of its tokens the engine generated, by the rule of
  `modeling_navil.token_types` (a generated token takes the word embeddings and the text experts).
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from PIL import Image
from torch import nn

from ..configuration_navil import (
    IMG_CONTEXT_TOKEN,
    SPECIAL_TOKEN_EMBEDDING_ROWS,
    NaViLConfig,
    NaViLTextConfig,
    special_token_rows,
)
from ..modeling_navil import IMAGE_TOKEN, ModalityRouter, token_types, typed_embeddings
from ..processing_navil import image_block_tokens

# The architecture names of navil's configs and of the original checkpoints (kept by `navil convert`).
ARCHITECTURES = ("NaViLForConditionalGeneration", "NaViL")
# Aspect ratios tried for the image with the most tokens (profiling): at the pixel limit, taller images have more rows.
PROFILED_ASPECT_RATIOS = ((1, 1), (1, 2), (2, 1), (1, 4), (4, 1), (1, 8))


def register_processors() -> None:
    """Adds navil's processor classes to transformers' Auto classes for NaViL configs, so that an engine loading a
    folder's processor uses the installed code (the folder's own files run only with `trust_remote_code`)."""
    from transformers import AutoImageProcessor, AutoProcessor

    from ..image_processing_navil import NaViLImageProcessor
    from ..processing_navil import NaViLProcessor

    AutoProcessor.register(NaViLConfig, NaViLProcessor, exist_ok=True)
    AutoImageProcessor.register(NaViLConfig, slow_image_processor_class=NaViLImageProcessor, exist_ok=True)


def check_servable(config: NaViLConfig) -> None:
    """Refuses, naming the fix, a config the served model does not cover."""
    if not config.special_token_ids:
        raise ValueError(
            "This config has no special_token_ids; convert the checkpoint once with `navil convert` (weights "
            "unchanged), which writes them with the tokenizer."
        )
    if not config.text_config.modality_experts:
        raise ValueError(
            "This is a dense NaViL (text_config.modality_experts=False), which navil's vLLM model does not serve; "
            "serve it with transformers (model.chat / batch_chat)."
        )


def num_image_tokens(image_processor, width: int, height: int) -> int:
    """Tokens of the `<img> … </img>` block of an image of this size, all scales of its pyramid included."""
    grids = image_processor(Image.new("RGB", (width, height)), multiscale=True, return_tensors="pt")["image_grid_thw"]
    return len(image_block_tokens(grids.tolist(), image_processor.merge_size))


def largest_image_size(image_processor) -> tuple[int, int]:
    """`(width, height)` of the image with the most tokens among `PROFILED_ASPECT_RATIOS` at the pixel limit."""
    max_pixels = image_processor.max_pixels
    sizes = [
        (int((max_pixels * wide / tall) ** 0.5), int((max_pixels * tall / wide) ** 0.5))
        for wide, tall in PROFILED_ASPECT_RATIOS
    ]
    return max(sizes, key=lambda size: num_image_tokens(image_processor, *size))


def rope_parameters(config: NaViLTextConfig) -> dict:
    """The RoPE of the text config for an engine. Dynamic NTK changes nothing up to `max_position_embeddings`, the
    longest context served, so it is served as plain RoPE."""
    parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_type == "linear":
        parameters.update(rope_type="linear", factor=config.rope_factor)
    return parameters


def deinterleave_wqkv(weight: torch.Tensor, config: NaViLTextConfig) -> dict[str, torch.Tensor]:
    """InternLM2's fused `wqkv` rows ([KV, G + 2, D] blocks: the G query heads of each key/value head, its key, its
    value) as "q", "k" and "v" shards (weight [rows, hidden] or bias [rows])."""
    kv_heads, dim = config.num_key_value_heads, config.head_dim
    groups = config.num_attention_heads // kv_heads
    blocks = weight.view(kv_heads, groups + 2, dim, -1)
    shards = {"q": blocks[:, :groups], "k": blocks[:, groups], "v": blocks[:, groups + 1]}
    return {name: shard.reshape(-1, *weight.shape[1:]) for name, shard in shards.items()}


def weight_shards(
    name: str, tensor: torch.Tensor, config: NaViLConfig
) -> list[tuple[str, torch.Tensor, Optional[Union[str, int]]]]:
    """What the checkpoint tensor `name` loads into, as (engine parameter name, tensor, shard or None) triples, from
    the layout of `config.text_config`: a part of a fused layer (`Layout.stacked_params`) goes to its shard, the fused,
    interleaved qkv of InternLM2 as q, k and v shards of the same name; nothing for rotary tables and a tied head."""
    text = config.text_config
    layout = text.layout
    if name.endswith("rotary_emb.inv_freq"):
        return []
    if text.tie_word_embeddings and name.startswith(f"language_model.{layout.head}."):
        return []
    if any(part in name for part in layout.fused_qkv_parts()):
        return [(name, part, shard) for shard, part in deinterleave_wqkv(tensor, text).items()]
    for part_name, fused_name, shard in layout.stacked_params():
        if part_name in name:
            return [(name.replace(part_name, fused_name), tensor, shard)]
    return [(name, tensor, None)]


def image_block_embeddings(
    special_token_embedding: nn.Embedding,
    features: torch.Tensor,
    grids: torch.Tensor,
    num_scales: Sequence[int],
    merge: int,
) -> list[torch.Tensor]:
    """One [block tokens, hidden] tensor per image: the `special_token_embedding` rows of the block's tokens, with
    the connector's `features` ([units, hidden], all images and scales in order) over its `<IMG_CONTEXT>` rows.
    `grids` [scales, 3] on the CPU, `num_scales` the scales of each image."""
    device = special_token_embedding.weight.device
    image_grids = grids.split(list(num_scales))
    units = [int(grid.prod(-1).sum()) // merge**2 for grid in image_grids]
    context_row = SPECIAL_TOKEN_EMBEDDING_ROWS.index(IMG_CONTEXT_TOKEN)
    blocks = []
    for grid, image_features in zip(image_grids, features.split(units)):
        tokens = image_block_tokens(grid.tolist(), merge)
        rows = torch.tensor([SPECIAL_TOKEN_EMBEDDING_ROWS.index(token) for token in tokens], device=device)
        block = special_token_embedding(rows).to(features.dtype)  # [block tokens, hidden]
        blocks.append(block.masked_scatter((rows == context_row)[:, None], image_features))
    return blocks


def step_embeddings(
    config: NaViLConfig,
    special_token_embedding: nn.Embedding,
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    generated: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[ModalityRouter]]:
    """The embeddings of one step ([tokens, hidden]: the word embeddings with image blocks already in place) and the
    router of its visual tokens, by `modeling_navil`'s rule (`token_types`, `typed_embeddings`): prompt tokens by
    their ids, the tokens of `generated` ([tokens] bool, None where the engine cannot tell: profiling) as text."""
    rows = special_token_rows(config.special_token_ids, input_ids)
    types = token_types(rows, generated)
    inputs_embeds = typed_embeddings(inputs_embeds, rows, types, special_token_embedding)
    return inputs_embeds, ModalityRouter.build(types == IMAGE_TOKEN)
