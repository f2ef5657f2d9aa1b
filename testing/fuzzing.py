"""Hypothesis generators and checks for fuzzing navil: used by tests/test_fuzz.py (a small budget in CI) and
benchmarks/fuzz.py (a large one). Not a Hub file; needs the `test` extra (hypothesis).

Each kind of case is drawn as plain parameters, so that hypothesis prints readable failing examples, and built by a
`make_*` function. Each `check_*` function runs one case and returns its outcome: `"ok"` after checking that the
outputs are consistent, or the kind of the documented `NaViLInputError` raised (its `kind`, one of `EXPECTED_KINDS`).
Inconsistent outputs fail an assertion, and any other exception (or a `ValueError` of no documented kind) propagates.

- images: any image (PIL modes, PNG bytes, arrays and tensors of several dtypes and layouts, sizes 1-600 px with
  extreme aspect ratios, values out of range, NaN, truncated PNG files) through the processor;
- prompts: 0-3 `<image>` placeholders against 0-3 images, with text that may hold `<IMG_CONTEXT>` or lone
  surrogates; the outcome is predicted exactly;
- processor options: hostile per-call `min_pixels` / `max_pixels` / `multiscale` (huge, NaN, infinite, negative,
  strings, arrays, tensors, min above max); the output stays within the patch limits;
- end-to-end: processor then forward of a model;
- generation: greedy generation with and without the KV cache gives the same tokens;
- configs: one field of a tiny config set to a hostile value; refused naming the field, or the model builds, runs
  a forward pass and encodes an image;
- weights: a checkpoint's `model.safetensors` truncated, emptied, replaced by random bytes, given a huge or corrupted
  header, changed in its data, or missing / reshaping / adding / retyping a tensor; loaded with and without `strict`;
- chat settings: hostile `generation_config` values and keys chat owns;
- JSONL files and collator batches: fine-tuning examples with broken encodings, lines, fields and images;
- CLI flags: `navil` command lines with hostile flag values, parsed;
- saved files: a `preprocessor_config.json` with hostile bounds, flags, means, sizes and filters, and a `config.json`
  whose sizes disagree with the weights or the memory.
"""

import contextlib
import io
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from ..checks_navil import NaViLInputError
from ..configuration_navil import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_START_TOKEN, NaViLConfig
from ..image_processing_navil import SAVED_BOUNDS, NaViLImageProcessor
from ..modeling_navil import NaViLForConditionalGeneration
from .configs import tiny_config

# The kinds of typed errors (`NaViLInputError`, see `checks_navil.ERROR_KINDS`) a random input may legitimately raise.
EXPECTED_KINDS = (
    "placeholder count mismatch",
    "text contains <IMG_CONTEXT>",
    "text is not valid Unicode",
    "image tokens without images",
    "generation setting out of range",
    "generation key that chat owns",
    "generation length",
    "JSONL file not UTF-8",
    "JSONL line not JSON",
    "JSONL file without examples",
    "images is not a list of images",
    "malformed chat example",
    "images do not match image blocks",
    "image placeholders do not match images",
    "empty batch",
    "example longer than max_length",
    "aspect ratio above 200",
    "float values out of range",
    "NaN or infinite values",
    "truncated or corrupt file",
    "not an image file",
    "max_pixels too small for the aspect ratio",
    "pixel limit is not a number",
    "min_pixels above max_pixels",
    "multiscale is not a bool",
    "too many patches",
    "unreadable safetensors file",
    "checkpoint does not match the model",
    "image file not found",
    "saved bound removed or raised",
    "image above max_image_pixels",
    "image processor setting",
    "image mean or std out of range",
    "special token ids disagree with the tokenizer",
    "config contradicts the weights",
    "config too large for the memory",
    "invalid config value",
)

# Small budgets for CI: deterministic, no example database written next to the tests.
CI_SETTINGS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def classify(error: ValueError) -> str:
    """The kind of a documented `ValueError`: a typed error's `kind`, one of `EXPECTED_KINDS`; an `AssertionError` for
    any other."""
    if not isinstance(error, NaViLInputError):
        raise AssertionError(f"undocumented ValueError (not a NaViLInputError): {error}") from error
    if error.kind not in EXPECTED_KINDS:
        raise AssertionError(f"undocumented ValueError of kind {error.kind!r}: {error}") from error
    return error.kind


# -- images ---------------------------------------------------------------------------------------------------------

PIL_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "F")
PNG_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "I;16")
ARRAY_DTYPES = ("uint8", "uint16", "float32")
ARRAY_LAYOUTS = ("HW", "HWC", "CHW")
MAX_SIDE = 600


@dataclass(frozen=True)
class ImageCase:
    source: str  # "pil", "png" (encoded bytes), "png-cut" (PNG bytes cut short), "numpy" or "torch"
    mode: str  # PIL mode, or the array dtype
    layout: str  # array layout ("HW", "HWC", "CHW"); "" for PIL images and files
    channels: int  # array channels (1, 3 or 4)
    width: int
    height: int
    values: str  # "in range", "out of range" (float images) or "nan" (float images)
    seed: int


