"""Across transformers releases (4.51.0 … newest 5.x): saved folders load on every release, and nothing of ours warns.

Part of the compatibility suite: `.ci/compat` runs it, with the other test files it lists, on each release of the
matrix. The cross-release tests run the other release's interpreter, named by `NAVIL_PYTHON_OLDEST`
(the venv of transformers 4.51.0 that `.ci/compat` creates); without it they are skipped.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import navil

PACKAGE = Path(navil.__file__).parent
CHECKPOINT = PACKAGE / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = PACKAGE / "examples" / "shapes.png"
EXAMPLE = json.loads((PACKAGE / "examples" / "shapes.json").read_text())
OLDEST_PYTHON = os.environ.get("NAVIL_PYTHON_OLDEST")

needs_oldest_release = pytest.mark.skipif(
    not (OLDEST_PYTHON and Path(OLDEST_PYTHON).is_file()),
    reason="NAVIL_PYTHON_OLDEST (the python of a transformers==4.51.0 venv) is not set; .ci/compat creates that venv",
)

# Saves a checkpoint again (model and processor) with the running release; arguments: CHECKPOINT FOLDER.
SAVE = """
    import sys
    from navil import NaViLForConditionalGeneration, NaViLProcessor

    checkpoint, folder = sys.argv[1:3]
    NaViLForConditionalGeneration.from_pretrained(checkpoint).save_pretrained(folder)
    NaViLProcessor.from_pretrained(checkpoint).save_pretrained(folder)
"""

# Loads a folder through the Auto classes (remote code, no navil import) and chats; arguments: FOLDER IMAGE QUESTION.
LOAD_AND_CHAT = """
    import json, sys
    import transformers
    from transformers import AutoModel, AutoProcessor

    folder, image, question = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reply = model.chat(processor.tokenizer, image, question, dict(max_new_tokens=16, do_sample=False))
    print(json.dumps({"transformers": transformers.__version__, "reply": reply}))
"""


def run_python(python: str, script: str, *args) -> subprocess.CompletedProcess:
    """Runs `script` with the interpreter `python`, offline, outside the repository, without stdin."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [python, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def chat_in_fresh_process(python: str, folder: Path) -> dict:
    result = run_python(python, LOAD_AND_CHAT, folder, EXAMPLE_IMAGE, EXAMPLE["question"])
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_oldest_release
def test_folder_saved_here_loads_and_chats_on_transformers_4_51(tmp_path):
    run_python(sys.executable, SAVE, CHECKPOINT, tmp_path)
    result = chat_in_fresh_process(OLDEST_PYTHON, tmp_path)
    assert result["transformers"] == "4.51.0"
    assert result["reply"] == EXAMPLE["answer"]


@needs_oldest_release
def test_folder_saved_on_transformers_4_51_loads_and_chats_here(tmp_path):
    run_python(OLDEST_PYTHON, SAVE, CHECKPOINT, tmp_path)
    result = chat_in_fresh_process(sys.executable, tmp_path)
    assert result["reply"] == EXAMPLE["answer"]


def relative_imports(module: str) -> set[str]:
    """The sibling modules `module` imports (`from .x import ...`)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


@pytest.mark.parametrize(
    "entry", ["configuration_navil", "modeling_navil", "image_processing_navil", "processing_navil"]
)
def test_remote_code_entry_modules_import_every_hub_file_they_need_themselves(entry):
    # the modules auto_map names: for a local folder, transformers 4.x copies only the files such a module imports
    # itself into its module cache, and the load fails on any file that only an imported file imports
    direct = relative_imports(entry)
    needed, pending = set(), list(direct)
    while pending:
        module = pending.pop()
        if module not in needed:
            needed.add(module)
            pending.extend(relative_imports(module))
    assert needed - {entry} <= direct


def saved_processor_folder(tmp_path):
    from navil import NaViLProcessor

    NaViLProcessor.from_pretrained(CHECKPOINT).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("folder", [saved_processor_folder, lambda tmp_path: CHECKPOINT], ids=["saved", "embedded"])
def test_processor_files_are_in_the_form_every_release_reads(folder, tmp_path):
    folder = folder(tmp_path)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    processor_config = json.loads((folder / "processor_config.json").read_text())
    image_processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    # 4.x knows no "TokenizersBackend" and reads extra special tokens only as a dict
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    assert "<IMG_CONTEXT>" in tokenizer_config["additional_special_tokens"]
    # 4.x passes every key of processor_config.json to __init__ and reads the image processor from its own file
    assert "image_processor" not in processor_config
    assert image_processor_config["image_processor_type"] == "NaViLImageProcessor"
    # a string: 4.51 … 5.0 read a list here as one class reference and fail (the fast class is picked by navil's
    # processor and, from 5.25, by the backend registered in AutoImageProcessor)
    assert image_processor_config["auto_map"]["AutoImageProcessor"] == "image_processing_navil.NaViLImageProcessor"


def test_processor_tokenizer_pads_on_the_left():
    from transformers import AutoTokenizer

    from navil import NaViLProcessor

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    tokenizer.padding_side = "right"
    assert NaViLProcessor(tokenizer=tokenizer).tokenizer.padding_side == "left"
    assert NaViLProcessor.from_pretrained(CHECKPOINT).tokenizer.padding_side == "left"


def test_auto_tokenizer_loads_the_checkpoint_without_asking_for_remote_code():
    result = run_python(
        sys.executable,
        f"""
        import navil
        from transformers import AutoTokenizer
        print(len(AutoTokenizer.from_pretrained({str(CHECKPOINT)!r})))
        """,
    )
    output = result.stdout + result.stderr  # transformers' prompt goes to stdout, its advice to stderr
    assert "trust_remote_code" not in output and "custom code" not in output
    assert int(result.stdout.strip().splitlines()[-1]) > 0


def test_navil_chat_prints_no_deprecation_warning():
    arguments = ["chat", "--image", str(EXAMPLE_IMAGE), EXAMPLE["question"], "--max-new-tokens", "16"]
    result = run_python(
        sys.executable,
        f"import sys, warnings; warnings.simplefilter('always'); from navil.tools.cli import main; sys.exit(main({arguments!r}))",
    )
    assert result.stdout.strip() == EXAMPLE["answer"]
    warnings = [line for line in result.stderr.splitlines() if "deprecat" in line.lower() or "Warning:" in line]
    ours = [line for line in warnings if "past_key_values" in line or "cache" in line or "_navil.py" in line]
    assert not ours, "\n".join(ours)


def test_saved_folder_has_a_model_card_whose_usage_snippet_runs(tmp_path):
    folder = tmp_path / "my-navil"
    run_python(sys.executable, SAVE, CHECKPOINT, folder)
    card = (folder / "README.md").read_text()
    front_matter = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "- navil"):
        assert line in front_matter.splitlines()
    snippet = card.split("```python\n")[1].split("```")[0]
    (tmp_path / "image.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip()
