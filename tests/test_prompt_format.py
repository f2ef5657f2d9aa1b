"""The prompt format has one owner, `NaViLProcessor.build_prompt`: the Jinja chat template renders every conversation
exactly as it does, and the turn by turn pieces training tokenises add up to it."""

import pytest

from navil.processing_navil import CHAT_TEMPLATES, IMAGE_PLACEHOLDER, NaViLProcessor


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
