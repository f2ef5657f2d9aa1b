"""PyTorch NaViL: a native multimodal LLM with a native-resolution ViT and modality-expert decoders.

Read top to bottom:
1. the vision encoder (`NaViLVisionModel`): patch embedding, 2-D rotary positions, window reordering and
   block-diagonal attention packed into batched calls (windows in most layers, whole image-scales in the others);
2. the connector (`mlp1` of `NaViLForConditionalGeneration`): 2×2 pixel shuffle then an MLP into the LLM width;
3. the modality-expert decoder: `ModalityRouter` sends every token through exactly one expert (text or visual
   weights) by gathering each modality's rows once and scattering the results back; the InternLM2-VE and Qwen3-VE
   layouts share it and differ only in their projections and parameter names;
4. `NaViLForConditionalGeneration`: embeddings with image features scattered in, the loss, generation and the
   chat helpers (`chat`, `batch_chat`, `stream_chat`).

Parameter names equal those of the original NaViL checkpoints, so they load without conversion.
"""

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from threading import Thread
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, TextIteratorStreamer
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .compat_navil import (
    CACHE_NAMES,
    cache_of,
    causal_masks,
    new_dynamic_cache,
    output_with_cache,
    pop_cache,
    with_dtype_kwarg,
)
from .configuration_navil import NaViLConfig, NaViLTextConfig, NaViLVisionConfig
from .image_processing_navil import NaViLImageProcessor
from .processing_navil import IMAGE_PLACEHOLDER, NaViLProcessor, clean_reply

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# Rows of `special_token_embedding`, in the order of the original checkpoints.
SPECIAL_TOKENS = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_START_TOKEN = "<img>"
IMG_FRAME_BREAK_TOKEN = "<IMG_FRAME_BREAK>"
END_OF_TURN_TOKEN = "<|im_end|>"


