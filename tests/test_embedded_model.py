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
from navil.cli import main
from navil.convert_navil import CODE_FILES
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
        f"import sys; from navil.cli import main; sys.exit(main({arguments + ['--max-new-tokens', '16']!r}))"
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
