"""The checks of benchmarks/gpu_check.sh (run that script, which makes the package importable and works offline).

    python benchmarks/gpu_check.py [--cpu] [--json out.json]

Prints one table, one row per check, each with its result, its reference or bound, and a verdict; exits non-zero
when a check fails (a check whose package is missing is skipped and says so). On a CUDA GPU, in under 8 minutes on
an H100/H200:
1. precision: the two golden checkpoints (tests/fixtures/golden, outputs of the original NaViL in float32 on CPU) in
   float32, bfloat16 and float16 against the golden logits of every chat case, within a stated tolerance relative to
   the largest golden logit, and greedy decoding reproducing the first golden tokens;
2. the NaViL-2B shape in bfloat16 (random weights, bench.py's `navil-2b-shape` preset, fewer repeats): greedy decode
   at batch 1 (eager, and static cache + torch.compile) and batch 8 against the bandwidth limit of the GPU found
   (bytes of the weights a decode step reads, the text experts and the LM head, over the nominal memory bandwidth of
   the device, or the measured copy bandwidth for an unknown one), next to the dense Llama of the same shape; the
   time to first token of a 1024x1024 image (vision encoder + prefill);
3. bitsandbytes 8-bit and 4-bit (nf4) through `load_in_8bit=True` / `load_in_4bit=True` on the embedded navil-tiny:
   the README example answered like float32 (when bitsandbytes is installed, e.g. from carried wheels);
4. `attn_implementation="flash_attention_2"` against sdpa in bfloat16 on the golden checkpoints (when flash_attn is
   installed);
5. `NaViLImageProcessorFast(device="cuda")` on 1024x1024 and 2048x2048 images (multi-scale): identical grids, pixel
   values within transformers' fast-processor tolerance (1e-1 absolute, 5e-3 mean) of the slow processor's, and the
   time against the slow processor on the CPU and the fast one on the CPU.

The speed rows run last (compiling takes longest); when gpu_check.sh's time limit stops the run, the rows measured
so far are still printed.

`--cpu` is the dry run: every step on the CPU with small shapes (bench.py's `tiny` preset, batch-1 static cache
without compile, no bandwidth limit), so that the script itself is tested where there is no GPU.
"""

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from bench import PRESETS, PROCESSOR_SIDES, Workload, decode_seconds_per_step, median_times, photo_like_image
from safetensors.torch import load_file
from transformers import AutoTokenizer

import navil
from navil.checks_navil import bitsandbytes_usable
from navil.image_processing_navil import NaViLImageProcessor
from navil.image_processing_navil_fast import NaViLImageProcessorFast
from navil.modeling_navil import NaViLForConditionalGeneration

PACKAGE = Path(navil.__file__).parent
sys.path.insert(0, str(PACKAGE / "tests"))
from conftest import BACKBONES, GOLDEN, case_pixel_inputs  # noqa: E402  (the golden files' own reader)

CHECKPOINT = PACKAGE / "checkpoints" / "navil-tiny"
EXAMPLE = json.loads((PACKAGE / "examples" / "shapes.json").read_text())
EXAMPLE_IMAGE = PACKAGE / "examples" / "shapes.png"

# max |logits - golden| / max |golden|, measured on CPU at 0.035 (bfloat16) and 0.0035 (float16) on these checkpoints
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.08, torch.float16: 0.01}
FIRST_TOKENS = 4  # greedy tokens that must equal the golden ones
# nominal memory bandwidth in bytes/s, by a part of the device name (the first match wins)
NOMINAL_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM (HBM3)
    "A100-SXM4-80GB": 2.04e12,
    "A100": 1.56e12,
}


class Table:
    def __init__(self):
        self.rows = []

    def add(self, check, result, reference="", passed=None):
        self.rows.append(dict(check=check, result=result, reference=reference, passed=passed))
        verdict = "" if passed is None else ("ok" if passed else "FAILED")
        print(f"  {check}: {result} {reference} {verdict}", file=sys.stderr, flush=True)

    def render(self):
        lines = ["| check | result | reference / bound | verdict |", "|---|---:|---|---|"]
        for row in self.rows:
            verdict = "" if row["passed"] is None else ("ok" if row["passed"] else "FAILED")
            lines.append(f"| {row['check']} | {row['result']} | {row['reference']} | {verdict} |")
        return "\n".join(lines)

    @property
    def failed(self):
        return [row["check"] for row in self.rows if row["passed"] is False]