# Sides from 1 to MAX_SIDE, with extreme aspect ratios (around the limit of 200) drawn often.
_sizes = st.one_of(
    st.tuples(st.integers(1, MAX_SIDE), st.integers(1, MAX_SIDE)),
    st.tuples(st.integers(1, 4), st.integers(180, MAX_SIDE)),
    st.tuples(st.integers(180, MAX_SIDE), st.integers(1, 4)),
)
_values = st.sampled_from(("in range",) * 6 + ("out of range", "nan"))


@st.composite
def image_cases(draw) -> ImageCase:
    source = draw(st.sampled_from(("pil", "png", "png-cut", "numpy", "torch")))
    if source in ("pil", "png", "png-cut"):
        mode = draw(st.sampled_from(PIL_MODES if source == "pil" else PNG_MODES))
        layout, channels = "", 0
    else:
        mode = draw(st.sampled_from(ARRAY_DTYPES))
        layout = draw(st.sampled_from(ARRAY_LAYOUTS))
        channels = 1 if layout == "HW" else draw(st.sampled_from((1, 3, 4)))
    width, height = draw(_sizes)
    values = draw(_values) if mode in ("F", "float32") else "in range"
    return ImageCase(source, mode, layout, channels, width, height, values, draw(st.integers(0, 2**32 - 1)))


def _float_levels(rng, shape, values: str, top: float) -> np.ndarray:
    levels = rng.random(shape, dtype=np.float32) * top
    if values == "out of range":
        levels -= top  # negative values: refused for every float scale
    elif values == "nan":
        levels.flat[rng.integers(levels.size)] = np.nan
    return levels


def _pil_image(rng, case: ImageCase) -> Image.Image:
    shape = (case.height, case.width)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    if case.mode == "1":
        return Image.fromarray(rgb[..., 0] > 127)
    if case.mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if case.mode == "F":
        return Image.fromarray(_float_levels(rng, shape, case.values, top=float(rng.choice((1.0, 255.0)))))
    if case.mode == "LA":
        return Image.fromarray(np.ascontiguousarray(rgb[..., :2]))
    if case.mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1))
    image = Image.fromarray(rgb).convert(case.mode)
    if case.mode == "P" and case.seed % 2:
        image.info["transparency"] = int(case.seed % 256)
    return image


def _array(rng, case: ImageCase) -> np.ndarray:
    shape = {
        "HW": (case.height, case.width),
        "HWC": (case.height, case.width, case.channels),
        "CHW": (case.channels, case.height, case.width),
    }[case.layout]
    if case.mode == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if case.mode == "uint16":
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return _float_levels(rng, shape, case.values, top=1.0)


def make_image(case: ImageCase):
    """The image object an `ImageCase` describes; a "png-cut" file loses its end from a random byte on."""
    rng = np.random.default_rng(case.seed)
    if case.source in ("pil", "png", "png-cut"):
        image = _pil_image(rng, case)
        if case.source == "pil":
            return image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        return data if case.source == "png" else data[: int(rng.integers(0, len(data) - 12))]  # IEND is 12 bytes
    array = _array(rng, case)
    return torch.from_numpy(array) if case.source == "torch" else array


