"""The paper's two central ablations in miniature: LLM initialisation and modality experts, in data efficiency.

    python benchmarks/native_ablations.py                                # ≈ 40 min on 2 free cores, updates the doc
    python benchmarks/native_ablations.py --smoke --output-dir /tmp/ab   # ≈ 1 min, writes only to that folder

Trains the embedded model's shape (docs/training.md) on the synthetic questions under four settings: the language
model initialised from the pre-trained text LLM (`upcycle_from_text_model`) or at random ("scratch"), with visual
experts (`_ve` twins) or dense (`text_config.modality_experts=False`: image tokens use the text weights). Every run
sees the same images in the same order (dataset seed 0, questions about 1–3 shapes, every question of an image as a
branch), with the same steps, batch and learning-rate schedule, and trains every weight; seeds change the
initialisation (and the text LLM's pre-training). It logs the answer-token loss of every step (each image is seen
once, so it is a held-out loss) and the exact-match accuracy on fresh questions at a few points, then writes:

- `results.md`: the table and the data-efficiency factors (how many training images each setting needs to reach
  the loss the best setting reaches at 25 % of the budget), plus what the numbers say about the paper's claims;
- `native_ablations.png`: loss and accuracy against training images seen;
- `history.json`: every loss and evaluation.

A full run also puts the table into docs/native_ablations.md (between its `results` markers) and the plot next to
it (`--no-docs` skips that). Each finished run is cached in `<output-dir>/runs/`, and each pre-trained text LLM in
`<output-dir>/text-llm-*`, so an interrupted benchmark resumes where it stopped.
"""

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from navil import NaViLForConditionalGeneration
from navil.training import (
    TrainingArguments,
    evaluate,
    format_accuracy,
    freeze,
    load_tokenizer,
    navil_processor,
    pretrain_text_model,
    question_batches,
    tiny_navil_config,
    tiny_text_config,
    train_loop,
    upcycle_from_text_model,
)
from navil.training.synthetic_data import ShapesDataset

DOCS = Path(__file__).resolve().parent.parent / "docs" / "native_ablations.md"
RESULTS_START, RESULTS_END = "<!-- results: written by benchmarks/native_ablations.py -->", "<!-- end of results -->"
DATA_SEED = 0  # every run sees the images of this dataset seed, in the same order
EVAL_SEED = 4321  # held-out questions, the same for every run and point
TARGET_FRACTION = 0.25  # the best setting's loss at this fraction of the budget is the target of the efficiency factor


@dataclass(frozen=True)
class Setting:
    name: str
    llm_init: bool
    experts: bool


SETTINGS = (
    Setting("LLM-init + experts", llm_init=True, experts=True),
    Setting("LLM-init + dense", llm_init=True, experts=False),
    Setting("scratch + experts", llm_init=False, experts=True),
    Setting("scratch + dense", llm_init=False, experts=False),
)


@dataclass(frozen=True)
class Budget:
    """What a benchmark trains: steps of `batch_size` images at `learning_rate` (AdamW, warm-up then cosine, as the
    recipe), `evaluations` accuracy points of `eval_questions` questions, and the text LLM's pre-training."""

    steps: int = 600
    batch_size: int = 8
    learning_rate: float = 3e-4
    seeds: tuple[int, ...] = (0, 1)
    evaluations: int = 4
    eval_questions: int = 120
    text_steps: int = 150
    text_batch_size: int = 32


SMOKE = Budget(steps=8, batch_size=2, seeds=(0,), evaluations=2, eval_questions=12, text_steps=8, text_batch_size=8)


def signature(*parts) -> str:
    """A short hash of the settings a cached result depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def text_llm(args: TrainingArguments, tokenizer, processor, cache_dir: Path) -> Qwen3ForCausalLM:
    """The recipe's pre-trained text LLM for `args.seed` (`pretrain_text_model`), trained once and cached."""
    folder = cache_dir / f"text-llm-seed{args.seed}-{signature(asdict(args), len(tokenizer))}"
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        model, _ = pretrain_text_model(args, tokenizer, processor, progress=False)
        model.save_pretrained(folder)
        print(f"text LLM (seed {args.seed}): {args.text_steps} steps in {time.perf_counter() - started:.0f} s")
    return Qwen3ForCausalLM.from_pretrained(folder)


