"""Property-based tests: for any image, prompt, per-call option, config value or damaged weight file, navil returns
consistent outputs or a documented ValueError; generation with the KV cache equals generation without it.

The generators and checks live in navil/testing/fuzzing.py; benchmarks/fuzz.py runs them with a large budget.
"""

from conftest import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st

from navil.testing.fuzzing import (
    CI_SETTINGS,
    chat_settings_cases,
    check_chat_settings_case,
    check_cli_case,
    check_collator_case,
    check_config_case,
    check_config_file_case,
    check_end_to_end,
    check_generation_case,
    check_image_case,
    check_jsonl_case,
    check_option_case,
    check_preprocessor_file_case,
    check_prompt_case,
    check_weight_case,
    cli_cases,
    collator_cases,
    config_cases,
    config_file_cases,
    generation_cases,
    image_cases,
    jsonl_cases,
    option_cases,
    preprocessor_file_cases,
    prompt_cases,
    weight_cases,
)


@settings(CI_SETTINGS, max_examples=150)
@given(case=image_cases(), multiscale=st.booleans())
def test_any_image_gives_consistent_tensors_or_a_documented_error(processor, case, multiscale):
    check_image_case(processor, case, multiscale)


@settings(CI_SETTINGS, max_examples=150)
@given(case=prompt_cases())
def test_any_prompt_and_image_count_gives_consistent_tensors_or_the_predicted_error(processor, case):
    check_prompt_case(processor, case)


@settings(CI_SETTINGS, max_examples=80)
@given(case=option_cases())
def test_any_per_call_processor_option_gives_bounded_outputs_or_a_documented_error(processor, case):
    check_option_case(processor, case)


@settings(CI_SETTINGS, max_examples=40)
@given(cases=st.lists(image_cases(), max_size=2), question=st.text(min_size=1, max_size=20))
def test_forward_runs_on_any_processor_output(model, processor, cases, question):
    check_end_to_end(model, processor, cases, question)


@settings(CI_SETTINGS, max_examples=15)
@given(case=generation_cases())
def test_generation_with_the_cache_equals_generation_without_it_on_any_prompt(model, processor, case):
    check_generation_case(model, processor, case)


@settings(CI_SETTINGS, max_examples=60)
@given(case=config_cases())
def test_any_config_value_is_refused_naming_its_field_or_builds_a_model_that_runs(case):
    check_config_case(case)


@settings(CI_SETTINGS, max_examples=25)
@given(case=weight_cases())
def test_any_damaged_weight_file_is_refused_naming_it_or_loads_as_documented(case):
    check_weight_case(GOLDEN / "qwen3_ve", case)


@settings(CI_SETTINGS, max_examples=40)
@given(case=chat_settings_cases())
def test_any_chat_generation_settings_give_a_reply_or_a_documented_error(model, golden_tokenizer, case):
    check_chat_settings_case(model, golden_tokenizer, case)


@settings(CI_SETTINGS, max_examples=60)
@given(case=jsonl_cases())
def test_any_jsonl_file_gives_its_examples_or_a_documented_error_naming_it(case):
    check_jsonl_case(case)


@settings(CI_SETTINGS, max_examples=40)
@given(case=collator_cases())
def test_any_collator_batch_gives_consistent_tensors_or_a_documented_error(processor, case):
    check_collator_case(processor, case)


@settings(CI_SETTINGS, max_examples=100)
@given(case=cli_cases())
def test_any_navil_command_line_parses_or_is_refused_naming_the_flag(case):
    check_cli_case(case)


@settings(CI_SETTINGS, max_examples=60)
@given(case=preprocessor_file_cases())
def test_any_saved_preprocessor_config_keeps_navils_bounds_or_is_refused_naming_the_field(case):
    check_preprocessor_file_case(GOLDEN.parents[2] / "checkpoints" / "navil-tiny", case)


@settings(CI_SETTINGS, max_examples=30)
@given(case=config_file_cases())
def test_any_config_file_size_is_refused_before_loading_or_matches_the_weights(case):
    check_config_file_case(GOLDEN / "qwen3_ve", case)
