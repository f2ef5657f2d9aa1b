"""The embedded tiny NaViL (`checkpoints/navil-tiny`): the README's first command gives the expected answer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

import navil
from navil.configuration_navil import CODE_FILES
from navil.tools.cli import main
from navil.training.synthetic_data import example_sample

PACKAGE = Path(navil.__file__).parent
CHECKPOINT = PACKAGE / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = PACKAGE / "examples" / "shapes.png"
EXAMPLE = json.loads((PACKAGE / "examples" / "shapes.json").read_text())

needs_checkpoint = pytest.mark.skipif(not CHECKPOINT.is_dir(), reason="checkpoints/navil-tiny is not trained yet")


def test_example_files_are_the_dataset_example():
    sample = example_sample()
    assert EXAMPLE == {"question": sample.question, "answer": sample.answer}
    assert np.array_equal(np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB")), np.asarray(sample.image))


@needs_checkpoint
def test_chat_answers_the_readme_example():
    from transformers import AutoTokenizer

    from navil import NaViLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    reply = model.chat(tokenizer, str(EXAMPLE_IMAGE), EXAMPLE["question"], dict(max_new_tokens=16, do_sample=False))
    assert reply == EXAMPLE["answer"]


@needs_checkpoint
def test_navil_chat_command_prints_the_expected_answer(capsys):
    assert main(["chat", "--image", str(EXAMPLE_IMAGE), EXAMPLE["question"], "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == EXAMPLE["answer"]


def run_without_stdin(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter whose stdin is closed (a prompt for remote code would fail there)."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr  # transformers' prompt goes to stdout, its advice to stderr
    assert "trust_remote_code" not in output and "custom code" not in output
    return result


@needs_checkpoint
def test_navil_chat_with_another_model_folder_answers_without_a_remote_code_prompt(tmp_path):
    folder = shutil.copytree(CHECKPOINT, tmp_path / "my-navil")
    arguments = ["chat", "--model", str(folder), "--image", str(EXAMPLE_IMAGE), EXAMPLE["question"]]
    result = run_without_stdin(
        f"import sys; from navil.tools.cli import main; sys.exit(main({arguments + ['--max-new-tokens', '16']!r}))"
    )
    assert result.stdout.strip() == EXAMPLE["answer"]


@needs_checkpoint
def test_processor_of_a_saved_folder_loads_without_a_remote_code_prompt(tmp_path):
    folder = shutil.copytree(CHECKPOINT, tmp_path / "my-navil")
    result = run_without_stdin(
        "from navil.processing_navil import NaViLProcessor; "
        f"print(len(NaViLProcessor.from_pretrained({str(folder)!r}).tokenizer))"
    )
    assert int(result.stdout) == len(AutoTokenizer.from_pretrained(CHECKPOINT, trust_remote_code=True))


@needs_checkpoint
def test_embedded_checkpoint_loads_with_the_auto_classes():
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(EXAMPLE_IMAGE)}, {"type": "text", "text": EXAMPLE["question"]}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert processor.decode_reply(output[0, inputs["input_ids"].shape[1] :]) == EXAMPLE["answer"]


@needs_checkpoint
def test_embedded_checkpoint_is_at_most_20_megabytes():
    assert sum(path.stat().st_size for path in CHECKPOINT.rglob("*") if path.is_file()) <= 20 * 1024 * 1024


@needs_checkpoint
@pytest.mark.parametrize("module", CODE_FILES)
def test_embedded_checkpoint_carries_the_current_remote_code(module):
    # AutoModel(..., trust_remote_code=True) runs these copies; they must not fall behind the package
    assert (CHECKPOINT / module).read_text() == (PACKAGE / module).read_text()


# Issue #22's targets: in-range accuracy per question type, and overall accuracy (words aside) out of the size range
# and on shapes drawn by another program; asserted on a fixed 100-question seed.
IN_RANGE_FLOORS = {"color": 0.95, "shape": 0.90, "count": 0.98, "describe": 0.85, "position": 0.85}
HELD_OUT_FLOORS = {"out_of_range": 0.80, "drawn": 0.90}


@pytest.fixture(scope="module")
def embedded():
    from navil import NaViLForConditionalGeneration
    from navil.training import navil_processor

    model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    return model, navil_processor(model.config, AutoTokenizer.from_pretrained(CHECKPOINT))


@needs_checkpoint
def test_embedded_model_meets_the_in_range_accuracy_floors(embedded):
    from navil.training import evaluate

    accuracy = evaluate(*embedded, num_questions=100, seed=4242, question_types=tuple(IN_RANGE_FLOORS))
    assert {kind: accuracy[kind] >= floor for kind, floor in IN_RANGE_FLOORS.items()} == dict.fromkeys(
        IN_RANGE_FLOORS, True
    ), accuracy


@needs_checkpoint
@pytest.mark.parametrize("held_out", list(HELD_OUT_FLOORS))
def test_embedded_model_meets_the_held_out_accuracy_floors(embedded, held_out):
    from navil.training import evaluate
    from navil.training.drawn_shapes import DrawnShapesDataset
    from navil.training.synthetic_data import OUT_OF_RANGE_SIZES

    if held_out == "drawn":
        accuracy = evaluate(*embedded, num_questions=100, data=DrawnShapesDataset(seed=4242))
    else:
        types = tuple(IN_RANGE_FLOORS)  # words are reported, not targeted (docs/training.md)
        accuracy = evaluate(
            *embedded, num_questions=100, seed=4242, size_range=OUT_OF_RANGE_SIZES, question_types=types
        )
    assert accuracy["all"] >= HELD_OUT_FLOORS[held_out], accuracy
