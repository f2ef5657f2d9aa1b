"""Long fuzz run of the processor, the model, its configs and its weight files, for use outside CI.

    python benchmarks/fuzz.py --examples 10000 [--seed 0] [--model checkpoints/navil-tiny]

Runs the generators and checks of navil.testing.fuzzing (the same as tests/test_fuzz.py) on the embedded tiny
checkpoint with a large hypothesis budget, split over images, prompts, per-call processor options, end-to-end
forwards, cached against uncached generation, config values, corrupted weight files, chat generation settings, JSONL
files, collator batches, CLI command lines, saved preprocessor configs and config.json sizes. Every case must give
consistent outputs or a documented ValueError; anything else is counted as unexpected and the run goes on. Prints a
summary (examples run, outcomes by kind, the slowest case, unexpected exceptions with their first cases) and exits
with status 1 if any was unexpected.
"""

import argparse
import collections
import datetime
import resource
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from navil.modeling_navil import NaViLForConditionalGeneration
from navil.processing_navil import load_navil_tokenizer
from navil.testing import fuzzing as fuzz

CHECKPOINT = Path(fuzz.__file__).resolve().parents[1] / "checkpoints" / "navil-tiny"
# An original checkpoint (config.json with llm_config), for the config-file cases.
GOLDEN = Path(fuzz.__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "qwen3_ve"


def run_property(name, strategy, check, examples, random_seed, outcomes, unexpected, slowest):
    """Runs `check` on `examples` cases drawn from `strategy`, recording outcomes instead of stopping at a failure."""

    @seed(random_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def property_(case):
        start = time.perf_counter()
        try:
            outcomes[name][check(case)] += 1
        except Exception as error:
            outcomes[name]["unexpected"] += 1
            unexpected.append((name, case, "".join(traceback.format_exception_only(error)).strip()))
        elapsed = time.perf_counter() - start
        if elapsed > slowest[0]:
            slowest[:] = [elapsed, name, repr(case)[:200]]

    property_()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000, help="total number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=CHECKPOINT, help="checkpoint folder (model and tokenizer)")
    parser.add_argument("--only", nargs="+", metavar="KIND", help="run only these kinds of cases (e.g. collator)")
    args = parser.parse_args()

    tokenizer = load_navil_tokenizer(args.model)
    model = NaViLForConditionalGeneration.from_pretrained(args.model).eval()
    processor = model.chat_processor(tokenizer)
    end_to_end = st.tuples(st.lists(fuzz.image_cases(), max_size=2), st.text(min_size=1, max_size=20))
    plan = [
        ("images", st.tuples(fuzz.image_cases(), st.booleans()), lambda c: fuzz.check_image_case(processor, *c), 0.26),
        ("prompts", fuzz.prompt_cases(), lambda case: fuzz.check_prompt_case(processor, case), 0.23),
        ("options", fuzz.option_cases(), lambda case: fuzz.check_option_case(processor, case), 0.15),
        ("end-to-end", end_to_end, lambda case: fuzz.check_end_to_end(model, processor, *case), 0.06),
        ("generation", fuzz.generation_cases(), lambda c: fuzz.check_generation_case(model, processor, c), 0.02),
        ("configs", fuzz.config_cases(), fuzz.check_config_case, 0.09),
        ("weights", fuzz.weight_cases(), lambda case: fuzz.check_weight_case(args.model, case), 0.05),
        (
            "chat settings",
            fuzz.chat_settings_cases(),
            lambda c: fuzz.check_chat_settings_case(model, tokenizer, c),
            0.02,
        ),
        ("JSONL files", fuzz.jsonl_cases(), fuzz.check_jsonl_case, 0.04),
        ("collator", fuzz.collator_cases(), lambda case: fuzz.check_collator_case(processor, case), 0.02),
        ("CLI flags", fuzz.cli_cases(), fuzz.check_cli_case, 0.03),
        (
            "preprocessor files",
            fuzz.preprocessor_file_cases(),
            lambda case: fuzz.check_preprocessor_file_case(args.model, case),
            0.02,
        ),
        ("config files", fuzz.config_file_cases(), lambda case: fuzz.check_config_file_case(GOLDEN, case), 0.01),
    ]
    plan = [item for item in plan if not args.only or item[0] in args.only]
    outcomes = collections.defaultdict(collections.Counter)
    unexpected, slowest = [], [0.0, "", ""]
    start = time.perf_counter()
    for name, strategy, check, share in plan:
        run_property(name, strategy, check, round(args.examples * share), args.seed, outcomes, unexpected, slowest)
    elapsed = time.perf_counter() - start

    total = sum(sum(counter.values()) for counter in outcomes.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"navil fuzz run, {datetime.date.today()}: {total} examples in {elapsed:.0f} s (seed {args.seed})")
    for name, _, _, _ in plan:
        counter = outcomes[name]
        details = ", ".join(f"{kind}: {count}" for kind, count in counter.most_common())
        print(f"  {name:<18} {sum(counter.values()):>6} examples  ({details})")
    print(f"slowest case: {slowest[0]:.2f} s ({slowest[1]}: {slowest[2]}); peak RSS of the run {peak:.2f} GiB")
    print(f"unexpected exceptions: {len(unexpected)}")
    for kind, _, _, _ in plan:  # the first three of each kind
        for name, case, error in [item for item in unexpected if item[0] == kind][:3]:
            print(f"  [{name}] {error}\n    case: {case!r}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