# -- 1. precision on the golden checkpoints ---------------------------------------------------------------------


def golden_cases(backbone):
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    outputs = load_file(GOLDEN / f"{backbone}.outputs.safetensors")
    pixels = load_file(GOLDEN / "image_processor.safetensors")
    for case, spec in manifest["models"][backbone]["cases"].items():
        pixel_values, grids, _ = case_pixel_inputs(pixels, spec["images"])
        yield (
            case,
            dict(
                input_ids=outputs[f"case.{case}.input_ids"],
                pixel_values=pixel_values,
                image_grid_thw=grids,
                logits=outputs[f"case.{case}.logits"],
                generated_ids=outputs[f"case.{case}.generated_ids"],
            ),
        )


def golden_model(backbone, device, dtype, **kwargs):
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / backbone, dtype=dtype, **kwargs).to(device).eval()
    model.config.special_token_ids = dict(manifest["tokenizer_info"]["special_token_ids"])
    return model, manifest["tokenizer_info"]["special_token_ids"]


@torch.inference_mode()
def case_outputs(model, tokens, case, device):
    """(float32 logits on the CPU, greedy token ids) of one golden case."""
    inputs = dict(input_ids=case["input_ids"].to(device), image_grid_thw=case["image_grid_thw"])
    if case["pixel_values"] is not None:
        inputs["pixel_values"] = case["pixel_values"].to(device)
    logits = model(**inputs).logits.float().cpu()
    generated = model.generate(
        **inputs,
        attention_mask=torch.ones_like(inputs["input_ids"]),
        max_new_tokens=len(case["generated_ids"]),
        do_sample=False,
        eos_token_id=tokens["<|im_end|>"],
        pad_token_id=tokens["<|endoftext|>"],
    )
    return logits, generated[0, inputs["input_ids"].shape[1] :].cpu()


def leading_matches(tokens, reference):
    count = 0
    for token, expected in zip(tokens.tolist(), reference.tolist()):
        if token != expected:
            break
        count += 1
    return count


def precision_checks(table, device):
    for backbone in BACKBONES:
        cases = list(golden_cases(backbone))
        for dtype in LOGIT_TOLERANCE:
            model, tokens = golden_model(backbone, device, dtype)
            worst, fewest = 0.0, math.inf
            for _, case in cases:
                logits, generated = case_outputs(model, tokens, case, device)
                worst = max(worst, ((logits - case["logits"]).abs().max() / case["logits"].abs().max()).item())
                needed = min(FIRST_TOKENS, len(case["generated_ids"]))
                fewest = min(fewest, leading_matches(generated, case["generated_ids"]) / needed)
            name = str(dtype).removeprefix("torch.")
            tolerance = LOGIT_TOLERANCE[dtype]
            table.add(
                f"{backbone} {name}: max logit error / max logit ({len(cases)} cases)",
                f"{worst:.2e}",
                f"<= {tolerance:g}",
                worst <= tolerance,
            )
            table.add(
                f"{backbone} {name}: first {FIRST_TOKENS} greedy tokens = golden",
                f"{100 * min(fewest, 1.0):.0f} % (worst case)",
                "100 %",
                fewest >= 1.0,
            )
            del model


# -- 2. speed of the NaViL-2B shape ---------------------------------------------------------------------------


def memory_bandwidth(device):
    """(bytes/s, where from): the nominal bandwidth of a known GPU, else a measured device-to-device copy."""
    name = torch.cuda.get_device_name()
    for part, bandwidth in NOMINAL_BANDWIDTH.items():
        if part in name:
            return bandwidth, f"nominal for {name}"
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_times({"copy": partial(target.copy_, source)}, device, warmup=2, repeats=10)["copy"]
    return 2 * source.numel() / seconds, f"measured copy on {name}"


def decode_weight_bytes(model):
    """Bytes a decode step reads: the language model's weights without the visual experts and the word embeddings
    (a step looks up one row), the final norm and the LM head included."""
    embeddings = model.language_model.get_input_embeddings().weight
    return sum(
        parameter.numel() * parameter.element_size()
        for name, parameter in model.language_model.named_parameters()
        if parameter is not embeddings and not any(part.endswith("_ve") for part in name.split("."))
    )


