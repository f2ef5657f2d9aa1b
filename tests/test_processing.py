"""NaViLProcessor builds the original chat() prompts and input ids, and decodes replies like the original."""

import pytest
import torch
from conftest import GOLDEN, case_pixel_inputs
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from navil.image_processing_navil import NaViLImageProcessor
from navil.layouts_navil import LAYOUTS
from navil.processing_navil import (
    CHAT_TEMPLATES,
    DEFAULT_SYSTEM_MESSAGE,
    IMAGE_PLACEHOLDER,
    NAVIL_SPECIAL_TOKENS,
    NaViLProcessor,
    add_navil_special_tokens,
)

TEMPLATES = {layout.golden_name: layout.template for layout in LAYOUTS.values()}
CASE_NAMES = ("text", "one_image", "two_images", "odd_modes")
CASES = [(model, case) for model in TEMPLATES for case in CASE_NAMES]
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "num_scales")


@pytest.fixture(scope="module")
def image_processor(golden_image_processor):
    return golden_image_processor


@pytest.fixture(scope="module")
def processors(image_processor, golden_tokenizer):
    return {
        model: NaViLProcessor(image_processor=image_processor, tokenizer=golden_tokenizer, template=template)
        for model, template in TEMPLATES.items()
    }


def image_paths(case):
    return [str(GOLDEN / "images" / f"{name}.png") for name in case["images"]]


def chat_messages(case):
    content = [{"type": "image", "path": path} for path in image_paths(case)]
    return [{"role": "user", "content": [*content, {"type": "text", "text": case["question"]}]}]


def assert_golden_pixels(inputs, ip_outputs, images):
    pixel_values, grids, num_scales = case_pixel_inputs(ip_outputs, images)
    assert torch.equal(inputs["pixel_values"], pixel_values.reshape(pixel_values.shape[0], -1))
    assert torch.equal(inputs["image_grid_thw"], grids)
    assert torch.equal(inputs["num_scales"], num_scales)


def test_golden_cases_are_the_ones_covered_here(manifest):
    for model, template in TEMPLATES.items():
        assert manifest["models"][model]["template"] == template
        assert tuple(manifest["models"][model]["cases"]) == CASE_NAMES


# -- prompts and ids of the golden cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("model, case_name", CASES)
def test_build_prompt_and_expansion_reproduce_the_original_prompt(
    manifest, processors, image_processor_outputs, model, case_name
):
    case = manifest["models"][model]["cases"][case_name]
    processor = processors[model]
    prompt = processor.build_prompt(case["question"], history=case["history"], num_images=len(case["images"]))
    if case["images"]:
        _, grids, num_scales = case_pixel_inputs(image_processor_outputs, case["images"])
        prompt = processor.expand_image_placeholders(prompt, grids, num_scales)
    assert prompt == case["prompt"]


@pytest.mark.parametrize("model, case_name", CASES)
def test_processor_gives_the_original_input_ids_and_pixel_inputs(
    manifest, processors, golden_outputs, image_processor_outputs, model, case_name
):
    case = manifest["models"][model]["cases"][case_name]
    processor = processors[model]
    prompt = processor.build_prompt(case["question"], num_images=len(case["images"]))
    inputs = processor(text=prompt, images=image_paths(case) or None)
    assert torch.equal(inputs["input_ids"], golden_outputs[model][f"case.{case_name}.input_ids"])
    assert inputs["attention_mask"].eq(1).all()
    if case["images"]:
        assert set(inputs) == {"input_ids", "attention_mask", *PIXEL_KEYS}
        assert_golden_pixels(inputs, image_processor_outputs, case["images"])
    else:
        assert set(inputs) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("model, case_name", CASES)
def test_chat_template_renders_build_prompt_and_tokenizes_like_the_processor(
    manifest, processors, golden_outputs, image_processor_outputs, model, case_name
):
    case = manifest["models"][model]["cases"][case_name]
    processor = processors[model]
    messages = chat_messages(case)
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == processor.build_prompt(case["question"], num_images=len(case["images"]))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], golden_outputs[model][f"case.{case_name}.input_ids"])
    if case["images"]:
        assert_golden_pixels(inputs, image_processor_outputs, case["images"])