class NaViLRMSNorm(nn.Module):
    """RMSNorm with the mean square taken in float32."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# 1. Vision encoder
# ---------------------------------------------------------------------------------------------------------------


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
    """Bidirectional attention inside each block; [tokens, heads, head_dim] in and out."""
    if implementation == "flash_attention_2" and flash_attn_varlen_func is not None and query.is_cuda:
        return flash_attn_varlen_func(
            query,
            key,
            value,
            blocks.cu_seqlens,
            blocks.cu_seqlens,
            blocks.max_len,
            blocks.max_len,
            softmax_scale=scaling,
        )
    output = None
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
        else:
            group_output = F.scaled_dot_product_attention(*batch, scale=scaling)
        group_output = group_output.transpose(1, 2).reshape(-1, *query.shape[1:])
        if len(blocks.groups) == 1 and isinstance(group.tokens, slice):
            return group_output
        if output is None:
            output = query.new_empty(query.shape)
        output[group.tokens] = group_output
    return output


class NaViLVisionEmbeddings(nn.Module):
    def __init__(self, config: NaViLVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [patches, 3·P·P] or [patches, 3, P, P] -> [patches, W]
        pixel_values = pixel_values.view(-1, self.num_channels, self.patch_size, self.patch_size)
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        return self.patch_embedding(pixel_values).flatten(1)


class NaViLVisionRotaryEmbedding(nn.Module):
    """2-D rotary angles: the first half of each head rotates with the patch row, the second with its column."""

    def __init__(self, config: NaViLVisionConfig, theta: float = 10000.0):
        super().__init__()
        self.dim = config.hidden_size // config.num_attention_heads // 2
        self.theta = theta
        self.merge_size = config.merge_size

    def forward(self, grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        # -> [patches, head_dim / 2] angles, patches in the image processor's order (merged units row-major)
        merge = self.merge_size
        positions = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            row_col = torch.stack((rows, cols), dim=-1).view(h // merge, merge, w // merge, merge, 2)
            positions.append(row_col.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))
        positions = torch.cat(positions)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        return (positions[..., None].float() * inv_freq).flatten(1)


def apply_vision_rotary(query, key, cos, sin):
    """Rotate-half RoPE in float32 on [patches, heads, head_dim]; cos/sin [patches, 1, head_dim] in float32."""
    rotated = []
    for states in (query, key):
        states_fp32 = states.float()
        rotated.append((states_fp32 * cos + rotate_half(states_fp32) * sin).to(states.dtype))
    return rotated


def get_window_index(grid_thw: torch.Tensor, window_size: int, merge_size: int):
    """Window order of the merged units and the window lengths in patches.

    Each image-scale's merged grid is cut into windows of `window_size // merge_size` units per side (row-major,
    bottom/right windows may be partial) and its units are listed window by window, row-major inside a window.
    Returns `window_index` [patches / merge²] (raster unit index, offset per image-scale) and `window_lengths`.
    """
    units_per_window = window_size // merge_size
    window_index, window_lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        grid_h, grid_w = h // merge_size, w // merge_size
        pad_h = units_per_window - grid_h % units_per_window
        pad_w = units_per_window - grid_w % units_per_window
        index = torch.arange(t * grid_h * grid_w).view(t, grid_h, grid_w)
        index = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        windows_h, windows_w = (grid_h + pad_h) // units_per_window, (grid_w + pad_w) // units_per_window
        windows = index.view(t, windows_h, units_per_window, windows_w, units_per_window).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(-1, units_per_window * units_per_window)
        valid = windows >= 0
        lengths = valid.sum(-1)
        window_index.append(windows[valid] + offset)
        window_lengths.append(lengths[lengths > 0] * merge_size**2)
        offset += t * grid_h * grid_w
    return torch.cat(window_index), torch.cat(window_lengths)


class NaViLVisionAttention(nn.Module):
    def __init__(self, config: NaViLVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.k_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, rotary_embeddings, blocks: AttentionBlocks):
        num_patches, width = hidden_states.shape
        query, key, value = self.qkv(hidden_states).view(num_patches, 3, self.num_heads, self.head_dim).unbind(1)
        if self.qk_normalization:
            # normalised over the full width, then split into heads
            query = self.q_norm(query.reshape(num_patches, width)).view(num_patches, self.num_heads, self.head_dim)
            key = self.k_norm(key.reshape(num_patches, width)).view(num_patches, self.num_heads, self.head_dim)
        query, key = apply_vision_rotary(query, key, *rotary_embeddings)
        output = block_diagonal_attention(
            query, key, value, blocks, self.config._attn_implementation or "sdpa", self.scaling
        )
        return self.proj(output.reshape(num_patches, width))


class NaViLVisionMLP(nn.Module):
    def __init__(self, config: NaViLVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


def vision_norm(config: NaViLVisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class NaViLVisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: NaViLVisionConfig, layer_idx: int):
        super().__init__()
        self.full_attention = config.fullatt_block_indexes is None or layer_idx in config.fullatt_block_indexes
        self.norm1 = vision_norm(config)
        self.attn = NaViLVisionAttention(config)
        self.norm2 = vision_norm(config)
        self.mlp = NaViLVisionMLP(config)
        self.layer_scale_init = config.initializer_factor
        self.ls1 = nn.Parameter(torch.full((config.hidden_size,), config.initializer_factor))
        self.ls2 = nn.Parameter(torch.full((config.hidden_size,), config.initializer_factor))

    def forward(self, hidden_states, rotary_embeddings, image_blocks, window_blocks):
        blocks = image_blocks if self.full_attention else window_blocks
        hidden_states = hidden_states + self.ls1 * self.attn(self.norm1(hidden_states), rotary_embeddings, blocks)
        return hidden_states + self.ls2 * self.mlp(self.norm2(hidden_states))


class NaViLPreTrainedModel(PreTrainedModel):
    config_class = NaViLConfig
    base_model_prefix = "navil"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NaViLVisionLayer", "InternLM2VEDecoderLayer", "Qwen3VEDecoderLayer"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle=False, strict=True, **kwargs):
        """`PreTrainedModel.from_pretrained`, safer: safetensors only and every tensor accounted for.

        Pickled weights (`*.bin`, which can run code when unpickled) are refused unless `allow_pickle=True`. With
        `strict` (the default) a checkpoint with missing, unexpected or mismatched tensors raises a `ValueError`
        naming them instead of silently initialising them at random.
        """
        folder = Path(str(pretrained_model_name_or_path))
        if not allow_pickle:
            if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
                raise ValueError(
                    f"{folder} holds only pickled weights (*.bin), which can run code when loaded. Convert them to "
                    "safetensors, or pass allow_pickle=True if you trust the files."
                )
            kwargs.setdefault("use_safetensors", True)
        kwargs = with_dtype_kwarg(kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        if strict:
            # mismatched shapes are collected and reported below, naming the tensors, instead of transformers' error
            kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {
            "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]),
            "mismatched_keys": [
                f"{key} (checkpoint {list(saved)}, model {list(expected)})"
                for key, saved, expected in sorted(info["mismatched_keys"])
            ],
        }
        if strict and any(problems.values()):
            details = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path} does not match {cls.__name__} ({details}). "
                "Check that it is a NaViL checkpoint of this configuration, or pass strict=False to load it anyway "
                "(missing and mismatched tensors are then initialised at random, unexpected ones ignored)."
            )
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.get_text_config().initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, (NaViLRMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, NaViLVisionLayer):
            module.ls1.fill_(module.layer_scale_init)
            module.ls2.fill_(module.layer_scale_init)


class NaViLVisionModel(NaViLPreTrainedModel):
    """The ViT: [patches, 3·P·P] pixels of several image-scales in, [patches, W] features out, in WINDOW order.

    The window permutation applied before the first layer is kept (as in the original): the output lists the merged
    units window by window, and downstream code consumes the features in that order.
    """

    config_class = NaViLVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: NaViLVisionConfig):
        super().__init__(config)
        self.embeddings = NaViLVisionEmbeddings(config)
        self.rotary = NaViLVisionRotaryEmbedding(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(NaViLVisionLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, output_hidden_states: bool = False):
        merge_units = self.config.merge_size**2
        grid_thw = grid_thw.to("cpu")
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes {expected}; pass the "
                "pixel_values and image_grid_thw returned together by the image processor."
            )
        device = pixel_values.device
        window_index, window_lengths = get_window_index(grid_thw, self.config.window_size, self.config.merge_size)
        window_index = window_index.to(device)
        image_lengths = grid_thw[:, 1:].prod(-1).repeat_interleave(grid_thw[:, 0])
        image_blocks = AttentionBlocks.from_lengths(image_lengths, device)
        window_blocks = AttentionBlocks.from_lengths(window_lengths, device)

        hidden_states = self.embeddings(pixel_values)  # [patches, W]
        width = hidden_states.shape[-1]
        hidden_states = hidden_states.view(-1, merge_units, width)[window_index].view(-1, width)
        angles = self.rotary(grid_thw, device)
        angles = angles.view(-1, merge_units, angles.shape[-1])[window_index].view(-1, angles.shape[-1])
        angles = torch.cat((angles, angles), dim=-1)
        rotary_embeddings = angles.cos()[:, None, :], angles.sin()[:, None, :]  # shared by all layers

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, rotary_embeddings, image_blocks, window_blocks)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        if output_hidden_states:
            return hidden_states, all_hidden_states
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------
# 3. Modality-expert decoders (the connector, part 2, lives in NaViLForConditionalGeneration.mlp1)
# ---------------------------------------------------------------------------------------------------------------


class ModalityRouter:
    """Sends each token through exactly one expert: text weights or visual weights.

    Built once per forward from the visual-token mask; every layer reuses its gather/scatter indices. A forward with
    no visual token (text prompts, cached decode steps) has no router and runs the text weights densely.
    """

    def __init__(self, visual_token_mask: torch.Tensor):
        flat_mask = visual_token_mask.reshape(-1)
        self.visual_index = flat_mask.nonzero().squeeze(1)
        self.text_index = (~flat_mask).nonzero().squeeze(1)

    @classmethod
    def build(cls, visual_token_mask: Optional[torch.Tensor]) -> Optional["ModalityRouter"]:
        if visual_token_mask is None or not bool(visual_token_mask.any()):
            return None
        return cls(visual_token_mask)

    def __call__(self, hidden_states: torch.Tensor, text_expert: Callable, visual_expert: Callable) -> torch.Tensor:
        # [batch, seq, d_in] -> [batch, seq, d_out]
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        text_out = text_expert(flat[self.text_index])
        visual_out = visual_expert(flat[self.visual_index])
        out = text_out.new_empty(flat.shape[0], text_out.shape[-1])
        out.index_copy_(0, self.text_index, text_out)
        out.index_copy_(0, self.visual_index, visual_out)
        return out.view(*hidden_states.shape[:-1], -1)

    def visual_only(self, hidden_states: torch.Tensor, visual_expert: Callable) -> torch.Tensor:
        """Applies `visual_expert` to the visual rows and leaves text rows unchanged."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = flat.index_copy(0, self.visual_index, visual_expert(flat[self.visual_index]))
        return out.view(*hidden_states.shape[:-1], -1)


