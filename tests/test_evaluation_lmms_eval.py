"""lmms-eval end to end, offline: a local image-QA task of 8 questions about the example images (a `datasets` folder
and a task YAML written here), run by the `lmms-eval` command with navil's `navil` model and with lmms-eval's
generic `huggingface` model on checkpoints/navil-tiny. Each reply must equal `model.chat` on the same input.

Needs navil[eval] (CI runs it in a venv of its own); skipped, saying so, where lmms-eval is not installed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install -e '.[eval]'")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "checkpoints" / "navil-tiny"
EXAMPLES = REPO / "examples" / "finetune"
TASK = "navil_shapes_qa"
MAX_NEW_TOKENS = 24
TASK_YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def example_questions() -> list[dict]:
    """One (image, question, answer) per example image (8 items): from the fine-tuning example's single-image
    conversations, the first question about the image, alternately its description and its last other question."""
    questions = {}
    for line in (EXAMPLES / "train.jsonl").read_text().splitlines():
        example = json.loads(line)
        if len(example["images"]) != 1:
            continue
        user, assistant = example["messages"][0], example["messages"][1]
        question = next(block["text"] for block in user["content"] if block["type"] == "text")
        answer = assistant["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        questions.setdefault(example["images"][0], {})[question == "Describe the image."] = (question, answer)
    items = []
    for index, name in enumerate(sorted(questions)):
        question, answer = questions[name].get(index % 2 == 0) or next(iter(questions[name].values()))
        items.append({"image": str(EXAMPLES / name), "question": question, "answer": answer})
    return items


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval_task")
    items = example_questions()
    assert len(items) == 8
    data = datasets.Dataset.from_list(items).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": data}).save_to_disk(str(root / "data"))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=root / "data", max_new_tokens=MAX_NEW_TOKENS)
    )
    return root


def run_lmms_eval(task_dir: Path, name: str, model: str, model_args: str, *extra: str) -> tuple[dict, list[dict]]:
    """Runs the `lmms-eval` command offline; returns the results file and the logged samples (doc order)."""
    output = task_dir / f"out-{name}"
    shutil.rmtree(output, ignore_errors=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(task_dir / "hf_home"),
        HF_HUB_ENABLE_HF_TRANSFER="0",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    command = [
        str(Path(sys.executable).with_name("lmms-eval")),
        "--model", model,
        "--model_args", model_args,
        "--tasks", TASK,
        "--include_path", str(task_dir / "tasks"),
        "--limit", "8",
        "--output_path", str(output),
        "--log_samples",
        *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(output.rglob("*_results.json"))
    samples = sorted(output.rglob(f"*_samples_{TASK}.jsonl"))
    assert results and samples, f"no results or samples under {output}: {sorted(output.rglob('*'))}"
    logged = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return json.loads(results[-1].read_text()), sorted(logged, key=lambda sample: sample["doc_id"])


def reply_of(sample: dict) -> str:
    """The logged reply of a sample (a string, or nested in lists by some lmms-eval releases)."""
    reply = sample["filtered_resps"]
    while isinstance(reply, list):
        reply = reply[0]
    return reply


def chat_replies(model, tokenizer) -> list[str]:
    return [
        model.chat(tokenizer, item["image"], item["question"], dict(max_new_tokens=MAX_NEW_TOKENS))
        for item in example_questions()
    ]


def test_lmms_eval_navil_model_replies_equal_chat_and_write_the_metric_file(task_dir):
    results, samples = run_lmms_eval(
        task_dir, "navil", "navil", f"pretrained={CHECKPOINT},device=cpu,dtype=float32", "--batch_size", "4"
    )
    from navil.cli import load_model

    model, tokenizer = load_model(str(CHECKPOINT), "cpu", "float32")
    expected = chat_replies(model, tokenizer)
    assert [sample["doc_id"] for sample in samples] == list(range(8))
    assert [reply_of(sample) for sample in samples] == expected
    answers = [item["answer"] for item in example_questions()]
    accuracy = sum(reply == answer for reply, answer in zip(expected, answers)) / 8
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy)


def test_lmms_eval_huggingface_model_with_trust_remote_code_replies_equal_chat(task_dir):
    results, samples = run_lmms_eval(
        task_dir,
        "huggingface",
        "huggingface",
        f"pretrained={CHECKPOINT},trust_remote_code=True,device=cpu,device_map=cpu",
        "--batch_size", "4",
    )  # fmt: skip
    from transformers import AutoModel, AutoTokenizer

    # lmms-eval's huggingface model loads in bfloat16; the reference does too
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, trust_remote_code=True)
    assert [reply_of(sample) for sample in samples] == chat_replies(model, tokenizer)
    assert "exact_match,none" in results["results"][TASK]