def small_image(seed: int) -> np.ndarray:
    """A random RGB image of 8 to 64 pixels per side."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (int(rng.integers(8, 65)), int(rng.integers(8, 65)), 3), dtype=np.uint8)


# -- prompts --------------------------------------------------------------------------------------------------------

_LONE_SURROGATE = "\udc80"
_FRAGMENTS = (" ", "\n", "What is this?", "图像", "<", ">", "image", "<imag", "e>", "</image>", "<|im_end|>", "<ref>")
_text_pieces = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8)), max_size=4).map("".join)


@dataclass(frozen=True)
class PromptCase:
    texts: tuple  # the prompts
    images: str  # "none" (images=None), "flat" (one list in placeholder order) or "nested" (one list per text)
    image_seeds: tuple  # one tuple of image seeds per text (flattened for "flat")


@st.composite
def prompt_cases(draw) -> PromptCase:
    texts, seeds = [], []
    for _ in range(draw(st.integers(1, 2))):
        pieces = [draw(_text_pieces) for _ in range(draw(st.integers(0, 3)) + 1)]
        if draw(st.integers(0, 7)) == 0:  # a text that already contains the image-feature token
            pieces[-1] += IMG_CONTEXT_TOKEN
        if draw(st.integers(0, 15)) == 0:  # a text that is not valid Unicode
            pieces[0] += _LONE_SURROGATE
        texts.append(IMAGE_PLACEHOLDER.join(pieces))
        seeds.append(tuple(draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))))
    return PromptCase(tuple(texts), draw(st.sampled_from(("none", "flat", "nested"))), tuple(seeds))


def prompt_case_images(case: PromptCase):
    """The `images` argument a `PromptCase` describes."""
    if case.images == "none":
        return None
    groups = [[small_image(seed) for seed in seeds] for seeds in case.image_seeds]
    if case.images == "nested":
        return groups
    return [image for group in groups for image in group]


def expected_prompt_outcome(case: PromptCase) -> tuple[str, str]:
    """The outcome the processor must give (the checks run in this order; the images are always valid) and, for a
    count mismatch, the part of the message naming both counts."""
    if any(_LONE_SURROGATE in text for text in case.texts):
        return "text is not valid Unicode", ""
    if case.images == "none" or (case.images != "nested" and not any(case.image_seeds)):
        return "ok", ""  # an empty list of images is no images (evaluation harnesses pass one)
    if any(IMG_CONTEXT_TOKEN in text for text in case.texts):
        return "text contains <IMG_CONTEXT>", ""
    counts = [text.count(IMAGE_PLACEHOLDER) for text in case.texts]
    images = [len(seeds) for seeds in case.image_seeds]
    if case.images == "nested":
        for index, (count, given) in enumerate(zip(counts, images)):
            if count != given:
                fragment = f"found {count} {IMAGE_PLACEHOLDER} placeholders in text {index} but {given} images"
                return "placeholder count mismatch", fragment
        return "ok", ""
    if sum(counts) != sum(images):
        placeholders = f"{sum(counts)} {IMAGE_PLACEHOLDER} placeholder{'s' if sum(counts) != 1 else ''}"
        return "placeholder count mismatch", f"found {placeholders} in the text but {sum(images)} image"
    return "ok", ""


# -- per-call processor options -------------------------------------------------------------------------------------

_pixel_limits = st.one_of(
    st.none(),
    st.integers(-10, 10**6),
    st.integers(10**6, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(1, 10**7).map(np.float32),
    st.integers(1, 10**7).map(torch.tensor),
    st.sampled_from(("1000", b"1000", [1000], True, np.array([1, 2]))),
)


@dataclass(frozen=True)
class OptionCase:
    min_pixels: object
    max_pixels: object
    multiscale: object
    image_seed: int


@st.composite
def option_cases(draw) -> OptionCase:
    multiscale = draw(st.sampled_from((None, True, False, np.bool_(True), "no", 0)))
    return OptionCase(draw(_pixel_limits), draw(_pixel_limits), multiscale, draw(st.integers(0, 2**32 - 1)))


# -- end-to-end and generation --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCase:
    question: str
    image_seeds: tuple
    new_tokens: int


@st.composite
def generation_cases(draw) -> GenerationCase:
    question = draw(_text_pieces.filter(lambda text: IMG_CONTEXT_TOKEN not in text and IMAGE_PLACEHOLDER not in text))
    seeds = tuple(draw(st.lists(st.integers(0, 2**32 - 1), max_size=1)))
    return GenerationCase(question or "?", seeds, draw(st.integers(1, 3)))


# -- configs --------------------------------------------------------------------------------------------------------

# The fields a config file sets, by section ("" = the top level).
CONFIG_FIELDS = {
    "vision_config": tuple(
        "hidden_size num_attention_heads num_hidden_layers intermediate_size patch_size num_channels layer_norm_eps "
        "hidden_act window_size initializer_factor initializer_range norm_type fullatt_block_indexes qkv_bias "
        "qk_normalization".split()
    ),
    "text_config": tuple(
        "architectures vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim hidden_act max_position_embeddings rms_norm_eps rope_theta rope_scaling "
        "use_sliding_window sliding_window initializer_range rope_factor backbone".split()
    ),
    "": tuple(
        "downsample_ratio min_dynamic_patch max_dynamic_patch scale_downsample_ratio template system_message "
        "special_token_ids dtype".split()
    ),
}
_CONFIG_VALUES = (
    2**40,
    0.5,
    1.5,
    1e-30,
    1e-300,
    "float32",
    "bfloat16",
    "int8",
    "qwen3",
    "internlm2",
    -1.0,
    math.nan,
    math.inf,
    "8",
    "gelu",
    "silu",
    "bogus",
    "layer_norm",
    None,
    True,
    False,
    [],
    [1],
    [0, 5],
    {},
    {"type": "linear", "factor": 2.0},
    {"type": "yarn"},
    {IMG_START_TOKEN: 5},
    {IMG_START_TOKEN: -1},
    {IMG_START_TOKEN: "5"},
    "qwen3-chat",
    ["Qwen3VEForCausalLM"],
    ["InternLM2VEForCausalLM"],
    ["LlamaForCausalLM"],
)
_config_values = st.one_of(st.integers(-3, 80), st.sampled_from(_CONFIG_VALUES), st.floats(-10, 10))
# Largest value of a mutated size for which the model is built and run (larger ones are only parsed).
MAX_BUILT_SIZE = 32


@dataclass(frozen=True)
class ConfigCase:
    backbone: str
    section: str
    field: str
    value: object
    with_image: bool
    seed: int


@st.composite
def config_cases(draw) -> ConfigCase:
    section = draw(st.sampled_from(tuple(CONFIG_FIELDS)))
    field = draw(st.sampled_from(CONFIG_FIELDS[section]))
    backbone = draw(st.sampled_from(("qwen3", "internlm2")))
    return ConfigCase(backbone, section, field, draw(_config_values), draw(st.booleans()), draw(st.integers(0, 99)))


# Words a config error may use instead of the field it refuses (a relation between fields names both).
_RELATED_WORDS = {
    "vocab_size": ("special_token_ids",),
    "hidden_size": ("head dim", "head_dim"),
    "num_attention_heads": ("head dim", "head_dim"),
    "downsample_ratio": ("merge size",),
    "architectures": ("architectures[0]",),
    "rope_scaling": ("rope scaling",),
    "max_dynamic_patch": ("min_dynamic_patch",),
    "num_hidden_layers": ("fullatt_block_indexes",),
    "patch_size": (),
    "use_sliding_window": ("sliding_window",),
}


# -- weight files ---------------------------------------------------------------------------------------------------

WEIGHT_CORRUPTIONS = (
    "truncated",
    "zero bytes",
    "random bytes",
    "huge header",
    "header byte",
    "data byte",
    "missing tensor",
    "reshaped tensor",
    "extra tensor",
    "float16 tensor",
)


@dataclass(frozen=True)
class WeightCase:
    corruption: str
    strict: bool
    position: float  # where in the file or the list of tensors the corruption hits, in [0, 1)
    seed: int


@st.composite
def weight_cases(draw) -> WeightCase:
    position = draw(st.floats(0, 1, exclude_max=True))
    return WeightCase(
        draw(st.sampled_from(WEIGHT_CORRUPTIONS)), draw(st.booleans()), position, draw(st.integers(0, 255))
    )


def write_corrupted_checkpoint(source: Path, folder: Path, case: WeightCase) -> None:
    """`source`'s config.json and its model.safetensors corrupted as `case` says, in `folder`."""
    (folder / "config.json").write_text((source / "config.json").read_text())
    data = (source / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(case.seed)
    if case.corruption in ("missing tensor", "reshaped tensor", "extra tensor", "float16 tensor"):
        state_dict = load_file(source / "model.safetensors")
        name = sorted(state_dict)[int(case.position * len(state_dict))]
        if case.corruption == "missing tensor":
            del state_dict[name]
        elif case.corruption == "reshaped tensor":
            state_dict[name] = torch.zeros(state_dict[name].numel() + 1)
        elif case.corruption == "extra tensor":
            state_dict[f"{name}.extra"] = torch.zeros(2)
        else:
            state_dict[name] = state_dict[name].half()
        save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
        return
    if case.corruption == "truncated":
        data = data[: int(case.position * len(data))]
    elif case.corruption == "zero bytes":
        data = b""
    elif case.corruption == "random bytes":
        data = rng.bytes(len(data))
    elif case.corruption == "huge header":
        data = (2**40).to_bytes(8, "little") + data[8:]
    else:
        start, end = (8, header_end) if case.corruption == "header byte" else (header_end, len(data))
        index = start + int(case.position * (end - start))
        data = data[:index] + bytes([data[index] ^ (1 + case.seed % 255)]) + data[index + 1 :]
    (folder / "model.safetensors").write_bytes(data)


# -- checks ---------------------------------------------------------------------------------------------------------


def check_processor_outputs(processor, texts, num_images, outputs) -> None:
    """Asserts that the processor's outputs describe `num_images` images (None: no images given) consistently."""
    input_ids, mask = outputs["input_ids"], outputs["attention_mask"]
    assert input_ids.shape == mask.shape and input_ids.shape[0] == len(texts)
    assert input_ids.dtype == torch.int64
    tokenizer = processor.tokenizer
    contexts = int((input_ids == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum())
    if num_images is None:
        assert "pixel_values" not in outputs
        assert contexts == sum(text.count(IMG_CONTEXT_TOKEN) for text in texts)
        return
    pixel_values, grids, scales = outputs["pixel_values"], outputs["image_grid_thw"], outputs["num_scales"]
    image_processor = processor.image_processor
    patch, merge = image_processor.patch_size, image_processor.merge_size
    assert scales.shape == (num_images,) and int(scales.sum()) == grids.shape[0] and bool((scales >= 1).all())
    assert grids.shape[1:] == (3,) and bool((grids[:, 0] == 1).all())
    assert bool((grids[:, 1:] % merge == 0).all()) and bool((grids[:, 1:] > 0).all())
    patches = int(grids.prod(-1).sum())
    assert pixel_values.shape == (patches, 3 * patch * patch) and pixel_values.dtype == torch.float32
    assert bool((pixel_values.abs() <= 1).all())  # finite, in the range of (x / 255 - 0.5) / 0.5
    assert patches <= image_processor.max_patches_per_call
    assert max(grids.prod(-1).tolist(), default=0) <= image_processor.max_patches_per_scale
    # one <IMG_CONTEXT> per feature the model produces: patches / merge², i.e. the sum over scales of h·w / merge²
    assert contexts == patches // merge**2 == int((grids[:, 1] * grids[:, 2] // merge**2).sum())
    assert int((input_ids == tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)).sum()) == num_images


def check_image_case(processor, case: ImageCase, multiscale: bool) -> str:
    """Runs the processor on one image with a one-placeholder prompt."""
    try:
        outputs = processor(
            text=f"{IMAGE_PLACEHOLDER}\nDescribe.", images=make_image(case), multiscale=multiscale, return_tensors="pt"
        )
    except ValueError as error:
        outcome = classify(error)
        damaged = outcome in ("truncated or corrupt file", "not an image file")
        assert not damaged or case.source == "png-cut", error
        return outcome
    check_processor_outputs(processor, ["x"], 1, outputs)
    return "ok"


def check_prompt_case(processor, case: PromptCase) -> str:
    """Runs the processor on random prompts and images; the outcome must be the predicted one."""
    expected, message = expected_prompt_outcome(case)
    images = prompt_case_images(case)
    try:
        outputs = processor(text=list(case.texts), images=images, return_tensors="pt")
    except ValueError as error:
        outcome = classify(error)
        assert outcome == expected and message in str(error), f"expected {expected} ({message}), got: {error}"
        return outcome
    assert expected == "ok", f"expected {expected}, the processor returned outputs"
    num_images = sum(len(seeds) for seeds in case.image_seeds) if images else None  # [] is no images
    check_processor_outputs(processor, case.texts, num_images, outputs)
    return "ok"


def check_option_case(processor, case: OptionCase) -> str:
    """Runs the processor with hostile per-call options: a documented error or outputs within the patch limits."""
    options = {"min_pixels": case.min_pixels, "max_pixels": case.max_pixels, "multiscale": case.multiscale}
    try:
        outputs = processor(
            text=IMAGE_PLACEHOLDER, images=small_image(case.image_seed), return_tensors="pt", **options
        )
    except ValueError as error:
        return classify(error)
    check_processor_outputs(processor, ["x"], 1, outputs)
    return "ok"


def check_end_to_end(model, processor, cases: list, question: str) -> str:
    """Processor then forward: finite logits for every prompt token, or a documented error."""
    try:
        images = [make_image(case) for case in cases]
        prompt = processor.build_prompt(question, num_images=len(images))
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    except ValueError as error:
        return classify(error)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    return "ok"


def check_generation_case(model, processor, case: GenerationCase) -> str:
    """Greedy generation of `new_tokens` tokens gives the same tokens with and without the KV cache."""
    images = [small_image(seed) for seed in case.image_seeds]
    try:
        prompt = processor.build_prompt(case.question, num_images=len(images))
        # one scale per image: without a cache every step re-encodes the images
        inputs = processor(text=prompt, images=images or None, multiscale=False, return_tensors="pt")
    except ValueError as error:
        return classify(error)
    settings = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**inputs, **settings, use_cache=True)
        uncached = model.generate(**inputs, **settings, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + case.new_tokens
    assert torch.equal(cached, uncached), f"cached {cached.tolist()} != uncached {uncached.tolist()}"
    return "ok"


def check_config_case(case: ConfigCase) -> str:
    """Loads the tiny config of `case.backbone` with one field set to `case.value`: refused naming the field, or it
    builds a model that runs a forward pass (and encodes an image)."""
    config_dict = tiny_config(case.backbone).to_dict()
    config_dict["vision_config"] = dict(config_dict["vision_config"])
    config_dict["text_config"] = dict(config_dict["text_config"])
    section = config_dict[case.section] if case.section else config_dict
    section[case.field] = case.value
    try:
        config = NaViLConfig.from_dict(config_dict)
    except ValueError as error:
        words = (case.field, *_RELATED_WORDS.get(case.field, ()))
        assert any(word in str(error) for word in words), f"the error does not name {case.field}: {error}"
        return "invalid config value"
    too_large = isinstance(case.value, int) and case.value > MAX_BUILT_SIZE
    if too_large or case.field in ("max_position_embeddings", "rope_theta", "initializer_range"):
        return "ok (parsed only)"
    torch.manual_seed(case.seed)
    model = NaViLForConditionalGeneration(config).eval()
    vocab_size = config.text_config.vocab_size
    input_ids = torch.randint(0, vocab_size, (1, 5), generator=torch.Generator().manual_seed(case.seed))
    input_ids[input_ids == config.special_token_ids.get(IMG_CONTEXT_TOKEN)] = 0  # image tokens need images
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        assert logits.shape == (1, 5, vocab_size)
        if case.with_image:
            pixel_inputs = model.image_processor(small_image(case.seed), return_tensors="pt")
            image_outputs = model.get_image_features(pixel_inputs["pixel_values"], pixel_inputs["image_grid_thw"])
            features = torch.cat(image_outputs.pooler_output)
            patches = int(pixel_inputs["image_grid_thw"].prod(-1).sum())
            assert features.shape == (patches // config.vision_config.merge_size**2, config.text_config.hidden_size)
    return "ok"


def check_weight_case(source: Path, case: WeightCase) -> str:
    """Loads a corrupted copy of the checkpoint at `source`: a documented error, or a model (strict loading refuses
    every missing, extra or reshaped tensor; `strict=False` loads them)."""
    with tempfile.TemporaryDirectory() as folder:
        write_corrupted_checkpoint(source, Path(folder), case)
        try:
            NaViLForConditionalGeneration.from_pretrained(folder, strict=case.strict)
        except ValueError as error:
            outcome = classify(error)
            assert outcome in ("unreadable safetensors file", "checkpoint does not match the model"), error
            assert case.strict or outcome != "checkpoint does not match the model", error
            return outcome
    assert not (case.strict and case.corruption in ("missing tensor", "reshaped tensor", "extra tensor"))
    return "ok"


# -- chat generation settings ---------------------------------------------------------------------------------------

# Values a generation setting may be given: valid ones, and out-of-range, non-finite or mistyped ones.
_SETTING_VALUES = (0, 1, 2, 3, -1, -5, 0.0, 0.5, 1.0, 2.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, True, False)
_SETTING_VALUES += (None, "8", "0.5", [], [1], [2, -1], 2**40)
GENERATION_SETTINGS = (
    "temperature top_p top_k min_p typical_p repetition_penalty length_penalty num_beams num_return_sequences "
    "no_repeat_ngram_size do_sample use_cache eos_token_id pad_token_id bos_token_id max_new_tokens max_length "
    "return_dict_in_generate streamer input_ids pixel_values attention_mask".split()
)


@dataclass(frozen=True)
class ChatSettingsCase:
    settings: tuple  # (name, value) pairs
    with_image: bool
    seed: int


@st.composite
def chat_settings_cases(draw) -> ChatSettingsCase:
    names = draw(st.lists(st.sampled_from(GENERATION_SETTINGS), min_size=1, max_size=3, unique=True))
    values = st.one_of(st.sampled_from(_SETTING_VALUES), st.floats(allow_nan=True), st.integers(-10, 2000))
    settings = tuple((name, draw(values)) for name in names)
    return ChatSettingsCase(settings, draw(st.booleans()), draw(st.integers(0, 99)))


def check_chat_settings_case(model, tokenizer, case: ChatSettingsCase) -> str:
    """`chat` with hostile generation settings (at most 3 new tokens unless the case sets the length): a reply string,
    or a documented error before anything is generated."""
    settings = {"max_new_tokens": 3, **dict(case.settings)}
    if isinstance(settings.get("max_new_tokens"), int) and not isinstance(settings["max_new_tokens"], bool):
        settings["max_new_tokens"] = min(settings["max_new_tokens"], 8)  # a valid length, kept short
    if isinstance(settings.get("max_length"), int) and not isinstance(settings["max_length"], bool):
        settings.pop("max_new_tokens")
    if isinstance(settings.get("num_beams"), int) and not isinstance(settings["num_beams"], bool):
        settings["num_beams"] = min(settings["num_beams"], 3)
    image = small_image(case.seed) if case.with_image else None
    torch.manual_seed(case.seed)
    try:
        with torch.no_grad():
            reply = model.chat(tokenizer, image, "What is it?", settings)
    except ValueError as error:
        return classify(error)
    assert isinstance(reply, str)
    return "ok"


# -- JSONL files and collator inputs --------------------------------------------------------------------------------

_JSONL_TEXTS = ("Hi", "<image>\nWhat?", "a\u2028b", "\ud800", "caf\u00e9", "", "\u0085x\u000c")
_JSONL_IMAGES = (None, None, None, [], ["a.png"], ["a.png"], ["sub/b.png", "https://example.com/c.png"])
_JSONL_IMAGES += (5, "a.png", {"x": 1}, [None])


@dataclass(frozen=True)
class ExampleCase:
    kind: str  # "chat", "image blocks", "no messages", "odd messages", "bad content", "deep", "not json", "blank"
    text: str
    images: object
    seed: int


@st.composite
def example_cases(draw) -> ExampleCase:
    kinds = ("chat",) * 8 + ("image blocks", "no messages", "odd messages", "bad content", "deep", "not json")
    return ExampleCase(
        draw(st.sampled_from((*kinds, "blank"))),
        draw(st.one_of(st.sampled_from(_JSONL_TEXTS), st.text(max_size=6))),
        draw(st.sampled_from(_JSONL_IMAGES)),
        draw(st.integers(0, 99)),
    )


def make_example(case: ExampleCase):
    """The example of `case` as a Python object (None for a line that is not a JSON object)."""
    user = {"role": "user", "content": case.text}
    if case.kind == "image blocks":
        user["content"] = [{"type": "image", "image": "x.png"}, {"type": "text", "text": case.text}]
    elif isinstance(case.images, list) and case.images and case.seed % 4:  # one image block per image
        user["content"] = [{"type": "image"}] * len(case.images) + [{"type": "text", "text": case.text}]
    messages = [user, {"role": "assistant", "content": "A circle."}]
    if case.kind == "odd messages":
        messages = messages[:1]
    if case.kind == "bad content":
        messages[0]["content"] = [None, 5, {"type": "video"}][case.seed % 3]
    example = {"messages": messages}
    if case.kind == "no messages":
        example = {"images": []}
    if case.images is not None:
        example["images"] = case.images
    return example


def _jsonl_line(case: ExampleCase) -> str:
    if case.kind == "blank":
        return " "
    if case.kind == "deep":
        return "[" * (200 + 1000 * case.seed) + "]" * (200 + 1000 * case.seed)
    line = json.dumps(make_example(case), ensure_ascii=case.seed % 2 == 0)
    return line[: len(line) // 2] if case.kind == "not json" else line


@dataclass(frozen=True)
class JsonlCase:
    examples: tuple  # ExampleCase per line
    encoding: str
    line_end: str


@st.composite
def jsonl_cases(draw) -> JsonlCase:
    examples = tuple(draw(st.lists(example_cases(), max_size=4)))
    encoding = draw(st.sampled_from(("utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16")))
    return JsonlCase(examples, encoding, draw(st.sampled_from(("\n", "\r\n"))))


def check_jsonl_case(case: JsonlCase) -> str:
    """Reads a JSONL file of hostile lines with `navil.training.load_jsonl`: one example per non-blank line, relative
    images resolved against the file's folder; or a documented error naming the file."""
    from ..training.finetune import load_jsonl

    text = case.line_end.join(_jsonl_line(example) for example in case.examples)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        try:
            path.write_bytes(text.encode(case.encoding))
        except UnicodeEncodeError:  # a lone surrogate or a character the encoding lacks: write it as UTF-8
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            examples = load_jsonl(path)
        except ValueError as error:
            assert str(path) in str(error), f"the error does not name the file: {error}"
            return classify(error)
    assert len(examples) == sum(example.kind != "blank" for example in case.examples)
    for example in examples:
        for image in example["images"]:
            assert not isinstance(image, str) or image.startswith(("https://", folder)), image
    return "ok"


@dataclass(frozen=True)
class CollatorCase:
    examples: tuple  # ExampleCase per example of the batch
    max_length: object
    with_pixels: bool  # images as arrays (else as the case's paths, which do not exist)


@st.composite
def collator_cases(draw) -> CollatorCase:
    examples = tuple(draw(st.lists(example_cases().filter(lambda c: c.kind not in ("deep", "not json")), max_size=3)))
    max_length = draw(st.one_of(st.none(), st.integers(1, 400)))
    return CollatorCase(examples, max_length, draw(st.booleans()))


def check_collator_case(processor, case: CollatorCase) -> str:
    """Runs `NaViLDataCollator` on a batch of hostile examples: a batch whose tensors agree, or a documented error."""
    from ..training.finetune import NaViLDataCollator

    examples = []
    for example_case in case.examples:
        example = make_example(example_case)
        if case.with_pixels and isinstance(example.get("images"), list):
            example["images"] = [small_image(example_case.seed) for _ in example["images"]]
        examples.append(example)
    try:
        batch = NaViLDataCollator(processor, max_length=case.max_length)(examples)
    except ValueError as error:
        return classify(error)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert 1 <= batch["input_ids"].shape[0] <= len(examples)
    assert case.max_length is None or batch["input_ids"].shape[1] <= case.max_length
    return "ok"


# -- CLI flags, saved preprocessor and config files (issue 33, items 1, 4, 5) -----------------------------------------

_FLAG_VALUES = ("0", "-1", "1", "2", "nan", "inf", "0.99", "1e12", "", "x", "meta", "cpu", "cuda", "float32", "bogus")
CLI_FLAGS = {
    "chat": ("--device", "--dtype", "--max-new-tokens", "--image", "--model", "--trust-remote-code", "--stream"),
    "eval": ("--device", "--dtype", "--num-questions", "--batch-size", "--seed", "--types", "--trust-remote-code"),
    "finetune": ("--epochs", "--batch-size", "--eval-fraction", "--max-length", "--stage", "--lora", "--lora-rank"),
    "convert": ("--tokenizer", "--trust-remote-code"),
}
_SWITCHES = ("--trust-remote-code", "--stream")


@dataclass(frozen=True)
class CliCase:
    command: str
    flags: tuple  # (flag, value) pairs; switches take no value


@st.composite
def cli_cases(draw) -> CliCase:
    command = draw(st.sampled_from(sorted(CLI_FLAGS)))
    flags = draw(st.lists(st.tuples(st.sampled_from(CLI_FLAGS[command]), st.sampled_from(_FLAG_VALUES)), max_size=4))
    return CliCase(command, tuple(flags))


def check_cli_case(case: CliCase) -> str:
    """Parses a `navil` command line of hostile flag values: it parses, or argparse refuses it with a message that
    names the flag (exit status 2); nothing else may escape."""
    from ..tools.cli import build_parser

    argv = [case.command]
    for flag, value in case.flags:
        argv += [flag] if flag in _SWITCHES else [flag, value]
    argv += {"finetune": ["--data", "d.jsonl", "--output-dir", "out"], "convert": ["src", "out"]}.get(case.command, [])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        message = errors.getvalue()
        assert exit_.code == 2, f"argparse exited with {exit_.code}: {message}"
        assert re.search(r"argument -|unrecognized arguments|the following arguments are required", message), message
        return "flag refused by argparse"
    return "ok (parsed)"


_BOUND_VALUES = (None, 0, 1, -5, 64, 10**4, 10**6, 10**9, 10**18, 1.5, 4e8, math.inf, "100", True)
_FLAG_FILE_VALUES = (True, False, None, "false", "no", "true", 0, 1, [])
_CHANNEL_VALUES = (
    [0.5, 0.5, 0.5],
    [9, 9, 9],
    [0, 0, 0],
    [0.1, 0.2],
    0.5,
    -1,
    math.nan,
    "0.5",
    None,
    [0.4, math.inf, 0.4],
)
# The fields of a saved preprocessor_config.json and the hostile values each is given (items 5, 12 and 18).
PREPROCESSOR_FILE_VALUES = {
    **{name: _BOUND_VALUES for name in ("min_pixels", "max_pixels", *SAVED_BOUNDS)},
    **{
        name: _FLAG_FILE_VALUES
        for name in ("do_normalize", "do_rescale", "load_truncated_images", "apply_exif_orientation", "multiscale")
    },
    "image_mean": _CHANNEL_VALUES,
    "image_std": _CHANNEL_VALUES,
    "rescale_factor": (1 / 255, 1.0, 0, -1, math.inf, math.nan, "x", None),
    "patch_size": (16, "16", 14, 8, 0, -16, 1.5, None, True),
    "merge_size": (2, 1, 3, 0, "2", None),
    "scale_downsample_ratio": (0.7071, 0.5, 1.0, 0, -1, 2.0, math.nan, None, "0.5"),
    "resample": (3, 0, 2, 99, "bicubic", None, 1.5),
}
PREPROCESSOR_FIELDS = tuple(PREPROCESSOR_FILE_VALUES)


@dataclass(frozen=True)
class PreprocessorFileCase:
    fields: tuple  # (field, value) pairs written over the embedded model's preprocessor_config.json


@st.composite
def preprocessor_file_cases(draw) -> PreprocessorFileCase:
    fields = draw(st.lists(st.sampled_from(PREPROCESSOR_FIELDS), min_size=1, max_size=4))
    return PreprocessorFileCase(
        tuple((name, draw(st.sampled_from(PREPROCESSOR_FILE_VALUES[name]))) for name in fields)
    )


def check_preprocessor_file_case(source: Path, case: PreprocessorFileCase) -> str:
    """Loads an image processor from a copy of `source`'s preprocessor_config.json with hostile bounds: a documented
    error naming a field, or a processor whose bounds are navil's or tighter, which processes an 80x64 image within
    them."""
    config = json.loads((source / "preprocessor_config.json").read_text())
    config.update(dict(case.fields))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config))
        try:
            processor = NaViLImageProcessor.from_pretrained(folder)
        except ValueError as error:
            assert any(field in str(error) for field, _ in case.fields), f"the error names no field: {error}"
            return classify(error)
    for name in SAVED_BOUNDS:
        value = getattr(processor, name)
        assert value is not None and value <= getattr(NaViLImageProcessor, name), f"{name}={value} was loaded"
    try:
        outputs = processor(Image.new("RGB", (80, 64), (90, 30, 200)), return_tensors="pt")
    except ValueError as error:
        return classify(error)
    assert len(outputs["pixel_values"]) <= processor.max_patches_per_call
    return "ok"


_SIZE_VALUES = (0, 1, 3, 16, 64, 128, 1000, 1024, 5_000_000, 10**12, -2)
CONFIG_FILE_FIELDS = (
    ("llm_config", "vocab_size"),
    ("llm_config", "hidden_size"),
    ("llm_config", "intermediate_size"),
    ("llm_config", "num_hidden_layers"),
    ("vision_config", "hidden_size"),
    ("vision_config", "intermediate_size"),
    ("vision_config", "num_hidden_layers"),
)


@dataclass(frozen=True)
class ConfigFileCase:
    section: str
    field: str
    value: int
    strict: bool


@st.composite
def config_file_cases(draw) -> ConfigFileCase:
    section, field = draw(st.sampled_from(CONFIG_FILE_FIELDS))
    value, strict = draw(st.sampled_from(_SIZE_VALUES)), draw(st.booleans())
    # strict=False builds what the config says: sizes above 128 (a 5e6-token vocabulary, 1000 layers) only with strict
    return ConfigFileCase(section, field, value, strict or 128 < value < 10**12)


def check_config_file_case(source: Path, case: ConfigFileCase) -> str:
    """Loads the checkpoint `source` (an original config, with `llm_config`) with one size of its config.json
    changed: refused before the model is built, naming the field, or a model of the stated size (only when the
    weights agree, or `strict=False` within the memory)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for path in source.iterdir():
            if path.is_file():
                (folder / path.name).symlink_to(path)
        config = json.loads((source / "config.json").read_text())
        config[case.section][case.field] = case.value
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        try:
            model = NaViLForConditionalGeneration.from_pretrained(folder, strict=case.strict)
        except ValueError as error:
            words = (case.field, *_RELATED_WORDS.get(case.field, ()), "does not match")
            assert any(word in str(error) for word in words), f"the error names no field: {error}"
            return classify(error)
    section = model.config.text_config if case.section == "llm_config" else model.config.vision_config
    assert getattr(section, case.field) == case.value
    assert case.strict is False or time.perf_counter() - start < 10
    return "ok"
