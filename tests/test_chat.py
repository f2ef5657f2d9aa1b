"""chat(), batch_chat() and stream_chat(): the same replies whichever way a conversation is run."""

import pytest
from conftest import BACKBONES, GOLDEN, chat_preprocessed, load_golden_model
from PIL import Image

IMAGES = GOLDEN / "images"
GENERATION = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module", params=BACKBONES)
def model(request, golden_tokenizer):
    return load_golden_model(request.param, golden_tokenizer)


def test_batch_chat_equals_chat_one_by_one(model, golden_tokenizer):
    questions = ["Tell me a short story.", "Describe the image shortly.", "What differs between the two images?"]
    images = [[], [IMAGES / "shapes.png"], [IMAGES / "grad.png", IMAGES / "strip.png"]]
    one_by_one = [model.chat(golden_tokenizer, item or None, q, GENERATION) for q, item in zip(questions, images)]
    assert model.batch_chat(golden_tokenizer, questions, images, GENERATION) == one_by_one


def test_stream_chat_pieces_join_to_the_chat_reply(model, golden_tokenizer):
    for images, question in [(None, "Tell me a short story."), (IMAGES / "shapes.png", "Describe the image.")]:
        reply = model.chat(golden_tokenizer, images, question, GENERATION)
        pieces = list(model.stream_chat(golden_tokenizer, images, question, GENERATION))
        assert "".join(pieces) == reply


def test_chat_accepts_images_paths_and_preprocessed_tensors_alike(model, golden_tokenizer):
    path = IMAGES / "shapes.png"
    from_path = model.chat(golden_tokenizer, str(path), "Describe the image shortly.", GENERATION)
    from_pil = model.chat(golden_tokenizer, Image.open(path), "Describe the image shortly.", GENERATION)
    processed = model.chat_processor(golden_tokenizer).image_processor(str(path), return_tensors="pt")
    from_tensors = chat_preprocessed(model, golden_tokenizer, processed, "Describe the image shortly.", GENERATION)
    assert from_path == from_pil == from_tensors


def test_multi_turn_history_continues_the_conversation(model, golden_tokenizer):
    image = IMAGES / "shapes.png"
    first, history = model.chat(golden_tokenizer, image, "Describe the image.", GENERATION, return_history=True)
    assert history == [("<image>\nDescribe the image.", first)]
    second, history = model.chat(
        golden_tokenizer, image, "And the colours?", GENERATION, history=history, return_history=True
    )
    assert len(history) == 2 and history[1] == ("And the colours?", second)


def test_image_count_mismatch_names_both_counts(model, golden_tokenizer):
    with pytest.raises(ValueError, match=r"2 .*1|1 .*2"):
        model.chat(golden_tokenizer, IMAGES / "shapes.png", "<image> and <image>: compare them.", GENERATION)