def static_cache_seconds_per_step(workload):
    """Batch-1 decode with a static cache but no torch.compile (the CPU dry run of the compiled row)."""
    models = (workload.model, workload.dense)
    for model in models:
        model.generation_config.cache_implementation = "static"
    try:
        return decode_seconds_per_step(workload, 1)
    finally:
        for model in models:
            model.generation_config.cache_implementation = None


def speed_checks(table, device):
    if device == "cuda":
        preset = dataclasses.replace(PRESETS["navil-2b-shape"], warmup=1, repeats=3, decode_tokens=64)
        dtype, label = torch.bfloat16, "NaViL-2B shape, bf16"
    else:
        preset = dataclasses.replace(PRESETS["tiny"], patch_counts=(64,), warmup=0, repeats=1, decode_tokens=4)
        dtype, label = torch.float32, "tiny preset, fp32 (dry run)"
    workload = Workload(preset, "internlm2", device, dtype)
    limit = None
    if device == "cuda":
        bandwidth, source = memory_bandwidth(device)
        weight_bytes = decode_weight_bytes(workload.model)
        limit = bandwidth / weight_bytes
        table.add(
            f"{label}: bandwidth limit of batch-1 decode",
            f"{limit:.0f} tokens/s",
            f"{weight_bytes / 1e9:.2f} GB per step at {bandwidth / 1e12:.2f} TB/s ({source}); H100 SXM: 985",
        )
    runs = {
        "batch 1, eager": (1, partial(decode_seconds_per_step, workload, 1)),
        "batch 8, eager": (8, partial(decode_seconds_per_step, workload, 8)),
    }
    if device == "cuda":
        runs["batch 1, static cache + torch.compile"] = (1, partial(decode_seconds_per_step, workload, 1, True))
    else:
        runs["batch 1, static cache (compiled on GPU only)"] = (1, partial(static_cache_seconds_per_step, workload))
    side = preset.prefill_image_side
    seconds = median_times({"ttft": workload.first_token}, device, preset.warmup, preset.repeats)["ttft"]
    tokens = workload.prompt_ids.shape[1]
    table.add(f"{label}: time to first token, {side}x{side} image ({tokens} tokens)", f"{seconds * 1e3:.0f} ms")
    for name, (batch, measure) in runs.items():  # the compiled run last: its compilation takes longest
        try:
            seconds = measure()
        except Exception as error:  # a compile failure must not hide the other rows
            table.add(f"{label}: decode {name}", f"error: {type(error).__name__}: {error}"[:300], "", False)
            continue
        ours, dense = batch / seconds["navil"], batch / seconds["dense"]
        reference = f"dense Llama {dense:.0f} tokens/s"
        if limit is not None:
            reference += f"; {100 * ours / (batch * limit):.0f} % of the bandwidth limit ({batch * limit:.0f})"
        table.add(f"{label}: decode {name}", f"{ours:.0f} tokens/s", reference)


# -- 3. bitsandbytes, 4. flash attention ---------------------------------------------------------------------


def readme_reply(model):
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    return model.chat(tokenizer, str(EXAMPLE_IMAGE), EXAMPLE["question"], dict(max_new_tokens=16, do_sample=False))


def bitsandbytes_checks(table, device):
    if not bitsandbytes_usable():
        table.add("bitsandbytes 8-bit / 4-bit chat", "skipped: bitsandbytes is not installed (carry its wheel)")
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    expected = readme_reply(NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype).to(device).eval())
    for flag in ("load_in_8bit", "load_in_4bit"):
        check = f"navil-tiny {flag}=True: README example"
        try:
            model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype, **{flag: True}).eval()
            reply = readme_reply(model)
        except Exception as error:  # bitsandbytes' CPU 4-bit kernel needs widths divisible by 64 (navil-tiny's: 96)
            table.add(check, f"error: {type(error).__name__}: {error}"[:300], "", False)
            continue
        table.add(check, repr(reply), f"float32: {expected!r}", reply == expected)


