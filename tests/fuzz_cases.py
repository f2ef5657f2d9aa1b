"""Generators and checks shared by tests/test_fuzz.py (a small budget in CI) and benchmarks/fuzz.py (a large one).

An image case is drawn as plain parameters (how the image is passed, its PIL mode or array dtype and layout, its size,
the range of its values) and built by `make_image`, so that hypothesis prints readable failing examples. Each
`check_*` function runs one case and returns its outcome: `"ok"` after checking that the outputs are consistent, or
the kind of documented `ValueError` raised (a key of `EXPECTED_ERRORS`). Inconsistent outputs fail an assertion, and
any other exception (or a `ValueError` with an undocumented message) propagates.
"""

import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from navil.processing_navil import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_START_TOKEN

# The documented errors a random input may legitimately raise: kind -> fragment of the message.
EXPECTED_ERRORS = {
    "aspect ratio above 200": "absolute aspect ratio must be smaller than 200",
    "float values out of range": r"is a float image with values in .* but must lie in \[0, ",
    "NaN or infinite values": "contains NaN or infinite values",
    "placeholder count mismatch": f"found \\d+ {IMAGE_PLACEHOLDER} placeholders? in (the )?text",
    "text contains <IMG_CONTEXT>": f"already contains {IMG_CONTEXT_TOKEN}",
    "max_pixels too small for the aspect ratio": "is too small for an image of",
}

# Small budgets for CI: deterministic, no example database written next to the tests.
CI_SETTINGS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

PIL_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "F")
PNG_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "I;16")
ARRAY_DTYPES = ("uint8", "uint16", "float32")
ARRAY_LAYOUTS = ("HW", "HWC", "CHW")
MAX_SIDE = 600


@dataclass(frozen=True)
class ImageCase:
    source: str  # "pil", "png" (encoded bytes), "numpy" or "torch"
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
    source = draw(st.sampled_from(("pil", "png", "numpy", "torch")))
    if source in ("pil", "png"):
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
    """The image object an `ImageCase` describes."""
    rng = np.random.default_rng(case.seed)
    if case.source == "pil":
        return _pil_image(rng, case)
    if case.source == "png":
        buffer = io.BytesIO()
        _pil_image(rng, case).save(buffer, format="PNG")
        return buffer.getvalue()
    array = _array(rng, case)
    return torch.from_numpy(array) if case.source == "torch" else array


def small_image(seed: int) -> np.ndarray:
    """A random RGB image of 8 to 64 pixels per side."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (int(rng.integers(8, 65)), int(rng.integers(8, 65)), 3), dtype=np.uint8)


# -- prompts --------------------------------------------------------------------------------------------------------

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
    if case.images == "none":
        return "ok", ""
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


# -- checks ---------------------------------------------------------------------------------------------------------


def classify(error: ValueError) -> str:
    """The kind of a documented `ValueError`; an `AssertionError` for an undocumented message."""
    for kind, pattern in EXPECTED_ERRORS.items():
        if re.search(pattern, str(error)):
            return kind
    raise AssertionError(f"undocumented ValueError: {error}") from error


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
    patch, merge = processor.image_processor.patch_size, processor.image_processor.merge_size
    assert scales.shape == (num_images,) and int(scales.sum()) == grids.shape[0] and bool((scales >= 1).all())
    assert grids.shape[1:] == (3,) and bool((grids[:, 0] == 1).all())
    assert bool((grids[:, 1:] % merge == 0).all()) and bool((grids[:, 1:] > 0).all())
    patches = int(grids.prod(-1).sum())
    assert pixel_values.shape == (patches, 3 * patch * patch) and pixel_values.dtype == torch.float32
    assert bool((pixel_values.abs() <= 1).all())  # finite, in the range of (x / 255 - 0.5) / 0.5
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
        return classify(error)
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
    num_images = None if images is None else sum(len(seeds) for seeds in case.image_seeds)
    check_processor_outputs(processor, case.texts, num_images, outputs)
    return "ok"


def check_end_to_end(model, processor, cases: list, question: str) -> str:
    """Processor then forward on a golden model: finite logits for every prompt token, or a documented error."""
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
