"""Reliability, round two (issue 20): every size a caller sets is bounded, truncated files are refused, configs and
weight files are checked before a model is built, edge-case inputs get a ValueError, and abandoned streams stop.

Each test names the behaviour it checks; the worst cases of unbounded sizes are run in a fresh process whose time
and peak memory are asserted.
"""

import io
import json
import struct
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file
from test_image_inputs import png_declaring

from navil.configuration_navil import NaViLConfig
from navil.image_processing_navil import NaViLImageProcessor
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.processing_navil import NaViLProcessor

IMAGES = GOLDEN / "images"
GENERATION = dict(max_new_tokens=2, do_sample=False)


def png_with_rows(width, height, rows):
    """An RGB PNG declaring `height` rows whose (valid, complete) zlib stream holds only `rows` of them."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    scanlines = b"".join(b"\x00" + bytes([200]) * (3 * width) for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    )


# -- 1. sizes a caller sets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(min_pixels=4 * 10**8), "min_pixels \\(400000000\\) is larger than max_pixels"),
        (dict(min_pixels=4 * 10**8, max_pixels=10**9), "1565760 patches: more than max_patches_per_scale=32768"),
        (dict(min_pixels=float("inf")), "min_pixels must be a finite number of pixels, got inf"),
        (dict(max_pixels="1000"), "max_pixels must be a number of pixels, got str"),
        (dict(max_pixels=float("nan")), "max_pixels must be a finite number of pixels, got nan"),
        (dict(min_pixels=5000, max_pixels=4000), "min_pixels \\(5000\\) is larger than max_pixels \\(4000\\)"),
        (dict(multiscale="no"), "multiscale must be True or False"),
    ],
    ids=["huge-min", "huge-min-and-max", "inf", "string", "nan", "min-above-max", "multiscale-string"],
)
def test_per_call_pixel_options_are_validated_before_resizing(processor, options, message):
    with pytest.raises(ValueError, match=message):
        processor(text="<image>", images=np.zeros((64, 80, 3), dtype=np.uint8), **options)


def test_patches_of_one_call_are_bounded_across_images():
    image_processor = NaViLImageProcessor(min_pixels=16 * 256, max_pixels=64 * 256, max_patches_per_call=150)
    image = np.zeros((128, 128, 3), dtype=np.uint8)  # 64 patches at full size, 100 with its pyramid
    assert len(image_processor(image, return_tensors="pt")["pixel_values"]) == 100
    with pytest.raises(ValueError, match="after 100 patches of earlier images .* more than max_patches_per_call=150"):
        image_processor([image, image])


def test_images_of_one_call_are_counted_before_any_is_loaded():
    image_processor = NaViLImageProcessor(max_images_per_call=2)
    with pytest.raises(ValueError, match="Got 3 images in one call, more than max_images_per_call=2"):
        image_processor(["missing.png"] * 3)


@pytest.mark.parametrize(
    "name", ["max_patches_per_scale", "max_patches_per_call", "max_images_per_call", "max_image_pixels"]
)
@pytest.mark.parametrize("value", [0, -5, 2.5, "100"])
def test_processor_limits_must_be_positive_whole_numbers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive whole number or None"):
        NaViLImageProcessor(**{name: value})


def test_chat_checks_grids_against_pixel_values_before_building_a_prompt(model, golden_tokenizer, monkeypatch):
    def expand(*args, **kwargs):
        raise AssertionError("a prompt was built for grids that do not describe pixel_values")

    monkeypatch.setattr(NaViLProcessor, "expand_image_placeholders", expand)
    with pytest.raises(ValueError, match="pixel_values has 168 patches but image_grid_thw describes 4000000"):
        model.chat(golden_tokenizer, torch.zeros(168, 768), "Hi", GENERATION, num_patches_list=[[1, 2000, 2000]])


WORST_CASES = """
    import json, resource, sys, time
    import numpy as np, torch
    from navil.image_processing_navil import NaViLImageProcessor
    from navil.modeling_navil import NaViLForConditionalGeneration
    from transformers import AutoTokenizer

    golden = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(golden + "/tokenizer")
    model = NaViLForConditionalGeneration.from_pretrained(golden + "/qwen3_ve").eval()
    model.init_special_token_ids(tokenizer)
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    large = np.zeros((2480, 3100, 3), dtype=np.uint8)  # 156 x 194 = 30264 patches, near max_patches_per_scale
    processor = NaViLImageProcessor()
    cases = {
        "min_pixels=4e8": lambda: processor(image, min_pixels=4 * 10**8),
        "min_pixels=4e8, max_pixels=1e9": lambda: processor(image, min_pixels=4 * 10**8, max_pixels=10**9),
        "min_pixels=inf": lambda: processor(image, min_pixels=float("inf")),
        "max_pixels=nan": lambda: processor(image, max_pixels=float("nan")),
        "near-limit image-scale": lambda: processor(large, max_pixels=30264 * 256, multiscale=False),
        "chat with a 2000x2000 grid": lambda: model.chat(
            tokenizer, torch.zeros(168, 768), "Hi", dict(max_new_tokens=2), num_patches_list=[[1, 2000, 2000]]
        ),
    }
    seconds = {}
    for name, run in cases.items():
        start = time.perf_counter()
        try:
            run()
        except ValueError:
            pass
        seconds[name] = time.perf_counter() - start
    # this process's own peak (VmHWM): Linux's ru_maxrss also counts the memory of the parent it was forked from
    status = open("/proc/self/status").read() if sys.platform == "linux" else ""
    peaks = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    peak = peaks[0] if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak}))
