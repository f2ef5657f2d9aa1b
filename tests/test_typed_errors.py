"""Refused inputs are `NaViLInputError`s (a `ValueError`) whose `kind`, a key of `ERROR_KINDS`, names the problem for
programs; the messages stay the ones people read."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from navil.checks_navil import ERROR_KINDS, NaViLInputError
from navil.configuration_navil import NaViLConfig

IMAGE = Image.new("RGB", (32, 32), (10, 20, 30))

# Bad processor calls and the kind each is refused with.
BAD_CALLS = {
    "two placeholders, one image": (dict(text="<image><image>", images=[IMAGE]), "placeholder count mismatch"),
    "a placeholder per text, one text short": (
        dict(text=["<image>", "no image"], images=[[IMAGE], [IMAGE]]),
        "placeholder count mismatch",
    ),
    "single images mixed with lists": (dict(text=["<image>", "<image>"], images=[IMAGE, [IMAGE]]), "images per text"),
    "text holding <IMG_CONTEXT>": (dict(text="<image><IMG_CONTEXT>", images=[IMAGE]), "text contains <IMG_CONTEXT>"),
    "a lone surrogate": (dict(text="\ud800"), "text is not valid Unicode"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_processor_refusals_carry_their_kind(processor, name):
    arguments, kind = BAD_CALLS[name]
    with pytest.raises(NaViLInputError) as error:
        processor(**arguments)
    assert error.value.kind == kind and isinstance(error.value, ValueError)


def test_expanding_placeholders_checks_num_scales_with_the_models_message_and_kind(processor):
    with pytest.raises(NaViLInputError, match="num_scales must give every image at least one scale") as error:
        processor.expand_image_placeholders("<image>", torch.tensor([[1, 2, 2]]), torch.tensor([0]))
    assert error.value.kind == "image grid"


def test_an_input_error_keeps_its_kind_through_pickling():
    error = NaViLInputError("found 2 <image> placeholders", "placeholder count mismatch")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.kind) == (str(error), error.kind)


def test_an_unknown_kind_is_refused():
    assert "no such kind" not in ERROR_KINDS
    with pytest.raises(KeyError):
        NaViLInputError("message", "no such kind")


def test_chat_generation_settings_are_refused_with_their_kind(model, golden_tokenizer):
    with pytest.raises(NaViLInputError) as error:
        model.chat(golden_tokenizer, None, "Hi", dict(temperature=float("nan")))
    assert error.value.kind == "generation setting out of range"
    with pytest.raises(NaViLInputError) as error:
        model.chat(golden_tokenizer, None, "Hi", dict(max_new_tokens=-1))
    assert error.value.kind == "generation length"


# Bad images and per-call options the fuzz draws, and the kind each is refused with (no longer told by its message).
BAD_IMAGES = {
    "300:1 aspect ratio": (lambda: Image.new("RGB", (600, 2)), {}, "aspect ratio above 200"),
    "float image above 1": (lambda: np.full((8, 8, 3), 2.0, dtype=np.float32), {}, "float values out of range"),
    "NaN pixels": (lambda: np.full((8, 8, 3), np.nan, dtype=np.float32), {}, "NaN or infinite values"),
    "bytes of no image": (lambda: b"not an image at all", {}, "not an image file"),
    "missing file": (lambda: "/nonexistent/navil/image.png", {}, "image file not found"),
    "min_pixels above max_pixels": (
        lambda: IMAGE,
        dict(min_pixels=10**6, max_pixels=10**4),
        "min_pixels above max_pixels",
    ),
    "multiscale as a string": (lambda: IMAGE, dict(multiscale="yes"), "multiscale is not a bool"),
    "max_pixels as a string": (lambda: IMAGE, dict(max_pixels="big"), "pixel limit is not a number"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_image_refusals_carry_their_kind(processor, name):
    image, options, kind = BAD_IMAGES[name]
    with pytest.raises(NaViLInputError) as error:
        processor(text="<image>", images=image(), **options)
    assert error.value.kind == kind


def test_config_refusals_carry_their_kind():
    with pytest.raises(NaViLInputError, match="must be divisible by num_attention_heads") as error:
        NaViLConfig(vision_config=dict(hidden_size=30, num_attention_heads=4))
    assert error.value.kind == "invalid config value"


def test_the_fuzz_refuses_an_untyped_value_error_whatever_its_message():
    classify = pytest.importorskip("navil.testing.fuzzing", reason="the fuzz needs hypothesis").classify
    assert classify(NaViLInputError("absolute aspect ratio must be smaller than 200", "aspect ratio above 200"))
    with pytest.raises(AssertionError, match="not a NaViLInputError"):
        classify(ValueError("absolute aspect ratio must be smaller than 200, got 300"))
