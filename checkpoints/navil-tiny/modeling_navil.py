"""PyTorch NaViL: a native multimodal LLM with a native-resolution ViT and modality-expert decoders.

Read top to bottom:
1. the vision encoder (`NaViLVisionModel`): patch embedding, 2-D rotary positions, window reordering and
   block-diagonal attention packed into batched calls (windows in most layers, whole image-scales in the others);
2. the connector (`mlp1` of `NaViLForConditionalGeneration`): 2×2 pixel shuffle then an MLP into the LLM width;
3. the modality-expert decoder: `ModalityRouter` sends every token through exactly one expert (text or visual
   weights) by gathering each modality's rows once and scattering the results back (a dense decoder, built with
   `modality_experts=False`, has no `_ve` twins: all tokens use the text weights); the InternLM2-VE and Qwen3-VE
   layouts share it and differ only in their projections and parameter names;
4. `NaViLForConditionalGeneration`: embeddings with image features scattered in, the loss and generation. The
   original chat helpers (`chat`, `batch_chat`, `stream_chat`) come from `NaViLChatMixin` in chat_navil.py.

Parameter names equal those of the original NaViL checkpoints, so they load without conversion.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.utils.generic import can_return_tuple

from .attention_navil import AttentionBlocks, attention_interface, block_diagonal_attention
from .chat_navil import NaViLChatMixin
from .checks_navil import (
    RefusesQuantizedLoraMerge,
    check_config_against_weights,
    check_generation_length,
    check_image_tokens,
    check_loading_info,
    check_local_checkpoint,
    check_model_folder,
    check_no_image_tokens,
    check_num_scales,
    check_pixel_values,
    check_prompt,
    check_token_types,
    check_torchao_loading,
    check_weight_dtypes,
    with_quantization_config,
)
from .compat_navil import (
    CACHE_NAMES,
    GradientCheckpointingLayer,
    cache_of,
    causal_masks,
    compiled_decode_settings,
    flash_packed_kwargs,
    generation_step_inputs,
    new_dynamic_cache,
    output_with_cache,
    packed_sequence_ids,
    pop_cache,
    with_dtype_kwarg,
    with_generated_token_types,
)
from .configuration_navil import (
    END_OF_TURN_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_START_TOKEN,
    SPECIAL_TOKEN_EMBEDDING_ROWS,
    NaViLConfig,
    NaViLTextConfig,
    NaViLVisionConfig,
    check_image_grid,
    special_token_ids_of,
    special_token_rows,
    write_model_card,
)

# transformers 4.x copies only the files that the loaded remote module imports itself: import every Hub file here.
from .errors_navil import NaViLInputError  # noqa: F401
from .image_loading_navil import NaViLImageLoader  # noqa: F401
from .image_processing_navil import NaViLImageProcessor  # noqa: F401
from .image_processing_navil_fast import NaViLImageProcessorFast  # noqa: F401
from .layouts_navil import LAYOUTS, VE_SUFFIX, Layout, register_layout
from .processing_navil import NaViLProcessor  # noqa: F401


def move_saved_files(staging: Path, target: Path) -> None:
    """Moves the files of a complete save from `staging` into `target` (renamed into place when `target` does not
    exist), removing weight files of an earlier save in `target` that the new one does not have (old shards)."""
    if not target.exists():
        staging.rename(target)
        return
    saved = {path.name for path in staging.iterdir()}
    for old in target.glob("*"):
        weights = old.name.startswith(("model", "pytorch_model")) and old.suffix in (".safetensors", ".bin", ".json")
        if weights and old.is_file() and old.name not in saved:
            old.unlink()
    for path in staging.iterdir():
        os.replace(path, target / path.name)
    staging.rmdir()


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


def apply_vision_rotary(query_key, cos, signed_sin):
    """Rotate-half RoPE in float32 on queries and keys at once, [patches, 2, heads, head_dim].

    `cos` and `signed_sin` are [patches, 1, 1, head_dim] in float32, the sine negated in its first half, so that
    `x * cos + rotate_half(x) * sin` becomes `x * cos + swap_halves(x) * signed_sin`: the same values in three
    kernels.
    """
    states = query_key.float()
    first, second = states.chunk(2, dim=-1)
    rotated = (states * cos).addcmul_(torch.cat((second, first), dim=-1), signed_sin)
    return rotated.to(query_key.dtype)


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
        self.is_causal = False  # read by the registry's attention functions
        self.num_key_value_groups = 1
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.k_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, rotary_embeddings, blocks: AttentionBlocks):
        output, weights = self.attend(*self.query_key_value(hidden_states, rotary_embeddings), blocks)
        return self.proj(output.flatten(1)), weights

    def query_key_value(self, hidden_states, rotary_embeddings):
        # [patches, W] -> query, key, value [patches, heads, head_dim], RoPE applied
        num_patches, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(num_patches, 3, self.num_heads, self.head_dim)
        query_key, value = qkv[:, :2], qkv[:, 2]
        if self.qk_normalization:
            # normalised over the full width, then split into heads
            query, key = query_key.reshape(num_patches, 2, width).unbind(1)
            query_key = torch.stack((self.q_norm(query), self.k_norm(key)), dim=1)
            query_key = query_key.view(num_patches, 2, self.num_heads, self.head_dim)
        query, key = apply_vision_rotary(query_key, *rotary_embeddings).unbind(1)
        return query, key, value

    def attend(self, query, key, value, blocks: AttentionBlocks):
        # [patches, heads, head_dim] each -> [patches, heads, head_dim], weights (eager only)
        implementation = self.config._attn_implementation or "sdpa"
        return block_diagonal_attention(self, query, key, value, blocks, implementation, self.scaling)


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


class NaViLVisionLayer(RefusesQuantizedLoraMerge, GradientCheckpointingLayer):
    def __init__(self, config: NaViLVisionConfig, layer_idx: int):
        super().__init__()
        self.quantized_merge_name = f"vision layer {layer_idx}"
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
        attention, attn_weights = self.attn.attend(*self.attention_inputs(hidden_states, rotary_embeddings), blocks)
        return self.attention_output(hidden_states, attention), attn_weights

    # The tensor work before and after attention, in two methods that `NaViLVisionModel.compile_layers` compiles
    # (attention itself runs over the Python list of equal-length block groups).
    def attention_inputs(self, hidden_states, rotary_embeddings):
        # [patches, W] -> norm, query / key / value [patches, heads, head_dim] with RoPE
        return self.attn.query_key_value(self.norm1(hidden_states), rotary_embeddings)

    def attention_output(self, hidden_states, attention):
        # [patches, W] and attention [patches, heads, head_dim] -> output projection, residuals and MLP [patches, W]
        hidden_states = torch.addcmul(hidden_states, self.ls1, self.attn.proj(attention.flatten(1)))
        return torch.addcmul(hidden_states, self.ls2, self.mlp(self.norm2(hidden_states)))


class NaViLPreTrainedModel(PreTrainedModel):
    config_class = NaViLConfig
    base_model_prefix = "navil"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NaViLVisionLayer", *(layout.decoder_layer for layout in LAYOUTS.values())]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    # Linear layers that quantization (torchao, bitsandbytes) keeps in full precision unless its config names others,
    # chosen by measurement (docs/benchmarks.md); both experts of every routed layer are quantized alike.
    _modules_to_not_quantize = ["mlp1", *(f"language_model.{layout.head}" for layout in LAYOUTS.values())]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle=False, strict=True, **kwargs):
        """`PreTrainedModel.from_pretrained`, safer: safetensors only and every tensor accounted for.

        Pickled weights (`*.bin`, which can run code when unpickled) are refused unless `allow_pickle=True`. With
        `strict` (the default) a checkpoint with missing, unexpected or mismatched tensors raises a `ValueError`
        naming them instead of silently initialising them at random. A local folder without `config.json` (and no
        `config=`) and unreadable safetensors files are refused before the model is built.
        """
        check_model_folder(pretrained_model_name_or_path)
        folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if folder.is_dir():
            check_local_checkpoint(folder, has_config="config" in kwargs, allow_pickle=allow_pickle)
            check_weight_dtypes(folder)
        if not allow_pickle:
            kwargs.setdefault("use_safetensors", True)
        kwargs = with_quantization_config(with_dtype_kwarg(kwargs), cls._modules_to_not_quantize)
        check_torchao_loading(cls, pretrained_model_name_or_path, kwargs)
        if folder.is_dir():
            check_config_against_weights(folder, cls.config_class, kwargs, strict)
        wants_info = kwargs.pop("output_loading_info", False)
        # strict: mismatched shapes are reported below, naming the tensors, instead of transformers' error;
        # strict=False loads such checkpoints, as documented, unless the caller says otherwise
        kwargs["ignore_mismatched_sizes"] = strict or kwargs.get("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        check_loading_info(info, pretrained_model_name_or_path, cls.__name__, model.config.get_text_config(), strict)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a model card (README.md) unless the folder has one.

        Everything is written to a temporary folder next to `save_directory` first and moved there only once every
        file is complete, so that a full disk leaves no config without its weights: it raises an `OSError` naming
        the folder, and `save_directory` stays as it was."""
        if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
            super().save_pretrained(save_directory, *args, **kwargs)
            write_model_card(save_directory, source=self.name_or_path)
            return
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            if (target / "README.md").is_file():
                shutil.copy2(target / "README.md", staging / "README.md")  # a card of the folder is kept
            super().save_pretrained(staging, *args, **kwargs)
            write_model_card(staging, name=target.resolve().name, source=self.name_or_path)
        except Exception as error:  # safetensors' own SafetensorError wraps a full disk (not importable everywhere)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":
                raise OSError(
                    f"Could not save the model to {target} ({error}); nothing was written there. Free some disk space "
                    "or choose another folder."
                ) from error
            raise
        move_saved_files(staging, target)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # `push_to_hub` has just put transformers' generic card (or the repo's) there; the card names the repo
        write_model_card(working_dir, name=repo_id, source=self.name_or_path)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        # `nn.init` functions, which transformers 5.0-5.3 guard so that they skip weights already loaded
        std = self.config.get_text_config().initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (NaViLRMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, NaViLVisionLayer):
            nn.init.constant_(module.ls1, module.layer_scale_init)
            nn.init.constant_(module.ls2, module.layer_scale_init)


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

    def compile_layers(self, **compile_kwargs) -> None:
        """Compiles the tensor work of every layer around attention (norms, projections, RoPE, MLP, residuals) with
        `torch.compile(dynamic=True, **compile_kwargs)`: one graph for all layers and all patch counts, compiled in
        the first forward (about 30 s on a CPU), outputs equal to eager within 1e-5. Attention keeps running per
        group of equal-length blocks. On a CPU the encoder runs nearer the matmul rate (docs/benchmarks.md)."""
        for layer in self.encoder.layers:
            for name in ("attention_inputs", "attention_output"):
                method = getattr(type(layer), name).__get__(layer)
                setattr(layer, name, torch.compile(method, dynamic=True, **compile_kwargs))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
    ) -> BaseModelOutput:
        """`last_hidden_state` [patches, W] in window order; `hidden_states` (embeddings, then each layer) and
        `attentions` (eager attention only: per layer, a tuple with one [blocks, heads, length, length] tensor per
        group of equal-length windows or image-scales) on request."""
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
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
        sin = angles.sin()
        # shared by all layers: [patches, 1, 1, head_dim] cos and sine with its first half negated
        rotary_embeddings = (
            torch.cat((angles, angles), dim=-1).cos()[:, None, None],
            torch.cat((-sin, sin), -1)[:, None, None],
        )

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.encoder.layers:
            hidden_states, attn_weights = layer(hidden_states, rotary_embeddings, image_blocks, window_blocks)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ---------------------------------------------------------------------------------------------------------------
