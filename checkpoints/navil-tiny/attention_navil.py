"""Attention functions of NaViL: the decoder's eager attention and the vision tower's packed block attention.

The vision tower attends within blocks of tokens (windows, or whole image-scales) of many lengths at once.
`AttentionBlocks` groups blocks of equal length so that `block_diagonal_attention` runs one batched call per length
(no padding, no dense mask), or one varlen flash-attention call on CUDA when flash-attn is installed. Both the decoder
and the vision tower look their attention function up by implementation name in transformers' attention registry
(`attention_interface`), with `eager_attention_forward` as the reference; the vision tower refuses, naming the fix, a
kernel it cannot run (`vision_attention_interface`).
"""

from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F

from .compat_navil import attention_function

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


class BlockGroup(NamedTuple):
    """Blocks of one length, batched: `tokens` selects their tokens block by block (a slice when they are adjacent)."""

    tokens: Union[slice, torch.Tensor]
    num_blocks: int
    length: int


class AttentionBlocks(NamedTuple):
    """Contiguous blocks of tokens attending only within themselves.

    Blocks of equal length are batched together (`groups`), so attention runs without padding or masks and its cost
    and memory grow with the number of blocks, not with the longest block; `cu_seqlens` are the block boundaries for
    varlen kernels.
    """

    groups: list[BlockGroup]
    cu_seqlens: torch.Tensor  # [blocks + 1], int32
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, device: torch.device) -> "AttentionBlocks":
        starts_by_length = {}
        start = 0
        for length in lengths.tolist():
            starts_by_length.setdefault(length, []).append(start)
            start += length
        groups = []
        for length, starts in starts_by_length.items():
            first, end = starts[0], starts[0] + len(starts) * length
            if starts == list(range(first, end, length)):
                tokens = slice(first, end)
            else:
                tokens = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(device)
            groups.append(BlockGroup(tokens, len(starts), length))
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        return cls(groups, cu_seqlens, max(starts_by_length))


def block_diagonal_attention(module, query, key, value, blocks: AttentionBlocks, implementation: str, scaling: float):
    """Bidirectional attention inside each block; [tokens, heads, head_dim] in and out. `module` is the calling
    attention layer (registry functions read `is_causal`, `num_key_value_groups` and `training` from it).

    Returns `(output, weights)`: where the kernel returns weights (eager), one [blocks, heads, length, length] tensor
    per group of equal-length blocks (in `blocks.groups` order), else `None`.
    """
    attend = vision_attention_interface(implementation)
    # the kernel of "flash_attention_2", called once over all blocks (varlen) instead of once per block length
    if implementation == "flash_attention_2" and flash_attn_varlen_func is not None and query.is_cuda:
        output = flash_attn_varlen_func(
            query,
            key,
            value,
            blocks.cu_seqlens,
            blocks.cu_seqlens,
            blocks.max_len,
            blocks.max_len,
            softmax_scale=scaling,
        )
        return output, None
    output, all_weights = None, ()
    for group in blocks.groups:
        # [blocks, heads, length, head_dim]
        batch = [
            states[group.tokens].view(group.num_blocks, group.length, *states.shape[1:]).transpose(1, 2)
            for states in (query, key, value)
        ]
        # [blocks, length, heads, head_dim]: equal-length blocks need no mask
        # is_causal passed too: older registry functions ignore `module.is_causal`
        group_output, weights = attend(module, *batch, None, scaling=scaling, dropout=0.0, is_causal=False)
        all_weights = all_weights + (weights,) if weights is not None and all_weights is not None else None
        group_output = group_output.reshape(-1, *query.shape[1:])
        if len(blocks.groups) == 1 and isinstance(group.tokens, slice):
            return group_output, all_weights
        if output is None:
            output = query.new_empty(query.shape)
        output[group.tokens] = group_output
    return output, all_weights


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [batch, heads, q_len, d]; key/value [batch, kv_heads, kv_len, d] -> [batch, q_len, heads, d]
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_interface(implementation: str) -> Callable:
    """The decoder's attention function for `implementation` ("eager", "sdpa", "flash_attention_2", …)."""
    return attention_function(implementation, eager_attention_forward)


def vision_attention_interface(implementation: str) -> Callable:
    """The vision tower's attention function for `implementation`, from the same registry as the decoder's. Refused,
    naming the fix: a name the registry does not hold, a kernel that reads a paged KV cache (the vision tower has no
    cache), and flex attention, which would need a block mask per image (without one it gives NaN on the CPU for
    some block lengths); running another kernel in their place would silently give other numbers."""
    reason = None
    if "paged" in implementation:
        reason = "it reads a paged KV cache, which the vision tower does not have"
    elif implementation == "flex_attention":
        reason = "the vision tower's blocks would need a flex block mask, which it does not build"
    if reason is not None:
        raise ValueError(
            f"The vision tower cannot run the attention implementation {implementation!r}: {reason}. Use 'sdpa', "
            "'eager' or a flash-attention kernel for the vision config (`config.vision_config._attn_implementation`)."
        )
    try:
        return attention_interface(implementation)
    except KeyError:
        raise ValueError(
            f"The attention implementation {implementation!r} is not registered in transformers' attention registry; "
            "register it with `transformers.AttentionInterface.register` or use 'sdpa' or 'eager'."
        ) from None