def flash_attention_checks(table, device):
    from transformers.utils import is_flash_attn_2_available

    if device != "cuda" or not is_flash_attn_2_available():
        table.add("flash_attention_2 vs sdpa", "skipped: flash_attn is not installed (or no GPU)")
        return
    for backbone in BACKBONES:
        models = {
            impl: golden_model(backbone, device, torch.bfloat16, attn_implementation=impl)
            for impl in ("sdpa", "flash_attention_2")
        }
        worst, same = 0.0, True
        for _, case in golden_cases(backbone):
            sdpa_logits, sdpa_tokens = case_outputs(*models["sdpa"], case, device)
            flash_logits, flash_tokens = case_outputs(*models["flash_attention_2"], case, device)
            worst = max(worst, ((flash_logits - sdpa_logits).abs().max() / sdpa_logits.abs().max()).item())
            same &= torch.equal(flash_tokens[:FIRST_TOKENS], sdpa_tokens[:FIRST_TOKENS])
        tolerance = LOGIT_TOLERANCE[torch.bfloat16]
        table.add(
            f"{backbone} bf16 flash_attention_2 vs sdpa: logit error",
            f"{worst:.2e}",
            f"<= {tolerance:g}",
            worst <= tolerance,
        )
        table.add(f"{backbone} bf16 flash_attention_2: first {FIRST_TOKENS} tokens = sdpa", str(same), "True", same)


class TimeLimit(BaseException):
    pass


# -- 5. the fast image processor on the device -----------------------------------------------------------------


def image_processor_checks(table, device):
    slow, fast_cpu, fast = NaViLImageProcessor(), NaViLImageProcessorFast(), NaViLImageProcessorFast(device=device)
    for side in PROCESSOR_SIDES:
        image = photo_like_image(side)
        reference, result = slow(image, return_tensors="pt"), fast(image, return_tensors="pt")
        difference = (result["pixel_values"].cpu() - reference["pixel_values"]).abs()
        same_grids = torch.equal(result["image_grid_thw"].cpu(), reference["image_grid_thw"]) and torch.equal(
            result["num_scales"].cpu(), reference["num_scales"]
        )
        table.add(
            f"fast image processor on {device}, {side}x{side} px multi-scale: difference to the slow processor",
            f"max {difference.max():.4f}, mean {difference.mean():.1e}",
            "<= 1e-1, mean <= 5e-3, identical grids",
            same_grids and difference.max() <= 1e-1 and difference.mean() <= 5e-3,
        )
        calls = {
            "slow (CPU)": partial(slow, image, return_tensors="pt"),
            "fast (CPU)": partial(fast_cpu, image, return_tensors="pt"),
            f"fast ({device})": partial(fast, image, return_tensors="pt"),
        }
        seconds = median_times(calls, device, 1, 5)
        ours = seconds[f"fast ({device})"]
        table.add(
            f"fast image processor on {device}, {side}x{side} px multi-scale: time",
            f"{ours * 1e3:.1f} ms",
            ", ".join(f"{name} {value * 1e3:.0f} ms ({value / ours:.1f}x)" for name, value in seconds.items()),
        )


def stop_on_timeout(signum, frame):
    raise TimeLimit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with small shapes")
    parser.add_argument("--json", type=Path, help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is visible; pass --cpu for the dry run.")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 rows compare with CPU float32
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    header = (
        f"NaViL GPU check on {name}: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(header, file=sys.stderr, flush=True)
    table = Table()
    signal.signal(signal.SIGTERM, stop_on_timeout)  # gpu_check.sh's time limit: still print the rows measured
    try:
        steps = (precision_checks, bitsandbytes_checks, flash_attention_checks, image_processor_checks, speed_checks)
        for step in steps:
            try:
                step(table, device)
            except Exception as error:  # one broken step must not hide the others' rows
                check = step.__name__.replace("_", " ")
                table.add(check, f"error: {type(error).__name__}: {error}"[:300], "", False)
    except TimeLimit:
        table.add("time limit", "reached: the rows after the last one above were not measured", "", False)
    print(header)
    print(table.render())
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(dict(header=header, rows=table.rows), indent=2))
    if table.failed:
        raise SystemExit(f"failed: {', '.join(table.failed)}")


if __name__ == "__main__":
    main()
