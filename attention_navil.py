"""Attention functions of NaViL: the decoder's eager attention and the vision tower's packed block attention.

The vision tower attends within blocks of tokens (windows, or whole image-scales) of many lengths at once.
`AttentionBlocks` groups blocks of equal length so that `block_diagonal_attention` runs one batched call per length
(no padding, no dense mask), or one varlen flash-attention call on CUDA when flash-attn is installed. The decoder looks
its attention function up by implementation name (`attention_interface`), with `eager_attention_forward` as the
reference.
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


def block_diagonal_attention(query, key, value, blocks: AttentionBlocks, implementation: str, scaling: float):
    """Bidirectional attention inside each block; [tokens, heads, head_dim] in and out.

    Returns `(output, weights)`: with eager attention `weights` has one [blocks, heads, length, length] tensor per
    group of equal-length blocks (in `blocks.groups` order); other implementations return `None`.
    """
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
    output, all_weights = None, () if implementation == "eager" else None
    for group in blocks.groups:
        # [blocks, heads, length, head_dim]
        batch = [
            states[group.tokens].view(group.num_blocks, group.length, *states.shape[1:]).transpose(1, 2)
            for states in (query, key, value)
        ]
        if implementation == "eager":
            scores = torch.matmul(batch[0], batch[1].transpose(-1, -2)) * scaling
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
            group_output = torch.matmul(weights, batch[2])
            all_weights += (weights,)
        else:
            group_output = F.scaled_dot_product_attention(*batch, scale=scaling)
        group_output = group_output.transpose(1, 2).reshape(-1, *query.shape[1:])
        if len(blocks.groups) == 1 and isinstance(group.tokens, slice):
            return group_output, all_weights
        if output is None:
            output = query.new_empty(query.shape)
        output[group.tokens] = group_output
    return output, all_weights


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [batch, heads, q_len, d]; key/value [batch, kv_heads, kv_len, d] -> [batch, q_len, heads, d]
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
