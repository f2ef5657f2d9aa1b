"""navil.evaluation without any harness installed: the evaluation engine, the VLMEvalKit wrapper (VLMEvalKit absent)
and the benchmark prompts. The lmms-eval runs are in test_evaluation_lmms_eval.py (a venv with navil[eval])."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "finetune"
IMAGES = sorted(str(path) for path in EXAMPLES.glob("shapes_*.png"))


@pytest.fixture(scope="module")
def wrapper():
    from navil.evaluation.vlmevalkit import NaViLChat

    return NaViLChat(device="cpu", max_new_tokens=32)


def test_importing_navil_and_the_wrapper_tries_no_harness_import():
    # a meta-path finder records every attempt to import a harness, installed or not (even inside try/except)
    code = (
        "import sys\n"
        "tried = []\n"
        "class Recorder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('vlmeval', 'lmms_eval'):\n"
        "            tried.append(name)\n"
        "sys.meta_path.insert(0, Recorder())\n"
        "import navil, navil.evaluation, navil.evaluation.vlmevalkit, navil.evaluation.benchmarks\n"
        "assert not tried, tried\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_inner_on_interleaved_text_image_text_equals_chat(wrapper):
    model, tokenizer = wrapper.engine.model, wrapper.engine.tokenizer
    message = [
        {"type": "text", "value": "Look at the picture."},
        {"type": "image", "value": IMAGES[0]},
        {"type": "text", "value": "What color is the circle?"},
    ]
    reply = wrapper.generate_inner(message, dataset="TextVQA_VAL")
    expected = model.chat(
        tokenizer, IMAGES[0], "Look at the picture.\nWhat color is the circle?", dict(max_new_tokens=32)
    )
    assert reply == expected
    assert reply == "orange"  # the tiny model answers this example right, so the prompt carries the image


@pytest.mark.parametrize("index", range(1, 4))
def test_generate_accepts_vlmevalkit_message_forms_and_equals_chat(wrapper, index):
    model, tokenizer = wrapper.engine.model, wrapper.engine.tokenizer
    question = "Describe the image."
    expected = model.chat(tokenizer, IMAGES[index], question, dict(max_new_tokens=32))
    assert wrapper.generate([{"type": "image", "value": IMAGES[index]}, question]) == expected


def test_mmmu_enlarges_the_first_image_twice(wrapper):
    model, tokenizer = wrapper.engine.model, wrapper.engine.tokenizer
    image = Image.open(IMAGES[2]).convert("RGB")
    larger = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
    message = [{"type": "image", "value": IMAGES[2]}, {"type": "text", "value": "Describe the image."}]
    reply = wrapper.generate_inner(message, dataset="MMMU_DEV_VAL")
    assert reply == model.chat(tokenizer, larger, "Describe the image.", dict(max_new_tokens=32))


@pytest.mark.parametrize(
    "message, problem",
    [
        ([], "non-empty list"),
        ([{"type": "video", "value": "clip.mp4"}], '"type"'),
        ([{"type": "text"}], '"value"'),
        ([{"type": "image", "value": IMAGES[0]}], "no text"),
        ([{"type": "text", "value": 3}], "is text but its value is int"),
    ],
)
def test_malformed_messages_are_refused_with_the_problem_named(wrapper, message, problem):
    with pytest.raises(ValueError, match=problem):
        wrapper.generate(message)


def test_dump_image_without_the_dataset_writer_says_how_vlmevalkit_provides_it(wrapper):
    with pytest.raises(ValueError, match="set_dump_image"):
        wrapper.dump_image({"index": 0, "question": "q"}, "MME")


def test_engine_batch_equals_chat_one_by_one_and_scores_the_greedy_reply():
    from navil.evaluation.engine import NaViLEvalModel

    engine = NaViLEvalModel(device="cpu", max_new_tokens=24)
    questions = ["What color is the circle?", "Describe the image.", "How many shapes are there?"]
    replies = engine.answer(questions, [[image] for image in IMAGES[:3]])
    expected = [
        engine.model.chat(engine.tokenizer, image, question, dict(max_new_tokens=24))
        for question, image in zip(questions, IMAGES[:3])
    ]
    assert replies == expected
    best, greedy = engine.loglikelihood(questions[0], [IMAGES[0]], replies[0])
    worse, not_greedy = engine.loglikelihood(questions[0], [IMAGES[0]], "purple")
    assert greedy and not not_greedy
    assert best > worse


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(min_pixels=10**6, max_pixels=10**5), "min_pixels .* is larger than max_pixels"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_pixels=-1), "max_pixels must be positive"),
    ],
)
def test_engine_refuses_bad_settings(settings, problem):
    from navil.evaluation.engine import NaViLEvalModel

    with pytest.raises(ValueError, match=problem):
        NaViLEvalModel(device="cpu", **settings)


def test_engine_pixel_limits_and_multiscale_reach_the_image_processor():
    from navil.evaluation.engine import NaViLEvalModel
    from navil.image_processing_navil import NaViLImageProcessor

    engine = NaViLEvalModel(device="cpu", min_pixels=32 * 32, max_pixels=64 * 64, multiscale=False)
    inputs = engine.processor(text=["<image>"], images=[IMAGES[0]])
    expected = NaViLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, multiscale=False)(IMAGES[0])
    assert inputs["num_scales"].tolist() == [1]
    assert inputs["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    default = NaViLEvalModel(device="cpu").processor(text=["<image>"], images=[IMAGES[0]])
    assert default["image_grid_thw"].tolist() != expected["image_grid_thw"].tolist()


@pytest.mark.parametrize(
    "line, dataset, dataset_type, expected",
    [
        ({"question": "Is it red?"}, "MME", "Y/N", "Is it red? Answer the question using a single word or phrase."),
        (
            {"question": "Which?", "hint": float("nan"), "A": "cat", "B": "dog", "C": float("nan")},
            "MMBench_DEV_EN",
            "MCQ",
            "Which?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly.",
        ),
        (
            {"question": "Which?", "hint": "Look.", "A": "cat"},
            "AI2D_TEST",
            "MCQ",
            "Look.\nWhich?\nA. cat\nAnswer with the option's letter from the given choices directly.",
        ),
        (
            {"question": "What is written?"},
            "DocVQA_VAL",
            "VQA",
            "What is written?\nAnswer the question using a single word or phrase.",
        ),
        ({"question": "Solve it."}, "MathVista_MINI", "VQA", "Solve it."),
        ({"question": "What is shown?"}, "MMVet", "VQA", "What is shown?"),
    ],
)
def test_benchmark_prompts_follow_internvls_vlmevalkit_suffixes(line, dataset, dataset_type, expected):
    from navil.evaluation.benchmarks import benchmark_prompt

    assert benchmark_prompt(line, dataset, dataset_type) == expected


def test_processor_takes_the_empty_modalities_lmms_eval_passes(wrapper):
    """lmms-eval's `huggingface` model calls processor(text=..., images=[...], videos=[], audios=[]), and images=[]
    for text-only requests: empty lists are no input."""
    processor = wrapper.engine.processor
    text = [processor.build_prompt("What color is the circle?", num_images=1)]
    plain = processor(text=text, images=[IMAGES[0]], return_tensors="pt")
    harness = processor(text=text, images=[IMAGES[0]], videos=[], audios=[], return_tensors="pt")
    assert plain.keys() == harness.keys()
    assert all(bool((plain[key] == harness[key]).all()) for key in plain)
    text_only = [processor.build_prompt("Hello")]
    assert processor(text=text_only, images=[], videos=[], audios=[])["input_ids"].tolist() == (
        processor(text=text_only)["input_ids"].tolist()
    )
    with pytest.raises(ValueError, match="text and images only; got videos"):
        processor(text=text, images=[IMAGES[0]], videos=["clip.mp4"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (None, {"max_new_tokens": 32, "do_sample": False}),
        (
            {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1},
            {"max_new_tokens": 16, "do_sample": False, "num_beams": 1},
        ),
        (
            {"temperature": 0.7, "top_p": 0.9},
            {"max_new_tokens": 32, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
        ),
        ({"temperature": 0, "do_sample": True}, {"max_new_tokens": 32, "do_sample": False}),
        ({"max_new_tokens": None}, {"max_new_tokens": 32, "do_sample": False}),
    ],
)
def test_harness_generation_settings_become_generate_arguments(wrapper, overrides, expected):
    """Temperature 0 (the harnesses' greedy) drops the sampling settings; a positive one samples."""
    assert wrapper.engine.generation_config(overrides) == expected