def route(router: Optional[ModalityRouter], hidden_states, text_expert, visual_expert):
    return text_expert(hidden_states) if router is None else router(hidden_states, text_expert, visual_expert)


class NaViLTextRotaryEmbedding(nn.Module):
    """1-D RoPE over the full head dim (InternLM2 and Qwen3 alike), with linear or dynamic-NTK scaling."""

    def __init__(self, config: NaViLTextConfig):
        super().__init__()
        self.config = config
        # inverse frequencies of the configured base, by device; kept out of the state dict (nothing to restore)
        self._inv_freq = {}

    def inverse_frequencies(self, base: float, device: torch.device) -> torch.Tensor:
        key = (base, device)
        if key not in self._inv_freq:
            dim = self.config.head_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
            if base != self.config.rope_theta:  # dynamic NTK bases change with the length: not worth keeping
                return 1.0 / (base**exponents)
            self._inv_freq[key] = 1.0 / (base**exponents)
        return self._inv_freq[key]

    def forward(self, hidden_states, position_ids):
        # -> cos, sin [batch, seq, head_dim] in the dtype of hidden_states
        config = self.config
        dim = config.head_dim
        base = config.rope_theta
        positions = position_ids.float()
        if config.rope_type == "linear":
            positions = positions / config.rope_factor
        elif config.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > config.max_position_embeddings:
                factor = config.rope_factor
                base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = self.inverse_frequencies(base, position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = positions[..., None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(hidden_states.dtype), emb.sin().to(hidden_states.dtype)


def apply_rotary_pos_emb(query, key, cos, sin):
    # query/key [batch, heads, seq, head_dim]; cos/sin [batch, seq, head_dim]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


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
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


class ModalityExpertAttention(nn.Module):
    """Causal self-attention over all tokens; the projections into q/k/v (and out) are per modality.

    Subclasses provide `project_qkv(hidden_states, router) -> (query, key, value)`, each [batch, seq, heads, D], and
    `project_out(attn_output, router)`.
    """

    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5

    def forward(self, hidden_states, router, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        query, key, value = (states.transpose(1, 2) for states in self.project_qkv(hidden_states, router))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attn_output, _ = attention_interface(self.config._attn_implementation or "sdpa")(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.project_out(attn_output.reshape(batch, seq_len, -1), router)

    @property
    def sliding_window(self):
        return None


class InternLM2VEAttention(ModalityExpertAttention):
    """InternLM2 attention: fused, interleaved `wqkv` ([KV, G + 2, D] blocks) and `wo`, each with a `_ve` twin.

    Visual rows get `wo_ve(wo(a))`: the original composes both output projections for visual tokens.
    """

    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        out_size = self.num_heads * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.wo = nn.Linear(out_size, config.hidden_size, bias=config.attention_bias)
        self.wqkv_ve = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.wo_ve = nn.Linear(out_size, config.hidden_size, bias=config.attention_bias)

    def project_qkv(self, hidden_states, router):
        qkv = route(router, hidden_states, self.wqkv, self.wqkv_ve)
        # interleaved [KV, G + 2, D]: the G query heads of each key/value head, then its key and its value
        qkv = qkv.view(*qkv.shape[:2], self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        return qkv[..., : self.num_key_value_groups, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]

    def project_out(self, attn_output, router):
        output = self.wo(attn_output)
        return output if router is None else router.visual_only(output, self.wo_ve)


class Qwen3VEAttention(ModalityExpertAttention):
    """Qwen3 attention: q/k/v/o projections and per-head q/k RMSNorms (before RoPE), each with a `_ve` twin."""

    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hidden, heads, kv_heads, dim = config.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim
        bias = config.attention_bias
        for suffix in ("", "_ve"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, heads * dim, bias=bias))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_heads * dim, bias=bias))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_heads * dim, bias=bias))
            setattr(self, f"o_proj{suffix}", nn.Linear(heads * dim, hidden, bias=bias))
            setattr(self, f"q_norm{suffix}", NaViLRMSNorm(dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", NaViLRMSNorm(dim, eps=config.rms_norm_eps))

    @property
    def sliding_window(self):
        config = self.config
        uses_window = config.use_sliding_window and self.layer_idx >= getattr(config, "max_window_layers", 0)
        return config.sliding_window if uses_window else None

    def _qkv_expert(self, hidden_states, suffix):
        # [..., hidden] -> query, key, value [..., heads, D], query and key normalised per head
        def heads(states):
            return states.view(*states.shape[:-1], -1, self.head_dim)

        query = getattr(self, "q_norm" + suffix)(heads(getattr(self, "q_proj" + suffix)(hidden_states)))
        key = getattr(self, "k_norm" + suffix)(heads(getattr(self, "k_proj" + suffix)(hidden_states)))
        return query, key, heads(getattr(self, "v_proj" + suffix)(hidden_states))

    def _fused_qkv_expert(self, hidden_states, suffix):
        # [tokens, hidden] -> [tokens, (H + 2·KV)·D]: one tensor for the router
        return torch.cat([states.flatten(-2) for states in self._qkv_expert(hidden_states, suffix)], dim=-1)

    def project_qkv(self, hidden_states, router):
        if router is None:
            return self._qkv_expert(hidden_states, "")
        qkv = router(
            hidden_states, partial(self._fused_qkv_expert, suffix=""), partial(self._fused_qkv_expert, suffix="_ve")
        )
        kv_size = self.num_key_value_heads * self.head_dim
        states = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        return tuple(state.view(*state.shape[:-1], -1, self.head_dim) for state in states)

    def project_out(self, attn_output, router):
        return route(router, attn_output, self.o_proj, self.o_proj_ve)


class InternLM2MLP(nn.Module):
    def __init__(self, config: NaViLTextConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


class Qwen3MLP(nn.Module):
    def __init__(self, config: NaViLTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class ModalityExpertDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: norms and attention are shared by all tokens, the feed-forward block is per modality.

    Subclasses name the attention and MLP classes and the five sub-modules as the original checkpoints do:
    (attention norm, attention, feed-forward norm, text feed-forward, visual feed-forward).
    """

    attention_class = None
    mlp_class = None
    module_names = ()

    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        attention_norm, attention, ffn_norm, ffn, ffn_ve = self.module_names
        setattr(self, attention_norm, NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        setattr(self, attention, self.attention_class(config, layer_idx))
        setattr(self, ffn_norm, NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        setattr(self, ffn, self.mlp_class(config))
        setattr(self, ffn_ve, self.mlp_class(config))

    def sublayers(self):
        return tuple(getattr(self, name) for name in self.module_names)

    def forward(self, hidden_states, router, position_embeddings, attention_mask, cache=None, **kwargs):
        attention_norm, attention, ffn_norm, ffn, ffn_ve = self.sublayers()
        hidden_states = hidden_states + attention(
            attention_norm(hidden_states), router, position_embeddings, attention_mask, cache, **kwargs
        )
        return hidden_states + route(router, ffn_norm(hidden_states), ffn, ffn_ve)


class InternLM2VEDecoderLayer(ModalityExpertDecoderLayer):
    attention_class = InternLM2VEAttention
    mlp_class = InternLM2MLP
    module_names = ("attention_norm", "attention", "ffn_norm", "feed_forward", "feed_forward_ve")


class Qwen3VEDecoderLayer(ModalityExpertDecoderLayer):
    attention_class = Qwen3VEAttention
    mlp_class = Qwen3MLP
    module_names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "mlp_ve")


class ModalityExpertModel(NaViLPreTrainedModel):
    """Embeddings, decoder layers and final norm; `visual_token_mask` [batch, seq] selects the visual experts."""

    config_class = NaViLTextConfig
    base_model_prefix = "model"
    decoder_layer_class = None
    embeddings_name = None

    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        setattr(self, self.embeddings_name, nn.Embedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NaViLTextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return getattr(self, self.embeddings_name)

    def set_input_embeddings(self, value):
        setattr(self, self.embeddings_name, value)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        visual_token_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        cache = pop_cache(past_key_values, kwargs)
        if use_cache and cache is None:
            cache = new_dynamic_cache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_attention_mask(
                attention_mask, inputs_embeds.shape[1], past_length, inputs_embeds.device
            ).to(inputs_embeds.device)

        if isinstance(attention_mask, dict):
            full_mask, window_mask = attention_mask.get("full_attention"), attention_mask.get("sliding_attention")
        else:
            full_mask, window_mask = causal_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids, self.config.use_sliding_window
            )

        router = ModalityRouter.build(visual_token_mask)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            mask = window_mask if layer.sublayers()[1].sliding_window is not None else full_mask
            hidden_states = layer(hidden_states, router, position_embeddings, mask, cache, **kwargs)
        return output_with_cache(
            BaseModelOutputWithPast, cache if use_cache else None, last_hidden_state=self.norm(hidden_states)
        )


def positions_from_attention_mask(attention_mask, seq_len, past_length, device):
    """Positions 0… of the real tokens (left padding skipped, padded slots get 1), for the last `seq_len` tokens."""
    if attention_mask is None or attention_mask.ndim != 2:
        # `past_length` is a device tensor for static caches: no host sync, no recompilation per step
        return (torch.arange(seq_len, device=device) + past_length)[None, :]
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq_len:]


class InternLM2VEModel(ModalityExpertModel):
    decoder_layer_class = InternLM2VEDecoderLayer
    embeddings_name = "tok_embeddings"


class Qwen3VEModel(ModalityExpertModel):
    decoder_layer_class = Qwen3VEDecoderLayer
    embeddings_name = "embed_tokens"


class ModalityExpertForCausalLM(NaViLPreTrainedModel, GenerationMixin):
    """A modality-expert decoder with its LM head; usable alone as a text model (every token text-routed)."""

    config_class = NaViLTextConfig
    base_model_prefix = "model"
    model_class = None
    head_name = None

    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        setattr(self, self.head_name, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return getattr(self, self.head_name)

    def set_output_embeddings(self, value):
        setattr(self, self.head_name, value)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        visual_token_mask=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pop_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            visual_token_mask=visual_token_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.get_output_embeddings()(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return output_with_cache(CausalLMOutputWithPast, cache_of(outputs), loss=loss, logits=logits)


class InternLM2VEForCausalLM(ModalityExpertForCausalLM):
    model_class = InternLM2VEModel
    head_name = "output"
    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}


class Qwen3VEForCausalLM(ModalityExpertForCausalLM):
    model_class = Qwen3VEModel
    head_name = "lm_head"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}


LANGUAGE_MODELS = {"internlm2": InternLM2VEForCausalLM, "qwen3": Qwen3VEForCausalLM}


# ---------------------------------------------------------------------------------------------------------------
# 4. NaViL
# ---------------------------------------------------------------------------------------------------------------


def check_image_grid(image_grid_thw, merge_size: int) -> torch.Tensor:
    """`image_grid_thw` as a CPU int64 [image_scales, 3] tensor, or a `ValueError` naming what is wrong with it."""
    grid = torch.as_tensor(image_grid_thw)
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise ValueError(f"image_grid_thw must hold integers (the image processor's output), got {grid.dtype}.")
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(
            f"image_grid_thw must be [image_scales, 3] (t, h, w per image-scale), got shape {tuple(grid.shape)}; "
            "pass the image processor's image_grid_thw."
        )
    grid = grid.to(device="cpu", dtype=torch.int64)
    bad = (grid[:, 0] < 1) | (grid[:, 1:] < merge_size).any(-1) | (grid[:, 1:] % merge_size != 0).any(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"image_grid_thw row {row} is {grid[row].tolist()}: t must be at least 1 and h, w positive multiples of "
            f"merge_size={merge_size}; pass the image processor's image_grid_thw with the model's merge size."
        )
    return grid


class NaViLForConditionalGeneration(NaViLPreTrainedModel, GenerationMixin):
    """NaViL: vision encoder → pixel shuffle + MLP connector (`mlp1`) → modality-expert language model.

    Image features replace the `<IMG_CONTEXT>` token embeddings; `<IMG_CONTEXT>` and `<img>` tokens are routed to the
    visual experts, every other token (including `</img>` and the line/frame breaks) to the text experts. The twelve
    NaViL special tokens take their embeddings from `special_token_embedding`. Cached decode steps embed new tokens
    with the plain word embeddings and route them as text, as the original does.
    """

    def __init__(self, config: NaViLConfig, **kwargs):
        # transformers 5 forwards unknown from_pretrained kwargs here; the original model card passes this one.
        if kwargs.pop("load_in_8bit", False):
            raise ValueError(
                "load_in_8bit=True is not handled by the model; pass quantization_config=BitsAndBytesConfig("
                "load_in_8bit=True) to from_pretrained instead."
            )
        if kwargs:
            raise TypeError(f"NaViLForConditionalGeneration got unexpected arguments: {sorted(kwargs)}")
        super().__init__(config)
        vision, text = config.vision_config, config.text_config
        merged_width = vision.hidden_size * vision.merge_size**2
        self.vision_model = NaViLVisionModel(vision)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged_width),
            nn.Linear(merged_width, text.hidden_size),
            nn.GELU(),
            nn.Linear(text.hidden_size, text.hidden_size),
        )
        self.language_model = LANGUAGE_MODELS[text.backbone](text)
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKENS), text.hidden_size)
        self.post_init()

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def image_processor(self) -> NaViLImageProcessor:
        """The image processor the original builds from the config: single-scale per call, min/max from the config."""
        patch = self.config.vision_config.patch_size
        return NaViLImageProcessor(
            patch_size=patch,
            merge_size=self.config.vision_config.merge_size,
            min_pixels=self.config.min_dynamic_patch * patch * patch,
            max_pixels=self.config.max_dynamic_patch * patch * patch,
            scale_downsample_ratio=self.config.scale_downsample_ratio,
            multiscale=False,
        )

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    # -- special tokens ------------------------------------------------------------------------------------------

    def init_special_token_ids(self, tokenizer):
        """Reads the ids of the NaViL special tokens from `tokenizer` and stores them in the config."""
        ids = {}
        for token in (*SPECIAL_TOKENS, END_OF_TURN_TOKEN):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids[token] = int(token_id)
        for required in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN):
            if required not in ids:
                raise ValueError(
                    f"The tokenizer has no {required} token; add the NaViL special tokens with "
                    "navil.processing_navil.add_navil_special_tokens(tokenizer)."
                )
        self.config.special_token_ids = ids
        if END_OF_TURN_TOKEN in ids:
            self.generation_config.eos_token_id = ids[END_OF_TURN_TOKEN]
        if self.generation_config.pad_token_id is None:
            pad = tokenizer.pad_token_id
            self.generation_config.pad_token_id = pad if pad is not None else ids.get(END_OF_TURN_TOKEN)

    def special_token_id(self, token: str) -> int:
        token_id = self.config.special_token_ids.get(token)
        if token_id is None:
            raise ValueError(
                f"The id of {token} is unknown: call model.init_special_token_ids(tokenizer) once after loading."
            )
        return token_id

    # -- images --------------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[patches, 3·P·P] pixels of all image-scales → [patches / 4, hidden] LLM inputs, in window order.

        `pixel_values` are moved to the vision tower's device and cast to its dtype (float32 processor output feeds
        a bfloat16 model as it is); they must be finite. `image_grid_thw` (an integer tensor or nested list, read on
        the CPU) must have one (t, h, w) row per image-scale with h and w multiples of the merge size, describing
        exactly the rows of `pixel_values`.
        """
        vision = self.config.vision_config
        patch_shape = (vision.num_channels, vision.patch_size, vision.patch_size)
        if not torch.is_floating_point(pixel_values):
            raise ValueError(
                f"pixel_values must be floating point (the image processor's output), got {pixel_values.dtype}."
            )
        if pixel_values.shape[1:] not in ((patch_shape[0] * patch_shape[1] * patch_shape[2],), patch_shape):
            raise ValueError(
                f"pixel_values must be [patches, {patch_shape[0] * patch_shape[1] * patch_shape[2]}] or [patches, "
                f"{', '.join(map(str, patch_shape))}] for this model, got shape {tuple(pixel_values.shape)}; pass the "
                "image processor's pixel_values with the model's patch_size."
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or infinite values; check the image or preprocessing.")
        image_grid_thw = check_image_grid(image_grid_thw, vision.merge_size)
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        features = self.vision_model(pixel_values, image_grid_thw)  # [patches, W]
        merge_units = self.config.vision_config.merge_size**2
        features = features.reshape(-1, merge_units * features.shape[-1])  # 2×2 pixel shuffle
        return self.mlp1(features)

    def embed_tokens(self, input_ids, pixel_values=None, image_grid_thw=None, num_prompt_tokens=None):
        """Word embeddings with special-token rows replaced and image features scattered over `<IMG_CONTEXT>`.

        Tokens from position `num_prompt_tokens` on were generated: like cached decode steps they get the plain word
        embeddings and are routed as text, so generation without a cache equals generation with one.
        Returns `(inputs_embeds [batch, seq, hidden], visual_token_mask [batch, seq] or None)`.
        """
        if num_prompt_tokens is not None and num_prompt_tokens < input_ids.shape[1]:
            prompt_embeds, visual_token_mask = self.embed_tokens(
                input_ids[:, :num_prompt_tokens], pixel_values, image_grid_thw
            )
            generated_embeds = self.get_input_embeddings()(input_ids[:, num_prompt_tokens:])
            if visual_token_mask is not None:
                visual_token_mask = F.pad(visual_token_mask, (0, generated_embeds.shape[1]), value=False)
            return torch.cat((prompt_embeds, generated_embeds), dim=1), visual_token_mask
        embeddings = self.get_input_embeddings()(input_ids)
        ids = self.config.special_token_ids
        if ids:
            table = torch.full((max(ids.values()) + 1,), -1, dtype=torch.long, device=input_ids.device)
            for row, token in enumerate(SPECIAL_TOKENS):
                if token in ids:
                    table[ids[token]] = row
            rows = table[input_ids.clamp(max=len(table) - 1)].masked_fill(input_ids >= len(table), -1)
            special = self.special_token_embedding(rows.clamp(min=0)).to(embeddings.dtype)
            embeddings = torch.where((rows >= 0)[..., None], special, embeddings)
        if pixel_values is None:
            return embeddings, None

        context_mask = input_ids == self.special_token_id(IMG_CONTEXT_TOKEN)
        if image_grid_thw is None:
            raise ValueError("pixel_values were given without image_grid_thw; pass both from the image processor.")
        image_grid_thw = check_image_grid(image_grid_thw, self.config.vision_config.merge_size)
        self._check_image_tokens(input_ids, context_mask, image_grid_thw)
        features = self.get_image_features(pixel_values, image_grid_thw)
        embeddings = embeddings.masked_scatter(context_mask[..., None], features.to(embeddings.dtype))
        visual_token_mask = context_mask | (input_ids == self.special_token_id(IMG_START_TOKEN))
        return embeddings, visual_token_mask

    def _check_image_tokens(self, input_ids, context_mask, image_grid_thw) -> None:
        """Refuses prompts whose `<IMG_CONTEXT>` tokens do not match the images, before the vision tower runs: in
        total and, when the tokenizer has `<IMG_FRAME_BREAK>` (which ends every frame of every image-scale), frame
        by frame, so that features never land on the tokens of another image."""
        grid = image_grid_thw
        per_frame = (grid[:, 1] * grid[:, 2] // self.config.vision_config.merge_size**2).repeat_interleave(grid[:, 0])
        found, expected = int(context_mask.sum()), int(per_frame.sum())
        if found != expected:
            raise ValueError(
                f"The prompt has {found} {IMG_CONTEXT_TOKEN} tokens but the images give {expected} features; build "
                "the prompt with the processor (or expand each <image> with the same image_grid_thw)."
            )
        frame_break = self.config.special_token_ids.get(IMG_FRAME_BREAK_TOKEN)
        if frame_break is None or not expected:
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

    def check_prompt(self, input_ids=None, inputs_embeds=None, attention_mask=None, pixel_values=None) -> None:
        """Clear errors for prompts this model cannot run: wrong shape, dtype or device, an attention mask of another
        shape, unknown token ids, too many positions, images given with `inputs_embeds` (they would be ignored).

        Nothing is converted here: token ids must be int64 (or int32) on the device of the embeddings. Only
        `pixel_values` are moved and cast, to the vision tower (see `get_image_features`).
        """
        text = self.config.text_config
        tokens = input_ids if input_ids is not None else inputs_embeds
        device = self.get_input_embeddings().weight.device
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
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values are only used with input_ids (their <IMG_CONTEXT> tokens mark where the features "
                    "go); pass input_ids, or put get_image_features() into your inputs_embeds yourself."
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

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        visual_token_mask: Optional[torch.Tensor] = None,
        num_scales: Optional[torch.LongTensor] = None,
        is_decode_step: Optional[bool] = None,
        num_prompt_tokens: Optional[int] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `[patches, 3·P·P]` or `[patches, 3, P, P]`): all image-scales of
            all images, in prompt order, as returned by the image processor.
        image_grid_thw (`torch.LongTensor` of shape `[image_scales, 3]`): (t, h, w) in patches per image-scale.
        visual_token_mask (`torch.BoolTensor` of shape `[batch, seq]`, *optional*): routing when `inputs_embeds` are
            given; computed from `input_ids` otherwise.
        num_scales (`torch.LongTensor`, *optional*): scales per image (from the processor); used for checking.
        is_decode_step (`bool`, *optional*): whether `past_key_values` already hold the prompt, so that `input_ids`
            are generated tokens (embedded with the plain word embeddings and routed as text, as in the original).
            Read from the cache when `None`; `generate` sets it, so compiled decode steps never branch on the
            length of a static cache.
        num_prompt_tokens (`int`, *optional*): length of the prompt when `input_ids` also hold generated tokens
            (generation without a cache; `generate` sets it): those tokens are embedded and routed like cached decode
            steps.
        labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): next-token targets; -100 and
            `<IMG_CONTEXT>` positions are ignored.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if num_scales is not None and image_grid_thw is not None and int(num_scales.sum()) != len(image_grid_thw):
            raise ValueError(
                f"num_scales adds up to {int(num_scales.sum())} image-scales but image_grid_thw has "
                f"{len(image_grid_thw)} rows."
            )
        cache = pop_cache(past_key_values, kwargs)
        decoding = is_decode_step
        if decoding is None:
            decoding = cache is not None and bool(cache.get_seq_length() > 0)
        if not decoding:
            self.check_prompt(input_ids, inputs_embeds, attention_mask, pixel_values)
        if inputs_embeds is None:
            if decoding:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            else:
                inputs_embeds, visual_token_mask = self.embed_tokens(
                    input_ids, pixel_values, image_grid_thw, num_prompt_tokens
                )
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            visual_token_mask=visual_token_mask,
            **kwargs,
        )
        loss = None
        if labels is not None:
            if input_ids is not None and IMG_CONTEXT_TOKEN in self.config.special_token_ids:
                labels = labels.masked_fill(input_ids == self.special_token_id(IMG_CONTEXT_TOKEN), -100)
            loss = self.loss_function(
                logits=outputs.logits, labels=labels, vocab_size=self.config.text_config.vocab_size
            )
        return output_with_cache(CausalLMOutputWithPast, cache_of(outputs), loss=loss, logits=outputs.logits)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, telling `forward` where the prompt ends (see `num_prompt_tokens`)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is not None and prompt.ndim == 2:
            kwargs.setdefault("num_prompt_tokens", prompt.shape[1])
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and cache_of(model_inputs) is not None:
            model_inputs["is_decode_step"] = True
        return model_inputs

    # -- chat ----------------------------------------------------------------------------------------------------

    def chat_processor(self, tokenizer) -> NaViLProcessor:
        """A processor with this model's image settings, chat template and system message."""
        if not self.config.special_token_ids:
            self.init_special_token_ids(tokenizer)
        processor = NaViLProcessor(
            image_processor=self.image_processor,
            tokenizer=tokenizer,
            template=self.config.template,
            system_message=self.config.system_message,
        )
        processor.image_processor.multiscale = True
        return processor

    def _generation_kwargs(self, generation_config, tokenizer, prompt_length: int) -> dict:
        """`generate` arguments of the chat helpers: greedy, up to 512 new tokens and stopping at `<|im_end|>` unless
        `generation_config` says otherwise. Refuses a prompt plus `max_new_tokens` (or `max_length`) that does not
        fit in the model's positions, rather than clamping the reply."""
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise ValueError(
                f"generation_config must be a dict of generate() arguments, e.g. dict(max_new_tokens=64, "
                f"do_sample=False), got {type(generation_config).__name__}."
            )
        kwargs = dict(generation_config or {})
        if "max_length" not in kwargs:
            kwargs.setdefault("max_new_tokens", 512)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("eos_token_id", self.special_token_id(END_OF_TURN_TOKEN))
        if tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        text = self.config.text_config
        new_tokens = kwargs.get("max_new_tokens")
        total = prompt_length + new_tokens if new_tokens is not None else kwargs.get("max_length", prompt_length)
        if text.rope_type != "dynamic" and total > text.max_position_embeddings:
            room = text.max_position_embeddings - prompt_length
            raise ValueError(
                f"The prompt has {prompt_length} tokens and up to {total - prompt_length} new tokens were asked for, "
                f"more than the model's {text.max_position_embeddings} positions; "
                + (f"lower max_new_tokens to at most {room}, or " if room > 0 else "")
                + "shorten the prompt or history, or use fewer/smaller images (max_pixels)."
            )
        return kwargs

    def _prepare_chat_inputs(self, processor, questions, images_per_question, histories, pixel_inputs=None):
        """Tokenised prompts (left padded) and image tensors for a batch of conversations."""
        for index, question in enumerate(questions):
            name = "The question" if len(questions) == 1 else f"Question {index}"
            if not isinstance(question, str):
                raise ValueError(f"{name} must be a string, got {type(question).__name__}.")
            if not question.strip():
                raise ValueError(
                    f"{name} is empty; ask something about the images, e.g. 'Describe the image.' (an image-only "
                    "question is '<image>')."
                )
        prompts = []
        for question, images, history in zip(questions, images_per_question, histories):
            prompts.append(processor.build_prompt(question, history=history, num_images=len(images)))
        flat_images = [image for images in images_per_question for image in images]
        if pixel_inputs is not None:
            prompts = [
                processor.expand_image_placeholders(prompt, pixel_inputs["image_grid_thw"], pixel_inputs["num_scales"])
                for prompt in prompts
            ]
            inputs = processor(text=prompts, return_tensors="pt")
            inputs.update(pixel_inputs)
        else:
            inputs = processor(text=prompts, images=flat_images or None, return_tensors="pt")
        return prompts, inputs.to(self.device)

    def chat(
        self,
        tokenizer,
        pixel_values,
        question: str,
        generation_config: Optional[dict] = None,
        history=None,
        return_history: bool = False,
        num_patches_list=None,
        num_scales=None,
        IMG_START_TOKEN: str = IMG_START_TOKEN,  # noqa: N803 (names of the original signature)
        IMG_END_TOKEN: str = "</img>",  # noqa: N803
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,  # noqa: N803
        verbose: bool = False,
        anyres_image_size: bool = True,
        streamer=None,
    ):
        """Answers `question` about the images, as the original `chat()`.

        `pixel_values` are either preprocessed tensors ([patches, 3·P·P] or [patches, 3, P, P], all scales of all
        images) with `num_patches_list` (their image_grid_thw rows) and `num_scales` (scales per image), or, for
        convenience, images (PIL, arrays, paths) that are preprocessed here with the multi-scale pyramid, or `None`.
        Without `history`, one `<image>\\n` per image is prefixed to a question that has no `<image>`.

        Bad inputs raise a `ValueError` naming the problem before anything is generated: an empty or non-string
        question, a history that is not a list of (question, answer) string pairs, `<image>` placeholders that do not
        match the images, tensors whose `num_patches_list` / `num_scales` do not describe `pixel_values`, a
        `generation_config` that is not a dict, and a prompt plus `max_new_tokens` longer than the model's positions.
        """
        processor = self.chat_processor(tokenizer)
        images, pixel_inputs = [], None
        if isinstance(pixel_values, torch.Tensor):
            if anyres_image_size and num_patches_list is None:
                raise ValueError("Preprocessed pixel_values need num_patches_list (the image_grid_thw rows).")
            grids = torch.as_tensor(num_patches_list if num_patches_list is not None else [], dtype=torch.long)
            if grids.numel() % 3:
                raise ValueError(
                    f"num_patches_list must hold the (t, h, w) image_grid_thw rows of pixel_values, got "
                    f"{grids.numel()} numbers; pass the image processor's image_grid_thw."
                )
            grids = check_image_grid(grids.view(-1, 3), self.config.vision_config.merge_size)
            scales = torch.as_tensor([len(grids)] if num_scales is None else num_scales, dtype=torch.long).view(-1)
            pixel_inputs = {
                "pixel_values": pixel_values,
                "image_grid_thw": grids,
                "num_scales": scales.cpu(),
            }
            images = [None] * len(scales)
        elif pixel_values is not None:
            images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else [pixel_values]
        prompts, inputs = self._prepare_chat_inputs(processor, [question], [images], [history], pixel_inputs)
        kwargs = self._generation_kwargs(generation_config, tokenizer, inputs["input_ids"].shape[1])
        output_ids = self.generate(**inputs, **kwargs, streamer=streamer)
        new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        reply = processor.decode_reply(new_ids)[0]
        question_as_asked = question
        if history is None and images and IMAGE_PLACEHOLDER not in question:
            question_as_asked = f"{IMAGE_PLACEHOLDER}\n" * len(images) + question
        if verbose:
            print(prompts[0].replace(IMG_CONTEXT_TOKEN, ""), reply)
        history = [*(history or []), (question_as_asked, reply)]
        return (reply, history) if return_history else reply

    def batch_chat(self, tokenizer, questions, images=None, generation_config=None, histories=None):
        """Answers several conversations in one batch (left padded); the same replies as `chat` one by one.

        `images[i]` is the list of images (PIL, arrays or paths) of conversation i; `histories[i]` its history.
        """
        if not isinstance(questions, (list, tuple)):
            raise ValueError(
                f"batch_chat takes a list of questions, got {type(questions).__name__}; for one question use chat()."
            )
        processor = self.chat_processor(tokenizer)
        images = images if images is not None else [[] for _ in questions]
        histories = histories if histories is not None else [None] * len(questions)
        for name, value in (("images", images), ("histories", histories)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"batch_chat takes {name} as a list with one entry per conversation, got {type(value).__name__}."
                )
        if not len(questions) == len(images) == len(histories):
            raise ValueError(
                f"batch_chat got {len(questions)} questions, {len(images)} image lists and {len(histories)} "
                "histories; pass one of each per conversation."
            )
        images = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        _, inputs = self._prepare_chat_inputs(processor, questions, images, histories)
        kwargs = self._generation_kwargs(generation_config, tokenizer, inputs["input_ids"].shape[1])
        output_ids = self.generate(**inputs, **kwargs)
        return processor.decode_reply(output_ids[:, inputs["input_ids"].shape[1] :])

    def stream_chat(self, tokenizer, pixel_values, question, generation_config=None, history=None, **kwargs):
        """Like `chat`, yielding the reply in pieces as it is generated; the pieces join to `chat`'s reply.

        Bad inputs raise `chat`'s `ValueError`s when the iteration starts.
        """
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors = []

        def generate():
            try:
                self.chat(tokenizer, pixel_values, question, generation_config, history, streamer=streamer, **kwargs)
            except Exception as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        worker = Thread(target=generate)
        worker.start()
        text, emitted = "", ""
        for piece in streamer:
            text += piece
            # the reply is stripped and cleaned of partial end-of-turn markers: emit only what more text cannot change
            if any(text.endswith(END_OF_TURN_TOKEN[:size]) for size in range(1, len(END_OF_TURN_TOKEN))):
                continue
            stable = clean_reply(text)
            if stable.startswith(emitted) and len(stable) > len(emitted):
                yield stable[len(emitted) :]
                emitted = stable
        worker.join()
        if errors:
            raise errors[0]
        final = clean_reply(text)
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted) :]


NaViLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "InternLM2VEForCausalLM",
    "NaViLForConditionalGeneration",
    "NaViLPreTrainedModel",
    "NaViLVisionModel",
    "Qwen3VEForCausalLM",
]
