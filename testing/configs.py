"""The tiny NaViL config that tests, benchmarks and the fuzz build their models from (and the training recipe starts
from): a 2-layer ViT and a 2-layer language model of either backbone."""

from typing import Optional

from ..configuration_navil import SPECIAL_TOKEN_EMBEDDING_ROWS, NaViLConfig
from ..layouts_navil import layout_of_backbone

# The smallest useful NaViL: a 2-layer ViT (windows, then full attention) and a 2-layer language model.
TINY_VISION = dict(
    hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, fullatt_block_indexes=[1]
)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def special_token_ids_at_end(vocab_size: int) -> dict[str, int]:
    """Ids for the NaViL special tokens on the last ids of a vocabulary (for models run without a tokenizer)."""
    first = vocab_size - len(SPECIAL_TOKEN_EMBEDDING_ROWS)
    return {token: first + row for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS)}


def tiny_config(
    backbone: str = "qwen3",
    vocab_size: int = 320,
    vision: Optional[dict] = None,
    text: Optional[dict] = None,
    **kwargs,
) -> NaViLConfig:
    """A tiny NaViL config: `TINY_VISION` and `TINY_TEXT` updated by `vision` and `text`, the `backbone` layout
    ("internlm2", "qwen3" or a registered layout's) and, unless `special_token_ids` is given, the special tokens on the last ids of the
    vocabulary. Further keyword arguments go to `NaViLConfig`."""
    kwargs.setdefault("special_token_ids", special_token_ids_at_end(vocab_size))
    return NaViLConfig(
        vision_config={**TINY_VISION, **(vision or {})},
        text_config={
            **TINY_TEXT,
            "architectures": [layout_of_backbone(backbone).architecture],
            "vocab_size": vocab_size,
            **(text or {}),
        },
        **kwargs,
    )
