"""The README's commands and snippets as a user runs them: the install and test commands are CI's, the release
matrix is .ci/compat's, the serving venv is built as CI builds it, and the Python fine-tuning snippet runs as written
(with navil[train])."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
CI_COMPAT = (ROOT / ".ci" / "compat").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def commands(block: str) -> list[str]:
    """The commands of a bash block, without comments and blank lines."""
    lines = (line.split("#")[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def test_the_first_two_commands_are_the_embedded_chat_and_the_test_command_ci_runs():
    first, second = commands(code_blocks(README[: README.index("\n## ")], "bash")[0])
    assert first == 'pip install -e . && navil chat --image examples/shapes.png "What color is the circle?"'
    assert second == 'pip install -e ".[test]" && python -m pytest -q tests'
    assert f"({second})" in CI_RUN


def test_the_release_matrix_of_the_readme_is_the_one_ci_compat_runs():
    versions = re.search(r"\|\| versions=\(([^)]*)\)", CI_COMPAT).group(1).split()
    assert versions[-1] == "newest" and "5.24.0" in versions
    releases = ", ".join(versions[:-1]) + " and the newest"
    compatibility = section("Supported transformers releases")
    block = code_blocks(compatibility, "bash")[0]
    assert f"# {releases} release" in block
    sentence = re.sub(r" \([^)]*\)", "", compatibility.split("throw-away venv per release — ")[1].split(":")[0])
    assert " ".join(sentence.split()) == releases


def test_the_serving_venv_is_built_as_ci_builds_it_and_torchvision_stays_out():
    serving = section("Serving with vLLM")
    steps = commands(code_blocks(serving, "bash")[0])
    venv = steps[0].split()[-1]
    assert steps[:3] == [
        f"python -m venv {venv}",
        f'{venv}/bin/pip install -e ".[vllm,test]"',
        f"{venv}/bin/pip uninstall -y torchvision torchaudio torchcodec",
    ]
    assert (
        'python -m venv "$vllm_venv"' in CI_RUN
        and '"$vllm_venv/bin/pip" install --quiet -e "$repo[vllm,test]"' in CI_RUN
    )
    assert '"$vllm_venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec' in CI_RUN
    assert "pip install torchvision" not in README and 'pip install -e ".[vllm,test]" &&' not in README


def test_the_python_fine_tuning_snippet_runs_as_written(tmp_path):
    for package in ("datasets", "trl", "peft"):
        pytest.importorskip(package)
    snippet = code_blocks(section("Fine-tuning"), "python")[0]
    # its paths are relative to the clone; its outputs (runs/) go to a folder of the test's
    for name in ("checkpoints", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "runs").is_dir()


def epoch_means(history: list) -> list[float]:
    """The mean training loss of each epoch of a `log_history`."""
    epochs = {}
    for entry in history:
        if "loss" in entry:
            epochs.setdefault(math.ceil(entry["epoch"] - 1e-9), []).append(entry["loss"])
    return [sum(losses) / len(losses) for _, losses in sorted(epochs.items())]


def test_the_lora_example_lowers_the_loss_and_changes_no_reply_as_the_readme_says(tmp_path):
    pytest.importorskip("peft")
    from navil import NaViLForConditionalGeneration
    from navil.processing_navil import load_navil_tokenizer
    from navil.training import load_jsonl

    assert "the merged model gives the base model's\nreply to every question of the example data" in README
    line = next(line for line in README.splitlines() if "--output-dir runs/lora --lora both" in line)
    arguments = commands(line)[0].split()[1:]
    arguments[arguments.index("runs/lora")] = str(tmp_path / "lora")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "navil.tools.cli", *arguments, "--quiet"]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env=env, timeout=1200)
    means = epoch_means(json.loads((tmp_path / "lora" / "log_history.json").read_text()))
    assert len(means) == 3 and means[-1] < means[0]
    tokenizer = load_navil_tokenizer(ROOT / "checkpoints" / "navil-tiny")
    base = NaViLForConditionalGeneration.from_pretrained(ROOT / "checkpoints" / "navil-tiny").eval()
    tuned = NaViLForConditionalGeneration.from_pretrained(tmp_path / "lora").eval()
    data = ROOT / "examples" / "finetune" / "train.jsonl"
    for example in load_jsonl(data):
        content = example["messages"][0]["content"]
        question = content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")
        images = [str(data.parent / image) for image in example.get("images", [])] or None
        settings = dict(max_new_tokens=16, do_sample=False)
        replies = [model.chat(tokenizer, images, question, settings) for model in (base, tuned)]
        assert replies[0] == replies[1], question
