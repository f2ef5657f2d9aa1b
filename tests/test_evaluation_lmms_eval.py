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
CHOICE_TASK = "navil_shapes_choice"
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
# The same questions as multiple choice, scored by loglikelihood (the reply, and the other items' replies).
CHOICE_TASK_YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: image
doc_to_text: question
doc_to_choice: choices
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
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
    answers = [item["answer"] for item in items]
    for index, item in enumerate(items):
        item["choices"] = [item["answer"], answers[(index + 1) % 8], answers[(index + 2) % 8]]
    data = datasets.Dataset.from_list(items).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": data}).save_to_disk(str(root / "data"))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=root / "data", max_new_tokens=MAX_NEW_TOKENS)
    )
    (root / "tasks" / f"{CHOICE_TASK}.yaml").write_text(CHOICE_TASK_YAML.format(task=CHOICE_TASK, data=root / "data"))
    return root


def run_lmms_eval(task_dir: Path, name: str, tasks: list[str], *arguments: str) -> tuple[dict, dict]:
    """Runs the `lmms-eval` command offline on `tasks`; returns the results file and each task's logged samples
    (in doc order)."""
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
        *arguments,
        "--tasks", ",".join(tasks),
        "--include_path", str(task_dir / "tasks"),
        "--limit", "8",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    # lmms-eval 0.7.3 exits with 0 after some errors: the written files are the check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(output.rglob("*_results.json"))
    assert results, f"no results file under {output}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    logged = {}
    for task in tasks:
        files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
        assert files, f"no samples of {task} under {output}"
        samples = [json.loads(line) for line in files[-1].read_text().splitlines()]
        logged[task] = sorted(samples, key=lambda sample: sample["doc_id"])
    return json.loads(results[-1].read_text()), logged


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
    model_args = f"pretrained={CHECKPOINT},device=cpu,dtype=float32"
    results, logged = run_lmms_eval(
        task_dir, "navil", [TASK], "--model", "navil", "--model_args", model_args, "--batch_size", "4"
    )
    from navil.tools.cli import load_model

    model, tokenizer = load_model(str(CHECKPOINT), "cpu", "float32")
    expected = chat_replies(model, tokenizer)
    samples = logged[TASK]
    assert [sample["doc_id"] for sample in samples] == list(range(8))
    assert [reply_of(sample) for sample in samples] == expected
    answers = [item["answer"] for item in example_questions()]
    accuracy = sum(reply == answer for reply, answer in zip(expected, answers)) / 8
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy)


def test_lmms_eval_navil_model_scores_the_loglikelihood_requests_of_a_multiple_choice_task(task_dir):
    """The requests lmms-eval builds for a multiple-choice task, answered by the `navil` model: each choice's score
    is the engine's. (lmms-eval 0.7.3's evaluator turns every model's (logprob, is_greedy) results into strings
    before scoring, so the command cannot run multiple-choice tasks; the requests and the task's scoring are
    lmms-eval's own here.)"""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from navil.evaluation.lmms_eval_navil import NaViL

    task = get_task_dict([CHOICE_TASK], TaskManager(include_path=str(task_dir / "tasks")))[CHOICE_TASK]
    task.build_all_requests(limit=8, rank=0, world_size=1)
    requests = sorted(task.instances, key=lambda request: (request.doc_id, request.idx))
    assert len(requests) == 24 and {request.request_type for request in requests} == {"loglikelihood"}
    model = NaViL(pretrained=str(CHECKPOINT), device="cpu", dtype="float32")
    model.task_dict = {CHOICE_TASK: task.dataset}
    scores = model.loglikelihood(requests)
    items = example_questions()
    for request, (score, greedy) in zip(requests, scores):
        item = items[request.doc_id]
        choice = task.dataset["test"][request.doc_id]["choices"][request.idx]
        expected, expected_greedy = model.engine.loglikelihood(item["question"], [item["image"]], choice)
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    for doc_id in range(8):
        assert "acc" in task.process_results(task.dataset["test"][doc_id], scores[3 * doc_id : 3 * doc_id + 3])
    assert any(greedy for _, greedy in scores)  # some replies of the tiny model are among the choices


def test_lmms_eval_huggingface_model_with_trust_remote_code_replies_equal_chat(task_dir):
    model_args = f"pretrained={CHECKPOINT},trust_remote_code=True,device=cpu,device_map=cpu"
    results, logged = run_lmms_eval(
        task_dir, "huggingface", [TASK], "--model", "huggingface", "--model_args", model_args, "--batch_size", "4"
    )
    from transformers import AutoModel, AutoTokenizer

    # lmms-eval's huggingface model loads in bfloat16; the reference does too
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, trust_remote_code=True)
    assert [reply_of(sample) for sample in logged[TASK]] == chat_replies(model, tokenizer)
    assert "exact_match,none" in results["results"][TASK]
