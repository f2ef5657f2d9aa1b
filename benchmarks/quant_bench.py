"""Quantized NaViL on CPU: weight memory, speed and agreement with float32, and which modules to keep in full precision.

    pip install -e '.[quant]'
    python benchmarks/quant_bench.py [--preset small] [--prompts 20] [--new-tokens 16] [--json out.json]
    python benchmarks/quant_bench.py --keep-study [--questions 200]

The main table builds the preset of bench.py with random weights (NaViL only), saves it, and loads it back through
`from_pretrained` once per mode: float32, bfloat16, torchao int8 weight-only (one scale per output row) and torchao
int4 weight-only (one scale per group of 32 inputs; `IntxWeightOnlyConfig`, since `Int4WeightOnlyConfig` has CPU
kernels for none of its layouts). The quantized modes compute in float32 and keep the model's full-precision modules
(`_modules_to_not_quantize`). Two more modes quantize dynamically to int8 with `navil.quantize_for_cpu` (int8
weights and activations, the CPU's int8 GEMM): with the model's full-precision modules kept, and with the LM head
quantized too. Per mode:
- weight memory: bytes of all parameters and buffers (of a quantized tensor: its integer data and scales);
- prefill: median time of the forward of one image prompt of the preset (vision encoder + LLM, last-position
  logits);
- decode: median time of one greedy step at batch 1 after a text prompt (steps marked as in bench.py), as tokens/s;
- agreement: float32 greedily continues `--prompts` prompts of a `--image-side` pixel image (random pixels and
  question ids); each mode reads the same prompt + continuation, and counts the positions whose greedy token equals
  float32's (teacher-forced, so one early difference does not hide the rest), and the continuations it reproduces
  whole.
All modes are loaded at once and timed in turns, so that changes of load hit them alike. Ratios are against float32. Random weights make the logits of neighbouring tokens close, so agreement here is a
lower bound; `--keep-study` measures it on the trained navil-tiny.

`--keep-study` loads the embedded navil-tiny quantized (int8 and int4) with different sets of modules kept in full
precision, answers `--questions` held-out questions, and prints the accuracy and the share of replies equal to the
float32 model's: the measurement behind `NaViLPreTrainedModel._modules_to_not_quantize`.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from bench import (
    PRESETS,
    StepClock,
    build_models,
    cpu_name,
    image_prompt,
    median_times,
    pyramid_grids,
    random_pixels,
    text_ids,
)
from transformers import StoppingCriteriaList, TorchAoConfig

import navil
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.serving.cpu_quantization import DynamicInt8Linear

CHECKPOINT = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
MiB = 2**20


def torchao_quant_type(bits: int):
    """torchao weight-only quantization that runs on CPU: int8 per output row, or int4 per group of 32 inputs."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if bits == 8:
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


MODES = {
    "float32": dict(dtype=torch.float32),
    "bfloat16": dict(dtype=torch.bfloat16),
    "torchao int8": dict(dtype=torch.float32, bits=8),
    "torchao int4": dict(dtype=torch.float32, bits=4),
    "int8 dynamic (quantize_for_cpu)": dict(dtype=torch.float32, dynamic=None),
    "int8 dynamic, LM head too": dict(dtype=torch.float32, dynamic=["mlp1"]),
}


