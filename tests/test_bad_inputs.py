"""Every class of bad input gets a ValueError naming the problem and the fix; loading is strict, local and code-free.

Image inputs (unreadable and truncated files, zero-size, 1x1, aspect ratio above 200, decompression bombs, 16-bit and
float images, CMYK, palettes with transparency, alpha, animations, EXIF, arrays of the wrong rank, channels or dtype,
NaN/inf) are covered one by one in tests/test_image_inputs.py; here they are re-checked briefly through the
processor, together with the memory bound of the image processor. This module covers the text, model and loading
side: placeholder counts, questions and histories, generation lengths, forward inputs (ids, masks, pixel values and
grids, dtypes and devices), strict safetensors loading, and the absence of eval/exec and of network access.
"""

import ast
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, chat_preprocessed
from PIL import Image
from safetensors.torch import load_file, save_file
from test_image_inputs import png_declaring

from navil.image_processing_navil import NaViLImageProcessor
from navil.modeling_navil import NaViLForConditionalGeneration

IMAGES = GOLDEN / "images"
PACKAGE = Path(__file__).resolve().parent.parent
GENERATION = dict(max_new_tokens=2, do_sample=False)


@pytest.fixture(scope="module")
def inputs(processor):
    """Processor outputs for one prompt with two images of different sizes."""
    prompt = processor.build_prompt("Compare them.", num_images=2)
    return processor(text=prompt, images=[IMAGES / "shapes.png", IMAGES / "strip.png"], return_tensors="pt")


# -- images, through the processor (details in tests/test_image_inputs.py) ----------------------------------------


@pytest.mark.parametrize(
    "image, message",
    [
        ((IMAGES / "noise.png").read_bytes()[:300], "truncated or corrupt"),
        (b"not an image at all", "Cannot read the image as an image"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
        (np.zeros((1, 201, 3), dtype=np.uint8), "aspect ratio must be smaller than 200"),
        (png_declaring(50_000, 50_000), "refused before decoding"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "4 dimensions"),
        (np.zeros((8, 8, 3), dtype=np.complex64), "dtype complex64"),
        ({"url": "cat.png"}, "Unsupported image type dict"),
    ],
    ids=["truncated", "not-an-image", "zero-size", "aspect", "bomb", "nan", "rank", "dtype", "type"],
)
def test_bad_image_through_the_processor_raises_a_documented_error(processor, image, message):
    with pytest.raises(ValueError, match=message):
        processor(text="<image>\nDescribe.", images=image)


def test_array_above_max_image_pixels_is_refused_before_conversion():
    image_processor = NaViLImageProcessor(max_image_pixels=10_000)
    for image in (np.zeros((101, 100, 3), dtype=np.float32), torch.zeros(3, 101, 100)):
        with pytest.raises(
            ValueError, match="101 = 10100 pixels, more than max_image_pixels=10000.*before conversion"
        ):
            image_processor(image)


def test_hundred_megapixel_image_is_downscaled_without_a_full_size_float_copy():
    image_processor = NaViLImageProcessor(min_pixels=8 * 256, max_pixels=48 * 256, multiscale=False)
    image = Image.new("L", (10_000, 10_000), 128)  # at the default max_image_pixels limit
    tracemalloc.start()
    try:
        out = image_processor(image, return_tensors="pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    # resized as a uint8 PIL image first: a float32 copy of the full image would take 1.2 GB
    assert peak < 16 * 2**20


# -- placeholders, questions, histories, generation lengths ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("<image> and <image>", [IMAGES / "shapes.png"], "found 2 <image> placeholders in the text but 1 image was"),
        ("Describe.", [IMAGES / "shapes.png"], "found 0 <image> placeholders in the text but 1 image was"),
        (["<image>", "none"], [[IMAGES / "shapes.png"], [IMAGES / "grad.png"]], "found 0 .* in text 1 but 1 images"),
    ],
)
def test_processor_placeholder_count_mismatch_names_both_counts(processor, text, images, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)


def test_processor_refuses_a_text_already_holding_image_feature_tokens_when_images_are_given(processor):
    with pytest.raises(ValueError, match="text 0 already contains <IMG_CONTEXT>"):
        processor(text="<image> <IMG_CONTEXT>", images=[IMAGES / "shapes.png"])


