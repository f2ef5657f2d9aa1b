"""Reliability, round three (issue 33, items 1-7): code runs only when the user asked for it, and small inputs get
bounded memory and time. Each test names the behaviour it checks and fails on the code before the fix."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import GOLDEN

import navil
from navil import cli
from navil.convert_navil import CODE_FILES, convert_checkpoint
from navil.loading_navil import auto_map_modules

EMBEDDED = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
EXAMPLES = Path(navil.__file__).parent / "examples" / "finetune"

# -- 1. which code runs ----------------------------------------------------------------------------------------------


def hostile_module(marker: Path) -> str:
    """Python source that leaves `marker` behind when it is imported."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def hostile_folder(tmp_path):
    """A copy of the embedded model whose own modeling, processing, configuration, image processing and tokenizer
    files write a marker file when imported (the tokenizer's code named by its tokenizer_config.json auto_map)."""
    folder, marker = tmp_path / "model", tmp_path / "marker"
    shutil.copytree(EMBEDDED, folder)
    for name in CODE_FILES:
        (folder / name).write_text(hostile_module(marker))
    (folder / "tokenization_evil.py").write_text(hostile_module(marker))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"]["AutoTokenizer"] = ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, marker


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_navil_chat_and_eval_run_none_of_the_model_folders_code(hostile_folder, command, capsys):
    folder, marker = hostile_folder
    if command == "chat":
        cli.main(["chat", "--model", str(folder), "--max-new-tokens", "2", "Hi"])
    else:
        cli.main(["eval", "--model", str(folder), "--num-questions", "1", "--batch-size", "1", "--quiet"])
    assert capsys.readouterr().out
    assert not marker.exists()


def test_navil_finetune_runs_none_of_the_model_folders_code(hostile_folder, tmp_path):
    folder, marker = hostile_folder
    data = tmp_path / "train.jsonl"
    data.write_text((EXAMPLES / "train.jsonl").read_text().splitlines()[0] + "\n")
    shutil.copy(EXAMPLES / "shapes_0.png", tmp_path / "shapes_0.png")
    output = tmp_path / "tuned"
    cli.main(
        ["finetune", "--model", str(folder), "--data", str(data), "--output-dir", str(output), "--max-steps", "1"]
        + ["--eval-fraction", "0", "--batch-size", "1", "--quiet"]
    )
    assert not marker.exists()
    assert (output / "model.safetensors").is_file()


def test_trust_remote_code_runs_the_folders_own_code_and_only_with_the_flag(hostile_folder):
    folder, marker = hostile_folder
    with pytest.raises(AttributeError):  # the hostile module defines no model class
        cli.main(["chat", "--model", str(folder), "--trust-remote-code", "--max-new-tokens", "2", "Hi"])
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    "reference",
    ["{elsewhere}--modeling_navil.NaViLForConditionalGeneration", "../x--modeling_navil.NaViLForConditionalGeneration"],
)
def test_an_auto_map_pointing_outside_the_folder_is_refused_even_with_trust_remote_code(tmp_path, reference):
    folder, elsewhere, marker = tmp_path / "model", tmp_path / "elsewhere", tmp_path / "marker"
    shutil.copytree(EMBEDDED, folder)
    elsewhere.mkdir()
    (elsewhere / "modeling_navil.py").write_text(hostile_module(marker))
    (elsewhere / "config.json").write_text((EMBEDDED / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = reference.format(elsewhere=elsewhere)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="points outside .* never runs such code, even with --trust-remote-code"):
        cli.main(["chat", "--model", str(folder), "--trust-remote-code", "--max-new-tokens", "2", "Hi"])
    assert not marker.exists()


def test_auto_map_paths_are_refused_and_local_modules_listed(tmp_path):
    shutil.copytree(EMBEDDED, tmp_path / "model")
    assert auto_map_modules(tmp_path / "model")["modeling_navil.py"] == "config.json"
    edit_json(tmp_path / "model" / "preprocessor_config.json", auto_map={"AutoImageProcessor": "../evil.X"})
    with pytest.raises(ValueError, match="preprocessor_config.json has an auto_map entry '../evil.X'"):
        auto_map_modules(tmp_path / "model")


def test_navil_convert_runs_and_copies_none_of_the_tokenizers_code(tmp_path):
    tokenizer, marker = tmp_path / "tokenizer", tmp_path / "marker"
    shutil.copytree(GOLDEN / "tokenizer", tokenizer)
    (tokenizer / "tokenization_evil.py").write_text(hostile_module(marker))
    edit_json(
        tokenizer / "tokenizer_config.json",
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]},
    )
    out = tmp_path / "converted"
    cli.main(["convert", str(GOLDEN / "qwen3_ve"), str(out), "--tokenizer", str(tokenizer)])
    assert not marker.exists()
    assert sorted(path.name for path in out.glob("*.py")) == sorted(CODE_FILES)
    assert "AutoTokenizer" not in json.loads((out / "tokenizer_config.json").read_text()).get("auto_map", {})


def test_convert_with_trust_remote_code_keeps_the_tokenizers_own_code(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(GOLDEN / "tokenizer", tokenizer)
    (tokenizer / "tokenization_navil_test.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass TestTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    reference = "tokenization_navil_test.TestTokenizer"
    edit_json(tokenizer / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, reference]})
    out = convert_checkpoint(GOLDEN / "qwen3_ve", tmp_path / "out", tokenizer, verify=False, trust_remote_code=True)
    assert (out / "tokenization_navil_test.py").is_file()
