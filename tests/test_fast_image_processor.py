"""NaViLImageProcessorFast against the slow processor: same grids, values within transformers' fast-processor
tolerance, the same golden chat replies, the same refusals of hostile inputs, and loading through the Auto classes."""

import json

import numpy as np
import pytest
import torch
from conftest import BACKBONES, GOLDEN, chat_golden_case, load_golden_model
from PIL import Image
from test_bad_inputs import PACKAGE
from test_bad_inputs import test_bad_image_through_the_processor_raises_a_documented_error as bad_image_test
from test_image_inputs import test_bad_arrays_raise_value_error as bad_array_test

from navil import NaViLProcessor
from navil.image_processing_navil import NaViLImageProcessor
from navil.image_processing_navil_fast import NaViLImageProcessorFast

IMAGES = GOLDEN / "images"
CHECKPOINT = PACKAGE / "checkpoints" / "navil-tiny"
# transformers' tests/test_image_processing_common.py compares backends with these (backend_equivalence_atol and
# backend_equivalence_mean_atol; rtol 1e-3)
ATOL, MEAN_ATOL, RTOL = 1e-1, 5e-3, 1e-3
# measured: torch's uint8 bicubic differs from PIL's by at most 2 levels, i.e. 2 / 127.5 with mean = std = 0.5
LEVELS_ATOL = 2 / 127.5 + 1e-6


def hostile_inputs(test):
    """(input, message) pairs of the slow processor's parametrized table of bad inputs `test`."""
    (mark,) = [mark for mark in test.pytestmark if mark.name == "parametrize"]
    return mark.args[1]


def natural_image(height, width, seed=0):
    """Smooth colour areas with sharp edges: resized noise plus a few rectangles."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    for _ in range(6):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 4, left : left + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def settings(manifest):
    """The settings the golden files were recorded with."""
    config = manifest["image_processor"]["config"]
    keys = (
        "patch_size",
        "merge_size",
        "min_pixels",
        "max_pixels",
        "scale_downsample_ratio",
        "image_mean",
        "image_std",
    )
    return {key: config[key] for key in keys}


def assert_same_output(slow, fast):
    assert torch.equal(slow["image_grid_thw"], fast["image_grid_thw"])
    assert torch.equal(slow["num_scales"], fast["num_scales"])
    assert fast["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(fast["pixel_values"], slow["pixel_values"], atol=ATOL, rtol=RTOL)
    difference = (fast["pixel_values"] - slow["pixel_values"]).abs()
    assert difference.mean() <= MEAN_ATOL
    assert difference.max() <= LEVELS_ATOL


@pytest.mark.parametrize("multiscale", [True, False])
def test_fast_processor_matches_slow_on_golden_and_resized_images(settings, multiscale):
    images = [IMAGES / f"{name}.png" for name in ("grad", "gray", "noise", "rgba", "shapes", "strip")]
    images += [natural_image(300, 420, seed=1), natural_image(900, 700, seed=2), natural_image(20, 30, seed=3)]
    slow, fast = NaViLImageProcessor(**settings), NaViLImageProcessorFast(**settings)
    for image in images:
        assert_same_output(
            slow(image, multiscale=multiscale, return_tensors="pt"),
            fast(image, multiscale=multiscale, return_tensors="pt"),
        )
    # several images in one call, and numpy outputs
    slow_outputs, fast_outputs = slow(images[:4], return_tensors="np"), fast(images[:4], return_tensors="np")
    assert_same_output(
        {key: torch.from_numpy(value) for key, value in slow_outputs.items()},
        {key: torch.from_numpy(value) for key, value in fast_outputs.items()},
    )


def test_fast_processor_pixels_at_original_size_equal_slow_exactly():
    image = natural_image(320, 480)  # inside [min_pixels, max_pixels]: kept at its size
    slow = NaViLImageProcessor(multiscale=False)(image, return_tensors="pt")
    fast = NaViLImageProcessorFast(multiscale=False)(image, return_tensors="pt")
    torch.testing.assert_close(fast["pixel_values"], slow["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fast_processor_gives_the_golden_chat_replies(backbone, manifest, golden_tokenizer, settings):
    model = load_golden_model(backbone, golden_tokenizer)
    fast = NaViLImageProcessorFast(**settings)
    for case, spec in manifest["models"][backbone]["cases"].items():
        pixel_values = grids = num_scales = None
        if spec["images"]:
            outputs = fast([IMAGES / f"{image}.png" for image in spec["images"]], return_tensors="pt")
            pixel_values, grids, num_scales = outputs["pixel_values"], outputs["image_grid_thw"], outputs["num_scales"]
        reply = chat_golden_case(model, golden_tokenizer, spec, pixel_values, grids, num_scales)
        assert reply == spec["response"], case


@pytest.mark.parametrize("image, message", hostile_inputs(bad_image_test) + hostile_inputs(bad_array_test))
def test_fast_processor_refuses_the_slow_processors_hostile_inputs(image, message):
    with pytest.raises(ValueError, match=message):
        NaViLImageProcessorFast()(image)


def test_fast_processor_keeps_the_slow_processors_limits():
    fast = NaViLImageProcessorFast(max_image_pixels=1000, max_patches_per_call=100)
    with pytest.raises(ValueError, match="max_image_pixels=1000"):
        fast(np.zeros((40, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="max_patches_per_call=100"):
        NaViLImageProcessorFast(max_patches_per_call=100)(natural_image(512, 512))


def test_navil_processor_and_auto_classes_pick_the_fast_processor_on_request(tmp_path):
    from transformers import AutoImageProcessor

    from navil.compat_navil import IMAGE_PROCESSOR_BACKENDS

    processor = NaViLProcessor.from_pretrained(CHECKPOINT)
    processor.save_pretrained(tmp_path)
    for use_fast, name in [(True, "NaViLImageProcessorFast"), (False, "NaViLImageProcessor")]:
        loaded = NaViLProcessor.from_pretrained(tmp_path, use_fast=use_fast)
        assert type(loaded.image_processor).__name__ == name
        if IMAGE_PROCESSOR_BACKENDS:  # 5.25: AutoImageProcessor takes the registered class of the backend asked for
            backend = "torchvision" if use_fast else "pil"
            assert type(AutoImageProcessor.from_pretrained(tmp_path, backend=backend)).__name__ == name


def test_fast_processor_saves_its_settings_and_no_device(tmp_path):
    NaViLImageProcessorFast(device="cpu", max_pixels=4096 * 16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "device" not in config
    loaded = NaViLImageProcessorFast.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "NaViLImageProcessorFast" and loaded.max_pixels == 4096 * 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_processor_on_cuda_matches_the_cpu():
    image = natural_image(700, 900)
    cpu = NaViLImageProcessorFast()(image, return_tensors="pt")
    cuda = NaViLImageProcessorFast(device="cuda")(image, return_tensors="pt")
    assert cuda["pixel_values"].device.type == "cuda"
    assert torch.equal(cpu["image_grid_thw"], cuda["image_grid_thw"].cpu())
    torch.testing.assert_close(cuda["pixel_values"].cpu(), cpu["pixel_values"], atol=2 / 127.5 + 1e-6, rtol=0)
    assert_same_output(NaViLImageProcessor()(image, return_tensors="pt"), {k: v.cpu() for k, v in cuda.items()})
