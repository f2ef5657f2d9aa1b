"""One rule for generated tokens (`modeling_navil.token_types`): prompt tokens are typed by their ids, generated tokens
are text; the transformers forward and the serving engines' step embeddings (`serving/core.py`) both follow it, and a
forward takes no generation flag."""

import inspect

import pytest
import torch

from navil import modeling_navil
from navil.checks_navil import NaViLInputError
from navil.configuration_navil import SPECIAL_TOKEN_EMBEDDING_ROWS, special_token_rows
from navil.modeling_navil import (
    IMAGE_TOKEN,
    SPECIAL_TOKEN,
    TEXT_TOKEN,
    NaViLForConditionalGeneration,
    token_types,
)
from navil.serving.core import step_embeddings
from navil.testing import tiny_config

CONFIG = tiny_config("qwen3")
IDS = CONFIG.special_token_ids


def tiny_model():
    torch.manual_seed(0)
    return NaViLForConditionalGeneration(tiny_config("qwen3")).eval()


def image_prompt(grid=(1, 4, 6)):
    """A prompt laid out as the processor lays out one image-scale, then text; its pixels and grid."""
    _, h, w = grid
    tokens = [IDS["<img>"]] + ([IDS["<IMG_CONTEXT>"]] * (w // 2) + [IDS["<IMG_LINE_BREAK>"]]) * (h // 2)
    tokens += [IDS["<IMG_FRAME_BREAK>"], IDS["</img>"], 5, IDS["<ref>"], 17, IDS["</ref>"], 42]
    pixel_values = torch.randn(h * w, 3 * 16 * 16, generator=torch.Generator().manual_seed(0))
    return torch.tensor([tokens]), pixel_values, torch.tensor([grid])


def test_prompt_tokens_are_typed_by_their_ids_and_generated_tokens_are_text_whatever_their_ids():
    tokens = ["<img>", "<IMG_CONTEXT>", "</img>", "<ref>", "<quad>", "<IMG_CONTEXT>", "<img>"]
    input_ids = torch.tensor([[IDS[token] for token in tokens] + [5]])
    generated = torch.tensor([[False] * 5 + [True, True, True]])
    rows = special_token_rows(IDS, input_ids)
    prompt = [IMAGE_TOKEN, IMAGE_TOKEN, SPECIAL_TOKEN, SPECIAL_TOKEN, SPECIAL_TOKEN]
    assert token_types(rows)[0].tolist() == prompt + [IMAGE_TOKEN, IMAGE_TOKEN, TEXT_TOKEN]
    assert token_types(rows, generated)[0].tolist() == prompt + [TEXT_TOKEN] * 3


def test_forward_takes_no_generation_flag():
    parameters = inspect.signature(NaViLForConditionalGeneration.forward).parameters
    assert not {"is_decode_step", "num_prompt_tokens"} & set(parameters)
    assert "mm_token_type_ids" in parameters


def test_generated_special_tokens_typed_as_text_take_their_word_embeddings_and_the_text_experts():
    model = tiny_model()
    quad = IDS["<quad>"]
    input_ids = torch.tensor([[5, quad, 17, quad]])
    generated = torch.tensor([[TEXT_TOKEN, SPECIAL_TOKEN, TEXT_TOKEN, TEXT_TOKEN]])  # the last <quad> was generated
    merged = model.embed_tokens(input_ids, mm_token_type_ids=generated)
    words = model.get_input_embeddings()(input_ids)[0]
    special = model.special_token_embedding.weight[SPECIAL_TOKEN_EMBEDDING_ROWS.index("<quad>")]
    assert torch.equal(merged.inputs_embeds[0, 1], special) and torch.equal(merged.inputs_embeds[0, 3], words[3])
    assert merged.visual_token_mask is None


def test_serving_step_embeddings_follow_the_rule_of_the_transformers_model():
    model = tiny_model()
    input_ids, pixel_values, grid = image_prompt()
    reply = torch.tensor([[IDS["<img>"], IDS["<ref>"], 9]])  # generated: text, whatever the ids
    sequence = torch.cat((input_ids, reply), dim=1)
    types = torch.cat((token_types(special_token_rows(IDS, input_ids)), torch.full_like(reply, TEXT_TOKEN)), dim=1)
    with torch.no_grad():
        merged = model.embed_tokens(sequence, pixel_values, grid, types)
        # an engine's step: word embeddings with the image block's embeddings (HF's own, rows and features) in place
        words = model.get_input_embeddings()(sequence)[0]
        block = slice(0, input_ids.shape[1] - 7)
        engine_embeds = words.clone()
        engine_embeds[block] = merged.inputs_embeds[0, block]
        generated = torch.arange(sequence.shape[1]) >= input_ids.shape[1]
        embeds, router = step_embeddings(CONFIG, model.special_token_embedding, engine_embeds, sequence[0], generated)
    assert torch.equal(embeds, merged.inputs_embeds[0])
    assert torch.equal(router.visual_index, merged.visual_token_mask[0].nonzero().squeeze(1))


def test_each_forward_checks_the_image_grid_once(monkeypatch):
    model = tiny_model()
    input_ids, pixel_values, grid = image_prompt()
    calls = []
    check = modeling_navil.check_image_grid
    monkeypatch.setattr(modeling_navil, "check_image_grid", lambda *args: calls.append(1) or check(*args))
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "types, message",
    [
        (torch.zeros(1, 3, dtype=torch.long), r"mm_token_type_ids have shape \(1, 3\) but the tokens are"),
        (torch.zeros(1, 4), "mm_token_type_ids must be an integer tensor, got torch.float32"),
    ],
)
def test_token_types_of_another_shape_or_dtype_are_refused(types, message):
    with pytest.raises(NaViLInputError, match=message):
        tiny_model()(input_ids=torch.tensor([[3, 4, 5, 6]]), mm_token_type_ids=types)