# 2. Connector
# ---------------------------------------------------------------------------------------------------------------


def pixel_shuffle(features: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[patches, W] → [patches / merge², merge²·W]: the patches of each merged unit are adjacent in the ViT output."""
    return features.reshape(-1, merge_size**2 * features.shape[-1])


def build_connector(vision: NaViLVisionConfig, text: NaViLTextConfig) -> nn.Sequential:
    """The MLP (`mlp1`) from pixel-shuffled ViT features [units, merge²·W] to the LLM width [units, hidden]."""
    merged_width = vision.hidden_size * vision.merge_size**2
    return nn.Sequential(
        nn.LayerNorm(merged_width),
        nn.Linear(merged_width, text.hidden_size),
        nn.GELU(),
        nn.Linear(text.hidden_size, text.hidden_size),
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Modality-expert decoders
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
        # [batch, seq, d_in] -> [batch, seq, d_out]; the text expert is not called without text tokens (an image chunk)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        visual_out = visual_expert(flat[self.visual_index])
        out = visual_out.new_empty(flat.shape[0], visual_out.shape[-1])
        out.index_copy_(0, self.visual_index, visual_out)
        if len(self.text_index):
            out.index_copy_(0, self.text_index, text_expert(flat[self.text_index]))
        return out.view(*hidden_states.shape[:-1], -1)

    def visual_only(self, hidden_states: torch.Tensor, visual_expert: Callable) -> torch.Tensor:
        """Applies `visual_expert` to the visual rows and leaves text rows unchanged."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = flat.index_copy(0, self.visual_index, visual_expert(flat[self.visual_index]))
        return out.view(*hidden_states.shape[:-1], -1)


def route(router: Optional[ModalityRouter], hidden_states, text_expert, visual_expert):
    return text_expert(hidden_states) if router is None else router(hidden_states, text_expert, visual_expert)


# The modality of each token of a step, as `mm_token_type_ids` (transformers' name; its `generate` appends text types
# for the tokens it generates): what embeds the token and which experts it goes to. The one rule for generated tokens,
# shared by `forward` and the serving engines (`serving/core.py`).
TEXT_TOKEN = 0  # the word embedding and the text experts: ordinary text, and every generated token
IMAGE_TOKEN = 1  # a prompt's `<img>` or `<IMG_CONTEXT>`: its special row or image feature, the visual experts
SPECIAL_TOKEN = 2  # another NaViL special token of a prompt: its `special_token_embedding` row, the text experts
_CONTEXT_ROW = SPECIAL_TOKEN_EMBEDDING_ROWS.index(IMG_CONTEXT_TOKEN)
_START_ROW = SPECIAL_TOKEN_EMBEDDING_ROWS.index(IMG_START_TOKEN)


def token_types(rows: torch.Tensor, generated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`mm_token_type_ids` of a step ([..., seq]) from the `special_token_embedding` rows of its tokens (-1 for every
    other token, see `special_token_rows`): prompt tokens by their ids, and the tokens of the bool mask `generated`
    `TEXT_TOKEN` whatever their ids, as the original embeds and routes the tokens it generates."""
    visual = (rows == _CONTEXT_ROW) | (rows == _START_ROW)
    types = torch.where(visual, IMAGE_TOKEN, torch.where(rows >= 0, SPECIAL_TOKEN, TEXT_TOKEN))
    return types if generated is None else types.masked_fill(generated, TEXT_TOKEN)


def typed_embeddings(
    inputs_embeds: torch.Tensor, rows: torch.Tensor, types: torch.Tensor, special_token_embedding: nn.Embedding
) -> torch.Tensor:
    """`inputs_embeds` [..., seq, hidden] (word embeddings, image features already in place where an engine put
    them) with the `special_token_embedding` row of each token typed `IMAGE_TOKEN` or `SPECIAL_TOKEN`, but
    `<IMG_CONTEXT>`, which takes its image feature; `TEXT_TOKEN`s keep their word embedding."""
    rows = rows.masked_fill((types == TEXT_TOKEN) | (rows == _CONTEXT_ROW), -1)
    special = special_token_embedding(rows.clamp(min=0)).to(inputs_embeds.dtype)
    return torch.where((rows >= 0)[..., None], special, inputs_embeds)


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


# Attention runs through `attention_interface`, which looks functions up with `ALL_ATTENTION_FUNCTIONS.get_interface(`
# (transformers 5 reads that in this file to allow `model.set_attn_implementation(...)`).
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
        segments = kwargs.pop("packed_segments", None)
        query, key, value = (states.transpose(1, 2) for states in self.project_qkv(hidden_states, router))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = partial(
            attention_interface(self.config._attn_implementation or "sdpa"),
            self,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        if segments is not None and attention_mask is None:
            attn_output, attn_weights = packed_attention(attention, query, key, value, segments), None
        else:
            attn_output, attn_weights = attention(query, key, value, attention_mask)
        return self.project_out(attn_output.reshape(batch, seq_len, -1), router), attn_weights

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
        experts = config.modality_experts  # a dense decoder has no `_ve` twins
        self.wqkv_ve = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias) if experts else None
        self.wo_ve = nn.Linear(out_size, config.hidden_size, bias=config.attention_bias) if experts else None

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
        bias, eps, experts = config.attention_bias, config.rms_norm_eps, config.modality_experts
        self.q_proj = nn.Linear(hidden, heads * dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=bias)
        self.q_norm = NaViLRMSNorm(dim, eps=eps)
        self.k_norm = NaViLRMSNorm(dim, eps=eps)
        self.q_proj_ve = nn.Linear(hidden, heads * dim, bias=bias) if experts else None
        self.k_proj_ve = nn.Linear(hidden, kv_heads * dim, bias=bias) if experts else None
        self.v_proj_ve = nn.Linear(hidden, kv_heads * dim, bias=bias) if experts else None
        self.o_proj_ve = nn.Linear(heads * dim, hidden, bias=bias) if experts else None
        self.q_norm_ve = NaViLRMSNorm(dim, eps=eps) if experts else None
        self.k_norm_ve = NaViLRMSNorm(dim, eps=eps) if experts else None

    @property
    def sliding_window(self):
        config = self.config
        uses_window = config.use_sliding_window and self.layer_idx >= getattr(config, "max_window_layers", 0)
        return config.sliding_window if uses_window else None

    def _heads(self, states):
        # [..., heads·D] -> [..., heads, D]
        return states.view(*states.shape[:-1], -1, self.head_dim)

    def text_qkv(self, hidden_states):
        # [..., hidden] -> query, key, value [..., heads, D], query and key normalised per head
        query = self.q_norm(self._heads(self.q_proj(hidden_states)))
        key = self.k_norm(self._heads(self.k_proj(hidden_states)))
        return query, key, self._heads(self.v_proj(hidden_states))

    def visual_qkv(self, hidden_states):
        query = self.q_norm_ve(self._heads(self.q_proj_ve(hidden_states)))
        key = self.k_norm_ve(self._heads(self.k_proj_ve(hidden_states)))
        return query, key, self._heads(self.v_proj_ve(hidden_states))

    @staticmethod
    def _fused(qkv_expert):
        # [tokens, hidden] -> [tokens, (H + 2·KV)·D]: one tensor for the router
        return lambda hidden_states: torch.cat([states.flatten(-2) for states in qkv_expert(hidden_states)], dim=-1)

    def project_qkv(self, hidden_states, router):
        if router is None:
            return self.text_qkv(hidden_states)
        qkv = router(hidden_states, self._fused(self.text_qkv), self._fused(self.visual_qkv))
        kv_size = self.num_key_value_heads * self.head_dim
        return tuple(map(self._heads, qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)))

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


class ModalityExpertDecoderLayer(RefusesQuantizedLoraMerge, GradientCheckpointingLayer):
    """Pre-norm layer: norms and attention are shared by all tokens, the feed-forward block is per modality.

    Each layout (below) declares its modules under the original checkpoint names and lists them in its
    `sublayers()`: (attention norm, attention, feed-forward norm, text feed-forward, visual feed-forward).
    """

    @property
    def sliding_window(self) -> Optional[int]:
        return self.sublayers()[1].sliding_window

    @property
    def quantized_merge_name(self) -> str:
        return f"language-model layer {self.sublayers()[1].layer_idx}"

    def forward(self, hidden_states, router, position_embeddings, attention_mask, cache=None, **kwargs):
        # -> hidden_states [batch, seq, hidden], attention weights [batch, heads, seq, kv_len] (eager only, else None)
        attention_norm, attention, ffn_norm, ffn, ffn_ve = self.sublayers()
        attn_output, attn_weights = attention(
            attention_norm(hidden_states), router, position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + route(router, ffn_norm(hidden_states), ffn, ffn_ve), attn_weights


class InternLM2VEDecoderLayer(ModalityExpertDecoderLayer):
    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = InternLM2VEAttention(config, layer_idx)
        self.ffn_norm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = InternLM2MLP(config)
        self.feed_forward_ve = InternLM2MLP(config) if config.modality_experts else None

    def sublayers(self):
        return self.attention_norm, self.attention, self.ffn_norm, self.feed_forward, self.feed_forward_ve


class Qwen3VEDecoderLayer(ModalityExpertDecoderLayer):
    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen3VEAttention(config, layer_idx)
        self.post_attention_layernorm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)
        self.mlp_ve = Qwen3MLP(config) if config.modality_experts else None

    def sublayers(self):
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp, self.mlp_ve


class ModalityExpertModel(NaViLPreTrainedModel):
    """Embeddings, decoder layers and final norm; `visual_token_mask` [batch, seq] selects the visual experts."""

    config_class = NaViLTextConfig
    base_model_prefix = "model"

    def build_decoder(self, config: NaViLTextConfig, decoder_layer_class: type) -> None:
        """What follows the layout's word embeddings: the decoder layers, the final norm and the rotary embedding."""
        self.layers = nn.ModuleList(decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NaViLTextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        visual_token_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        cache = pop_cache(past_key_values, kwargs)
        # several examples packed in each row (their positions restart at 0), when no padding mask or cache is given
        packed = packed_sequence_ids(position_ids) if attention_mask is None and cache is None else None
        if use_cache and cache is None and packed is None:
            cache = new_dynamic_cache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_attention_mask(
                attention_mask, inputs_embeds.shape[1], past_length, inputs_embeds.device
            ).to(inputs_embeds.device)

        implementation = self.config._attn_implementation or "sdpa"
        if packed is not None:
            kwargs.update(packed_attention_kwargs(implementation, packed, position_ids))
        if isinstance(attention_mask, dict):
            full_mask, window_mask = attention_mask.get("full_attention"), attention_mask.get("sliding_attention")
        elif "packed_segments" in kwargs:  # sdpa runs each example alone; only sliding windows need a mask
            full_mask = None
            window_mask = None
            if self.config.use_sliding_window:
                window_mask = causal_masks(self.config, inputs_embeds, None, None, position_ids, True, packed)[1]
        else:
            full_mask, window_mask = causal_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids, self.config.use_sliding_window, packed
            )

        router = ModalityRouter.build(visual_token_mask) if self.config.modality_experts else None
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            mask = window_mask if layer.sliding_window is not None else full_mask
            hidden_states, attn_weights = layer(hidden_states, router, position_embeddings, mask, cache, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:  # the last entry is the normalised output, as in transformers' decoders
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return output_with_cache(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


def packed_attention(attention: Callable, query, key, value, segments: list[list[slice]]) -> torch.Tensor:
    """Causal attention within each packed example (`segments`: each row's example spans), one example at a time.

    query [batch, heads, seq, D], key/value [batch, kv_heads, seq, D] -> [batch, seq, heads, D]
    """
    rows = []
    for row, spans in enumerate(segments):
        outputs = [
            attention(*(states[row, None, :, span] for states in (query, key, value)), None)[0] for span in spans
        ]
        rows.append(torch.cat(outputs, dim=1))
    return torch.cat(rows)


def packed_attention_kwargs(implementation: str, packed: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """What the attention functions need to keep packed examples (`packed_sequence_ids` [batch, seq]) apart.

    sdpa: `packed_segments`, each row's example spans, which `ModalityExpertAttention` runs one at a time (causal
    attention within the example: cost and memory grow with each example's length, not the row's). Flash attention:
    what transformers' varlen flash attention reads the examples of a single row from (`flash_packed_kwargs`). Other
    implementations (eager, flex) take the per-example masks of `causal_masks`.
    """
    if implementation.startswith("flash"):
        if packed.shape[0] != 1:
            raise ValueError(
                f"Packed sequences under {implementation} take one row, got {packed.shape[0]}; lay the packed examples "
                "one after another in a single row (navil.training.PackingCollator does)."
            )
        return flash_packed_kwargs(packed, position_ids)
    if implementation != "sdpa":
        return {}
    segments = []
    for row in packed:
        starts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist(), row.shape[0]]
        segments.append([slice(start, end) for start, end in zip(starts, starts[1:])])
    return {"packed_segments": segments}


def positions_from_attention_mask(attention_mask, seq_len, past_length, device):
    """Positions 0… of the real tokens (left padding skipped, padded slots get 1), for the last `seq_len` tokens."""
    if attention_mask is None or attention_mask.ndim != 2:
        # `past_length` is a device tensor for static caches: no host sync, no recompilation per step
        return (torch.arange(seq_len, device=device) + past_length)[None, :]
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq_len:]


class InternLM2VEModel(ModalityExpertModel):
    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.build_decoder(config, InternLM2VEDecoderLayer)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value


class Qwen3VEModel(ModalityExpertModel):
    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.build_decoder(config, Qwen3VEDecoderLayer)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value


LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def lm_head_output(
    model, outputs, labels, logits_to_keep, vocab_size: int, output_class=CausalLMOutputWithPast, **fields
) -> CausalLMOutputWithPast:
    """`model`'s LM head over the decoder `outputs` (the last `logits_to_keep` positions, all when 0), and the loss.

    `fields` may hold the loss arguments of transformers' `loss_function` (`LOSS_KWARGS`, e.g. `num_items_in_batch`
    from `Trainer`, `shift_labels`); the others are stored in the `output_class`.
    """
    loss_kwargs = {name: fields.pop(name) for name in LOSS_KWARGS if name in fields}
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.get_output_embeddings()(outputs.last_hidden_state[:, keep, :])
    loss = None
    if labels is not None or loss_kwargs.get("shift_labels") is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)
    return output_with_cache(
        output_class,
        cache_of(outputs),
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **fields,
    )


class ModalityExpertForCausalLM(NaViLPreTrainedModel, GenerationMixin):
    """A modality-expert decoder with its LM head; usable alone as a text model (every token text-routed)."""

    config_class = NaViLTextConfig
    base_model_prefix = "model"

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @can_return_tuple
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
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        outputs = self.model(
            return_dict=True,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pop_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            visual_token_mask=visual_token_mask,
            **kwargs,
        )
        return lm_head_output(self, outputs, labels, logits_to_keep, self.config.vocab_size, **loss_kwargs)


class InternLM2VEForCausalLM(ModalityExpertForCausalLM):
    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.model = InternLM2VEModel(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value


class Qwen3VEForCausalLM(ModalityExpertForCausalLM):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.model = Qwen3VEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value


# backbone -> causal LM: the decoder `NaViLForConditionalGeneration` builds for `text_config.backbone`
LANGUAGE_MODELS = {"internlm2": InternLM2VEForCausalLM, "qwen3": Qwen3VEForCausalLM}


def register_language_model(layout: Layout, attention_class: type, mlp_class: type) -> type:
    """Adds a decoder layout: `layout` (a `layouts_navil.Layout`) plus its attention and MLP classes are all a new
    backbone needs. Returns the causal LM built from them, registered for `layout.backbone`.

    `attention_class(config, layer_idx)` is a `ModalityExpertAttention` whose projections and q/k norms (and their
    `_ve` twins, absent when `config.modality_experts` is false) carry the names `layout` gives; `mlp_class(config)`
    has the `layout.ffn_parts`. The decoder layer, model and head take their module names from `layout`.
    """
    if not issubclass(attention_class, ModalityExpertAttention):
        raise TypeError(
            f"The attention class of a layout must subclass ModalityExpertAttention, got {attention_class}."
        )
    register_layout(layout)

    def build_layer(self, config, layer_idx):
        ModalityExpertDecoderLayer.__init__(self)
        setattr(self, layout.attention_norm, NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        setattr(self, layout.attention, attention_class(config, layer_idx))
        setattr(self, layout.ffn_norm, NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        setattr(self, layout.ffn, mlp_class(config))
        setattr(self, layout.ffn + VE_SUFFIX, mlp_class(config) if config.modality_experts else None)

    decoder_layer = type(
        layout.decoder_layer,
        (ModalityExpertDecoderLayer,),
        {"__init__": build_layer, "sublayers": lambda self: tuple(getattr(self, n) for n in layout.sublayers())},
    )

    def build_model(self, config):
        ModalityExpertModel.__init__(self, config)
        setattr(self, layout.embedding, nn.Embedding(config.vocab_size, config.hidden_size))
        self.build_decoder(config, decoder_layer)

    model_class = type(
        layout.architecture.removesuffix("ForCausalLM") + "Model",
        (ModalityExpertModel,),
        {
            "__init__": build_model,
            "get_input_embeddings": lambda self: getattr(self, layout.embedding),
            "set_input_embeddings": lambda self, value: setattr(self, layout.embedding, value),
        },
    )

    def build_causal_lm(self, config):
        ModalityExpertForCausalLM.__init__(self, config)
        self.model = model_class(config)
        setattr(self, layout.head, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    causal_lm = type(
        layout.architecture,
        (ModalityExpertForCausalLM,),
        {
            "_tied_weights_keys": layout.tied_weights(),
            "__init__": build_causal_lm,
            "get_output_embeddings": lambda self: getattr(self, layout.head),
            "set_output_embeddings": lambda self, value: setattr(self, layout.head, value),
        },
    )
    NaViLPreTrainedModel._no_split_modules.append(layout.decoder_layer)
    NaViLPreTrainedModel._modules_to_not_quantize.append(f"language_model.{layout.head}")
    LANGUAGE_MODELS[layout.backbone] = causal_lm
    return causal_lm


# ---------------------------------------------------------------------------------------------------------------
# 4. NaViL
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NaViLModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_outputs (`BaseModelOutputWithPooling`, *optional*): `get_image_features` of the prompt's images (prefill).
    """

    image_outputs: Optional[BaseModelOutputWithPooling] = None


@dataclass
class NaViLCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_outputs (`BaseModelOutputWithPooling`, *optional*): `get_image_features` of the prompt's images (prefill).
    """

    image_outputs: Optional[BaseModelOutputWithPooling] = None


class MergedInputs(NamedTuple):
    """What the decoder takes for a prompt: embeddings with the images in, routing, and the image features."""

    inputs_embeds: torch.Tensor  # [batch, seq, hidden]
    visual_token_mask: Optional[torch.Tensor]  # [batch, seq], None without images
    image_outputs: Optional[BaseModelOutputWithPooling]


class NaViLModel(nn.Module):
    """`NaViLForConditionalGeneration.base_model`: the multimodal backbone without the LM head.

    It takes the model's inputs and returns a `BaseModelOutputWithPast` whose `last_hidden_state` [batch, seq,
    hidden] feeds the head, as the base models of transformers' vision-language models do (TRL's fused loss calls
    `model.base_model(**inputs)`). It is a view over its owner's modules, not a module of the checkpoint, so every
    parameter keeps its original name.
    """

    _tp_plan = None
    _pp_plan = None
    # what tools read from a base model, answered by the owner
    _from_owner = ("config", "device", "dtype", "vision_model", "get_input_embeddings", "get_image_features")

    def __init__(self, owner: "NaViLForConditionalGeneration"):
        super().__init__()
        self.__dict__["owner"] = owner  # not registered as a submodule: no second name for the owner's parameters

    def __getattr__(self, name):
        if name in NaViLModel._from_owner:
            return getattr(self.owner, name)
        return super().__getattr__(name)

    @property
    def language_model(self) -> nn.Module:
        return self.owner.language_model.model

    @can_return_tuple
    def forward(self, *args, **kwargs) -> BaseModelOutputWithPast:
        return self.owner.decoder_outputs(*args, **kwargs)


class NaViLForConditionalGeneration(NaViLChatMixin, NaViLPreTrainedModel, GenerationMixin):
    """NaViL: vision encoder → pixel shuffle + MLP connector (`mlp1`) → modality-expert language model.

    Image features replace the `<IMG_CONTEXT>` token embeddings; `<IMG_CONTEXT>` and `<img>` tokens are routed to the
    visual experts, every other token (including `</img>` and the line/frame breaks) to the text experts. The twelve
    NaViL special tokens take their embeddings from `special_token_embedding`. Cached decode steps embed new tokens
    with the plain word embeddings and route them as text, as the original does.
    """

    def __init__(self, config: NaViLConfig, **kwargs):
        # from_pretrained turns the original model card's quantization flags into a quantization_config; a model
        # built directly cannot quantize itself.
        if kwargs.pop("load_in_8bit", False) or kwargs.pop("load_in_4bit", False):
            raise ValueError(
                "load_in_8bit / load_in_4bit quantize the weights while loading: pass them (or quantization_config) to "
                "NaViLForConditionalGeneration.from_pretrained instead of the constructor."
            )
        if kwargs:
            raise TypeError(f"NaViLForConditionalGeneration got unexpected arguments: {sorted(kwargs)}")
        super().__init__(config)
        vision, text = config.vision_config, config.text_config
        self.vision_model = NaViLVisionModel(vision)
        self.mlp1 = build_connector(vision, text)
        self.language_model = LANGUAGE_MODELS[text.backbone](text)
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKEN_EMBEDDING_ROWS), text.hidden_size)
        self.post_init()

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def base_model(self) -> NaViLModel:
        return NaViLModel(self)

    def get_decoder(self):
        return self.language_model.model

    def set_decoder(self, decoder):
        self.language_model.model = decoder

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
        ids = special_token_ids_of(tokenizer)
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

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
    ) -> BaseModelOutputWithPooling:
        """[patches, 3·P·P] pixels of all image-scales → `pooler_output`, the LLM inputs: one [units, hidden] tensor
        per image-scale (units = patches / 4, in window order); `last_hidden_state` [patches, W] is the ViT output,
        `hidden_states` and `attentions` those of the ViT on request (see `NaViLVisionModel.forward`).

        `pixel_values` are moved to the vision tower's device and cast to its dtype (float32 processor output feeds
        a bfloat16 model as it is); they must be finite. `image_grid_thw` (an integer tensor or nested list, read on
        the CPU) must have one (t, h, w) row per image-scale with h and w multiples of the merge size, describing
        exactly the rows of `pixel_values`.
        """
        image_grid_thw = check_image_grid(image_grid_thw, self.config.vision_config.merge_size)
        return self.image_features(pixel_values, image_grid_thw, output_hidden_states, output_attentions)

    def image_features(
        self, pixel_values, image_grid_thw, output_hidden_states=None, output_attentions=None
    ) -> BaseModelOutputWithPooling:
        """`get_image_features` for an `image_grid_thw` already checked (`check_image_grid`), as `merge_inputs` has
        it: each check runs once per forward."""
        vision = self.config.vision_config
        check_pixel_values(pixel_values, vision)
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        vision_outputs = self.vision_model(
            pixel_values, image_grid_thw, output_hidden_states, output_attentions, return_dict=True
        )
        features = vision_outputs.last_hidden_state  # [patches, W]
        units_per_scale = (image_grid_thw.prod(-1) // vision.merge_size**2).tolist()
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            pooler_output=self.mlp1(pixel_shuffle(features, vision.merge_size)).split(units_per_scale),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def embed_tokens(
        self, input_ids, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None, **vision_kwargs
    ) -> MergedInputs:
        """Word embeddings with special-token rows replaced and image features scattered over `<IMG_CONTEXT>` (see
        `merge_inputs`)."""
        embeddings = self.get_input_embeddings()(input_ids)
        return self.merge_inputs(
            embeddings, pixel_values, image_grid_thw, input_ids, mm_token_type_ids, **vision_kwargs
        )

    def merge_inputs(
        self,
        inputs_embeds,
        pixel_values=None,
        image_grid_thw=None,
        input_ids=None,
        mm_token_type_ids=None,
        **vision_kwargs,
    ) -> MergedInputs:
        """The embeddings [batch, seq, hidden] as the decoder takes them, by the type of each token (`token_types`):
        NaViL special tokens of the prompt take their `special_token_embedding` rows, image features go over the
        prompt's `<IMG_CONTEXT>` rows, generated tokens keep their word embeddings.

        The tokens are read from `input_ids` when given, else recognised in `inputs_embeds` by their word (or special)
        embeddings, so `inputs_embeds=model.get_input_embeddings()(input_ids)` gives what `input_ids` give. Without
        `mm_token_type_ids` every token is a prompt token, typed by its id, and the prompt is checked here.
        `vision_kwargs` (`output_hidden_states`, `output_attentions`) go to `get_image_features`.
        """
        rows = self.special_token_rows(input_ids, inputs_embeds)  # [batch, seq], -1 for other tokens
        typed = mm_token_type_ids is not None
        types = mm_token_type_ids if typed else token_types(rows)
        inputs_embeds = typed_embeddings(inputs_embeds, rows, types, self.special_token_embedding)
        context_mask = (rows == _CONTEXT_ROW) & (types == IMAGE_TOKEN)
        if pixel_values is None:
            if not typed:  # typed tokens come from `generate`, which checked its prompt once
                check_no_image_tokens(context_mask)
            return MergedInputs(inputs_embeds, None, None)
        if image_grid_thw is None:
            raise ValueError("pixel_values were given without image_grid_thw; pass both from the image processor.")
        image_grid_thw = check_image_grid(image_grid_thw, self.config.vision_config.merge_size)
        self.special_token_id(IMG_CONTEXT_TOKEN)  # a clear error when the ids were never read from a tokenizer
        prompt_ids = input_ids.masked_fill(types == TEXT_TOKEN, -1) if input_ids is not None else None
        check_image_tokens(self.config, prompt_ids, context_mask, image_grid_thw)
        image_outputs = self.image_features(pixel_values, image_grid_thw, **vision_kwargs)
        features = torch.cat(image_outputs.pooler_output).to(inputs_embeds.dtype)  # [units of all scales, hidden]
        inputs_embeds = inputs_embeds.masked_scatter(context_mask[..., None], features)
        return MergedInputs(inputs_embeds, types == IMAGE_TOKEN, image_outputs)

    def special_token_rows(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """[batch, seq]: the `special_token_embedding` row of each NaViL special token, -1 for every other token."""
        ids = self.config.special_token_ids
        if input_ids is not None:
            return special_token_rows(ids, input_ids)
        rows = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        words, specials = self.get_input_embeddings().weight, self.special_token_embedding.weight
        for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS):
            if token in ids:
                for embedding in (words[ids[token]], specials[row]):
                    rows = rows.masked_fill((inputs_embeds == embedding.to(inputs_embeds)).all(-1), row)
        return rows

    # -- forward -------------------------------------------------------------------------------------------------

    @can_return_tuple
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
        mm_token_type_ids: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ) -> NaViLCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `[patches, 3·P·P]` or `[patches, 3, P, P]`): all image-scales of
            all images, in prompt order, as returned by the image processor.
        image_grid_thw (`torch.LongTensor` of shape `[image_scales, 3]`): (t, h, w) in patches per image-scale.
        visual_token_mask (`torch.BoolTensor` of shape `[batch, seq]`, *optional*): routing when `inputs_embeds` are
            given; computed from `input_ids` otherwise.
        num_scales (`torch.LongTensor`, *optional*): scales per image (from the processor); used for checking.
        mm_token_type_ids (`torch.LongTensor` of shape `[batch, seq]`, *optional*): the type of each token
            (`token_types`): `TEXT_TOKEN` for generated tokens, which keep their word embeddings and go to the text
            experts, as in the original. `generate` passes them (transformers appends `TEXT_TOKEN` for each new
            token), so a step knows its generated tokens from its inputs alone, cached or not, and a compiled decode
            step never branches on the cache. Without them every token is a prompt token, typed by its id, and the
            prompt is checked.
        labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): next-token targets; -100 and
            `<IMG_CONTEXT>` positions are ignored.
        """
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        outputs = self.decoder_outputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=use_cache,
            visual_token_mask=visual_token_mask,
            num_scales=num_scales,
            mm_token_type_ids=mm_token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        if input_ids is not None and IMG_CONTEXT_TOKEN in self.config.special_token_ids:
            is_context = input_ids == self.special_token_id(IMG_CONTEXT_TOKEN)
            if labels is not None:
                labels = labels.masked_fill(is_context, -100)
            if loss_kwargs.get("shift_labels") is not None:  # shift_labels[:, i] is the target of position i + 1
                next_is_context = F.pad(is_context[:, 1:], (0, 1), value=False)
                loss_kwargs["shift_labels"] = loss_kwargs["shift_labels"].masked_fill(next_is_context, -100)
        return lm_head_output(
            self,
            outputs,
            labels,
            logits_to_keep,
            self.config.text_config.vocab_size,
            output_class=NaViLCausalLMOutputWithPast,
            image_outputs=outputs.image_outputs,
            **loss_kwargs,
        )

    def decoder_outputs(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        pixel_values=None,
        image_grid_thw=None,
        use_cache=None,
        visual_token_mask=None,
        num_scales=None,
        mm_token_type_ids=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ) -> NaViLModelOutputWithPast:
        """Everything but the LM head (the arguments of `forward`): `last_hidden_state` [batch, seq, hidden], and the
        `image_outputs` of the prompt's images."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_num_scales(num_scales, image_grid_thw)
        cache = pop_cache(past_key_values, kwargs)
        if mm_token_type_ids is None:  # a prompt; `generate` checks its prompt once and types every step
            check_prompt(
                self.config, self.get_input_embeddings().weight.device, input_ids, inputs_embeds, attention_mask
            )
        else:
            check_token_types(mm_token_type_ids, input_ids if input_ids is not None else inputs_embeds)
        output_flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        if inputs_embeds is None:
            merged = self.embed_tokens(input_ids, pixel_values, image_grid_thw, mm_token_type_ids, **output_flags)
            inputs_embeds, visual_token_mask, image_outputs = merged
        else:
            merged = self.merge_inputs(
                inputs_embeds, pixel_values, image_grid_thw, None, mm_token_type_ids, **output_flags
            )
            inputs_embeds, image_outputs = merged.inputs_embeds, merged.image_outputs
            if merged.visual_token_mask is not None:
                visual_token_mask = merged.visual_token_mask
        outputs = self.language_model.model(
            return_dict=True,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            visual_token_mask=visual_token_mask,
            **output_flags,
            **kwargs,
        )
        return NaViLModelOutputWithPast(**outputs, image_outputs=image_outputs)

    def check_prompt_inputs(self, input_ids=None, inputs_embeds=None, attention_mask=None, pixel_values=None) -> None:
        """`check_prompt` for this model; with `pixel_values=None` also `check_no_image_tokens`, for `generate`,
        whose steps are typed (`forward` checks an untyped prompt's image tokens as it merges the images)."""
        check_prompt(self.config, self.get_input_embeddings().weight.device, input_ids, inputs_embeds, attention_mask)
        if pixel_values is None:
            check_no_image_tokens(self.special_token_rows(input_ids, inputs_embeds) == _CONTEXT_ROW)

    def generate(self, inputs=None, generation_config=None, compile_decode: bool = False, **kwargs):
        """`GenerationMixin.generate` after `check_generation_length` and the prompt's checks, with the prompt's
        `mm_token_type_ids` (`token_types`), which transformers extends with `TEXT_TOKEN` for each generated token.

        compile_decode (`bool`, *optional*, defaults to `False`): run the decode steps compiled with `torch.compile`
            (one graph per step, static cache), on CPUs too, with the same greedy tokens as eager decoding. On a CPU,
            batch-1 steps read each weight in one fused pass: about 2x the eager speed on docs/benchmarks.md's shape.
            It compiles (10-30 s) in the first call and once more in the first call of another length (a graph for
            any length, reused by later calls). Also `chat(..., generation_config=dict(compile_decode=True))`.
        """
        if compile_decode:
            taken = sorted(key for key in ("cache_implementation", "compile_config") if kwargs.get(key) is not None)
            if taken:
                raise ValueError(
                    f"compile_decode=True sets {' and '.join(taken)} itself; pass either compile_decode=True or "
                    f"{', '.join(taken)}, not both."
                )
            kwargs.update(compiled_decode_settings(self.device))
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor) and prompt.ndim == 2:
            prompt_ids, prompt_embeds = prompt, None
        else:
            prompt_ids, prompt_embeds = None, kwargs.get("inputs_embeds")
        prompt_tokens = prompt_ids if prompt_ids is not None else prompt_embeds
        if isinstance(prompt_tokens, torch.Tensor) and prompt_tokens.ndim == (2 if prompt_ids is not None else 3):
            config = generation_config if generation_config is not None else self.generation_config
            check_generation_length(self.config.text_config, config, prompt_tokens.shape[1], kwargs)
            self.check_prompt_inputs(
                prompt_ids, prompt_embeds, kwargs.get("attention_mask"), kwargs.get("pixel_values")
            )
            rows = self.special_token_rows(prompt_ids, prompt_embeds)
            kwargs.setdefault("mm_token_type_ids", token_types(rows))
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        return generation_step_inputs(model_inputs, kwargs, input_ids)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        return with_generated_token_types(
            super()._update_model_kwargs_for_generation, outputs, model_kwargs, *args, **kwargs
        )


NaViLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "InternLM2VEForCausalLM",
    "NaViLForConditionalGeneration",
    "NaViLPreTrainedModel",
    "NaViLVisionModel",
    "Qwen3VEForCausalLM",
]
