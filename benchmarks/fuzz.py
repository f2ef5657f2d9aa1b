"""Long fuzz run of the processor and model, for use outside CI.

    python benchmarks/fuzz.py --examples 10000 [--seed 0]

Runs the properties of tests/test_fuzz.py with their generators (tests/fuzz_cases.py) and a large hypothesis budget,
split 45% random images, 45% random prompts with 0-3 `<image>` placeholders against 0-3 images, and 10% end-to-end
cases (processor then forward of the golden qwen3_ve model). Every case must give consistent tensors or a documented
ValueError; anything else is counted as unexpected and the run goes on. Prints a summary (examples run, expected
errors by kind, unexpected exceptions with their first cases) and exits with status 1 if any was unexpected.
"""

import argparse
import collections
import datetime
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from conftest import GOLDEN, load_golden_model  # noqa: E402
from fuzz_cases import (  # noqa: E402
    check_end_to_end,
    check_image_case,
    check_prompt_case,
    image_cases,
    prompt_cases,
)


def run_property(name, strategy, check, examples, random_seed, outcomes, unexpected):
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
        try:
            outcomes[name][check(case)] += 1
        except Exception as error:
            outcomes[name]["unexpected"] += 1
            unexpected.append((name, case, "".join(traceback.format_exception_only(error)).strip()))

    property_()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000, help="total number of cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GOLDEN / "tokenizer")
    model = load_golden_model("qwen3_ve", tokenizer)
    processor = model.chat_processor(tokenizer)
    end_to_end = st.tuples(st.lists(image_cases(), max_size=2), st.text(min_size=1, max_size=20))
    plan = [
        ("images", st.tuples(image_cases(), st.booleans()), lambda case: check_image_case(processor, *case), 0.45),
        ("prompts", prompt_cases(), lambda case: check_prompt_case(processor, case), 0.45),
        ("end-to-end", end_to_end, lambda case: check_end_to_end(model, processor, *case), 0.10),
    ]
    outcomes = collections.defaultdict(collections.Counter)
    unexpected = []
    start = time.perf_counter()
    for name, strategy, check, share in plan:
        run_property(name, strategy, check, round(args.examples * share), args.seed, outcomes, unexpected)
    elapsed = time.perf_counter() - start

    total = sum(sum(counter.values()) for counter in outcomes.values())
    print(f"navil fuzz run, {datetime.date.today()}: {total} examples in {elapsed:.0f} s (seed {args.seed})")
    for name, _, _, _ in plan:
        counter = outcomes[name]
        details = ", ".join(f"{kind}: {count}" for kind, count in counter.most_common())
        print(f"  {name:<11} {sum(counter.values()):>6} examples  ({details})")
    print(f"unexpected exceptions: {len(unexpected)}")
    for name, case, error in unexpected[:10]:
        print(f"  [{name}] {error}\n    case: {case!r}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
