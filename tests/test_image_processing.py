"""NaViLImageProcessor reproduces the original preprocessing (golden `image_processor.safetensors`) exactly."""

import copy

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from PIL import Image

from navil.image_processing_navil import NaViLImageProcessor, smart_resize

GOLDEN_IMAGES = ("grad", "gray", "noise", "rgba", "shapes", "strip")


@pytest.fixture(scope="module")
def processor(golden_image_processor):
    return golden_image_processor


def open_golden(name):
    return Image.open(GOLDEN / "images" / f"{name}.png")


def golden_pixels(outputs, name, mode):
    pixel_values = outputs[f"ip.{name}.{mode}.pixel_values"]  # [N, 3, P, P]
    return pixel_values.reshape(pixel_values.shape[0], -1)


@pytest.mark.parametrize("name", GOLDEN_IMAGES)
def test_single_scale_matches_original_exactly(processor, image_processor_outputs, name):
    out = processor(open_golden(name), return_tensors="pt", multiscale=False)
    assert out["pixel_values"].dtype == torch.float32
    assert torch.equal(out["pixel_values"], golden_pixels(image_processor_outputs, name, "single"))
    assert torch.equal(out["image_grid_thw"], image_processor_outputs[f"ip.{name}.single.image_grid_thw"].view(-1, 3))
    assert out["num_scales"].tolist() == [1]


@pytest.mark.parametrize("name", GOLDEN_IMAGES)
def test_multi_scale_pyramid_matches_original_exactly(processor, image_processor_outputs, name):
    out = processor(open_golden(name), return_tensors="pt")
    assert torch.equal(out["pixel_values"], golden_pixels(image_processor_outputs, name, "multi"))
    assert torch.equal(out["image_grid_thw"], image_processor_outputs[f"ip.{name}.multi.image_grid_thw"])
    assert torch.equal(out["num_scales"], image_processor_outputs[f"ip.{name}.multi.num_scales"])
    assert out["image_grid_thw"].dtype == out["num_scales"].dtype == torch.int64


def test_smart_resize_reproduces_every_recorded_call_including_float32_limits(manifest):
    calls = [
        call for image in manifest["images"].values() for call in image["multi"]["smart_resize_calls_in_call_order"]
    ]
    quirk_lists = manifest["image_processor"]["multi_image_list_quirk"]["lists"].values()
    calls += [call for entry in quirk_lists for call in entry["smart_resize_calls_in_call_order"]]
    assert len(calls) > 10
    for call in calls:
        height, width = call["in_hw"]
        limit = call["max_pixels"]
        # the first pass uses the integer limit of the config; the pyramid's limits are float32 scalars
        max_pixels = int(limit) if limit.is_integer() else np.float32(limit)
        assert np.float32(max_pixels) == np.float32(limit)
        assert list(smart_resize(height, width, int(call["min_pixels"]), max_pixels)) == call["resized_hw"], call


def test_too_thin_image_raises_the_original_aspect_ratio_error(processor, manifest):
    expected = manifest["image_processor"]["errors"]["too_thin"]["message"]
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as error:
        processor(open_golden("too_thin"))
    assert expected in str(error.value)


def test_multi_image_call_equals_processing_each_image_alone(processor):
    names = ["gray", "rgba", "shapes"]
    together = processor([open_golden(name) for name in names], return_tensors="pt")
    alone = [processor(open_golden(name), return_tensors="pt") for name in names]
    for key in ("pixel_values", "image_grid_thw", "num_scales"):
        assert torch.equal(together[key], torch.cat([out[key] for out in alone]))


def test_multi_image_call_does_not_carry_max_pixels_over_like_the_demo(processor, image_processor_outputs):
    out = processor([open_golden("gray"), open_golden("rgba")], return_tensors="pt")
    demo_quirk = image_processor_outputs["ip.list.gray+rgba.image_grid_thw"]
    assert not torch.equal(out["image_grid_thw"], demo_quirk)
    assert out["image_grid_thw"][-1].tolist() == [1, 6, 6]  # rgba at full size, not shrunk to 4x4


def test_nested_lists_are_flattened_in_order(processor):
    flat = processor([open_golden("grad"), open_golden("strip"), open_golden("gray")], return_tensors="pt")
    nested = processor([[open_golden("grad"), open_golden("strip")], [open_golden("gray")]], return_tensors="pt")
    for key in flat:
        assert torch.equal(flat[key], nested[key])