def test_chat_with_preprocessed_tensors_names_both_counts(model, golden_tokenizer, inputs):
    with pytest.raises(ValueError, match="found 1 <image> placeholder in the text but 2 images were given"):
        chat_preprocessed(model, golden_tokenizer, inputs, "<image> What is it?", GENERATION)


@pytest.mark.parametrize(
    "num_patches_list, num_scales, message",
    [
        ([16, 24], None, "num_patches_list must hold the \\(t, h, w\\) image_grid_thw rows"),
        ([[1, 4, 4]], None, "pixel_values has \\d+ patches but image_grid_thw describes 16"),
        (None, [1, 1], "num_scales adds up to 2 image-scales but image_grid_thw has \\d+ rows"),
    ],
)
def test_chat_refuses_grids_that_do_not_describe_the_pixel_values(
    model, golden_tokenizer, inputs, num_patches_list, num_scales, message
):
    grids = inputs["image_grid_thw"] if num_patches_list is None else num_patches_list
    with pytest.raises(ValueError, match=message):
        model.chat(
            golden_tokenizer,
            inputs["pixel_values"],
            "Compare.",
            GENERATION,
            num_patches_list=grids,
            num_scales=num_scales,
        )


@pytest.mark.parametrize(
    "question, message", [("", "is empty"), ("  \n", "is empty"), (None, "must be a string, got NoneType")]
)
def test_empty_or_missing_question_is_refused_by_every_chat_helper(model, golden_tokenizer, question, message):
    with pytest.raises(ValueError, match=f"The question {message}"):
        model.chat(golden_tokenizer, IMAGES / "shapes.png", question, GENERATION)
    with pytest.raises(ValueError, match=f"Question 1 {message}"):
        model.batch_chat(golden_tokenizer, ["Hi", question], generation_config=GENERATION)
    with pytest.raises(ValueError, match=f"The question {message}"):
        list(model.stream_chat(golden_tokenizer, None, question, GENERATION))


@pytest.mark.parametrize(
    "history, message",
    [
        ("Hello", "history must be a list of \\(question, answer\\) pairs, got str"),
        (["Hello"], "history\\[0\\] must be a \\(question, answer\\) pair, got 'Hello'"),
        ([("q", "a", "extra")], "history\\[0\\] must be a \\(question, answer\\) pair"),
        ([("q", "a"), {"role": "user", "content": "q"}], "history\\[1\\] is a dict.*apply_chat_template"),
        ([("q", 42)], "The answer of history\\[0\\] must be a string, got int"),
    ],
)
def test_malformed_history_is_refused_naming_the_bad_turn(model, processor, golden_tokenizer, history, message):
    with pytest.raises(ValueError, match=message):
        processor.build_prompt("Next?", history=history)
    with pytest.raises(ValueError, match=message):
        model.chat(golden_tokenizer, None, "Next?", GENERATION, history=history)


def test_batch_chat_refuses_arguments_that_are_not_one_per_conversation(model, golden_tokenizer):
    with pytest.raises(ValueError, match="takes a list of questions, got str; for one question use chat"):
        model.batch_chat(golden_tokenizer, "Hi", generation_config=GENERATION)
    with pytest.raises(ValueError, match="takes images as a list with one entry per conversation"):
        model.batch_chat(golden_tokenizer, ["Hi"], images=IMAGES / "shapes.png", generation_config=GENERATION)
    with pytest.raises(ValueError, match="got 2 questions, 1 image lists and 2 histories"):
        model.batch_chat(golden_tokenizer, ["Hi", "Ho"], images=[[]], generation_config=GENERATION)


def test_generation_config_must_be_a_dict(model, golden_tokenizer):
    with pytest.raises(ValueError, match="generation_config must be a dict of generate\\(\\) arguments"):
        model.chat(golden_tokenizer, None, "Hi", model.generation_config)


def test_chat_refuses_a_prompt_plus_new_tokens_beyond_the_model_positions(model, golden_tokenizer, monkeypatch):
    prompt_length = len(golden_tokenizer(model.chat_processor(golden_tokenizer).build_prompt("Hi"))["input_ids"])
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", prompt_length + 3)
    assert model.chat(golden_tokenizer, None, "Hi", dict(max_new_tokens=3, do_sample=False)) is not None
    with pytest.raises(ValueError, match=f"{prompt_length} tokens and up to 4 new.*lower max_new_tokens to at most 3"):
        model.chat(golden_tokenizer, None, "Hi", dict(max_new_tokens=4))
    with pytest.raises(ValueError, match="up to 5 new tokens were asked for"):
        model.chat(golden_tokenizer, None, "Hi", dict(max_length=prompt_length + 5))
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", prompt_length - 1)
    with pytest.raises(ValueError, match="shorten the prompt or history"):
        model.chat(golden_tokenizer, None, "Hi", GENERATION)


