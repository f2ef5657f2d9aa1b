"""The decoder layouts of NaViL's language model: one declarative entry per backbone.

Each `Layout` names the checkpoint modules of one backbone (InternLM2-VE, Qwen3-VE): the embedding and head, the
attention block with its projections and q/k norms, the feed-forward block and its parts, and whether q/k/v are one
fused, interleaved projection. Everything that needs those names (the serving loader's stacked parameters, upcycling's
visual-expert twins, LoRA targets, `_no_split_modules`, the modules kept out of quantization, the configuration's
backbone and template tables) derives them from `LAYOUTS`; `modeling_navil.py` declares the same modules literally,
and the tests check the two against each other. A new layout is one `register_layout` call (with its attention and
MLP classes, see `modeling_navil.register_language_model`).
"""

from typing import NamedTuple, Optional

VE_SUFFIX = "_ve"  # the visual-expert twin of module `x` is `x_ve`


class Layout(NamedTuple):
    """The checkpoint names of one decoder layout (module names relative to their parent)."""

    architecture: str  # `text_config.architectures[0]`, the causal-LM class name
    backbone: str  # `text_config.backbone`
    template: str  # the default chat template
    embedding: str  # word embeddings, under `model.`
    head: str  # LM head, beside `model`
    decoder_layer: str  # the decoder-layer class name (kept whole by device maps)
    attention_norm: str
    attention: str
    projections: tuple  # the attention's linear layers: q, k, v, o or fused qkv, o
    qk_norms: tuple  # per-head q/k norms with visual twins (empty when the layout has none)
    fused_qkv: Optional[str]  # the fused, interleaved [KV, G + 2, D] qkv projection, or None for separate q/k/v
    ffn_norm: str
    ffn: str
    ffn_parts: tuple  # gate, up, down

    @property
    def golden_name(self) -> str:
        """The name of the layout's golden fixture folder (`qwen3_ve`)."""
        return f"{self.backbone}{VE_SUFFIX}"

    def sublayers(self) -> tuple:
        """The decoder layer's module names in `sublayers()` order: norm, attention, norm, text FFN, visual FFN."""
        return self.attention_norm, self.attention, self.ffn_norm, self.ffn, self.ffn + VE_SUFFIX

    def expert_twins(self) -> tuple:
        """(text module, visual twin) paths within a decoder layer: attention projections, q/k norms, the FFN."""
        attention = tuple(f"{self.attention}.{name}" for name in self.projections + self.qk_norms)
        return tuple((name, name + VE_SUFFIX) for name in (*attention, self.ffn))

    def tied_weights(self) -> dict:
        """The LM head's weight tied to the word embeddings, as causal-LM state-dict keys."""
        return {f"{self.head}.weight": f"model.{self.embedding}.weight"}

    def stacked_params(self) -> list:
        """(checkpoint name part, engine parameter name part, shard) of the layers serving engines fuse: q/k/v into
        `qkv_proj` (a fused qkv layout keeps its name and is split by the loader) and gate/up into `gate_up_proj`."""
        stacked = []
        for expert in ("", VE_SUFFIX):
            if self.fused_qkv is None:
                for name, shard in zip(self.projections[:3], "qkv"):
                    stacked.append(
                        (f".{self.attention}.{name}{expert}.", f".{self.attention}.qkv_proj{expert}.", shard)
                    )
            ffn = self.ffn + expert
            for name, shard in zip(self.ffn_parts[:2], (0, 1)):
                stacked.append((f".{ffn}.{name}.", f".{ffn}.gate_up_proj.", shard))
        return stacked

    def fused_qkv_parts(self) -> tuple:
        """Substrings of the checkpoint names of the fused, interleaved qkv projection and its twin (none if q/k/v
        are separate)."""
        if self.fused_qkv is None:
            return ()
        return tuple(f".{self.attention}.{self.fused_qkv}{expert}." for expert in ("", VE_SUFFIX))


INTERNLM2_VE_LAYOUT = Layout(
    architecture="InternLM2VEForCausalLM",
    backbone="internlm2",
    template="internlm2-chat",
    embedding="tok_embeddings",
    head="output",
    decoder_layer="InternLM2VEDecoderLayer",
    attention_norm="attention_norm",
    attention="attention",
    projections=("wqkv", "wo"),
    qk_norms=(),
    fused_qkv="wqkv",
    ffn_norm="ffn_norm",
    ffn="feed_forward",
    ffn_parts=("w1", "w3", "w2"),
)
QWEN3_VE_LAYOUT = Layout(
    architecture="Qwen3VEForCausalLM",
    backbone="qwen3",
    template="qwen3-chat",
    embedding="embed_tokens",
    head="lm_head",
    decoder_layer="Qwen3VEDecoderLayer",
    attention_norm="input_layernorm",
    attention="self_attn",
    projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    qk_norms=("q_norm", "k_norm"),
    fused_qkv=None,
    ffn_norm="post_attention_layernorm",
    ffn="mlp",
    ffn_parts=("gate_proj", "up_proj", "down_proj"),
)

# architecture -> layout: what the configuration accepts and the model builds
LAYOUTS = {}


def register_layout(layout: Layout) -> Layout:
    """Adds `layout` to `LAYOUTS`; its architecture and backbone must be new."""
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout takes a navil Layout, got {type(layout).__name__}.")
    taken = {known.backbone for known in LAYOUTS.values()}
    if layout.architecture in LAYOUTS or layout.backbone in taken:
        raise ValueError(
            f"A layout named {layout.architecture!r} or with backbone {layout.backbone!r} is already registered; "
            "give the new layout its own architecture and backbone names."
        )
    LAYOUTS[layout.architecture] = layout
    return layout


def layout_of_backbone(backbone: str) -> Layout:
    """The registered layout whose `backbone` is `backbone`."""
    for layout in LAYOUTS.values():
        if layout.backbone == backbone:
            return layout
    raise ValueError(
        f"Unknown backbone {backbone!r}; registered: {sorted(known.backbone for known in LAYOUTS.values())}."
    )


register_layout(INTERNLM2_VE_LAYOUT)
register_layout(QWEN3_VE_LAYOUT)