"""


def test_worst_cases_of_caller_set_sizes_stay_within_ten_seconds_and_two_gigabytes():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORST_CASES), str(GOLDEN)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(measured["seconds"].values()) <= 10, measured
    assert measured["peak_rss_kib"] <= 2 * 2**20, measured


# -- 2. truncated and corrupt files ---------------------------------------------------------------------------------


def test_png_cut_inside_its_header_is_refused():
    with pytest.raises(ValueError, match="Cannot read the header of the image: .*truncated or corrupt"):
        NaViLImageProcessor()(png_with_rows(100, 100, 100)[:20])


def test_png_whose_image_data_ends_early_is_refused_unless_truncated_images_are_accepted():
    data = png_with_rows(100, 100, 16)  # 16 of 100 rows, then a valid IEND: PIL alone fills 84 rows with black
    with pytest.raises(ValueError, match="is truncated: its PNG image data ends before the last row"):
        NaViLImageProcessor()(data)
    accepted = NaViLImageProcessor(load_truncated_images=True)(data, return_tensors="pt")
    assert accepted["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_cut_inside_its_data_is_accepted_only_on_request_and_pil_global_is_untouched():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()[:-200]
    with pytest.raises(ValueError, match="truncated or corrupt"):
        NaViLImageProcessor()(data)
    accepted = NaViLImageProcessor(load_truncated_images=True)(data)
    assert accepted["image_grid_thw"].tolist() == NaViLImageProcessor()(buffer.getvalue())["image_grid_thw"].tolist()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_complete_interlaced_and_palette_pngs_are_not_mistaken_for_truncated_ones():
    rng = np.random.default_rng(1)
    for image, options in [
        (Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)), dict(interlace=1)),
        (Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert("P"), {}),
        (Image.fromarray(rng.integers(0, 2, (37, 53), dtype=bool)), {}),
        (Image.fromarray(rng.integers(0, 65536, (37, 53), dtype=np.uint16)), {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", **options)
        assert NaViLImageProcessor()(buffer.getvalue())["num_scales"].tolist() == [1]


def test_pil_image_opened_on_a_bomb_header_is_refused_by_pil_limit_even_without_ours(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = Image.open(io.BytesIO(png_declaring(50_000, 50_000)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    with pytest.raises(ValueError, match="more than twice PIL.Image.MAX_IMAGE_PIXELS"):
        NaViLImageProcessor(max_image_pixels=None)(image)


# -- 3. weights and configs -----------------------------------------------------------------------------------------


def _folder_with_weights(folder, data: bytes):
    folder.mkdir()
    (folder / "config.json").write_text((GOLDEN / "qwen3_ve" / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"",
        lambda data: np.random.default_rng(0).bytes(len(data)),
        lambda data: (2**40).to_bytes(8, "little") + data[8:],
    ],
    ids=["truncated", "zero-bytes", "random-bytes", "huge-header"],
)
def test_unreadable_safetensors_file_is_refused_naming_it(tmp_path, damage):
    data = (GOLDEN / "qwen3_ve" / "model.safetensors").read_bytes()
    folder = _folder_with_weights(tmp_path / "checkpoint", damage(data))
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        NaViLForConditionalGeneration.from_pretrained(folder)


def test_non_strict_loading_initialises_a_tensor_of_the_wrong_shape_and_reports_it(tmp_path):
    state_dict = load_file(GOLDEN / "qwen3_ve" / "model.safetensors")
    state_dict["mlp1.1.weight"] = torch.zeros(3, 3)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text((GOLDEN / "qwen3_ve" / "config.json").read_text())
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    model, info = NaViLForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)
    assert model.mlp1[1].weight.shape == (64, 256)
    assert [key for key, *_ in info["mismatched_keys"]] == ["mlp1.1.weight"]


def test_folder_without_config_is_refused_before_a_model_is_built(tmp_path):
    (tmp_path / "README.md").write_text("weights to come")
    with pytest.raises(ValueError, match="has no config.json, so the model's size is unknown"):
        NaViLForConditionalGeneration.from_pretrained(tmp_path)


def _golden_config(edit):
    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    edit(config)
    return config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["vision_config"].update(hidden_size=-64), "vision_config.hidden_size must be a positive whole"),
        (lambda c: c["llm_config"].update(intermediate_size=-1), "text_config.intermediate_size must be a positive"),
        (lambda c: c["llm_config"].update(hidden_size=0), "text_config.hidden_size must be a positive whole number"),
        (lambda c: c["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads must be"),
        (lambda c: c["llm_config"].update(num_attention_heads=0), "text_config.num_attention_heads must be"),
        (lambda c: c.update(downsample_ratio=0), "NaViLConfig.downsample_ratio must be a positive finite number"),
        (lambda c: c["llm_config"].update(hidden_act="swishy"), "text_config.hidden_act must name an activation"),
        (lambda c: c["vision_config"].update(hidden_act=None), "vision_config.hidden_act must name an activation"),
        (lambda c: c["llm_config"].update(rms_norm_eps=-1), "text_config.rms_norm_eps must be a positive finite"),
        (lambda c: c["llm_config"].update(max_position_embeddings=0), "text_config.max_position_embeddings must"),
        (lambda c: c.update(special_token_ids={"<img>": "5"}), "special_token_ids maps token strings to integer"),
        (lambda c: c.update(special_token_ids={"<img>": -1}), "special_token_ids\\['<img>'\\] = -1 is outside"),
        (lambda c: c.update(special_token_ids={"<img>": 1024}), "= 1024 is outside the vocabulary \\[0, 1024\\)"),
        (lambda c: c.update(llm_config=None), "has no text_config or llm_config \\(missing or null\\)"),
        (lambda c: c.update(min_dynamic_patch=2.5), "NaViLConfig.min_dynamic_patch must be a positive whole"),
        (lambda c: c["vision_config"].update(num_channels=4), "vision_config.num_channels must be 3"),
    ],
    ids=[
        "negative-vision-size",
        "negative-ffn",
        "zero-hidden",
        "zero-vision-heads",
        "zero-text-heads",
        "zero-downsample",
        "unknown-act",
        "null-act",
        "negative-eps",
        "zero-positions",
        "string-token-id",
        "negative-token-id",
        "token-id-past-vocab",
        "null-text-config",
        "fractional-patches",
        "four-channels",
    ],
)
def test_config_fields_are_validated_at_construction_naming_the_field(edit, message):
    with pytest.raises(ValueError, match=message):
        NaViLConfig.from_dict(_golden_config(edit))


def test_whole_number_layer_scale_factor_gives_float_layer_scales():
    config = NaViLConfig.from_dict(_golden_config(lambda c: c["vision_config"].update(initializer_factor=1)))
    model = NaViLForConditionalGeneration(config)
    assert model.vision_model.encoder.layers[0].ls1.dtype == torch.float32


# -- 4. processor and chat edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(text=[]), "text is an empty list"),
        (lambda p: p(text=5), "text must be a string or a list of strings, got int"),
        (lambda p: p(text=["ok", None]), "text 1 must be a string, got NoneType"),
        (lambda p: p(text="Is this \ud800 ok?"), "text 0 is not valid Unicode: .*lone surrogate '\\\\ud800'"),
        (lambda p: p.apply_chat_template([]), "needs a non-empty list of messages"),
        (lambda p: p.apply_chat_template([[]]), "needs a non-empty list of messages"),
        (lambda p: p.decode_reply([-1]), "token id -1 at position 0 of row 0 is not a token id"),
        (lambda p: p.decode_reply([[3, 2**40]]), "token id 1099511627776 at position 1"),
        (lambda p: p.decode_reply([1.5]), "token ids must be integers, got 1.5"),
        (lambda p: p(text="<image>", images=torch.zeros(3, 8, 8, device="meta")), "tensor on the meta device"),
    ],
    ids=[
        "empty-text",
        "int-text",
        "none-in-texts",
        "surrogate",
        "empty-chat",
        "empty-batch",
        "negative-id",
        "huge-id",
        "float-id",
        "meta-image",
    ],
)
def test_processor_edge_cases_raise_value_errors(processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor)


def test_chat_edge_cases_raise_value_errors(model, golden_tokenizer):
    with pytest.raises(ValueError, match="batch_chat got no questions"):
        model.batch_chat(golden_tokenizer, [])
    with pytest.raises(ValueError, match="is not valid Unicode"):
        model.chat(golden_tokenizer, None, "Hi \ud800", GENERATION)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 0, got '8'"):
        model.chat(golden_tokenizer, None, "Hi", dict(max_new_tokens="8"))
    grids = [[1, 4, 4]]
    with pytest.raises(ValueError, match="pixel_values are on the meta device"):
        model.chat(golden_tokenizer, torch.zeros(16, 768, device="meta"), "Hi", GENERATION, num_patches_list=grids)
    with torch.no_grad(), pytest.raises(ValueError, match="pixel_values are on the meta device"):
        model.get_image_features(torch.zeros(16, 768, device="meta"), grids)


def test_generate_refuses_a_non_integer_max_new_tokens(model, processor):
    inputs = processor(text=processor.build_prompt("Hi"))
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 0, got '8'"):
        model.generate(**inputs, max_new_tokens="8")


def test_image_url_without_an_http_client_says_which_to_install(processor, monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.setitem(sys.modules, "requests", None)
    with pytest.raises(ValueError, match="image URLs need httpx or requests, and neither is installed"):
        processor(text="<image>", images="https://example.com/cat.png")


# -- 5. silently wrong results --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, message",
    [
        ({"type": "image"}, "an image block needs the image under one of image, url, path, base64"),
        ({"type": "image", "url": None}, "an image block needs the image"),
        ({"text": "Describe."}, "every block needs a 'type'"),
        ({"type": "video", "path": "clip.mp4"}, "NaViL chats take blocks of type 'text' or 'image'"),
        ({"type": "text", "text": 5}, "a text block needs a string under 'text'"),
    ],
    ids=["image-without-source", "image-with-null-url", "no-type", "video", "text-not-string"],
)
def test_chat_template_blocks_that_would_be_dropped_or_left_as_text_are_refused(processor, block, message):
    messages = [{"role": "user", "content": [block, {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)


def test_image_without_any_scale_is_refused(model, golden_tokenizer, processor):
    pixels = processor.image_processor(IMAGES / "shapes.png", return_tensors="pt", multiscale=False)
    with pytest.raises(ValueError, match="num_scales must give every image at least one scale, got \\[0, 1\\]"):
        model.chat(
            golden_tokenizer,
            pixels["pixel_values"],
            "<image> and <image>",
            GENERATION,
            num_patches_list=pixels["image_grid_thw"],
            num_scales=[0, 1],
        )
    inputs = processor(text="<image>", images=IMAGES / "shapes.png", multiscale=False)
    with torch.no_grad(), pytest.raises(ValueError, match="num_scales must give every image at least one scale"):
        model(**{**inputs, "num_scales": torch.tensor([0, 1])})


def test_generate_refuses_a_prompt_plus_new_tokens_beyond_the_model_positions(model, processor, monkeypatch):
    inputs = processor(text=processor.build_prompt("Hi"))
    prompt_length = inputs["input_ids"].shape[1]
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", prompt_length + 3)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] <= prompt_length + 3
    with pytest.raises(
        ValueError, match=f"{prompt_length} tokens and up to 50 new.*lower max_new_tokens to at most 3"
    ):
        model.generate(**inputs, max_new_tokens=50)


# -- 6. abandoned streams -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("leave", ["close", "break"])
def test_abandoned_stream_stops_its_worker_within_one_decode_step(model, golden_tokenizer, leave):
    steps = []
    hook = model.language_model.register_forward_hook(lambda *args: steps.append(1))
    threads_before = set(threading.enumerate())
    config = dict(max_new_tokens=400, min_new_tokens=400, do_sample=False)
    try:
        stream = model.stream_chat(golden_tokenizer, None, "Tell me a long story.", config)
        if leave == "close":
            next(stream)
            steps_when_left = len(steps)
            stream.close()
        else:
            for _ in stream:
                steps_when_left = len(steps)
                break
            del stream
        steps_after = len(steps)
        workers = [thread for thread in threading.enumerate() if thread not in threads_before]
    finally:
        hook.remove()
    assert not any(thread.is_alive() for thread in workers)
    assert steps_after - steps_when_left <= 1
    assert steps_after < 400
