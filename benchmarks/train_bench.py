"""Packed against padded training batches at equal token budgets, on the CPU tiny model.

    python benchmarks/train_bench.py [--examples 24] [--budget 16384] [--threads 1] [--json]

The mix of issue #32: images with sides drawn uniformly from 200–1600 px at native resolution (the image processor's
pixel limits opened to that range), multi-scale, and 5–300 text tokens per example (question and answer words drawn
at random). Every example is tokenised once, by `NaViLDataCollator.encode`, before anything is timed.

- padded: examples in order, as many per batch as fit `--budget` slots counting the padding (batch × longest),
  right-padded with a padding mask (`pad_batch`, what `NaViLDataCollator` gives `Trainer`);
- packed: the same examples in packs of at most `--budget` tokens (`PackedDataset`, `--strategy`), one row each
  (`PackingCollator`), every example attending to itself only.

A step is the forward and backward pass of the whole model (vision encoder, connector, language model, loss) in
float32; both modes train on the same examples, so the vision encoder's work is the same in both. Time is this
process's CPU time (`time.process_time`: wall time on an idle machine with `--threads 1`, and unaffected by other jobs
on a shared one); the modes are timed in turns (`--repeats`, the fastest pass of each kept). Reported:
the share of padding slots among all language-model token slots, real (non-padding) tokens per second, and the
packed steps' model FLOPs (`torch.utils.flop_counter`, counted in an untimed pass) per second as a share of this
machine's fp32 GEMM rate, measured in the same process (best of a few 1024×1024 matrix products).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoProcessor

import navil
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.training import NaViLDataCollator, tiny_config
from navil.training.collators import pad_batch
from navil.training.packing import PackedDataset, PackingCollator, packed_loss, split_model_inputs

CHECKPOINT = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
SIDES = (200, 1600)
TEXT_TOKENS = (5, 300)
WORDS = "red green blue circle square triangle left right above below small large the a and of".split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=24, help="examples trained on in each mode")
    parser.add_argument("--budget", type=int, default=32768, help="token slots per step (max_packed_tokens)")
    parser.add_argument("--strategy", default="best_fit", choices=("greedy", "best_fit"))
    parser.add_argument("--backbone", default="qwen3", choices=("qwen3", "internlm2"))
    parser.add_argument("--max-side", type=int, default=SIDES[1], help="largest image side (smoke runs)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes of each mode, in turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return parser.parse_args(argv)


def build_processor(max_side: int):
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    image_processor = processor.image_processor
    image_processor.min_pixels = SIDES[0] ** 2 // 4  # native resolution: no side of the mix is resized
    image_processor.max_pixels = max_side**2
    return processor


def random_examples(count: int, max_side: int, rng: np.random.Generator) -> list[dict]:
    """Chats of one random-pixel image (sides uniform in [200, max_side]) and 5–300 text tokens in all."""
    examples = []
    for _ in range(count):
        width, height = rng.integers(SIDES[0], max_side + 1, size=2)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        words = rng.choice(WORDS, size=int(rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1)))
        split = max(1, len(words) // 4)
        question, answer = " ".join(words[:split]), " ".join(words[split:])
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ],
                "images": [Image.fromarray(pixels)],
            }
        )
    return examples


def padded_batches(processor, encoded: list, budget: int) -> list[dict]:
    """Examples in order, as many per batch as fit `budget` slots (batch × longest), right-padded."""
    batches, current = [], []
    for example in encoded:
        longest = max([len(example[0])] + [len(other[0]) for other in current])
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(example)
    batches.append(current)
    return [
        pad_batch(processor, [(ids, labels) for ids, labels, _ in batch], [i for b in batch for i in b[2]])
        for batch in batches
    ]


def padded_step(model, batch):
    model(**batch).loss.backward()


def packed_step(model, batch):
    inputs, packing = split_model_inputs(batch)
    packed_loss(model(**inputs).logits, packing)[0].backward()


def run(model, step, batches) -> float:
    """Seconds of this process's CPU time to train on `batches`."""
    start = time.process_time()
    for batch in batches:
        step(model, batch)
        model.zero_grad(set_to_none=True)
    return time.process_time() - start


def gemm_flops_per_s(size: int = 1024, tries: int = 5) -> float:
    """fp32 FLOPs per CPU second of the best of `tries` [size, size] matrix products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size**3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(tries))


def _timed(function) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = build_processor(args.max_side)
    model = NaViLForConditionalGeneration(tiny_config(args.backbone, vocab_size=len(processor.tokenizer))).float()
    model.init_special_token_ids(processor.tokenizer)
    model.train()
    examples = random_examples(args.examples, args.max_side, np.random.default_rng(args.seed))
    encode = NaViLDataCollator(processor, multiscale=True).encode
    encoded = [encode(example) for example in examples]
    lengths = [len(ids) for ids, _, _ in encoded]
    if max(lengths) > args.budget:
        raise SystemExit(f"--budget {args.budget} is below the longest example ({max(lengths)} tokens); raise it.")

    padded = padded_batches(processor, encoded, args.budget)
    packs = PackedDataset(encoded, lambda example: example, args.budget, args.strategy, lengths=lengths)
    collator = PackingCollator(processor)
    packed = [collator([packs[i]]) for i in range(len(packs))]

    real = sum(lengths)
    padded_slots = sum(batch["input_ids"].numel() for batch in padded)
    packed_slots = sum(batch["input_ids"].numel() for batch in packed)

    counter = FlopCounterMode(display=False)
    with counter:  # untimed pass: the packed steps' FLOPs, and a warm-up
        run(model, packed_step, packed)
    run(model, padded_step, padded[:1])
    times = {"padded": [], "packed": []}
    for _ in range(args.repeats):
        times["padded"].append(run(model, padded_step, padded))
        times["packed"].append(run(model, packed_step, packed))
    padded_time, packed_time = min(times["padded"]), min(times["packed"])
    return {
        "examples": len(examples),
        "tokens_min": min(lengths),
        "tokens_median": int(np.median(lengths)),
        "tokens_max": max(lengths),
        "budget": args.budget,
        "steps_padded": len(padded),
        "steps_packed": len(packed),
        "padding_share_padded": 1 - real / padded_slots,
        "padding_share_packed": 1 - real / packed_slots,
        "real_tokens_per_s_padded": real / padded_time,
        "real_tokens_per_s_packed": real / packed_time,
        "flops_per_s_share_of_gemm_peak": counter.get_total_flops() / packed_time / gemm_flops_per_s(),
        "threads": args.threads,
    }


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return result
    speedup = result["real_tokens_per_s_packed"] / result["real_tokens_per_s_padded"]
    print(
        f"{result['examples']} examples of {result['tokens_min']}–{result['tokens_max']} tokens (median "
        f"{result['tokens_median']}), budget {result['budget']} token slots per step, {args.threads} thread(s)"
    )
    print(f"{'':8} {'steps':>6} {'padding share':>14} {'real tokens/s':>14}")
    for mode in ("padded", "packed"):
        print(
            f"{mode:8} {result[f'steps_{mode}']:>6} {result[f'padding_share_{mode}']:>14.1%} "
            f"{result[f'real_tokens_per_s_{mode}']:>14.0f}"
        )
    print(f"packed / padded: {speedup:.2f}x real tokens/s")
    print(f"packed model FLOP/s: {result['flops_per_s_share_of_gemm_peak']:.1%} of this machine's fp32 GEMM rate")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
