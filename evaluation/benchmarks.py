"""The prompts of the benchmarks in the NaViL paper, as VLMEvalKit builds them for InternVL-family models.

The NaViL repository publishes no evaluation wrapper; its demo (`generate(message, model, tokenizer)`) keeps the
message format and the `upscale` option of InternVL's VLMEvalKit wrapper, from the same lab. The prompt suffixes
below are that wrapper's (`InternVLChat.build_prompt`); docs/evaluation.md marks which settings are the demo's, which
are InternVL's, and which are unknown.
"""

import math
from typing import Optional

SINGLE_WORD_SUFFIX = "\nAnswer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OPTION_LETTER_SUFFIX_CN = "\n请直接回答选项字母。"
DIRECT_ANSWER_SUFFIX = "\nAnswer the question directly."
DIRECT_ANSWER_SUFFIX_CN = "\n请直接回答问题。"
DETAIL_SUFFIX = "\nAnswer this question in detail."
YES_NO_SUFFIX = " Please answer yes or no. Answer the question using a single word or phrase."

# VQA datasets (VLMEvalKit names, matched as substrings) whose question gets SINGLE_WORD_SUFFIX or nothing; other VQA
# datasets get SINGLE_WORD_SUFFIX too.
SHORT_ANSWER_VQA = ("OCRVQA", "TextVQA", "ChartQA", "DocVQA", "InfoVQA", "OCRBench", "DUDE", "SLIDEVQA", "GQA")
FREE_FORM_VQA = ("MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MathVerse", "MMDU", "CRPE", "MIA-Bench")
DETAILED_VQA = ("LLaVABench", "WildVision")
# Benchmarks whose first image is enlarged 2x (bilinear) before preprocessing, as InternVL's wrapper does for MMMU.
UPSCALED_FIRST_IMAGE = ("MMMU",)


def _names(dataset: Optional[str], names) -> bool:
    return dataset is not None and any(name in dataset for name in names)


def _given(line, key: str) -> bool:
    """Whether the row `line` (a dict or a pandas row) has a value for `key` (not missing, not NaN)."""
    if key not in line:
        return False
    value = line[key]
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


def benchmark_prompt(line, dataset: Optional[str], dataset_type: Optional[str]) -> str:
    """The question text for one benchmark row: VLMEvalKit's `line` (`question`, and for multiple choice `hint` and
    option columns `A`, `B`, ...), the dataset's name and its VLMEvalKit type (`"Y/N"`, `"MCQ"`, `"VQA"`, other)."""
    if not _given(line, "question"):
        raise ValueError("A benchmark row needs a 'question' column to build the prompt from.")
    question = str(line["question"])
    if dataset_type == "Y/N":
        if _names(dataset, ("HallusionBench", "AMBER")):
            return question + YES_NO_SUFFIX
        if _names(dataset, ("MME",)):
            return f"{question} {SINGLE_WORD_SUFFIX.lstrip()}"
        return question
    if dataset_type == "MCQ":
        if _given(line, "hint"):
            question = f"{line['hint']}\n{question}"
        options = [letter for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if _given(line, letter)]
        for letter in options:
            question += f"\n{letter}. {line[letter]}"
        chinese = _has_cjk(question)
        if options:
            return question + (OPTION_LETTER_SUFFIX_CN if chinese else OPTION_LETTER_SUFFIX)
        return question + (DIRECT_ANSWER_SUFFIX_CN if chinese else DIRECT_ANSWER_SUFFIX)
    if dataset_type == "VQA":
        if _names(dataset, DETAILED_VQA):
            return question + DETAIL_SUFFIX
        if _names(dataset, FREE_FORM_VQA) and not _names(dataset, SHORT_ANSWER_VQA):
            return question
        return question + SINGLE_WORD_SUFFIX
    return question


def upscales_first_image(dataset: Optional[str]) -> bool:
    return _names(dataset, UPSCALED_FIRST_IMAGE)