def train_setting(setting: Setting, seed: int, args: TrainingArguments, budget: Budget, tokenizer, cache_dir: Path):
    """One run: builds the NaViL of `setting`, trains it on the shared data order and returns its record."""
    config = tiny_navil_config(args, tiny_text_config(args, len(tokenizer)), tokenizer)
    config.text_config.modality_experts = setting.experts
    processor = navil_processor(config, tokenizer)
    text_model = text_llm(replace(args, seed=seed), tokenizer, processor, cache_dir) if setting.llm_init else None
    torch.manual_seed(seed + 1)
    model = NaViLForConditionalGeneration(config)
    model.init_special_token_ids(tokenizer)
    if text_model is not None:
        upcycle_from_text_model(text_model, model)
    with torch.no_grad():
        model.mlp1[-1].weight.mul_(args.connector_init_gain)  # as the recipe (docs/training.md)
    freeze(model, 2)
    data = ShapesDataset(seed=DATA_SEED, size_range=args.size_range)
    evaluations = []

    def run_eval(step: int) -> None:
        accuracy = evaluate(model, processor, budget.eval_questions, seed=EVAL_SEED, size_range=args.size_range)
        evaluations.append({"step": step, "images": step * budget.batch_size, **accuracy})
        print(f"  {setting.name}, seed {seed}, step {step}: {format_accuracy(accuracy)}")

    started = time.perf_counter()
    losses = train_loop(
        model,
        question_batches(processor, data, budget.batch_size, args.single_scale_fraction),
        budget.steps,
        budget.learning_rate,
        args.warmup_ratio,
        args.weight_decay,
        args.max_grad_norm,
        args.dtype,
        description=f"{setting.name}, seed {seed}",
        callback=run_eval,
        callback_every=max(1, budget.steps // budget.evaluations),
        progress=False,
    )
    parameters = sum(parameter.numel() for parameter in model.language_model.parameters())
    return {
        "setting": setting.name,
        "seed": seed,
        "losses": losses,
        "evaluations": evaluations,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "language_model_parameters": parameters,
    }


# -- analysis ---------------------------------------------------------------------------------------------------


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (fewer at the start)."""
    sums = [0.0]
    for loss in losses:
        sums.append(sums[-1] + loss)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(losses))]


def mean_curves(runs: list[dict], window: int) -> dict[str, list[float]]:
    """Per setting: the loss of each step averaged over seeds, then smoothed over `window` steps."""
    curves = {}
    for name in dict.fromkeys(run["setting"] for run in runs):
        per_seed = [run["losses"] for run in runs if run["setting"] == name]
        curves[name] = smoothed([sum(step) / len(step) for step in zip(*per_seed)], window)
    return curves


def steps_to_reach(curve: list[float], target: float):
    """The number of steps after which `curve` first is at or below `target`, or None."""
    return next((step + 1 for step, loss in enumerate(curve) if loss <= target), None)


def data_efficiency(curves: dict[str, list[float]], fraction: float = TARGET_FRACTION) -> dict:
    """The target (the lowest loss any setting has after `fraction` of the steps), the setting that reaches it there,
    and per setting the steps it needs to reach it (None: not within the budget) and their ratio to `fraction` of the
    budget (the data-efficiency factor; the best setting's is at most 1)."""
    steps = len(next(iter(curves.values())))
    at = max(1, math.ceil(fraction * steps))
    best = min(curves, key=lambda name: curves[name][at - 1])
    target = curves[best][at - 1]
    needed = {name: steps_to_reach(curve, target) for name, curve in curves.items()}
    factors = {name: None if count is None else count / at for name, count in needed.items()}
    return {"best": best, "target": target, "at_step": at, "steps": needed, "factors": factors}


def final_losses(runs: list[dict], window: int) -> dict[str, list[float]]:
    """Per setting, per seed: the mean loss of the last `window` steps."""
    finals = {}
    for run in runs:
        finals.setdefault(run["setting"], []).append(sum(run["losses"][-window:]) / len(run["losses"][-window:]))
    return finals


def compare(runs: list[dict], better: str, worse: str, window: int) -> str:
    """Whether `better` beats `worse` at equal data, as the paper claims: final losses (every seed, and on average)
    and how many images `worse` needs to reach the loss `better` has at 25 % of the budget."""
    finals = final_losses(runs, window)
    mean = {name: sum(values) / len(values) for name, values in finals.items()}
    pair = data_efficiency(
        {name: curve for name, curve in mean_curves(runs, window).items() if name in (better, worse)}
    )
    if pair["best"] != better:
        efficiency = f"{worse} is the one ahead at 25 % of the budget"
    elif pair["factors"][worse] is None:
        efficiency = (
            f"{worse} never reaches the loss {better} has at 25 % of the budget (> {1 / TARGET_FRACTION:.0f}×)"
        )
    else:
        factor = pair["factors"][worse]
        efficiency = f"{worse} needs {factor:.1f}× the images to reach the loss {better} has at 25 % of the budget"
    if max(finals[better]) < min(finals[worse]):
        verdict = "holds for every seed"
    elif mean[better] < mean[worse]:
        verdict = "holds on average, but the seeds overlap"
    else:
        verdict = "does not hold"
    return (
        f"**{better} vs {worse}**: final answer loss {mean[better]:.3f} vs {mean[worse]:.3f} (the paper's direction "
        f"{verdict} at the end of the budget); in data efficiency, {efficiency}."
    )


def results_markdown(runs: list[dict], budget: Budget, window: int) -> str:
    """The results section: the table, the data-efficiency factors and the two comparisons of the paper."""
    curves = mean_curves(runs, window)
    efficiency = data_efficiency(curves)
    finals = final_losses(runs, window)
    images = budget.steps * budget.batch_size
    target_images = efficiency["at_step"] * budget.batch_size
    lines = [
        f"{len(runs)} runs ({len(SETTINGS)} settings × seeds {', '.join(map(str, budget.seeds))}) of {budget.steps} "
        f"steps × {budget.batch_size} images ({images} images, each with all its questions), learning rate "
        f"{budget.learning_rate:g}; {sum(run['seconds'] for run in runs) / 60:.1f} min of training and evaluation on "
        f"{runs[0]['threads']} thread(s), the text LLM's pre-training not counted. Losses are the mean "
        f"answer-token loss over seeds, smoothed over {window} steps; accuracy is exact match on "
        f"{budget.eval_questions} held-out questions (mean over seeds). The target is the loss the best setting "
        f"({efficiency['best']}) reaches after {target_images} images ({TARGET_FRACTION:.0%} of the budget): "
        f"{efficiency['target']:.3f}.",
        "",
        "| setting | language-model parameters | final loss (per seed) | accuracy at "
        + " / ".join(f"{e['images']}" for e in _evaluations(runs, SETTINGS[0].name))
        + " images | images to reach the target | data-efficiency factor |",
        "|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        name = setting.name
        count, factor = efficiency["steps"][name], efficiency["factors"][name]
        reach = "not reached" if count is None else str(count * budget.batch_size)
        factor_text = f"not reached (> {images / target_images:.0f}×)" if factor is None else f"{factor:.2f}×"
        accuracy = " / ".join(f"{100 * e['all']:.1f} %" for e in _evaluations(runs, name))
        parameters = next(run["language_model_parameters"] for run in runs if run["setting"] == name)
        per_seed = ", ".join(f"{value:.3f}" for value in finals[name])
        lines.append(f"| {name} | {parameters / 1e6:.2f} M | {per_seed} | {accuracy} | {reach} | {factor_text} |")
    lines += [
        "",
        compare(runs, "LLM-init + experts", "scratch + experts", window),
        "",
        compare(runs, "LLM-init + dense", "scratch + dense", window),
        "",
        compare(runs, "LLM-init + experts", "LLM-init + dense", window),
        "",
        compare(runs, "scratch + experts", "scratch + dense", window),
        "",
        "![answer-token loss and held-out accuracy against training images](native_ablations.png)",
    ]
    return "\n".join(lines) + "\n"


def _evaluations(runs: list[dict], name: str) -> list[dict]:
    """The evaluations of a setting averaged over seeds (step by step)."""
    per_seed = [run["evaluations"] for run in runs if run["setting"] == name]
    return [
        {"images": points[0]["images"], "all": sum(point["all"] for point in points) / len(points)}
        for points in zip(*per_seed)
    ]


def plot(runs: list[dict], budget: Budget, window: int, path: Path) -> None:
    """Loss (per seed, faint, and mean) and held-out accuracy against training images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(runs, window)
    efficiency = data_efficiency(curves)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    images = [(step + 1) * budget.batch_size for step in range(budget.steps)]
    for index, setting in enumerate(SETTINGS):
        style = dict(color=f"C{index}", linestyle="-" if setting.experts else "--")
        for run in (run for run in runs if run["setting"] == setting.name):
            loss_axis.plot(images, smoothed(run["losses"], window), alpha=0.25, linewidth=0.8, **style)
        loss_axis.plot(images, curves[setting.name], label=setting.name, linewidth=1.8, **style)
        points = _evaluations(runs, setting.name)
        accuracy_axis.plot(
            [p["images"] for p in points], [100 * p["all"] for p in points], marker="o", label=setting.name, **style
        )
    loss_axis.axhline(efficiency["target"], color="grey", linewidth=0.8, linestyle=":")
    loss_axis.axvline(efficiency["at_step"] * budget.batch_size, color="grey", linewidth=0.8, linestyle=":")
    loss_axis.set(xlabel="training images seen", ylabel="answer-token loss", yscale="log")
    loss_axis.set_title("loss (dotted: the best setting at 25 % of the budget)")
    accuracy_axis.set(xlabel="training images seen", ylabel="held-out exact match (%)", ylim=(0, 100))
    accuracy_axis.set_title(f"accuracy on {budget.eval_questions} held-out questions")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_docs(results: str, png: Path, docs: Path) -> None:
    """Replaces the results block of `docs` with `results` and copies the plot next to it."""
    text = docs.read_text(encoding="utf-8")
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        raise ValueError(f"{docs} has no results block ({RESULTS_START!r} … {RESULTS_END!r}); add the two markers.")
    docs.write_text(text[: start + len(RESULTS_START)] + "\n\n" + results + "\n" + text[end:], encoding="utf-8")
    shutil.copyfile(png, docs.parent / png.name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/native_ablations"))
    parser.add_argument("--smoke", action="store_true", help="a 1-minute run of a few steps; never touches the docs")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {Budget.steps})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds per setting (default 0 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=Path, default=DOCS, help="the doc whose results block a full run rewrites")
    parser.add_argument("--no-docs", action="store_true", help="leave the doc and its plot alone")
    options = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("matplotlib draws the plot: pip install -e '.[bench]' (checked now rather than after the training)")

    budget = SMOKE if options.smoke else Budget()
    if options.steps:
        budget = replace(budget, steps=options.steps)
    if options.seeds:
        budget = replace(budget, seeds=tuple(options.seeds))
    args = TrainingArguments(
        text_steps=budget.text_steps, text_batch_size=budget.text_batch_size, threads=options.threads
    )
    torch.set_num_threads(options.threads)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    output_dir = options.output_dir
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    runs, total = [], len(budget.seeds) * len(SETTINGS)
    for seed in budget.seeds:
        for setting in SETTINGS:
            name = f"{setting.name.replace(' + ', '-')}-seed{seed}-{signature(asdict(args), asdict(budget))}.json"
            cached = output_dir / "runs" / name
            if cached.is_file():
                run = json.loads(cached.read_text())
            else:
                run = train_setting(setting, seed, args, budget, tokenizer, output_dir)
                cached.write_text(json.dumps(run) + "\n")
            runs.append(run)
            left = (total - len(runs)) * sum(run["seconds"] for run in runs) / len(runs)
            print(
                f"{setting.name}, seed {seed}: final loss {run['losses'][-1]:.3f} after {run['seconds']:.0f} s "
                f"({len(runs)}/{total} runs, about {left / 60:.0f} min left)"
            )

    window = max(1, round(0.05 * budget.steps))
    png = output_dir / "native_ablations.png"
    plot(runs, budget, window, png)
    results = results_markdown(runs, budget, window)
    (output_dir / "results.md").write_text(results, encoding="utf-8")
    (output_dir / "history.json").write_text(json.dumps({"budget": asdict(budget), "runs": runs}) + "\n")
    print(results)
    if not options.smoke and not options.no_docs:
        write_docs(results, png, options.docs)
        print(f"wrote the results into {options.docs}")


if __name__ == "__main__":
    main()
