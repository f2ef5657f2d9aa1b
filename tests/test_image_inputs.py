"""Every class of unusual or broken image input gives a sensible result or a clear ValueError."""

import base64
import io
import resource
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from PIL import Image

from navil.image_processing_navil import NaViLImageProcessor


@pytest.fixture(scope="module")
def processor():
    return NaViLImageProcessor(min_pixels=8 * 256, max_pixels=48 * 256)


def pixels(processor, image, **kwargs):
    return processor(image, return_tensors="pt", **kwargs)["pixel_values"]


def png_declaring(width, height):
    """A PNG whose header declares width x height RGB pixels, followed by a tiny (far too short) IDAT."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- decompression bombs ----------------------------------------------------------------------------------------------


def test_decompression_bomb_png_is_refused_quickly_before_decoding(processor, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(50_000, 50_000))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(ValueError, match="refused before decoding"):
            processor(source)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024


def test_image_above_max_image_pixels_is_refused_before_decoding():
    small_limit = NaViLImageProcessor(max_image_pixels=1_000_000)
    # 2000 x 2000 is under PIL's own limit: the processor's check must refuse it (the data would not even decode)
    with pytest.raises(ValueError, match="max_image_pixels=1000000.*refused before decoding"):
        small_limit(png_declaring(2000, 2000))
    with pytest.raises(ValueError, match="max_image_pixels"):
        small_limit(Image.new("RGB", (1001, 1000)))
    unlimited = NaViLImageProcessor(max_image_pixels=None, min_pixels=8 * 256, max_pixels=48 * 256)
    assert unlimited(Image.new("RGB", (1001, 1000)), return_tensors="pt")["num_scales"].tolist() == [2]


def test_large_image_is_downscaled_on_uint8_before_normalisation(processor):
    out = processor(Image.fromarray(noise(3000, 4000)), return_tensors="pt", multiscale=False)
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod()) <= 48 + 16


# -- unreadable files -------------------------------------------------------------------------------------------------


def test_truncated_file_raises_value_error(processor, tmp_path):
    data = (GOLDEN / "images" / "noise.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        processor(path)


def test_non_image_missing_and_directory_paths_raise_value_error(processor, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read .*notes.txt as an image"):
        processor(text_file)
    with pytest.raises(ValueError, match="not found"):
        processor(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        processor(tmp_path)


def test_data_uri_is_decoded_and_broken_one_is_refused(processor):
    data = (GOLDEN / "images" / "grad.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert torch.equal(pixels(processor, uri), pixels(processor, Image.open(io.BytesIO(data))))
    with pytest.raises(ValueError, match="not valid base64"):
        processor("data:image/png;base64,@@@")


def test_bad_image_in_a_list_is_named_by_index(processor):
    with pytest.raises(ValueError, match="Image 1 of 2: .*zero size"):
        processor([Image.new("RGB", (8, 8)), np.zeros((0, 4, 3), dtype=np.uint8)])


# -- sizes ------------------------------------------------------------------------------------------------------------


def test_zero_size_images_raise_value_error(processor):
    for image in (Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), dtype=np.uint8), torch.zeros(3, 4, 0)):
        with pytest.raises(ValueError, match="zero size"):
            processor(image)


def test_one_pixel_image_is_upscaled_to_the_minimum_area(processor):
    out = processor(Image.new("RGB", (1, 1), (200, 10, 10)), return_tensors="pt")
    # 1x1 -> ceil(sqrt(2048)) = 46 x 46 -> padded to 64 x 64 -> 4 x 4 patches; a smaller scale would be < min_pixels
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert out["num_scales"].tolist() == [1]


def test_aspect_ratio_above_200_raises_and_200_is_accepted(processor):
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200, got 201.0"):
        processor(np.zeros((1, 201, 3), dtype=np.uint8))
    assert processor(np.zeros((1, 200, 3), dtype=np.uint8), return_tensors="pt")["num_scales"].tolist() == [1]


def test_max_pixels_too_small_for_the_aspect_ratio_raises(processor):
    with pytest.raises(ValueError, match="too small"):
        processor(np.zeros((2, 300, 3), dtype=np.uint8), max_pixels=100, min_pixels=1)


# -- PIL modes --------------------------------------------------------------------------------------------------------


def test_16_bit_images_are_scaled_to_8_bits(processor):
    levels = noise(40, 60)[..., 0]
    expected = pixels(processor, Image.fromarray(levels).convert("RGB"))
    wide = levels.astype(np.uint16) * 257
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    sixteen_bit_file = Image.open(buffer)
    assert sixteen_bit_file.mode.startswith("I;16")
    assert torch.equal(pixels(processor, sixteen_bit_file), expected)
    assert torch.equal(pixels(processor, wide), expected)  # uint16 array
    assert torch.equal(pixels(processor, Image.fromarray(wide.astype(np.int32))), expected)  # mode "I"


def test_float_images_use_0_1_or_0_255_scale_and_refuse_nan(processor):
    levels = noise(40, 60)[..., 0]
    expected = pixels(processor, Image.fromarray(levels).convert("RGB"))
    assert torch.equal(pixels(processor, Image.fromarray(levels.astype(np.float32) / 255)), expected)
    assert torch.equal(pixels(processor, Image.fromarray(levels.astype(np.float32))), expected)
    with_nan = levels.astype(np.float32)
    with_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(Image.fromarray(with_nan))
    with pytest.raises(ValueError, match="float image"):
        processor(Image.fromarray(levels.astype(np.float32) - 300))


def test_cmyk_palette_and_bilevel_images_convert_like_pil(processor):
    rgb = Image.fromarray(noise(40, 60))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    with_transparency = Image.open(buffer)
    assert "transparency" in with_transparency.info
    for image in (rgb.convert("CMYK"), with_transparency, rgb.convert("1")):
        assert torch.equal(pixels(processor, image), pixels(processor, image.convert("RGB"))), image.mode


def test_palette_image_with_per_entry_transparency_converts_like_pil_without_a_warning(processor):
    palette = Image.fromarray(noise(40, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = bytes(range(0, 256, 16))  # one alpha per palette entry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = palette.convert("RGB")  # PIL warns here, and gives the same colours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pixels(processor, palette), pixels(processor, expected))


def test_alpha_is_dropped_not_composited_on_white(processor):
    colour = np.zeros((40, 60, 4), dtype=np.uint8)
    colour[..., :3] = (10, 120, 230)  # fully transparent everywhere: the stored colour is kept
    out = pixels(processor, Image.fromarray(colour), multiscale=False)
    assert torch.equal(
        out, pixels(processor, Image.fromarray(np.ascontiguousarray(colour[..., :3])), multiscale=False)
    )
    assert torch.equal(pixels(processor, colour, multiscale=False), out)  # 4-channel arrays likewise
    gray = Image.new("LA", (60, 40), (120, 0))  # gray 120, fully transparent
    assert torch.equal(pixels(processor, gray), pixels(processor, Image.new("RGB", (60, 40), (120, 120, 120))))


def test_animated_image_file_uses_its_first_frame(processor):
    frames = [Image.new("RGB", (48, 48), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    animation = Image.open(io.BytesIO(buffer.getvalue()))
    assert animation.n_frames == 2
    first = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert torch.equal(pixels(processor, buffer.getvalue()), pixels(processor, first))


def test_exif_orientation_is_ignored_by_default_and_applied_on_request():
    image = Image.fromarray(noise(32, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    data = buffer.getvalue()
    settings = dict(min_pixels=8 * 256, max_pixels=48 * 256, multiscale=False)
    as_stored = NaViLImageProcessor(**settings)(data, return_tensors="pt")
    upright = NaViLImageProcessor(apply_exif_orientation=True, **settings)(data, return_tensors="pt")
    assert as_stored["image_grid_thw"].tolist() == [[1, 2, 6]]
    assert upright["image_grid_thw"].tolist() == [[1, 6, 2]]
    rotated = NaViLImageProcessor(**settings)(image.transpose(Image.Transpose.ROTATE_270), return_tensors="pt")
    assert torch.equal(upright["pixel_values"], rotated["pixel_values"])


# -- arrays and tensors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), "4 dimensions"),
        (np.zeros(8, dtype=np.uint8), "1 dimensions"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "no channel axis of size 1, 3 or 4"),
        (np.zeros((8, 8, 3), dtype=np.complex64), "dtype complex64"),
        (np.full((8, 8, 3), 2.0, dtype=np.float32), r"must lie in \[0, 1\]"),
        (np.full((8, 8, 3), np.inf, dtype=np.float32), "NaN or infinite"),
        (torch.full((3, 8, 8), float("nan")), "NaN or infinite"),
        (np.full((8, 8, 3), -1, dtype=np.int16), "integer image"),
        (np.full((8, 8, 3), 70_000, dtype=np.int32), "integer image"),
    ],
)
def test_bad_arrays_raise_value_error(processor, array, message):
    with pytest.raises(ValueError, match=message):
        processor(array)


def test_unsupported_input_type_raises_value_error(processor):
    with pytest.raises(ValueError, match="Unsupported image type dict"):
        processor({"image": "cat.png"})
    with pytest.raises(ValueError, match="images=None"):
        processor(None)


def test_gray_bool_and_half_precision_arrays_are_accepted(processor):
    levels = noise(40, 60)[..., 0]
    expected = pixels(processor, Image.fromarray(levels).convert("RGB"))
    assert torch.equal(pixels(processor, levels), expected)  # [H, W]
    assert torch.equal(pixels(processor, levels[..., None]), expected)  # [H, W, 1]
    as_bf16 = torch.from_numpy(levels.astype(np.float32) / 255).to(torch.bfloat16)
    assert pixels(processor, as_bf16[None]).shape == expected.shape  # [1, H, W] bfloat16 (values rounded)
    mask = levels > 127
    assert torch.equal(pixels(processor, mask), pixels(processor, (mask * 255).astype(np.uint8)))
