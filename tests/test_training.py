"""Training code of the embedded model: synthetic data, tokenizer, batches, upcycling and the training loop."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3ForCausalLM

from navil.configuration_navil import SPECIAL_TOKEN_EMBEDDING_ROWS
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.testing import TINY_VISION
from navil.training import (
    TOKENIZER_DIR,
    Conversation,
    TrainingArguments,
    build_tokenizer,
    collate_conversations,
    collate_question_branches,
    load_tokenizer,
    navil_processor,
    question_batches,
    set_text_weights_trainable,
    tiny_config,
    tiny_navil_config,
    tiny_text_config,
    train_loop,
    train_tiny_navil,
    upcycle_from_text_model,
)
from navil.training.synthetic_data import (
    COLORS,
    NUMBER_WORDS,
    OUT_OF_RANGE_SIZES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SIZE_RANGE,
    ShapesDataset,
    example_sample,
)

# The recipe on the ViT of the tiny test config (navil.testing) and a language model of that ViT's width, depth and
# heads, with one key/value head.
MINIATURE = TrainingArguments(
    **{f"vision_{name}": value for name, value in TINY_VISION.items()},
    **{
        name: TINY_VISION[name]
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    },
    num_key_value_heads=1,
    head_dim=16,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return navil_processor(
        tiny_navil_config(MINIATURE, tiny_text_config(MINIATURE, len(tokenizer)), tokenizer), tokenizer
    )


def miniature_models(tokenizer, seed=0):
    torch.manual_seed(seed)
    text_config = tiny_text_config(MINIATURE, len(tokenizer))
    text_model = Qwen3ForCausalLM(text_config).eval()
    for name, parameter in text_model.named_parameters():
        if "norm" in name:  # non-trivial norms, so that a norm copied to the wrong place shows
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
    model = NaViLForConditionalGeneration(tiny_navil_config(MINIATURE, text_config, tokenizer)).eval()
    model.init_special_token_ids(tokenizer)
    return text_model, model


# -- data --------------------------------------------------------------------------------------------------------


def test_dataset_items_are_deterministic_and_seed_dependent():
    first, again, other = ShapesDataset(seed=3)[7], ShapesDataset(seed=3)[7], ShapesDataset(seed=4)[7]
    assert (first.question, first.answer, first.scene) == (again.question, again.answer, again.scene)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.scene != other.scene


def test_dataset_cycles_through_question_types_with_answerable_scenes():
    data = ShapesDataset(seed=0)
    samples = [data[index] for index in range(4 * len(QUESTION_TYPES))]
    assert [sample.question_type for sample in samples[: len(QUESTION_TYPES)]] == list(QUESTION_TYPES)
    for sample in samples:
        shapes = sample.scene.shapes
        assert len({shape.kind for shape in shapes}) == len({shape.color for shape in shapes}) == len(shapes)
        assert [shape.center[0] for shape in shapes] == sorted(shape.center[0] for shape in shapes)
        if sample.question_type == "position":
            assert len(shapes) >= 2 and sample.answer in ("left", "right")
        if sample.question_type == "ocr":
            assert sample.answer == sample.scene.word
        if sample.question_type == "describe":
            assert sample.answer.count(" a ") + sample.answer.count(" an ") + 1 == len(shapes)


def test_training_questions_are_every_question_the_scene_allows():
    data = ShapesDataset(seed=0)
    for index in range(60):
        image, questions = data.questions(index)
        kinds = [kind for _, _, kind in questions]
        count = next(answer for _, answer, kind in questions if kind == "count")
        shapes = NUMBER_WORDS.index(count)
        assert kinds.count("color") == kinds.count("shape") == shapes
        assert kinds.count("count") == kinds.count("describe") == 1
        assert kinds.count("position") == (0 if shapes == 1 else 2)
        assert kinds.count("ocr") <= 1 and len(set(questions)) == len(questions)
        assert {answer for _, answer, kind in questions if kind == "color"} <= set(COLORS)
        assert {answer for _, answer, kind in questions if kind == "shape"} <= set(SHAPES)
        assert all(TRAIN_SIZE_RANGE[0] <= side <= TRAIN_SIZE_RANGE[1] for side in image.size)


def test_training_questions_can_ask_about_every_ordered_pair_of_shapes():
    for index in range(30):
        _, questions = ShapesDataset(seed=0, position_questions=6).questions(index)
        pairs = {question for question, _, kind in questions if kind == "position"}
        shapes = NUMBER_WORDS.index(next(answer for _, answer, kind in questions if kind == "count"))
        assert len(pairs) == shapes * (shapes - 1)


@pytest.mark.parametrize("question_types", [("ocr",), ("position",), ("position", "ocr")])
def test_training_questions_restricted_to_conditional_types_are_never_empty(question_types):
    data = ShapesDataset(seed=0, question_types=question_types)
    for index in range(20):
        _, questions = data.questions(index, num_shapes=1)
        assert questions and {kind for _, _, kind in questions} <= set(question_types)


def test_single_shape_training_questions_ask_only_what_one_shape_allows():
    data = ShapesDataset(seed=0)
    kinds = set()
    for index in range(60):
        _, questions = data.questions(index, num_shapes=1)
        kinds |= {kind for _, _, kind in questions}
        assert all(answer == "one" for _, answer, kind in questions if kind == "count")
        assert all(" and " not in answer for _, answer, kind in questions if kind == "describe")
    assert kinds == set(QUESTION_TYPES) - {"position"}


def test_image_sizes_stay_in_the_training_range_and_held_out_sizes_outside_it():
    low, high = TRAIN_SIZE_RANGE
    for index in range(30):
        assert all(low <= side <= high for side in ShapesDataset(seed=0)[index].image.size)
        held_out = ShapesDataset(seed=1, size_range=OUT_OF_RANGE_SIZES)[index].image.size
        assert all(side < low or side > high for side in held_out)


def test_example_image_answers_its_question():
    sample = example_sample()
    assert sample.question == "What color is the circle?"
    assert sample.answer in [shape.color for shape in sample.scene.shapes if shape.kind == "circle"]


# -- tokenizer and batches -----------------------------------------------------------------------------------------


def test_rebuilt_tokenizer_equals_the_packaged_one(tmp_path):
    build_tokenizer(tmp_path)
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    packaged = json.loads((Path(TOKENIZER_DIR) / "tokenizer.json").read_text())
    assert rebuilt == packaged


def test_tokenizer_has_the_navil_special_tokens_appended_and_no_bos(tokenizer):
    vocab = tokenizer.get_vocab()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer("red")["input_ids"] == [vocab["red"]]
    special_ids = [vocab[token] for token in SPECIAL_TOKEN_EMBEDDING_ROWS]
    assert min(special_ids) > max(vocab[token] for token in ("red", "circle", "cat"))


def test_labels_cover_exactly_the_answers_and_their_end_of_turn(processor, tokenizer):
    sample = ShapesDataset(seed=0)[3]
    conversations = [
        Conversation(sample.image, [(sample.question, sample.answer)]),
        Conversation(None, [("Say red.", "red"), ("And blue?", "blue")]),
    ]
    batch = collate_conversations(processor, conversations)
    labels = batch["labels"]
    assert tokenizer.decode(labels[0][labels[0] != -100]) == sample.answer + "<|im_end|>"
    assert tokenizer.decode(labels[1][labels[1] != -100]) == "red<|im_end|>blue<|im_end|>"
    second = batch["input_ids"][1][batch["attention_mask"][1] == 1]
    expected = processor.build_prompt("And blue?", history=[("Say red.", "red")]) + "blue<|im_end|>"
    assert tokenizer.decode(second) == expected
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((batch["input_ids"] == context).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4


def test_each_question_branch_is_computed_exactly_as_chat_asks_that_question_alone(processor, tokenizer):
    _, model = miniature_models(tokenizer)
    data = ShapesDataset(seed=0, size_range=(64, 96))
    examples = [data.questions(index) for index in range(2)]
    batch = collate_question_branches(
        processor, [Conversation(image, [q[:2] for q in questions]) for image, questions in examples], [True, False]
    )
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        branched = model(**batch).logits
        for row, ((image, questions), multiscale) in enumerate(zip(examples, [True, False])):
            answers = []
            for question, answer, _ in questions:
                prompt = processor.build_prompt(question, num_images=1)
                inputs = processor(images=[image], text=[prompt], multiscale=multiscale, return_tensors="pt")
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
                ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
                alone = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0]
                # the branch is the prompt after </img>, then the answer; find where it sits in the packed row
                prefix = int((ids[0] == tokenizer.convert_tokens_to_ids("</img>")).nonzero()) + 1
                branch = ids[0, prefix:].tolist()
                packed = batch["input_ids"][row].tolist()
                start = next(i for i in range(prefix, len(packed)) if packed[i : i + len(branch)] == branch)
                torch.testing.assert_close(branched[row, :prefix], alone[:prefix])
                torch.testing.assert_close(branched[row, start : start + len(branch)], alone[prefix:])
                answers.append(answer + "<|im_end|>")
            labels = batch["labels"][row]
            assert tokenizer.decode(labels[labels != -100]) == "".join(answers)


# -- upcycling -----------------------------------------------------------------------------------------------------


def test_upcycling_copies_text_weights_into_both_experts(tokenizer):
    text_model, model = miniature_models(tokenizer)
    report = upcycle_from_text_model(text_model, model)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.special_token_rows == list(SPECIAL_TOKEN_EMBEDDING_ROWS)
    text = text_model.state_dict()
    navil = model.state_dict()
    for key, value in text.items():
        assert torch.equal(navil[f"language_model.{key}"], value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        assert torch.equal(
            navil[f"language_model.model.layers.1.self_attn.{name}_ve.weight"],
            text[f"model.layers.1.self_attn.{name}.weight"],
        )
    assert torch.equal(
        navil["language_model.model.layers.0.mlp_ve.up_proj.weight"], text["model.layers.0.mlp.up_proj.weight"]
    )
    embeddings = text["model.embed_tokens.weight"]
    for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS):
        assert torch.equal(
            model.special_token_embedding.weight[row], embeddings[tokenizer.convert_tokens_to_ids(token)]
        )


def test_upcycled_model_gives_the_text_model_logits_on_text(tokenizer, processor):
    text_model, model = miniature_models(tokenizer)
    upcycle_from_text_model(text_model, model)
    prompt = processor.build_prompt("Where is the <ref>red circle</ref>? <box> <img> </img>")
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = text_model(input_ids).logits
        actual = model(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_upcycling_reports_missing_and_unexpected_keys(tokenizer):
    text_model, model = miniature_models(tokenizer)
    state = text_model.state_dict()
    del state["model.layers.0.mlp.down_proj.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: .*layers\.0\.mlp\.down_proj.* unexpected: .*mlp\.extra"):
        upcycle_from_text_model(state, model)
    report = upcycle_from_text_model(state, model, strict=False)
    assert report.missing_keys == [
        "language_model.model.layers.0.mlp.down_proj.weight",
        "language_model.model.layers.0.mlp_ve.down_proj.weight",
    ]
    assert report.unexpected_keys == ["model.layers.0.mlp.extra.weight"]


def test_upcycling_rejects_a_text_model_of_another_shape(tokenizer):
    _, model = miniature_models(tokenizer)
    other = Qwen3ForCausalLM(tiny_text_config(TrainingArguments(hidden_size=48, head_dim=16), len(tokenizer)))
    with pytest.raises(ValueError, match="does not match"):
        upcycle_from_text_model(other, model)


def test_upcycling_handles_the_internlm2_layout_and_tied_heads(tokenizer):
    config = tiny_config(
        "internlm2",
        len(tokenizer),
        vision=dict(num_hidden_layers=1, fullatt_block_indexes=None),
        text=dict(hidden_size=32, intermediate_size=64),
    )
    torch.manual_seed(0)
    source = NaViLForConditionalGeneration(config).language_model.state_dict()
    text_state = {key: value for key, value in source.items() if "_ve." not in key and key != "output.weight"}
    assert "model.layers.1.attention.wqkv.weight" in text_state and "model.tok_embeddings.weight" in text_state
    torch.manual_seed(1)
    model = NaViLForConditionalGeneration(config)
    upcycle_from_text_model(text_state, model, tokenizer=tokenizer)
    navil = model.language_model.state_dict()
    assert torch.equal(
        navil["model.layers.1.attention.wqkv_ve.weight"], text_state["model.layers.1.attention.wqkv.weight"]
    )
    assert torch.equal(
        navil["model.layers.1.attention.wo_ve.weight"], text_state["model.layers.1.attention.wo.weight"]
    )
    assert torch.equal(
        navil["model.layers.0.feed_forward_ve.w2.weight"], text_state["model.layers.0.feed_forward.w2.weight"]
    )
    assert torch.equal(navil["output.weight"], text_state["model.tok_embeddings.weight"])


# -- training ------------------------------------------------------------------------------------------------------


def train_miniature(tokenizer, processor, steps, seed=0):
    text_model, model = miniature_models(tokenizer, seed)
    upcycle_from_text_model(text_model, model)
    batches = question_batches(processor, ShapesDataset(seed=seed, size_range=(64, 96)), batch_size=4)
    return train_loop(model, batches, steps, learning_rate=3e-3, warmup_ratio=0.1, progress=False)


def test_miniature_model_loss_decreases(tokenizer, processor):
    text_model, model = miniature_models(tokenizer)
    upcycle_from_text_model(text_model, model)
    batch = question_batches(processor, ShapesDataset(seed=0, size_range=(64, 96)), batch_size=6)(0)
    losses = train_loop(model, lambda step: batch, 30, learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_gives_the_same_first_20_losses(tokenizer, processor):
    first = train_miniature(tokenizer, processor, 20)
    assert train_miniature(tokenizer, processor, 20) == first
    assert train_miniature(tokenizer, processor, 1, seed=1) != first[:1]


def test_stage_one_freezing_leaves_only_visual_experts_trainable_in_the_language_model(tokenizer):
    _, model = miniature_models(tokenizer)
    set_text_weights_trainable(model, False)
    trainable = {name for name, parameter in model.language_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("_ve." in name for name in trainable)
    assert all(parameter.requires_grad for parameter in model.vision_model.parameters())
    assert model.special_token_embedding.weight.requires_grad and model.mlp1[1].weight.requires_grad
    set_text_weights_trainable(model, True)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_recipe_runs_every_stage_and_saves_a_model_that_loads_back(tmp_path):
    stages = ("text", "scene", "caption", "single_shape", "qa")
    steps = {f"{name}_steps": 2 for name in stages}
    args = dataclasses.replace(MINIATURE, output_dir=str(tmp_path), eval_every=2, eval_questions=6, **steps)
    model, _, history = train_tiny_navil(args, progress=False, log=lambda message: None)
    assert [len(history[f"{name}_losses"]) for name in stages] == [2] * len(stages)
    assert all(math.isfinite(loss) for name in stages for loss in history[f"{name}_losses"])
    assert [evaluation["step"] for evaluation in history["evaluations"]] == [2]
    summary = json.loads((tmp_path / "training_history.json").read_text())
    assert set(summary["seconds"]) == {*stages, "total"}
    reloaded = NaViLForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
