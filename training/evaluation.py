"""Exact-match accuracy of a model on freshly generated questions, per question type."""

from collections.abc import Mapping
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..modeling_navil import NaViLForConditionalGeneration
from ..processing_navil import NaViLProcessor
from .collators import end_of_turn_id
from .synthetic_data import QUESTION_TYPES, TRAIN_SIZE_RANGE, ShapesDataset


@torch.no_grad()
def answer_questions(
    model: NaViLForConditionalGeneration,
    processor: NaViLProcessor,
    images: list,
    questions: list[str],
    batch_size: int = 32,
    multiscale: bool = True,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy replies to (image, question) pairs in left-padded batches (the replies of `model.chat` one by one)."""
    replies = []
    end_id = end_of_turn_id(processor)
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        prompts = [processor.build_prompt(question, num_images=1) for question in questions[chunk]]
        inputs = processor(images=images[chunk], text=prompts, multiscale=multiscale, return_tensors="pt")
        inputs = inputs.to(model.device)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id, pad_token_id=end_id
        )
        replies += processor.decode_reply(output[:, inputs["input_ids"].shape[1] :])
    return replies


def evaluate(
    model: NaViLForConditionalGeneration,
    processor: NaViLProcessor,
    num_questions: int = 600,
    seed: int = 1234,
    size_range=TRAIN_SIZE_RANGE,
    batch_size: int = 32,
    multiscale: bool = True,
    question_types: Iterable[str] = QUESTION_TYPES,
    progress: bool = False,
    data=None,
) -> dict[str, float]:
    """Exact-match accuracy per question type (and "all") on `num_questions` freshly generated questions.

    Questions cycle through `question_types`; images come from `ShapesDataset(seed, size_range)` (use a seed other
    than training's 0, and `OUT_OF_RANGE_SIZES` for sizes outside the training range). `data` replaces that dataset
    (then `seed`, `size_range` and `question_types` are not used): any object whose `data[index]` is a `Sample` and
    whose `question_types` lists its types, such as `DrawnShapesDataset` (`navil eval --drawn`).
    """
    if data is None:
        data = ShapesDataset(seed=seed, size_range=size_range, question_types=tuple(question_types))
    samples = [data[index] for index in range(num_questions)]
    replies = []
    bar = tqdm(range(0, num_questions, batch_size), desc="eval", disable=not progress, dynamic_ncols=True)
    for start in bar:
        chunk = samples[start : start + batch_size]
        replies += answer_questions(
            model,
            processor,
            [sample.image for sample in chunk],
            [sample.question for sample in chunk],
            batch_size=batch_size,
            multiscale=multiscale,
        )
    correct, total = {}, {}
    for sample, reply in zip(samples, replies):
        total[sample.question_type] = total.get(sample.question_type, 0) + 1
        correct[sample.question_type] = correct.get(sample.question_type, 0) + int(reply == sample.answer)
    accuracy = {kind: correct[kind] / total[kind] for kind in data.question_types if kind in total}
    accuracy["all"] = sum(correct.values()) / max(sum(total.values()), 1)
    return accuracy


def format_accuracy(accuracy: Mapping[str, float]) -> str:
    """A one-line summary: "color 100.0% | shape 98.3% | … | all 97.5%"."""
    return " | ".join(f"{kind} {100 * value:.1f}%" for kind, value in accuracy.items())