# -- batches ----------------------------------------------------------------------------------------------------------


def test_batch_with_different_image_counts_pads_left_and_matches_single_prompts(processors, golden_tokenizer):
    processor = processors["internlm2_ve"]
    texts = [
        processor.build_prompt("Compare them.", num_images=2),
        processor.build_prompt("Just text."),
        processor.build_prompt("Describe it.", num_images=1),
    ]
    images = [[GOLDEN / "images" / f"{name}.png" for name in names] for names in (["grad", "strip"], [], ["shapes"])]
    nested = processor(text=texts, images=images)
    flat = processor(text=texts, images=[image for group in images for image in group])
    for key in nested:
        assert torch.equal(nested[key], flat[key]), key
    singles = [processor(text=text, images=group or None) for text, group in zip(texts, images)]
    longest = max(single["input_ids"].shape[1] for single in singles)
    assert nested["input_ids"].shape == (3, longest)
    for row, single in enumerate(singles):
        length = single["input_ids"].shape[1]
        assert torch.equal(nested["input_ids"][row, longest - length :], single["input_ids"][0])
        assert nested["input_ids"][row, : longest - length].eq(golden_tokenizer.pad_token_id).all()
        assert nested["attention_mask"][row].tolist() == [0] * (longest - length) + [1] * length
    for key in PIXEL_KEYS:
        assert torch.equal(nested[key], torch.cat([single[key] for single in singles if key in single]))

    right = processor(text=texts, images=images, padding_side="right")
    length = singles[1]["input_ids"].shape[1]
    assert torch.equal(right["input_ids"][1, :length], singles[1]["input_ids"][0])
    assert right["attention_mask"][1].tolist() == [1] * length + [0] * (longest - length)


def test_placeholder_count_mismatch_raises_naming_both_counts(processors):
    processor = processors["internlm2_ve"]
    image = GOLDEN / "images" / "grad.png"
    with pytest.raises(ValueError, match="found 2 <image> placeholders in the text but 1 image was given"):
        processor(text="<image><image>What is it?", images=[image])
    with pytest.raises(ValueError, match="found 0 <image> placeholders in the text but 1 image was given"):
        processor(text="What is it?", images=image)
    with pytest.raises(ValueError, match="found 1 <image> placeholders in text 1 but 0 images were given"):
        processor(text=["<image>a", "<image>b"], images=[[image], []])
    with pytest.raises(ValueError, match="found 1 <image> placeholder in the text but 2 images were given"):
        processor.expand_image_placeholders("<image>x", [[1, 4, 4], [1, 2, 2]], [1, 1])


def test_text_without_images_keeps_a_literal_placeholder(processors, golden_tokenizer):
    inputs = processors["internlm2_ve"](text="What does <image> mean?")
    assert golden_tokenizer.decode(inputs["input_ids"][0]) == "What does <image> mean?"


# -- prompt rules -----------------------------------------------------------------------------------------------------


def test_build_prompt_follows_the_original_history_and_empty_message_rules(processors):
    processor = processors["qwen3_ve"]
    roles = CHAT_TEMPLATES["qwen3-chat"]
    system = roles["system"] + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>"
    user, assistant = roles["user"], roles["assistant"]
    assert processor.build_prompt("Hi", num_images=2) == system + user + "<image>\n<image>\nHi<|im_end|>" + assistant
    assert processor.build_prompt("<image> Hi", num_images=1) == system + user + "<image> Hi<|im_end|>" + assistant
    # any history (even an empty one) disables the automatic prefix
    assert processor.build_prompt("Hi", history=[], num_images=1) == system + user + "Hi<|im_end|>" + assistant
    history = [("<image>\nWhat?", "A cat."), ("And?", "")]
    expected = system + user + "<image>\nWhat?<|im_end|>" + assistant + "A cat.<|im_end|>"
    expected += user + "And?<|im_end|>" + assistant + user + "More<|im_end|>" + assistant
    assert processor.build_prompt("More", history=history, num_images=1) == expected
    assert processor.build_prompt(None) == system + user + assistant
    custom = roles["system"] + "Be brief.<|im_end|>" + user + "Hi<|im_end|>" + assistant
    assert processor.build_prompt("Hi", system_message="Be brief.") == custom
    configured = NaViLProcessor(
        processor.image_processor, processor.tokenizer, template="qwen3-chat", system_message="Be brief."
    )
    assert configured.build_prompt("Hi") == custom


def test_chat_template_handles_system_assistant_turns_and_string_content(processors):
    for processor in processors.values():
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": "And now?"},
        ]
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        history = [(f"{IMAGE_PLACEHOLDER}\nWhat?", "A cat.")]
        assert rendered == processor.build_prompt("And now?", history=history, system_message="Be brief.")
        without_prompt = processor.apply_chat_template(messages[:3], tokenize=False)
        assert without_prompt == rendered.split(processor.roles["user"] + "And now?")[0]
    with pytest.raises(Exception, match="got role tool"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_custom_system_message_reaches_the_chat_template(image_processor, golden_tokenizer):
    processor = NaViLProcessor(image_processor, golden_tokenizer, template="qwen3-chat", system_message='Say "hi"\n')
    messages = [{"role": "user", "content": "Hello"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == processor.build_prompt("Hello")
    assert 'Say "hi"\n' in rendered


def test_unknown_template_raises(image_processor, golden_tokenizer):
    with pytest.raises(ValueError, match="Unknown NaViL template 'llama'"):
        NaViLProcessor(image_processor, golden_tokenizer, template="llama")


# -- decoding ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, case_name", CASES)
def test_decode_reply_reproduces_the_original_reply(manifest, processors, golden_outputs, model, case_name):
    generated = golden_outputs[model][f"case.{case_name}.generated_ids"]
    expected = manifest["models"][model]["cases"][case_name]["response"]
    processor = processors[model]
    assert processor.decode_reply(generated) == expected
    assert processor.decode_reply(generated[None]) == [expected]


@pytest.mark.parametrize("model", TEMPLATES)
def test_pipeline_post_processing_leaves_the_reply_after_the_prompt(manifest, processors, golden_outputs, model):
    processor = processors[model]
    for case_name in CASE_NAMES:
        prompt_ids = golden_outputs[model][f"case.{case_name}.input_ids"]
        sequence = torch.cat([prompt_ids, golden_outputs[model][f"case.{case_name}.generated_ids"][None]], dim=1)
        full = processor.post_process_image_text_to_text(sequence)
        prompt = processor.post_process_image_text_to_text(prompt_ids)
        assert full[0].startswith(prompt[0])
        assert full[0][len(prompt[0]) :] == manifest["models"][model]["cases"][case_name]["response"]


def test_add_navil_special_tokens_adds_only_missing_tokens(golden_tokenizer):
    assert add_navil_special_tokens(golden_tokenizer) == 0
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert add_navil_special_tokens(tokenizer) == len(NAVIL_SPECIAL_TOKENS)
    assert add_navil_special_tokens(tokenizer) == 0
    ids = tokenizer("hello<img><IMG_CONTEXT></img>")["input_ids"]
    assert ids == [1, *tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"


# -- saving -----------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, golden_tokenizer):
    image_processor = NaViLImageProcessor(min_pixels=8 * 256, max_pixels=48 * 256, multiscale=False)
    processor = NaViLProcessor(image_processor, golden_tokenizer, template="qwen3-chat", system_message="Be brief.")
    processor.save_pretrained(tmp_path)
    loaded = NaViLProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, NaViLImageProcessor)
    assert (loaded.template, loaded.system_message) == ("qwen3-chat", "Be brief.")
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.to_dict() == image_processor.to_dict()
    text = processor.build_prompt("Describe it.", num_images=1)
    assert loaded.build_prompt("Describe it.", num_images=1) == text
    image = GOLDEN / "images" / "shapes.png"
    expected, actual = processor(text=text, images=image), loaded(text=text, images=image)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
