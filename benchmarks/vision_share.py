"""The vision encoder's share of the CPU's matmul rate, eager and with `compile_layers()`, in the same process.

    python benchmarks/vision_share.py [--patches 4096] [--rounds 9] [--threads 2]

Issue #35's bench shape (ViT 12 layers × 384, 6 heads, MLP 1536, full attention in layers 2, 5, 8, 11, window 8,
and the connector into a 512-wide LLM), random weights, float32, one square image of `--patches` patches at a single
scale. `vision_share_of_gemm_peak` as in bench.py: the encoder's FLOPs (torch's flop counter, attention included) per
second over the rate of a [patches, 384] × [384, 1536] matmul. The eager encoder, the compiled one (a copy with
`vision_model.compile_layers()`, compiled before timing) and the matmul run in turns, `--rounds` times after a
warm-up; the share of each round uses that round's matmul. Prints the median share, the lowest and highest round,
the compiled / eager speed of each round, the largest difference between the two encoders' outputs, and the load
average before and after.
"""

import argparse
import copy
import math
import os
import statistics
import time

import torch
from bench import cpu_name, flops_of, random_pixels

from navil.configuration_navil import NaViLConfig
from navil.modeling_navil import NaViLForConditionalGeneration

BENCH_VISION = dict(
    hidden_size=384,
    num_attention_heads=6,
    num_hidden_layers=12,
    intermediate_size=1536,
    fullatt_block_indexes=[2, 5, 8, 11],
)
# the LLM only sets the connector's output width; its layers do not run here
BENCH_TEXT = dict(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=4,
    architectures=["InternLM2VEForCausalLM"],
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=4096, help="patches of the square image (a square number)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    side = math.isqrt(args.patches)
    if side * side != args.patches or side % 2:
        raise SystemExit(f"--patches must be the square of an even number (e.g. 4096 = 64²), got {args.patches}.")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = NaViLConfig(vision_config=BENCH_VISION, text_config=BENCH_TEXT, special_token_ids={})
    torch.manual_seed(0)
    eager = NaViLForConditionalGeneration(config).eval()
    compiled = copy.deepcopy(eager)
    compiled.vision_model.compile_layers()
    pixel_values, grid = random_pixels([(1, side, side)], config, "cpu", torch.float32)
    operands = torch.randn(args.patches, 384), torch.randn(384, 1536)

    def encoder(model):
        with torch.inference_mode():
            return torch.cat(model.get_image_features(pixel_values, grid).pooler_output)

    functions = {
        "eager": lambda: encoder(eager),
        "compiled": lambda: encoder(compiled),
        "matmul": lambda: torch.mm(*operands),
    }
    started = time.perf_counter()
    difference = (functions["compiled"]() - functions["eager"]()).abs().max().item()
    compile_seconds = time.perf_counter() - started
    flops = {"encoder": flops_of(functions["eager"]), "matmul": flops_of(functions["matmul"])}
    for function in functions.values():
        function()
    seconds = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    matmul_rates = [flops["matmul"] / s for s in seconds["matmul"]]
    print(
        f"vision encoder 12 × 384 at {args.patches} patches, float32, {args.threads} threads, {cpu_name()}, torch "
        f"{torch.__version__}; {flops['encoder'] / 1e9:.1f} GFLOP; {args.rounds} rounds in turns after a warm-up "
        f"(compiling took {compile_seconds:.0f} s); load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.1f}' for x in load_before)}, after {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"matmul: {statistics.median(matmul_rates) / 1e9:.1f} GFLOP/s (median)")
    print("| encoder | seconds (median) | share (median) | lowest, highest round |\n|---|---:|---:|---:|")
    for name in ("eager", "compiled"):
        shares = [flops["encoder"] / s / rate for s, rate in zip(seconds[name], matmul_rates)]
        print(
            f"| {name} | {statistics.median(seconds[name]):.2f} | {statistics.median(shares):.3f} | "
            f"{min(shares):.3f}, {max(shares):.3f} |"
        )
    speedups = sorted(e / c for e, c in zip(seconds["eager"], seconds["compiled"]))
    print(f"compiled / eager speed per round: {', '.join(f'{x:.2f}' for x in speedups)}")
    print(f"largest |compiled - eager| of the features: {difference:.1e}")


if __name__ == "__main__":
    main()
