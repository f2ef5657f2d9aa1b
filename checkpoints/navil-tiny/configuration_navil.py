"""NaViL configuration: a native-resolution ViT, a pixel-shuffle MLP connector and an LLM with modality experts.

`NaViLConfig` reads the `config.json` of an ORIGINAL NaViL checkpoint unchanged (model_type "navil_chat", with
`vision_config` and `llm_config`) and writes a config that loads back identically. The LLM sub-config is stored
as `text_config` (the name transformers' generation utilities look for); `llm_config` is accepted on input.
"""

import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .errors_navil import NaViLInputError
from .layouts_navil import INTERNLM2_VE_LAYOUT, LAYOUTS, QWEN3_VE_LAYOUT, Layout

# The Hub files (this one among them): they import each other relatively and run as remote code next to a
# checkpoint (`navil convert` copies them); every other module of the package lives in a subpackage.
CODE_FILES = (
    "configuration_navil.py",
    "errors_navil.py",
    "compat_navil.py",
    "attention_navil.py",
    "checks_navil.py",
    "chat_navil.py",
    "modeling_navil.py",
    "image_loading_navil.py",
    "image_processing_navil.py",
    "image_processing_navil_fast.py",
    "layouts_navil.py",
    "processing_navil.py",
)

INTERNLM2_VE = INTERNLM2_VE_LAYOUT.architecture
QWEN3_VE = QWEN3_VE_LAYOUT.architecture
ROPE_TYPES = ("default", "linear", "dynamic")

# Special-token strings: the one definition, used by the model, the processor and training.
IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_LINE_BREAK_TOKEN = "<IMG_LINE_BREAK>"
IMG_FRAME_BREAK_TOKEN = "<IMG_FRAME_BREAK>"
END_OF_TURN_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# The special tokens of the NaViL tokenizers, in the order the original appends them.
NAVIL_SPECIAL_TOKENS = [
    "<|im_start|>",
    END_OF_TURN_TOKEN,
    PAD_TOKEN,
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<img_uncond>",
    "<think>",
    "</think>",
]

# Rows of the model's `special_token_embedding`, in the order of the original checkpoints.
SPECIAL_TOKEN_EMBEDDING_ROWS = (
    "</box>",
    "<box>",
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    IMG_LINE_BREAK_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
)
# Written into every saved config so that the folder loads through the Auto classes with trust_remote_code=True.
AUTO_MAP = {
    "AutoConfig": "configuration_navil.NaViLConfig",
    "AutoModel": "modeling_navil.NaViLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_navil.NaViLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_navil.NaViLForConditionalGeneration",
}


def special_token_ids_of(tokenizer) -> dict[str, int]:
    """The ids `tokenizer` gives the NaViL special tokens it has (token -> id), for `config.special_token_ids`;
    a `ValueError` if it lacks the image tokens."""
    ids = {}
    for token in (*SPECIAL_TOKEN_EMBEDDING_ROWS, END_OF_TURN_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids[token] = int(token_id)
    for required in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN):
        if required not in ids:
            raise ValueError(
                f"The tokenizer has no {required} token; add the NaViL special tokens with "
                "navil.processing_navil.add_navil_special_tokens(tokenizer)."
            )
    return ids


def special_token_rows(special_token_ids: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """The `special_token_embedding` row of each token of `input_ids` that is a NaViL special token (ids from
    `special_token_ids`, token -> id), -1 for every other token; same shape as `input_ids`."""
    size = max(special_token_ids.values()) + 1 if special_token_ids else 1
    table = torch.full((size,), -1, dtype=torch.long, device=input_ids.device)
    for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS):
        if token in special_token_ids:
            table[special_token_ids[token]] = row
    return table[input_ids.clamp(max=len(table) - 1)].masked_fill(input_ids >= len(table), -1)


