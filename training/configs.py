"""Model configurations: the recipe's model (built on the tiny test config of `navil.testing`), its processor, and the
mapping between a NaViL language model and a dense transformers LLM of the same shape."""

from dataclasses import dataclass
from typing import Optional, Union

from transformers import LlamaConfig, Qwen3Config

from ..configuration_navil import QWEN3_VE, NaViLConfig, NaViLTextConfig, special_token_ids_of
from ..processing_navil import NaViLProcessor
from ..testing.configs import tiny_config
from .synthetic_data import TRAIN_SIZE_RANGE

SYSTEM_MESSAGE = "Answer the question about the image."
TEMPLATE = "qwen3-chat"
# Fields a NaViL language model shares with a dense transformers LLM of the same shape (besides RoPE and tying).
DENSE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "initializer_range",
)


def dense_text_config(text_config: NaViLTextConfig) -> Union[LlamaConfig, Qwen3Config]:
    """The dense transformers LLM of the shape of a NaViL language model: `Qwen3Config` for the Qwen3 layout,
    `LlamaConfig` for InternLM2 (the same computation without the fused, interleaved qkv), untied head."""
    fields = {name: getattr(text_config, name) for name in DENSE_FIELDS}
    rope = {"rope_type": "default", "rope_theta": text_config.rope_theta}
    config_class = Qwen3Config if text_config.backbone == "qwen3" else LlamaConfig
    return config_class(**fields, rope_parameters=rope, tie_word_embeddings=False)


def navil_text_config(text_config: Qwen3Config) -> dict:
    """The NaViL `text_config` (Qwen3-VE layout) whose text experts are exactly `text_config`'s model."""
    rope_theta = (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta")
    return dict(
        {name: getattr(text_config, name) for name in DENSE_FIELDS},
        architectures=[QWEN3_VE],
        rope_theta=rope_theta if rope_theta is not None else getattr(text_config, "rope_theta", 10000.0),
        tie_word_embeddings=False,
    )


@dataclass
class TrainingArguments:
    """Every setting of `navil train`; the defaults are the recipe of `checkpoints/navil-tiny` (docs/training.md)."""

    output_dir: str = "runs/navil-tiny"
    tokenizer_dir: Optional[str] = None  # default: the packaged tokenizer/
    seed: int = 0
    # model shape
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 384
    vision_num_hidden_layers: int = 4
    vision_num_attention_heads: int = 4
    vision_window_size: int = 32
    vision_fullatt_block_indexes: tuple[int, ...] = (1, 3)
    min_dynamic_patch: int = 144
    max_dynamic_patch: int = 400
    # the connector's output layer starts at this multiple of the standard initialisation (std 0.02)
    connector_init_gain: float = 10.0
    # schedule
    text_steps: int = 150
    text_batch_size: int = 32
    text_learning_rate: float = 3e-3
    # scene supervision (docs/training.md): a vision stage on per-token scene labels, then the same labels as an
    # auxiliary loss of the question stages, read after decoder layer `scene_decoder_layer`
    scene_steps: int = 1500
    scene_batch_size: int = 16
    scene_learning_rate: float = 1e-3
    scene_loss_weight: float = 1.0
    scene_decoder_layer: int = 2
    # left/right questions per image in the question stages: every ordered pair of shapes
    position_questions: int = 6
    caption_steps: int = 200
    caption_batch_size: int = 16
    caption_learning_rate: float = 3e-4
    single_shape_steps: int = 1000
    qa_steps: int = 4000
    qa_batch_size: int = 8
    qa_learning_rate: float = 3e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    single_scale_fraction: float = 0.75
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    threads: int = 2
    eval_every: int = 2000
    eval_questions: int = 60
    size_range: tuple[int, int] = TRAIN_SIZE_RANGE


# `navil train --quick`: the shipped recipe shortened to under 30 minutes on 2 CPU threads (docs/training.md).
QUICK_RECIPE = dict(scene_steps=300, caption_steps=100, single_shape_steps=250, qa_steps=600, eval_every=300)


def tiny_text_config(args: TrainingArguments, vocab_size: int) -> Qwen3Config:
    """The Qwen3 text model of the recipe (untied head, RoPE base 10000)."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
    )


def tiny_navil_config(args: TrainingArguments, text_config: Qwen3Config, tokenizer) -> NaViLConfig:
    """The NaViL of the recipe around `text_config`: a small native-resolution ViT (patch 16, 2×2 merge) whose layer
    scales start at 1, with the special-token ids of `tokenizer`."""
    vision = dict(
        hidden_size=args.vision_hidden_size,
        num_attention_heads=args.vision_num_attention_heads,
        num_hidden_layers=args.vision_num_hidden_layers,
        intermediate_size=args.vision_intermediate_size,
        initializer_factor=1.0,
        window_size=args.vision_window_size,
        fullatt_block_indexes=list(args.vision_fullatt_block_indexes),
    )
    return tiny_config(
        "qwen3",
        text_config.vocab_size,
        vision=vision,
        text=navil_text_config(text_config),
        template=TEMPLATE,
        system_message=SYSTEM_MESSAGE,
        min_dynamic_patch=args.min_dynamic_patch,
        max_dynamic_patch=args.max_dynamic_patch,
        special_token_ids=special_token_ids_of(tokenizer),
    )


def navil_processor(config: NaViLConfig, tokenizer) -> NaViLProcessor:
    """The processor of a NaViL config ([`NaViLProcessor.from_model_config`]): its patch/merge sizes, pixel limits,
    template and system message."""
    return NaViLProcessor.from_model_config(config, tokenizer)
