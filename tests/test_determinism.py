"""Greedy results do not depend on how they are computed: attention kernel, cache, batching, or repetition.

Complements tests/test_modeling.py (cache vs no cache for one prompt, left-padded batch vs alone with sdpa) and
tests/test_chat.py (batch_chat vs chat, stream_chat vs chat).
"""

import pytest
import torch
from conftest import BACKBONES, GOLDEN, greedy, load_golden_model

IMAGES = GOLDEN / "images"
CONVERSATIONS = [
    ("Tell me a short story.", []),
    ("Describe the image shortly.", [IMAGES / "shapes.png"]),
    ("What differs between the two images?", [IMAGES / "grad.png", IMAGES / "strip.png"]),
]
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=BACKBONES)
def models(request, golden_tokenizer):
    return {
        implementation: load_golden_model(request.param, golden_tokenizer, attn_implementation=implementation)
        for implementation in ("sdpa", "eager")
    }


def _inputs(model, tokenizer, conversations):
    processor = model.chat_processor(tokenizer)
    prompts = [processor.build_prompt(question, num_images=len(images)) for question, images in conversations]
    images = [image for _, group in conversations for image in group]
    return processor(text=prompts, images=images or None, return_tensors="pt")


def _greedy(model, inputs, **kwargs):
    return greedy(model, inputs, NEW_TOKENS, pad_token_id=1001, **kwargs)


def test_sdpa_and_eager_generate_the_same_greedy_tokens(models, golden_tokenizer):
    inputs = _inputs(models["sdpa"], golden_tokenizer, CONVERSATIONS)
    assert torch.equal(_greedy(models["sdpa"], inputs), _greedy(models["eager"], inputs))


def test_sdpa_and_eager_give_the_same_chat_replies(models, golden_tokenizer):
    generation = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    replies = {
        name: [
            model.chat(golden_tokenizer, images or None, question, generation) for question, images in CONVERSATIONS
        ]
        for name, model in models.items()
    }
    assert replies["sdpa"] == replies["eager"]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padded_batch_generates_the_same_with_and_without_cache(models, golden_tokenizer, implementation):
    model = models[implementation]
    inputs = _inputs(model, golden_tokenizer, CONVERSATIONS)
    assert torch.equal(_greedy(model, inputs, use_cache=True), _greedy(model, inputs, use_cache=False))


def test_generated_special_tokens_are_embedded_alike_with_and_without_cache(golden_tokenizer):
    # this conversation makes qwen3_ve generate <quad>: generated tokens get plain embeddings and text routing
    # with a cache (as in the original) and, through the mm_token_type_ids generate passes, without one too
    model = load_golden_model("qwen3_ve", golden_tokenizer)
    inputs = _inputs(model, golden_tokenizer, CONVERSATIONS[2:])
    assert torch.equal(_greedy(model, inputs, use_cache=True), _greedy(model, inputs, use_cache=False))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padded_batch_generates_what_each_conversation_generates_alone(models, golden_tokenizer, implementation):
    model = models[implementation]
    batch = _greedy(model, _inputs(model, golden_tokenizer, CONVERSATIONS))
    for row, conversation in zip(batch, CONVERSATIONS):
        assert torch.equal(row, _greedy(model, _inputs(model, golden_tokenizer, [conversation]))[0])


def test_repeated_runs_are_bit_identical(models, golden_tokenizer):
    model = models["sdpa"]
    inputs = _inputs(model, golden_tokenizer, CONVERSATIONS)
    again = _inputs(model, golden_tokenizer, CONVERSATIONS)
    assert all(torch.equal(inputs[key], again[key]) for key in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    assert torch.equal(_greedy(model, inputs), _greedy(model, inputs))