# -- forward --------------------------------------------------------------------------------------------------------


def _grid_rows(inputs):
    return int(inputs["image_grid_thw"].prod(-1).sum())


BAD_FORWARD_INPUTS = {
    "float-ids": (lambda x: {**x, "input_ids": x["input_ids"].float()}, "input_ids must be integer token ids"),
    "int16-ids": (lambda x: {**x, "input_ids": x["input_ids"].short()}, "got torch.int16; convert with .long"),
    "1d-ids": (lambda x: {**x, "input_ids": x["input_ids"][0]}, "must be \\[batch, seq\\].*input_ids\\[None\\]"),
    "empty-prompt": (lambda x: {"input_ids": x["input_ids"][:, :0]}, "The prompt is empty"),
    "negative-id": (lambda x: {"input_ids": x["input_ids"] * 0 - 1}, "input_ids must lie in \\[0, 1024\\)"),
    "id-above-vocab": (lambda x: {"input_ids": x["input_ids"] + 2000}, "input_ids must lie in \\[0, 1024\\)"),
    "ids-on-another-device": (lambda x: {"input_ids": x["input_ids"].to("meta")}, "inputs are on meta.*model is on"),
    "mask-shape": (
        lambda x: {**x, "attention_mask": x["attention_mask"][:, 1:]},
        "attention_mask has shape .* but the prompt is",
    ),
    "no-ids-nor-embeds": (lambda x: {}, "exactly one of input_ids or inputs_embeds"),
    "embeds-without-image-tokens": (
        lambda x: {
            "inputs_embeds": torch.zeros(1, 4, 64),
            "pixel_values": x["pixel_values"],
            "image_grid_thw": x["image_grid_thw"],
        },
        "The prompt has 0 <IMG_CONTEXT> tokens but the images give",
    ),
    "embeds-width": (lambda x: {"inputs_embeds": torch.zeros(1, 4, 7)}, "inputs_embeds must be \\[batch, seq, 64\\]"),
    "int-pixels": (lambda x: {**x, "pixel_values": x["pixel_values"].long()}, "must be floating point"),
    "pixel-width": (lambda x: {**x, "pixel_values": x["pixel_values"][:, :100]}, "must be \\[patches, 768\\]"),
    "nan-pixels": (lambda x: {**x, "pixel_values": x["pixel_values"] * np.nan}, "NaN or infinite"),
    "fewer-pixel-rows": (
        lambda x: {**x, "pixel_values": x["pixel_values"][:-4]},
        "pixel_values has \\d+ patches but image_grid_thw describes",
    ),
    "pixels-without-grid": (lambda x: {**x, "image_grid_thw": None}, "without image_grid_thw"),
    "float-grid": (lambda x: {**x, "image_grid_thw": x["image_grid_thw"].float()}, "must hold integers"),
    "flat-grid": (
        lambda x: {**x, "image_grid_thw": x["image_grid_thw"].flatten(), "num_scales": None},
        "must be \\[image_scales, 3\\]",
    ),
    "odd-grid": (
        lambda x: {**x, "image_grid_thw": torch.tensor([[1, 1, _grid_rows(x)]]), "num_scales": None},
        "row 0 is \\[1, 1, \\d+\\]: .* multiples of merge_size=2",
    ),
    "zero-frames": (
        lambda x: {**x, "image_grid_thw": x["image_grid_thw"] * torch.tensor([0, 1, 1])},
        "t must be at least 1",
    ),
    "num-scales": (lambda x: {**x, "num_scales": x["num_scales"] + 1}, "num_scales adds up to"),
    "pixels-for-a-text-prompt": (
        lambda x: {**x, "input_ids": x["input_ids"][:, :5], "attention_mask": None},
        "The prompt has 0 <IMG_CONTEXT> tokens but the images give \\d+ features",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD_INPUTS))
def test_bad_forward_inputs_raise_value_errors_naming_the_fix(model, inputs, case):
    mutate, message = BAD_FORWARD_INPUTS[case]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(**mutate(dict(inputs)))


