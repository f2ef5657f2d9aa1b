"""Property-based tests: for any image and prompt the processor returns consistent tensors or a documented ValueError.

The generators and checks live in tests/fuzz_cases.py; benchmarks/fuzz.py runs them with a large budget.
"""

import pytest
from conftest import load_golden_model
from fuzz_cases import (
    CI_SETTINGS,
    check_end_to_end,
    check_image_case,
    check_prompt_case,
    image_cases,
    prompt_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def model(golden_tokenizer):
    return load_golden_model("qwen3_ve", golden_tokenizer)


@pytest.fixture(scope="module")
def processor(model, golden_tokenizer):
    return model.chat_processor(golden_tokenizer)


@settings(CI_SETTINGS, max_examples=150)
@given(case=image_cases(), multiscale=st.booleans())
def test_any_image_gives_consistent_tensors_or_a_documented_error(processor, case, multiscale):
    check_image_case(processor, case, multiscale)


@settings(CI_SETTINGS, max_examples=150)
@given(case=prompt_cases())
def test_any_prompt_and_image_count_gives_consistent_tensors_or_the_predicted_error(processor, case):
    check_prompt_case(processor, case)


@settings(CI_SETTINGS, max_examples=40)
@given(cases=st.lists(image_cases(), max_size=2), question=st.text(min_size=1, max_size=20))
def test_forward_runs_on_any_processor_output(model, processor, cases, question):
    check_end_to_end(model, processor, cases, question)