def check_image_grid(image_grid_thw, merge_size: int) -> torch.Tensor:
    """`image_grid_thw` as a CPU int64 [image_scales, 3] tensor, or a `ValueError` naming what is wrong with it."""
    grid = torch.as_tensor(image_grid_thw)
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise NaViLInputError(
            f"image_grid_thw must hold integers (the image processor's output), got {grid.dtype}.", "image grid"
        )
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise NaViLInputError(
            f"image_grid_thw must be [image_scales, 3] (t, h, w per image-scale), got shape {tuple(grid.shape)}; "
            "pass the image processor's image_grid_thw.",
            "image grid",
        )
    grid = grid.to(device="cpu", dtype=torch.int64)
    bad = (grid[:, 0] < 1) | (grid[:, 1:] < merge_size).any(-1) | (grid[:, 1:] % merge_size != 0).any(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise NaViLInputError(
            f"image_grid_thw row {row} is {grid[row].tolist()}: t must be at least 1 and h, w positive multiples of "
            f"merge_size={merge_size}; pass the image processor's image_grid_thw with the model's merge size.",
            "image grid",
        )
    return grid


# What each kind of numeric or flag field must hold, for `check_fields`.
_FIELD_KINDS = {
    "size": ("a positive whole number", lambda v: isinstance(v, numbers.Integral) and v > 0),
    "index": ("a whole number >= 0", lambda v: isinstance(v, numbers.Integral) and v >= 0),
    "positive": ("a positive finite number", lambda v: isinstance(v, numbers.Real) and _finite(v) and v > 0),
    "non-negative": ("a finite number >= 0", lambda v: isinstance(v, numbers.Real) and _finite(v) and v >= 0),
    "flag": ("True or False", lambda v: isinstance(v, bool)),
}


def _finite(value) -> bool:
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def check_fields(owner: str, kind: str, **fields) -> None:
    """Raises a `ValueError` naming `owner.field` unless every value is of `kind` (a key of `_FIELD_KINDS`)."""
    description, valid = _FIELD_KINDS[kind]
    for name, value in fields.items():
        if (isinstance(value, bool) and kind != "flag") or not valid(value):
            raise NaViLInputError(f"{owner}.{name} must be {description}, got {value!r:.60}.", "invalid config value")


def check_range(owner: str, name: str, value, low: float, high: float, hint: str) -> None:
    """Raises a `ValueError` naming `owner.name` unless `low < value <= high` (a value already checked as a number):
    finite but absurd values (a RoPE base of 1e-300, an epsilon of 5) build a model that answers garbage. An epsilon
    of 1 is allowed: transformers' common tests set it to compare attention kernels on well-scaled activations."""
    if not low < value <= high:
        raise NaViLInputError(
            f"{owner}.{name} must be above {low} and at most {high} {hint}, got {value!r:.40}.", "invalid config value"
        )


def check_dtype_field(owner: str, kwargs: dict) -> None:
    """Raises a `ValueError` naming `owner.dtype` (or `torch_dtype`) unless it is None, "auto" or a floating-point
    torch dtype (or its name), before transformers looks the name up in torch."""
    for name in ("dtype", "torch_dtype"):
        value = kwargs.get(name)
        dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
        if value is not None and value != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise NaViLInputError(
                f"{owner}.{name} must be a floating-point dtype such as 'float32', 'bfloat16' or 'float16' (or null), "
                f"got {value!r:.40}.",
                "invalid config value",
            )


def check_activation(owner: str, hidden_act) -> None:
    if not isinstance(hidden_act, str) or hidden_act not in ACT2FN:
        raise NaViLInputError(
            f"{owner}.hidden_act must name an activation of transformers (e.g. 'gelu', 'silu'), got {hidden_act!r:.60}.",
            "invalid config value",
        )


MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
{base_model}tags:
- navil
- multimodal
- image-text-to-text
- custom_code
---

# {name}

A NaViL native multimodal LLM: a native-resolution ViT, a pixel-shuffle MLP connector and an LLM whose attention and
feed-forward blocks have a visual-expert copy for image tokens. The model code comes with the checkpoint
(`trust_remote_code=True`) and runs on transformers 4.51.0 through 5.x, on CPU and GPU.

## Usage

```python
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor

path = "{name}"
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
image = Image.new("RGB", (448, 448), "white")
ImageDraw.Draw(image).ellipse((112, 112, 336, 336), fill="yellow")
messages = [
    {{
        "role": "user",
        "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "What color is the circle?"}}],
    }}
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode_reply(output[0, inputs["input_ids"].shape[1] :]))
```
"""


# A sentence of transformers' generic model card, which `push_to_hub` writes when the Hub repo has no card yet.
GENERIC_CARD_SENTENCE = "This model card has been automatically generated."
_CARD_NAME = re.compile(r"^# (.+)$", re.MULTILINE)
_CARD_BASE_MODEL = re.compile(r"^base_model: (.+)$", re.MULTILINE)
# Hub cache folders are named models--{owner}--{name}
_HUB_CACHE_FOLDER = re.compile(r"^models--([^/]+?)--([^/]+)$")


def model_card(name: str, base_model: Optional[str] = None) -> str:
    """The model card (README.md) of a NaViL folder or Hub repo `name`; `base_model` is the Hub id of the model it was
    converted or fine-tuned from, when known."""
    return MODEL_CARD.format(name=name, base_model=f"base_model: {base_model}\n" if base_model else "")


def navil_card_fields(text: str) -> Optional[tuple[str, Optional[str]]]:
    """`(name, base_model)` when `text` is a card written by `model_card` and left unedited, else None (a card of
    the user's own, which is kept)."""
    name, base_model = _CARD_NAME.search(text), _CARD_BASE_MODEL.search(text)
    if name is None:
        return None
    fields = (name.group(1), base_model.group(1) if base_model else None)
    return fields if text == model_card(*fields) else None


def hub_repo_id_of(source) -> Optional[str]:
    """The Hub repo id that `source` (what a model was loaded from) stands for, when it tells: a Hub id itself, a
    snapshot folder of the Hub cache, or a folder whose NaViL card names a Hub repo (a pushed model's card)."""
    if source is None:
        return None
    path = Path(str(source))
    if not path.exists():
        text = str(source)
        return text if text.count("/") == 1 and not text.startswith((".", "/")) else None
    for folder in (path, *path.parents):
        cached = _HUB_CACHE_FOLDER.match(folder.name)
        if cached:
            return "/".join(cached.groups())
    card = path / "README.md"
    fields = navil_card_fields(card.read_text(encoding="utf-8")) if card.is_file() else None
    return fields[0] if fields and "/" in fields[0] else None


def _card_base_model(folder) -> Optional[str]:
    """The base model named by the unedited NaViL card of `folder`, if any."""
    card = Path(str(folder)) / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    fields = navil_card_fields(card.read_text(encoding="utf-8"))
    return fields[1] if fields else None


def write_model_card(save_directory, name: Optional[str] = None, base_model: Optional[str] = None, source=None):
    """Writes the model card (README.md) into `save_directory` unless the folder has a card of the user's own.

    transformers' generic card (which `push_to_hub` writes into its upload folder) and an unedited NaViL card are
    replaced. `name` is what the card's title and usage snippet load: the folder's name by default, the repo id when
    pushing. `base_model` defaults to the one known from `source` (the folder the model was loaded from) or from the
    card being replaced.
    """
    card = Path(save_directory) / "README.md"
    existing = card.read_text(encoding="utf-8") if card.exists() else None
    fields = navil_card_fields(existing) if existing is not None else None
    if existing is not None and fields is None and GENERIC_CARD_SENTENCE not in existing:
        return
    base_model = base_model or _card_base_model(source) or (fields[1] if fields else None)
    card.write_text(model_card(name or Path(save_directory).resolve().name, base_model), encoding="utf-8")


class NaViLVisionConfig(PretrainedConfig):
    r"""
    Configuration of the NaViL vision encoder: a ViT that embeds `patch_size`² patches of an image at its native
    resolution, with 2-D rotary positions, windowed attention in most layers and full attention (over each
    image-scale) in the layers listed in `fullatt_block_indexes`.

    Args:
        hidden_size (`int`, *optional*, defaults to 1024): width W of the encoder.
        num_attention_heads (`int`, *optional*, defaults to 16): heads; W / heads must be divisible by 4 (2-D RoPE).
        num_hidden_layers (`int`, *optional*, defaults to 24): number of encoder layers.
        intermediate_size (`int`, *optional*, defaults to 4096): width of the MLP.
        patch_size (`int`, *optional*, defaults to 16): side of a square patch in pixels.
        num_channels (`int`, *optional*, defaults to 3): image channels.
        qkv_bias (`bool`, *optional*, defaults to `True`): bias on the fused qkv projection.
        qk_normalization (`bool`, *optional*, defaults to `False`): RMS-normalise q and k over the full width
            before splitting heads (the original only runs this with one head).
        norm_type (`str`, *optional*, defaults to `"rms_norm"`): `"rms_norm"` or `"layer_norm"`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the norms.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact erf GELU).
        initializer_factor (`float`, *optional*, defaults to 0.1): initial value of the layer scales.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the weight initialisation.
        window_size (`int`, *optional*, defaults to 8): side of an attention window, in patches.
        fullatt_block_indexes (`list[int]`, *optional*): layers with full attention; `None` = every layer.
        downsample_ratio (`float`, *optional*, defaults to 0.5): overwritten by the top-level value.
    """

    model_type = "navil_vit"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size=1024,
        num_attention_heads=16,
        num_hidden_layers=24,
        intermediate_size=4096,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="rms_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        initializer_factor=0.1,
        initializer_range=0.02,
        window_size=8,
        fullatt_block_indexes=(5, 11, 17, 23),
        downsample_ratio=0.5,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_factor = initializer_factor
        self.initializer_range = initializer_range
        self.window_size = window_size
        if fullatt_block_indexes is not None and not isinstance(fullatt_block_indexes, (list, tuple)):
            raise NaViLInputError(
                f"vision_config.fullatt_block_indexes must be a list of layer indexes or None, got "
                f"{fullatt_block_indexes!r:.60}.",
                "invalid config value",
            )
        self.fullatt_block_indexes = None if fullatt_block_indexes is None else list(fullatt_block_indexes)
        self.downsample_ratio = downsample_ratio
        check_dtype_field("vision_config", kwargs)
        super().__init__(**kwargs)
        self.validate_vision()
        # the layer scales are filled with it: an int (e.g. `1` in a JSON file) would make them integer tensors
        self.initializer_factor = float(self.initializer_factor)

    def validate_vision(self):
        sizes = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "patch_size")
        check_fields("vision_config", "size", **{name: getattr(self, name) for name in sizes})
        if self.num_channels != 3:
            raise NaViLInputError(
                f"vision_config.num_channels must be 3 (the image processor gives RGB patches), got "
                f"{self.num_channels!r:.40}.",
                "invalid config value",
            )
        check_fields("vision_config", "size", window_size=self.window_size)
        check_fields(
            "vision_config", "positive", layer_norm_eps=self.layer_norm_eps, downsample_ratio=self.downsample_ratio
        )
        check_range("vision_config", "layer_norm_eps", self.layer_norm_eps, 0, 1, "(1e-6 in practice)")
        check_fields(
            "vision_config",
            "non-negative",
            initializer_range=self.initializer_range,
            initializer_factor=self.initializer_factor,
        )
        check_fields("vision_config", "flag", qkv_bias=self.qkv_bias, qk_normalization=self.qk_normalization)
        check_activation("vision_config", self.hidden_act)
        for index in self.fullatt_block_indexes or ():
            check_fields("vision_config", "index", fullatt_block_indexes=index)
        if self.hidden_size % self.num_attention_heads != 0:
            raise NaViLInputError(
                f"vision hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}).",
                "invalid config value",
            )
        if (self.hidden_size // self.num_attention_heads) % 4 != 0:
            raise NaViLInputError(
                f"vision head dim ({self.hidden_size // self.num_attention_heads}) must be a multiple of 4: the 2-D "
                "rotary embedding splits it into row and column halves of cos/sin pairs.",
                "invalid config value",
            )
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise NaViLInputError(
                f"vision norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}.", "invalid config value"
            )
        if self.fullatt_block_indexes is not None:
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise NaViLInputError(
                    f"fullatt_block_indexes {bad} are outside the {self.num_hidden_layers} vision layers.",
                    "invalid config value",
                )

    @property
    def merge_size(self):
        return round(1 / self.downsample_ratio)


class NaViLTextConfig(PretrainedConfig):
    r"""
    Configuration of the NaViL language model: a decoder whose attention projections and feed-forward blocks have
    a text copy and a visual-expert copy. `architectures[0]` picks the layout of the original checkpoints:
    `"InternLM2VEForCausalLM"` (fused interleaved `wqkv`, NaViL-2B) or `"Qwen3VEForCausalLM"` (q/k/v with per-head
    q/k norms, NaViL-9B).

    Args:
        architectures (`list[str]`, *optional*, defaults to `["InternLM2VEForCausalLM"]`): the layout.
        vocab_size (`int`, *optional*, defaults to 92553): vocabulary size.
        hidden_size (`int`, *optional*, defaults to 2048): hidden size Hd.
        intermediate_size (`int`, *optional*, defaults to 8192): feed-forward width.
        num_hidden_layers (`int`, *optional*, defaults to 24): decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 16): query heads.
        num_key_value_heads (`int`, *optional*, defaults to 8): key/value heads (`None` = query heads).
        head_dim (`int`, *optional*): per-head width; InternLM2 always uses hidden_size / heads.
        hidden_act (`str`, *optional*, defaults to `"silu"`): feed-forward activation.
        max_position_embeddings (`int`, *optional*, defaults to 32768): longest supported sequence.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the RMS norms.
        rope_theta (`float`, *optional*, defaults to 1e6): RoPE base.
        rope_scaling (`dict`, *optional*): as in original configs, `None` or `{"type": "linear"|"dynamic",
            "factor": f >= 1}`; read into `rope_type` and `rope_factor`.
        rope_type (`str`, *optional*, defaults to `"default"`): `"default"`, `"linear"` or `"dynamic"` (NTK).
        rope_factor (`float`, *optional*, defaults to 1.0): the scaling factor of `rope_type`.
        attention_bias (`bool`, *optional*, defaults to `False`): biases on the attention projections
            (`bias` in InternLM2 configs).
        use_sliding_window (`bool`, *optional*, defaults to `False`) and sliding_window (`int`, *optional*):
            Qwen3 sliding-window attention, applied only when `use_sliding_window` is true.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the weight initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie the LM head to the embeddings.
        modality_experts (`bool`, *optional*, defaults to `True`): give every attention projection, q/k norm and
            feed-forward block a visual-expert (`_ve`) twin for the image tokens, as NaViL does. `False` builds a
            dense decoder in which image tokens use the text weights (the paper's dense baseline); such a model
            has no `_ve` weights and refuses checkpoints that have them.
    """

    model_type = "navil_llm"
    base_config_key = "text_config"

    def __init__(
        self,
        architectures=None,
        vocab_size=92553,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling=None,
        rope_type="default",
        rope_factor=1.0,
        attention_bias=None,
        use_sliding_window=False,
        sliding_window=None,
        initializer_range=0.02,
        tie_word_embeddings=False,
        modality_experts=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        # Inert keys of the original configs: the attention backend is chosen at load time
        # (`attn_implementation=`), RoPE settings arrive as `rope_scaling` and InternLM2 spells the bias `bias`.
        for key in ("attn_implementation", "rope_parameters", "skip_final_norm_weight", "max_window_layers"):
            kwargs.pop(key, None)
        bias = kwargs.pop("bias", None)
        if architectures is not None and not isinstance(architectures, (list, tuple)):
            raise NaViLInputError(
                f"text_config.architectures must be a list of class names, got {architectures!r:.60}.",
                "invalid config value",
            )
        self.architectures = list(architectures or [INTERNLM2_VE])
        if self.architectures[0] not in LAYOUTS:
            raise NaViLInputError(
                f"llm_config.architectures[0] must be one of {sorted(LAYOUTS)}, got {self.architectures[0]!r}.",
                "invalid config value",
            )
        backbone = kwargs.pop("backbone", None)  # derived from architectures; an equal value is redundant
        if backbone is not None and backbone != self.backbone:
            raise NaViLInputError(
                f"text_config.backbone is {backbone!r:.40} but architectures[0] = {self.architectures[0]!r} gives "
                f"{self.backbone!r}; the backbone follows from architectures, so remove the backbone key.",
                "invalid config value",
            )
        check_dtype_field("text_config", kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        check_fields("text_config", "size", hidden_size=hidden_size, num_attention_heads=num_attention_heads)
        check_fields("text_config", "positive", rope_theta=rope_theta)
        check_range("text_config", "rope_theta", rope_theta, 1, math.inf, "(the RoPE base; 1e4 to 1e6 in practice)")
        if self.backbone == "internlm2" or head_dim is None:
            head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        # RoPE scaling is stored as two plain fields (`rope_scaling` is a reserved property in transformers 5).
        self.rope_type, self.rope_factor = parse_rope_scaling(rope_scaling, rope_type, rope_factor)
        self.attention_bias = bool(attention_bias if attention_bias is not None else bias or False)
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.initializer_range = initializer_range
        self.modality_experts = modality_experts
        super().__init__(
            architectures=self.architectures,
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        self.validate_text()

    def validate_text(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        sizes += ("num_key_value_heads", "head_dim", "max_position_embeddings")
        check_fields("text_config", "size", **{name: getattr(self, name) for name in sizes})
        check_fields("text_config", "positive", rms_norm_eps=self.rms_norm_eps)
        check_range("text_config", "rms_norm_eps", self.rms_norm_eps, 0, 1, "(1e-6 in practice)")
        check_fields("text_config", "non-negative", initializer_range=self.initializer_range)
        check_fields(
            "text_config", "flag", use_sliding_window=self.use_sliding_window, modality_experts=self.modality_experts
        )
        if self.sliding_window is not None:
            check_fields("text_config", "size", sliding_window=self.sliding_window)
        check_activation("text_config", self.hidden_act)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise NaViLInputError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}).",
                "invalid config value",
            )
        if self.backbone == "internlm2" and self.hidden_size % self.num_attention_heads != 0:
            raise NaViLInputError(
                f"InternLM2 hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}).",
                "invalid config value",
            )
        if self.head_dim % 2 != 0:
            raise NaViLInputError(
                f"head_dim must be even for rotary embeddings, got {self.head_dim}.", "invalid config value"
            )
        if self.use_sliding_window and not self.sliding_window:
            raise NaViLInputError("use_sliding_window is true but sliding_window is not set.", "invalid config value")

    @property
    def backbone(self):
        """`"internlm2"` or `"qwen3"` (or a registered layout's): names the layout of the decoder's weights."""
        return self.layout.backbone

    @property
    def layout(self) -> Layout:
        """The `layouts_navil.Layout` of the decoder: its checkpoint module names."""
        return LAYOUTS[self.architectures[0]]


def parse_rope_scaling(rope_scaling, rope_type="default", rope_factor=1.0):
    """Returns `(rope_type, factor)` from an original `rope_scaling` dict (InternLM2 or Qwen3 spelling) or the fields."""
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise NaViLInputError(
                f"rope_scaling must be a dict or None, got {rope_scaling!r}.", "invalid config value"
            )
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        rope_factor = rope_scaling.get("factor", 1.0)
    if rope_type not in ROPE_TYPES:
        raise NaViLInputError(
            f"rope scaling type {rope_type!r} is not supported; use one of {ROPE_TYPES}.", "invalid config value"
        )
    if isinstance(rope_factor, bool) or not isinstance(rope_factor, (int, float)) or not 1.0 <= rope_factor < math.inf:
        raise NaViLInputError(
            f"rope scaling factor (rope_factor) must be a finite number >= 1, got {rope_factor!r}.",
            "invalid config value",
        )
    return rope_type, float(rope_factor)


class NaViLConfig(PretrainedConfig):
    r"""
    Configuration of a NaViL model (`NaViLForConditionalGeneration`).

    Args:
        vision_config (`dict` or `NaViLVisionConfig`, *optional*): the vision encoder.
        text_config (`dict` or `NaViLTextConfig`, *optional*): the language model (`llm_config` in original files).
        template (`str`, *optional*): chat template, `"internlm2-chat"` or `"qwen3-chat"`; defaults to the one of
            the backbone.
        system_message (`str`, *optional*): replaces the template's default system message.
        downsample_ratio (`float`, *optional*, defaults to 0.5): pixel-shuffle ratio; 1/ratio patches per side are
            merged into one visual token.
        min_dynamic_patch (`int`, *optional*, defaults to 256) and max_dynamic_patch (`int`, *optional*, defaults
            to 24576): bounds of an image's area in patches (min/max pixels = value × patch_size²).
        scale_downsample_ratio (`float`, *optional*, defaults to 0.7071): side ratio between pyramid scales.
        anyres_image_size (`bool`, *optional*, defaults to `True`): stored for compatibility.
        special_token_ids (`dict[str, int]`, *optional*): ids of the NaViL special tokens, filled by
            `NaViLForConditionalGeneration.init_special_token_ids(tokenizer)`.
    """

    model_type = "navil_chat"
    sub_configs = {"vision_config": NaViLVisionConfig, "text_config": NaViLTextConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        template=None,
        system_message=None,
        downsample_ratio=0.5,
        min_dynamic_patch=256,
        max_dynamic_patch=24576,
        scale_downsample_ratio=0.7071,
        anyres_image_size=True,
        special_token_ids=None,
        **kwargs,
    ):
        llm_config = kwargs.pop("llm_config", None)
        if text_config is None:
            text_config = llm_config
        check_fields("NaViLConfig", "positive", downsample_ratio=downsample_ratio)
        for name, sub_config in (("vision_config", vision_config), ("text_config", text_config)):
            if sub_config is not None and not isinstance(sub_config, (Mapping, PretrainedConfig)):
                raise NaViLInputError(
                    f"{name} must be a dict or a config, got {type(sub_config).__name__}.", "invalid config value"
                )
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        if isinstance(text_config, PretrainedConfig):
            text_config = text_config.to_dict()
        vision_config = dict(vision_config or {}, downsample_ratio=downsample_ratio)
        self.vision_config = NaViLVisionConfig(**vision_config)
        self.text_config = NaViLTextConfig(**(text_config or {}))
        self.template = template or self.text_config.layout.template
        self.system_message = system_message
        self.downsample_ratio = downsample_ratio
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.scale_downsample_ratio = scale_downsample_ratio
        self.anyres_image_size = anyres_image_size
        if special_token_ids is not None and not isinstance(special_token_ids, Mapping):
            raise NaViLInputError(
                f"special_token_ids must be a dict of token ids, got {special_token_ids!r:.60}.",
                "invalid config value",
            )
        self.special_token_ids = dict(special_token_ids or {})
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        check_dtype_field("NaViLConfig", kwargs)
        super().__init__(**kwargs)
        self.validate_navil()

    def validate_navil(self):
        templates = sorted({layout.template for layout in LAYOUTS.values()})
        if self.template not in templates:
            raise NaViLInputError(
                f"template must be one of {templates}, got {self.template!r}.", "invalid config value"
            )
        merge = 1 / self.downsample_ratio
        if merge != round(merge) or merge < 1:
            raise NaViLInputError(
                f"downsample_ratio must be 1/n for a whole n, got {self.downsample_ratio}.", "invalid config value"
            )
        if self.vision_config.window_size // self.vision_config.merge_size <= 0:
            raise NaViLInputError(
                f"vision window_size ({self.vision_config.window_size}) must be at least the merge size "
                f"({self.vision_config.merge_size}).",
                "invalid config value",
            )
        check_fields(
            "NaViLConfig", "size", min_dynamic_patch=self.min_dynamic_patch, max_dynamic_patch=self.max_dynamic_patch
        )
        check_fields("NaViLConfig", "positive", scale_downsample_ratio=self.scale_downsample_ratio)
        if self.system_message is not None and not isinstance(self.system_message, str):
            raise NaViLInputError(
                f"system_message must be a string or None, got {type(self.system_message).__name__}.",
                "invalid config value",
            )
        vocab_size = self.text_config.vocab_size
        for token, token_id in self.special_token_ids.items():
            if not isinstance(token, str) or isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise NaViLInputError(
                    f"special_token_ids maps token strings to integer ids, got {token!r:.40}: {token_id!r:.40}; fill it "
                    "with model.init_special_token_ids(tokenizer).",
                    "invalid config value",
                )
            if not 0 <= token_id < vocab_size:
                raise NaViLInputError(
                    f"special_token_ids[{token!r}] = {token_id} is outside the vocabulary [0, {vocab_size}); fill it "
                    "with model.init_special_token_ids(tokenizer) using this model's tokenizer.",
                    "invalid config value",
                )
        if not 0 < self.min_dynamic_patch <= self.max_dynamic_patch:
            raise NaViLInputError(
                f"need 0 < min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch} and "
                f"{self.max_dynamic_patch}.",
                "invalid config value",
            )
        if not 0 < self.scale_downsample_ratio < 1:
            raise NaViLInputError(
                f"scale_downsample_ratio must be in (0, 1), got {self.scale_downsample_ratio}.", "invalid config value"
            )

    @property
    def llm_config(self):
        """The language-model config under its name in original NaViL code."""
        return self.text_config

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PretrainedConfig.from_dict`, refusing a saved config without the settings of the vision encoder or the
        language model: the defaults describe a full-size model, not the checkpoint's."""
        for keys in (("vision_config",), ("text_config", "llm_config")):
            if not any(isinstance(config_dict.get(key), (Mapping, PretrainedConfig)) for key in keys):
                raise NaViLInputError(
                    f"The NaViL config has no {' or '.join(keys)} (missing or null); a saved config must describe its "
                    "model. Use the config.json saved with the checkpoint.",
                    "invalid config value",
                )
        return super().from_dict(config_dict, **kwargs)


NaViLConfig.register_for_auto_class()


__all__ = ["NaViLConfig", "NaViLTextConfig", "NaViLVisionConfig"]