def test_forward_refuses_a_prompt_longer_than_the_model_positions(model, inputs, monkeypatch):
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 10)
    with torch.no_grad(), pytest.raises(ValueError, match="but the model supports 10 positions"):
        model(**inputs)


def test_images_swapped_between_prompt_and_pixel_values_are_refused(model, processor, inputs):
    swapped = processor.image_processor([IMAGES / "strip.png", IMAGES / "shapes.png"], return_tensors="pt")
    assert _grid_rows(swapped) == _grid_rows(inputs)  # same total: only the per-image check can tell
    with torch.no_grad(), pytest.raises(ValueError, match="features would land on another image's tokens"):
        model(**{**inputs, **swapped})


def test_pixel_values_are_cast_and_int32_ids_accepted_as_documented(model, inputs):
    with torch.no_grad():
        reference = model(**inputs).logits
        as_float64 = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}).logits
        as_int32 = model(**{**inputs, "input_ids": inputs["input_ids"].int()}).logits
        as_bfloat16 = model(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}).logits
    assert torch.equal(as_float64, reference) and torch.equal(as_int32, reference)
    assert as_bfloat16.dtype == reference.dtype and bool(torch.isfinite(as_bfloat16).all())


# -- loading --------------------------------------------------------------------------------------------------------


def _checkpoint(folder: Path, edit) -> Path:
    """A copy of the golden qwen3_ve checkpoint with its state dict changed by `edit`."""
    folder.mkdir()
    (folder / "config.json").write_text((GOLDEN / "qwen3_ve" / "config.json").read_text())
    state_dict = load_file(GOLDEN / "qwen3_ve" / "model.safetensors")
    edit(state_dict)
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("mlp1.1.weight"), "missing_keys: mlp1.1.weight"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "unexpected_keys: extra.weight"),
        (
            lambda sd: sd.update({"mlp1.1.weight": torch.zeros(3, 3)}),
            "mismatched_keys: mlp1.1.weight \\(checkpoint \\[3, 3\\], model \\[64, 256\\]\\)",
        ),
    ],
    ids=["missing", "unexpected", "mismatched"],
)
def test_checkpoint_not_matching_the_model_is_refused_naming_the_tensors(tmp_path, edit, message):
    folder = _checkpoint(tmp_path / "checkpoint", edit)
    with pytest.raises(
        ValueError, match=f"does not match NaViLForConditionalGeneration \\({message}\\).*strict=False"
    ):
        NaViLForConditionalGeneration.from_pretrained(folder)


def test_non_strict_loading_initialises_a_missing_tensor_and_reports_it(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint", lambda sd: sd.pop("mlp1.1.weight"))
    _, info = NaViLForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"mlp1.1.weight"}


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((GOLDEN / "qwen3_ve" / "config.json").read_text())
    state_dict = load_file(GOLDEN / "qwen3_ve" / "model.safetensors")
    torch.save(state_dict, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds only pickled weights.*allow_pickle=True"):
        NaViLForConditionalGeneration.from_pretrained(folder)
    loaded = NaViLForConditionalGeneration.from_pretrained(folder, allow_pickle=True)
    assert torch.equal(loaded.state_dict()["mlp1.1.weight"], state_dict["mlp1.1.weight"])


def test_package_sources_contain_no_eval_or_exec():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] == "tests" or any(part.startswith(".") for part in parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "builtins":
                name = func.attr
            else:
                name = getattr(func, "id", None)  # plain calls only: `model.eval()` is a method
            if name in ("eval", "exec"):
                calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not calls


NO_NETWORK = """
    import socket, sys
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:2]))
        raise OSError("networking is disabled in this test")

    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.getaddrinfo = socket.create_connection = refuse

    import navil  # noqa: F401
    from transformers import AutoModel, AutoTokenizer

    folder, image = sys.argv[1:3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model.chat(tokenizer, image, "Describe.", dict(max_new_tokens=2))
    print("network attempts:", attempts)
"""


def test_import_loading_and_chat_make_no_network_connection(tmp_path, model, golden_tokenizer):
    model.save_pretrained(tmp_path)
    golden_tokenizer.save_pretrained(tmp_path)
    offline_switches = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {key: value for key, value in os.environ.items() if key not in offline_switches}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_NETWORK), str(tmp_path), str(IMAGES / "shapes.png")],
        capture_output=True,
        text=True,
        env={**env, "PYTHONWARNINGS": "ignore"},
        cwd="/",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "network attempts: []"
