"""Greedy decode speed of NaViL on one machine, every path in the same process, in turns: eager (dynamic cache),
static cache, static cache + `torch.compile` (transformers' inductor settings, and with inductor's freezing),
`generate(compile_decode=True)` (navil's compiled path), and eager with `navil.quantize_for_cpu` (dynamic int8).

    python benchmarks/decode_paths.py [--preset small] [--new-tokens 32] [--rounds 6]

Random weights (bench.py's preset, InternLM2-VE), a 16-token text prompt, EOS disabled. Time per token is the median
time between consecutive generation steps (bench.py's StepClock) over the rounds after the first (warm-up, which
also compiles); the paths take turns within each round so that changes of load hit them alike. Prints tokens/s, the
speed over eager at the same batch, and whether the greedy tokens equal eager's.
"""

import argparse
import copy
import os
import statistics
import time

import torch
from bench import PRESETS, StepClock, build_models, cpu_name, text_ids
from transformers import CompileConfig, StoppingCriteriaList

import navil

COMPILED_PATHS = {
    "static cache + torch.compile": dict(mode="default"),
    "static cache + torch.compile (freezing)": dict(mode=None, options=dict(freezing=True)),
}


def generate_kwargs(path: str) -> dict:
    if path == "static cache":
        return dict(cache_implementation="static")
    if path in COMPILED_PATHS:
        compile_config = CompileConfig(fullgraph=True, **COMPILED_PATHS[path])
        compile_config._compile_all_devices = True  # transformers compiles decode steps on accelerators only
        return dict(cache_implementation="static", compile_config=compile_config)
    if path == "compile_decode=True":
        return dict(compile_decode=True)
    return {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all paths; the first is a warm-up")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    model, _ = build_models(preset, "internlm2", "cpu", torch.float32)
    model.eval()
    quantized = navil.quantize_for_cpu(copy.deepcopy(model), ["mlp1"])  # the LM head quantized too
    paths = ["eager", "static cache", *COMPILED_PATHS, "compile_decode=True"]
    # one copy per compiled path: a model keeps one compiled step, and a new compile config would recompile it
    generators = {path: copy.deepcopy(model) if path in COMPILED_PATHS else model for path in paths}
    runs = [(f"batch {b}, {path}", generators[path], b, path) for b in (1, 8) for path in paths]
    runs.insert(len(paths), ("batch 1, eager, quantize_for_cpu (LM head too)", quantized, 1, "eager"))
    times, tokens = {name: [] for name, *_ in runs}, {}
    started, load_before = time.perf_counter(), os.getloadavg()
    for round_index in range(args.rounds):
        for name, generator, batch, path in runs:
            input_ids = text_ids(preset.question_tokens, model.config, seed=2, batch=batch)
            clock = StepClock("cpu")
            with torch.inference_mode():
                tokens[name] = generator.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    stopping_criteria=StoppingCriteriaList([clock]),
                    **generate_kwargs(path),
                )
            clock.end_run()
            if round_index:
                times[name].append(statistics.median(clock.step_seconds))
    print(
        f"preset {args.preset}, {args.new_tokens} new tokens, medians of {args.rounds - 1} rounds after 1 warm-up, "
        f"paths in turns; {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.perf_counter() - started:.0f} s; load average (1, 5, 15 min) before "
        f"{', '.join(f'{load:.1f}' for load in load_before)}, after {', '.join(f'{load:.1f}' for load in os.getloadavg())}"
    )
    print(
        "| decode path | tokens/s | speed / eager | lowest, highest of the rounds | greedy tokens = eager |\n"
        "|---|---:|---:|---:|---|"
    )
    for name, _, batch, _ in runs:
        eager = f"batch {batch}, eager"
        seconds = statistics.median(times[name])
        per_round = [eager_seconds / path_seconds for eager_seconds, path_seconds in zip(times[eager], times[name])]
        same = "yes" if torch.equal(tokens[name], tokens[eager]) else "no"
        print(
            f"| {name} | {batch / seconds:.1f} | {statistics.median(times[eager]) / seconds:.2f} | "
            f"{min(per_round):.2f}, {max(per_round):.2f} | {same} |"
        )


if __name__ == "__main__":
    main()