def test_array_tensor_path_and_file_inputs_equal_pil_input(processor):
    path = GOLDEN / "images" / "shapes.png"
    rgb = Image.open(path).convert("RGB")
    array = np.array(rgb)
    expected = processor(rgb, return_tensors="pt")["pixel_values"]
    with open(path, "rb") as file:
        file_input = processor(file, return_tensors="pt")["pixel_values"]
    inputs = {
        "numpy HWC uint8": array,
        "numpy CHW uint8": np.ascontiguousarray(array.transpose(2, 0, 1)),
        "torch CHW uint8": torch.from_numpy(array).permute(2, 0, 1),
        "torch CHW float in [0, 1]": torch.from_numpy(array).permute(2, 0, 1).double() / 255,
        "numpy HWC float32 in [0, 1]": array.astype(np.float32) / 255,
        "path string": str(path),
        "pathlib.Path": path,
        "bytes": path.read_bytes(),
    }
    for kind, image in inputs.items():
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], expected), kind
    assert torch.equal(file_input, expected)


def test_unconverted_modes_equal_the_rgb_path(processor):
    for name in ("gray", "rgba"):
        image = open_golden(name)
        assert image.mode != "RGB"
        converted = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], converted)


def test_model_card_single_pass_calling_convention(manifest, image_processor_outputs):
    """The original model card: one single-scale call per image, then its own pyramid with float32 limits."""
    config = manifest["image_processor"]["config"]
    patch_size, ratio = config["patch_size"], config["scale_downsample_ratio"]
    min_pixels = config["min_dynamic_patch"] * patch_size**2
    max_pixels = config["max_dynamic_patch"] * patch_size**2
    image_processor = NaViLImageProcessor(
        patch_size=patch_size,
        merge_size=config["merge_size"],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        scale_downsample_ratio=ratio,
        multiscale=False,
    )
    image = open_golden("noise").convert("RGB")
    ret = image_processor(image, return_tensors="pt", min_pixels=min_pixels, max_pixels=max_pixels)
    grid = ret["image_grid_thw"]
    assert grid.shape == (1, 3)
    pixel_values = ret["pixel_values"].reshape(
        [grid.prod(), -1, image_processor.patch_size, image_processor.patch_size]
    )
    assert torch.equal(pixel_values, image_processor_outputs["ip.noise.single.pixel_values"])

    scales, grids = [pixel_values], [grid[0]]
    while True:
        next_max = grids[0].prod() * patch_size * patch_size * ratio**2  # a float32 torch scalar, as in the card
        if next_max < min_pixels:
            break
        ret = image_processor(image, return_tensors="pt", min_pixels=min_pixels, max_pixels=next_max)
        if ret["image_grid_thw"][0].prod() >= grids[0].prod():
            break
        scales.insert(0, ret["pixel_values"].reshape(-1, 3, patch_size, patch_size))
        grids.insert(0, ret["image_grid_thw"][0])
    assert torch.equal(torch.stack(grids), image_processor_outputs["ip.noise.multi.image_grid_thw"])
    assert torch.equal(torch.cat(scales), image_processor_outputs["ip.noise.multi.pixel_values"])


def test_padding_is_minus_one_and_values_are_x_over_127_5_minus_1(processor):
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels] * 3, axis=-1)[:, :15])  # 15 wide, 16 high
    out = processor(image, return_tensors="pt", min_pixels=1, max_pixels=10**6, multiscale=False)
    patches = out["pixel_values"].reshape(-1, 3, 16, 16)  # 2x2 merged block of a 32x32 padded canvas
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]]
    levels = torch.arange(256, dtype=torch.float32).reshape(16, 16)[:, :15] / 127.5 - 1
    assert torch.equal(patches[0, 0, :, :15], levels)
    assert (patches[0, :, :, 15] == -1).all() and (patches[1:] == -1).all()


def test_return_tensors_none_gives_numpy_and_empty_list_gives_empty_outputs(processor):
    out = processor(open_golden("grad"))
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32
    empty = processor([], return_tensors="pt")
    assert empty["pixel_values"].shape == (0, 768)
    assert empty["image_grid_thw"].shape == (0, 3) and empty["num_scales"].shape == (0,)


def test_save_and_load_round_trip(tmp_path, processor):
    processor = copy.deepcopy(processor)  # the fixture is shared across test modules
    processor.max_image_pixels = None
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_image_pixels=None, which removes navil's bound"):
        NaViLImageProcessor.from_pretrained(tmp_path)  # a saved file may lower a bound, not remove it
    loaded = NaViLImageProcessor.from_pretrained(tmp_path, max_image_pixels=None)
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert loaded.max_image_pixels is None
    for key in ("patch_size", "merge_size", "min_pixels", "max_pixels", "scale_downsample_ratio", "multiscale"):
        assert getattr(loaded, key) == getattr(processor, key)
    image = open_golden("shapes")
    assert torch.equal(
        loaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )
