"""The prompt format has one owner, `NaViLProcessor` (`build_prompt`, `render_conversation`): the Jinja chat template
renders every conversation exactly as it does, the turn by turn pieces training tokenises add up to it, and the
template, `chat()` and the fine-tuning collator give a conversation the same tokens."""

import copy

import pytest
import torch
from PIL import Image

from navil.processing_navil import CHAT_TEMPLATES, IMAGE_PLACEHOLDER, NaViLProcessor
from navil.training.finetune import NaViLDataCollator


def user(text, images=0):
    return {
        "role": "user",
        "content": [{"type": "image", "path": f"{i}.png"} for i in range(images)] + [text_block(text)],
    }


def assistant(text):
    return {"role": "assistant", "content": [text_block(text)]}


def text_block(text):
    return {"type": "text", "text": text}


# Each conversation in transformers' message format, and the `build_prompt` arguments that give its prompt.
CONVERSATIONS = {
    "text": ([user("Hi")], dict(question="Hi")),
    "string content": ([{"role": "user", "content": "Hi"}], dict(question="Hi")),
    "one image": ([user("What is it?", images=1)], dict(question="What is it?", num_images=1)),
    "two images": ([user("Compare them.", images=2)], dict(question="Compare them.", num_images=2)),
    "an image without text": ([user("", images=1)], dict(question="", num_images=1)),
    "an empty message": ([user("")], dict(question="")),
    "a system message": (
        [{"role": "system", "content": "Be brief."}, user("Hi")],
        dict(question="Hi", system_message="Be brief."),
    ),
    "a second turn": (
        [user("Hi"), assistant("Hello."), user("Bye")],
        dict(question="Bye", history=[("Hi", "Hello.")]),
    ),
    "a second turn about an image": (
        [user("What is it?", images=1), assistant("A cat."), user("Sure?")],
        dict(question="Sure?", history=[(f"{IMAGE_PLACEHOLDER}\nWhat is it?", "A cat.")]),
    ),
    "an empty answer": ([user("Hi"), assistant(""), user("Again")], dict(question="Again", history=[("Hi", "")])),
    "a bare image block": (
        [{"role": "user", "content": [{"type": "image"}, text_block("What is it?")]}],
        dict(question="What is it?", num_images=1),
    ),
    "images in two turns": (
        [user("What is it?", images=1), assistant("A cat."), user("And these?", images=2)],
        dict(
            question=f"{IMAGE_PLACEHOLDER}\n" * 2 + "And these?",
            history=[(f"{IMAGE_PLACEHOLDER}\nWhat is it?", "A cat.")],
        ),
    ),
    "three turns and a system message": (
        [
            {"role": "system", "content": [text_block("Be brief.")]},
            user("Hi"),
            assistant("Hello."),
            user("Why?"),
            assistant("Because."),
            user("Bye"),
        ],
        dict(question="Bye", history=[("Hi", "Hello."), ("Why?", "Because.")], system_message="Be brief."),
    ),
}


@pytest.fixture(
    scope="module", params=[(template, system) for template in CHAT_TEMPLATES for system in (None, 'Say "hi"\n')]
)
def processor(request, golden_tokenizer):
    template, system_message = request.param
    return NaViLProcessor(tokenizer=golden_tokenizer, template=template, system_message=system_message)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_renders_each_conversation_as_build_prompt(processor, name):
    messages, arguments = CONVERSATIONS[name]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == processor.build_prompt(**arguments)


@pytest.mark.parametrize("num_images", [0, 1])
def test_a_conversation_is_its_first_prompt_then_each_answer_and_the_next_turn_prompt(processor, num_images):
    turns = [("Hi", "Hello."), ("Why?", "Because.")]
    separator = processor.roles["separator"]
    pieces = processor.build_prompt(turns[0][0], num_images=num_images)
    for (_, answer), (question, _) in zip(turns, [*turns[1:], ("Bye", None)]):
        pieces += answer + separator + processor.next_turn_prompt(question)
    # in a history, the images of the first question are its explicit placeholders
    history = [(f"{IMAGE_PLACEHOLDER}\n" * num_images + "Hi", "Hello."), ("Why?", "Because.")]
    assert pieces == processor.build_prompt("Bye", history=history)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_conversation_is_the_chat_template(processor, name, add_generation_prompt):
    messages, _ = CONVERSATIONS[name]
    # a conversation ending with the answer, as training renders it
    messages = messages if add_generation_prompt else [*messages, assistant("Sure.")]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert processor.render_conversation(messages, add_generation_prompt=add_generation_prompt) == rendered


def test_from_model_config_leaves_the_callers_tokenizer_unchanged(golden_tokenizer, model):
    tokenizer = copy.deepcopy(golden_tokenizer)
    tokenizer.padding_side = "right"
    size = len(tokenizer)
    processor = NaViLProcessor.from_model_config(model.config, tokenizer)
    assert processor.tokenizer.padding_side == "left"
    assert (tokenizer.padding_side, len(tokenizer)) == ("right", size)
    assert processor.image_processor.merge_size == model.config.vision_config.merge_size
    assert (processor.template, processor.system_message) == (model.config.template, model.config.system_message)


def test_chat_builds_its_processor_once_per_tokenizer(golden_tokenizer, model):
    assert model.chat_processor(golden_tokenizer) is model.chat_processor(golden_tokenizer)


# Conversations of (user text, number of images, answer) turns, for the template, chat() and the collator.
TURN_TABLE = {
    "text": [("Hi", 0, "Hello.")],
    "one image": [("What is it?", 1, "A square.")],
    "two images": [("Compare them.", 2, "Both red.")],
    "an image, then text": [("What is it?", 1, "A square."), ("Sure?", 0, "Yes.")],
    "images in two turns": [("What is it?", 1, "A square."), ("And these?", 2, "Circles."), ("Bye", 0, "Bye.")],
}


def _turn_messages(turns):
    """The transformers messages of `turns`, with bare image blocks, and their images."""
    messages, images = [], []
    for text, count, answer in turns:
        images += [Image.new("RGB", (40 + 8 * len(images), 32), (200, 30 * len(images), 0)) for _ in range(count)]
        messages.append({"role": "user", "content": [{"type": "image"}] * count + [text_block(text)]})
        messages.append(assistant(answer))
    return messages, images


def _chat_prompt_ids(model, tokenizer, images, question, history):
    """The prompt ids `model.chat` hands to `generate` (which here stops at once)."""
    seen = {}

    def generate(input_ids, **kwargs):
        seen["input_ids"] = input_ids
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    model.generate, original = generate, model.generate
    try:
        model.chat(tokenizer, images or None, question, history=history)
    finally:
        model.generate = original
    return seen["input_ids"][0].tolist()


@pytest.mark.parametrize("name", TURN_TABLE)
def test_template_chat_and_finetuning_collator_give_a_conversation_the_same_tokens(golden_tokenizer, model, name):
    processor = model.chat_processor(golden_tokenizer)
    messages, images = _turn_messages(TURN_TABLE[name])

    def decode(ids):
        return processor.tokenizer.decode(ids, skip_special_tokens=False)

    # the whole conversation: the template's text, images expanded, against what the collator trains on
    text = processor.apply_chat_template(messages, tokenize=False)
    template_ids = processor(images=images or None, text=text, return_tensors=None)["input_ids"][0]
    collator_ids, _, _ = NaViLDataCollator(processor).encode({"messages": messages, "images": images})
    assert decode(collator_ids) == decode(template_ids)

    # the prompt of the last answer: the template's generation prompt against chat()'s, given the earlier turns
    *earlier, (question, count, _) = TURN_TABLE[name]
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = processor(images=images or None, text=prompt, return_tensors=None)["input_ids"][0]
    history = None
    if earlier:
        history = [(f"{IMAGE_PLACEHOLDER}\n" * n + q, a) for q, n, a in earlier]
        question = f"{IMAGE_PLACEHOLDER}\n" * count + question
    assert decode(_chat_prompt_ids(model, golden_tokenizer, images, question, history)) == decode(prompt_ids)