def load(folder, mode, modules_to_not_convert=None):
    """The model saved in `folder`, loaded in `mode` (a key of MODES), in eval mode."""
    settings = MODES[mode]
    kwargs = {}
    if "bits" in settings:
        quantization = TorchAoConfig(torchao_quant_type(settings["bits"]))
        quantization.modules_to_not_convert = modules_to_not_convert  # None: the model's own list
        kwargs["quantization_config"] = quantization
    model = NaViLForConditionalGeneration.from_pretrained(folder, dtype=settings["dtype"], **kwargs).eval()
    if "dynamic" in settings:
        keep = settings["dynamic"] if modules_to_not_convert is None else modules_to_not_convert
        navil.quantize_for_cpu(model, keep)
    return model


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor; a tensor subclass (torchao's quantized weights) counts the tensors it is made of."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.nbytes


def packed_bytes(module: DynamicInt8Linear) -> int:
    """Storage of a prepacked int8 linear: its int8 weights, per-row scales and zero points, and bias."""
    weight, bias = torch.ops.quantized.linear_unpack(module.packed)
    parts = (weight.int_repr(), weight.q_per_channel_scales(), weight.q_per_channel_zero_points())
    return sum(part.nbytes for part in parts) + (0 if bias is None else bias.nbytes)


def weight_bytes(model) -> int:
    packed = sum(packed_bytes(module) for module in model.modules() if isinstance(module, DynamicInt8Linear))
    return packed + sum(tensor_bytes(tensor) for tensor in (*model.parameters(), *model.buffers()))


class Prompts:
    """`count` prompts of one `side`-pixel image each (random pixels, same pyramid) + a random question, batched."""

    def __init__(self, preset, config, count, side):
        grids = pyramid_grids(side, config)
        torch.manual_seed(1)
        pixels = [random_pixels(grids, config, "cpu", torch.float32) for _ in range(count)]
        self.pixel_values = torch.cat([pixel_values for pixel_values, _ in pixels])
        self.image_grid_thw = torch.cat([grid for _, grid in pixels])
        prompt = image_prompt(grids, config, preset.question_tokens, "cpu")  # [1, L]
        questions = text_ids(preset.question_tokens, config, seed=3, batch=count)
        self.input_ids = torch.cat((prompt[:, : -preset.question_tokens].expand(count, -1), questions), dim=1)

    def first(self) -> dict:
        """The inputs of the first prompt alone."""
        count = len(self.input_ids)
        return dict(
            input_ids=self.input_ids[:1],
            pixel_values=self.pixel_values[: len(self.pixel_values) // count],
            image_grid_thw=self.image_grid_thw[: len(self.image_grid_thw) // count],
        )


@torch.inference_mode()
def continuation(model, prompts, new_tokens):
    """Greedy continuation [count, new_tokens] of every prompt."""
    output = model.generate(
        input_ids=prompts.input_ids,
        attention_mask=torch.ones_like(prompts.input_ids),
        pixel_values=prompts.pixel_values,
        image_grid_thw=prompts.image_grid_thw,
        max_new_tokens=new_tokens,
        do_sample=False,
    )
    return output[:, prompts.input_ids.shape[1] :]


@torch.inference_mode()
def agreement(model, prompts, reference):
    """(share of positions whose greedy token equals `reference`, continuations reproduced whole) when `model` reads
    each prompt followed by the reference continuation."""
    input_ids = torch.cat((prompts.input_ids, reference), dim=1)
    logits = model(
        input_ids=input_ids, pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw
    ).logits
    predicted = logits[:, prompts.input_ids.shape[1] - 1 : -1].argmax(-1)  # the token each position chose
    same = predicted == reference
    return same.float().mean().item(), int(same.all(dim=1).sum())


def decode_seconds_per_token(models, preset, new_tokens):
    """Median time of one greedy decode step of each model, the models generating in turns."""
    clocks = {mode: StepClock("cpu") for mode in models}
    input_ids = text_ids(preset.question_tokens, next(iter(models.values())).config, seed=2)
    for run in range(preset.warmup + preset.repeats):
        for mode, model in models.items():
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    stopping_criteria=StoppingCriteriaList([clocks[mode]]),
                )
            if run < preset.warmup:
                clocks[mode].marks = []
            else:
                clocks[mode].end_run()
    return {mode: statistics.median(clock.step_seconds) for mode, clock in clocks.items()}


def measure_modes(args):
    """Every mode's weight memory, agreement with float32, prefill and decode times (timed in turns)."""
    preset = PRESETS[args.preset]
    if args.repeats:
        preset = dataclasses.replace(preset, repeats=args.repeats)
    model, _ = build_models(preset, args.backbone, "cpu", torch.float32)
    prompts = Prompts(preset, model.config, args.prompts, args.image_side)
    timed_prompt = Prompts(preset, model.config, 1, preset.prefill_image_side).first()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        models = {mode: load(folder, mode) for mode in MODES}
    reference = continuation(models["float32"], prompts, args.new_tokens)
    results = {}
    for mode, model in models.items():
        token_share, whole = agreement(model, prompts, reference)
        results[mode] = dict(weight_bytes=weight_bytes(model), token_agreement=token_share, whole_continuations=whole)
        print(f"{mode}: {results[mode]}", file=sys.stderr, flush=True)
    with torch.inference_mode():
        prefill = {mode: partial(model, **timed_prompt, logits_to_keep=1) for mode, model in models.items()}
        prefill = median_times(prefill, "cpu", preset.warmup, preset.repeats)
    decode = decode_seconds_per_token(models, preset, args.decode_tokens)
    for mode in models:
        results[mode].update(prefill_seconds=prefill[mode], decode_seconds_per_token=decode[mode])
    return results, preset


def modes_table(results, prompts):
    base = results["float32"]
    lines = [
        "| mode | weights MiB | ratio | prefill ms | ratio | decode tokens/s | ratio | greedy tokens = fp32 "
        f"| continuations = fp32 (of {prompts}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, row in results.items():
        lines.append(
            f"| {mode} | {row['weight_bytes'] / MiB:.1f} | {row['weight_bytes'] / base['weight_bytes']:.3f} "
            f"| {row['prefill_seconds'] * 1e3:.1f} | {row['prefill_seconds'] / base['prefill_seconds']:.3f} "
            f"| {1 / row['decode_seconds_per_token']:.1f} "
            f"| {base['decode_seconds_per_token'] / row['decode_seconds_per_token']:.3f} "
            f"| {100 * row['token_agreement']:.1f} % | {row['whole_continuations']} |"
        )
    return "\n".join(lines)


# -- which modules stay in full precision (trained navil-tiny) ------------------------------------------------

KEEP_CHOICES = {
    "nothing (every linear quantized)": [],
    "LM head": ["language_model.lm_head"],
    "LM head + connector (the model's default)": None,
    "LM head + connector + vision encoder": ["language_model.lm_head", "mlp1", "vision_model"],
}


def keep_study(args):
    from navil.processing_navil import NaViLProcessor
    from navil.training import answer_questions
    from navil.training.synthetic_data import ShapesDataset

    processor = NaViLProcessor.from_pretrained(CHECKPOINT)
    data = ShapesDataset(seed=1234)  # training uses seed 0
    samples = [data[index] for index in range(args.questions)]

    def replies(model):
        images, questions = [sample.image for sample in samples], [sample.question for sample in samples]
        return answer_questions(model, processor, images, questions, batch_size=40)

    def accuracy(answers):
        return sum(answer == sample.answer for answer, sample in zip(answers, samples)) / len(samples)

    reference = replies(load(CHECKPOINT, "float32"))
    rows = [("float32", "—", 0, accuracy(reference), 1.0)]
    for mode in args.keep_modes:
        for label, modules in KEEP_CHOICES.items():
            model = load(CHECKPOINT, mode, modules)
            quantized = sum(hasattr(type(parameter), "__tensor_flatten__") for parameter in model.parameters())
            quantized += sum(isinstance(module, DynamicInt8Linear) for module in model.modules())
            answers = replies(model)
            same = sum(a == b for a, b in zip(answers, reference)) / len(samples)
            rows.append((mode, label, quantized, accuracy(answers), same))
            print(
                f"{mode} / {label}: accuracy {rows[-1][3]:.3f}, same replies {same:.3f}", file=sys.stderr, flush=True
            )
    lines = [
        f"| mode | kept in full precision | quantized linears | accuracy ({args.questions} questions) "
        "| replies = float32 |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {k} | {q} | {100 * a:.1f} % | {100 * s:.1f} % |" for m, k, q, a, s in rows]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--backbone", choices=("internlm2", "qwen3"), default="internlm2")
    parser.add_argument("--prompts", type=int, default=20, help="image prompts compared with float32")
    parser.add_argument("--image-side", type=int, default=256, help="pixels of the compared prompts' images")
    parser.add_argument("--repeats", type=int, help="timed runs (default: the preset's)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt compared")
    parser.add_argument("--decode-tokens", type=int, default=64, help="new tokens per timed decode run")
    parser.add_argument("--keep-study", action="store_true", help="the full-precision study on navil-tiny instead")
    parser.add_argument("--questions", type=int, default=200, help="held-out questions of --keep-study")
    parser.add_argument(
        "--keep-modes",
        nargs="+",
        choices=[mode for mode, settings in MODES.items() if "bits" in settings or settings.get("dynamic", 0) is None],
        default=["torchao int8", "torchao int4", "int8 dynamic (quantize_for_cpu)"],
        help="quantized modes of --keep-study",
    )
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import torchao
    except ImportError:
        raise SystemExit("torchao is not installed: pip install -e '.[quant]'") from None
    started = time.perf_counter()
    environment = (
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, torchao {torchao.__version__}"
    )
    if args.keep_study:
        print(keep_study(args))
    else:
        results, preset = measure_modes(args)
        print(
            f"preset {args.preset} ({args.backbone}); agreement: {args.prompts} prompts ({args.image_side} px image + "
            f"{preset.question_tokens} question tokens) x {args.new_tokens} greedy tokens; prefill: one "
            f"{preset.prefill_image_side} px image prompt; decode: {args.decode_tokens} new tokens at batch 1; "
            f"medians of {preset.repeats} runs after {preset.warmup} warm-up, the modes taken in turns"
        )
        print(modes_table(results, args.prompts))
        if args.json:
            args.json.write_text(json.dumps(dict(args=vars(args) | {"json": str(args.json)}, results=results)))
    print(f"{environment}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
