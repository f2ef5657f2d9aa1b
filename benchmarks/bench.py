"""Speed and memory of NaViL against a dense transformers LLM of the same shape.

    python benchmarks/bench.py --preset tiny|small|navil-2b-shape [--device cpu|cuda] [--dtype float32|bfloat16]
        [--backbone internlm2|qwen3] [--compile] [--json out.json] [--png out.png]

Builds random-weight models and prints one table: the vision encoder (ViT + connector) at three patch counts, single
scale and with the multi-scale pyramid; prefill of one image + a short question through the modality-expert LLM;
greedy decode at batch 1 and 8; the same prefill and decode for a dense baseline built from transformers' own classes
(`LlamaForCausalLM` for the InternLM2 shape, `Qwen3ForCausalLM` for the Qwen3 shape) fed the same number of tokens;
and the ratios ours/dense. Times are medians of repeated runs after warm-up, NaViL and dense taken in turns; a
decode step is the time between consecutive steps of `generate` (marked by a stopping criterion), so prefill is
excluded and bursts of load on a shared machine move the median little.

Peak memory is the increase over the memory in use just before the call: on CUDA from
`torch.cuda.max_memory_allocated`; on CPU from the process's peak resident set size (`VmHWM`, reset through
`/proc/self/clear_refs` before each call) in a separate worker process whose glibc returns every allocation of 64 KiB
or more to the system on free (`MALLOC_MMAP_THRESHOLD_`), so freed tensors cannot hide in the heap. Timings run in
the parent process with the default allocator.
"""

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count
from transformers import LlamaForCausalLM, Qwen3ForCausalLM, StoppingCriteria, StoppingCriteriaList

from navil.compat_navil import compiled_decode_settings
from navil.configuration_navil import SPECIAL_TOKEN_EMBEDDING_ROWS, NaViLConfig
from navil.image_processing_navil import NaViLImageProcessor
from navil.image_processing_navil_fast import NaViLImageProcessorFast
from navil.layouts_navil import LAYOUTS, layout_of_backbone
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.training import dense_text_config, special_token_ids_at_end

MiB = 2**20
PROCESSOR_SIDES = (1024, 2048)  # square images of the slow/fast image processor comparison, multi-scale
PROCESSOR_REPEATS = 11  # the processors are cheap next to the models: more runs steady their medians


@dataclass
class Preset:
    vision: dict
    text: dict
    patch_counts: tuple  # vision encoder sizes (square images), single scale
    prefill_image_side: int  # pixels of the square image of the prefill prompt
    min_dynamic_patch: int  # smallest pyramid scale, in patches
    question_tokens: int
    decode_tokens: int
    warmup: int
    repeats: int
    note: str = ""
    backbones: tuple = ("internlm2", "qwen3")


PRESETS = {
    "tiny": Preset(
        vision=dict(
            hidden_size=64,
            num_attention_heads=2,
            num_hidden_layers=4,
            intermediate_size=256,
            fullatt_block_indexes=[1, 3],
        ),
        text=dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        patch_counts=(64, 256, 1024),
        prefill_image_side=256,
        min_dynamic_patch=16,
        question_tokens=16,
        decode_tokens=32,
        warmup=1,
        repeats=3,
        note="patch counts scaled down 16x (64/256/1k instead of 1k/4k/16k); 32 new tokens",
    ),
    "small": Preset(
        vision=dict(
            hidden_size=256,
            num_attention_heads=4,
            num_hidden_layers=6,
            intermediate_size=1024,
            fullatt_block_indexes=[2, 5],
        ),
        text=dict(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
        patch_counts=(256, 1024, 4096),
        prefill_image_side=512,
        min_dynamic_patch=64,
        question_tokens=16,
        decode_tokens=128,
        warmup=1,
        repeats=5,
        note="patch counts scaled down 4x (256/1k/4k instead of 1k/4k/16k)",
    ),
    "navil-2b-shape": Preset(
        vision=dict(),  # the NaViLVisionConfig defaults: NaViL-2B's ViT
        text=dict(),  # the NaViLTextConfig defaults: NaViL-2B's InternLM2-1.8B
        patch_counts=(1024, 4096, 16384),
        prefill_image_side=1024,
        min_dynamic_patch=256,
        question_tokens=16,
        decode_tokens=128,
        warmup=2,
        repeats=5,
        backbones=("internlm2",),
    ),
}


# -- models and inputs -----------------------------------------------------------------------------------------


def build_models(preset, backbone, device, dtype):
    """(NaViL, dense baseline) with random weights, in eval mode, on `device` in `dtype`."""
    text = dict(preset.text, architectures=[layout_of_backbone(backbone).architecture], rope_theta=1e6)
    config = NaViLConfig(
        vision_config=preset.vision,
        text_config=text,
        min_dynamic_patch=preset.min_dynamic_patch,
    )
    config.special_token_ids = special_token_ids_at_end(config.text_config.vocab_size)
    dense_class = LlamaForCausalLM if backbone == "internlm2" else Qwen3ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        models = NaViLForConditionalGeneration(config), dense_class(dense_text_config(config.text_config))
    for model in models:
        model.to(dtype).eval()
        model.generation_config.eos_token_id = None  # decode exactly the requested number of tokens
        model.generation_config.pad_token_id = 0
    return models


def pyramid_grids(side_px, config):
    """Grids (t, h, w) of the multi-scale pyramid of a square image, smallest first, as the image processor makes."""
    vision = config.vision_config
    patch, merge = vision.patch_size, vision.merge_size
    unit = patch * merge
    min_pixels = config.min_dynamic_patch * patch * patch

    def one_pass(max_pixels):
        size = side_px
        if side_px * side_px > max_pixels:
            size = math.floor(side_px / math.sqrt(side_px * side_px / max_pixels))
        elif side_px * side_px < min_pixels:
            size = math.ceil(side_px * math.sqrt(min_pixels / (side_px * side_px)))
        cells = math.ceil(size / unit) * merge
        return (1, cells, cells)

    grids = [one_pass(config.max_dynamic_patch * patch * patch)]
    while True:
        smallest = grids[0]
        max_pixels = smallest[1] * smallest[2] * patch * patch * config.scale_downsample_ratio**2
        if max_pixels < min_pixels:
            break
        grid = one_pass(max_pixels)
        if grid[1] * grid[2] >= smallest[1] * smallest[2]:
            break
        grids.insert(0, grid)
    return grids


def random_pixels(grids, config, device, dtype):
    patch = config.vision_config.patch_size
    num_patches = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.rand(num_patches, 3 * patch * patch, device=device, dtype=dtype) * 2 - 1
    return pixel_values, torch.tensor(grids, dtype=torch.long)


def image_prompt(grids, config, question_tokens, device):
    """`<img>` + per scale: rows of `<IMG_CONTEXT>` each closed by `<IMG_LINE_BREAK>`, `<IMG_FRAME_BREAK>` + `</img>`,
    then a question of random text ids: the layout the processor builds."""
    ids = config.special_token_ids
    merge = config.vision_config.merge_size
    tokens = [ids["<img>"]]
    for _, h, w in grids:
        for _ in range(h // merge):
            tokens += [ids["<IMG_CONTEXT>"]] * (w // merge) + [ids["<IMG_LINE_BREAK>"]]
        tokens.append(ids["<IMG_FRAME_BREAK>"])
    tokens.append(ids["</img>"])
    tokens += text_ids(question_tokens, config, seed=1)[0].tolist()
    return torch.tensor([tokens], device=device)


def text_ids(length, config, seed, batch=1):
    generator = torch.Generator().manual_seed(seed)
    high = config.text_config.vocab_size - len(SPECIAL_TOKEN_EMBEDDING_ROWS)
    return torch.randint(1, high, (batch, length), generator=generator)


# -- measuring -------------------------------------------------------------------------------------------------


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_times(functions, device, warmup, repeats):
    """Median wall time in seconds of each callable over `repeats` runs after `warmup` runs.

    The callables run in turns, so that a change of load on the machine hits all of them alike.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


class StepClock(StoppingCriteria):
    """Marks the end of every generation step: a CUDA event on GPU (no synchronisation), the wall clock on CPU."""

    def __init__(self, device):
        self.device = device
        self.marks = []
        self.step_seconds = []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device == "cuda":
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def end_run(self):
        """Keeps the durations of the decode steps of the run that just ended (the first mark ends the prefill)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.step_seconds += [start.elapsed_time(end) / 1e3 for start, end in zip(self.marks, self.marks[1:])]
        else:
            self.step_seconds += [end - start for start, end in zip(self.marks, self.marks[1:])]
        self.marks = []


def _status_kib(field_name):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def peak_memory(fn, device):
    """Peak memory of `fn()` in bytes above what was in use before it (after one warm-up call)."""
    fn()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set size
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def photo_like_image(side: int, seed: int = 0) -> Image.Image:
    """A `side` x `side` RGB image with smooth colour areas and sharp edges (upscaled noise plus rectangles)."""
    rng = np.random.default_rng(seed)
    pixels = np.array(
        Image.fromarray(rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8)).resize(
            (side, side), Image.Resampling.BICUBIC
        )
    )
    for _ in range(8):
        top, left = rng.integers(0, side // 2, 2)
        pixels[top : top + side // 4, left : left + side // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def image_processors(config, device):
    """(slow, fast) multi-scale image processors with the model's pixel limits; the fast one works on `device`."""
    patch = config.vision_config.patch_size
    settings = dict(
        patch_size=patch,
        merge_size=config.vision_config.merge_size,
        min_pixels=config.min_dynamic_patch * patch * patch,
        max_pixels=config.max_dynamic_patch * patch * patch,
        scale_downsample_ratio=config.scale_downsample_ratio,
    )
    return NaViLImageProcessor(**settings), NaViLImageProcessorFast(device=device, **settings)


# torch's flop counter knows the attention kernels of accelerators only; the CPU kernel does the same work
CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if CPU_SDPA not in flop_registry:

    @register_flop_formula(CPU_SDPA)
    def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def flops_of(function) -> int:
    """Floating-point operations of one call of `function`, counted by torch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


class Workload:
    """The inputs and the callables measured, for one preset on one device."""

    def __init__(self, preset, backbone, device, dtype):
        self.preset, self.device = preset, device
        self.model, self.dense = build_models(preset, backbone, device, dtype)
        config = self.model.config
        patch = config.vision_config.patch_size
        self.vision_inputs = {}
        for count in preset.patch_counts:
            side_px = math.isqrt(count) * patch
            single = [(1, side_px // patch, side_px // patch)]
            for kind, grids in (("single", single), ("pyramid", pyramid_grids(side_px, config))):
                self.vision_inputs[count, kind] = random_pixels(grids, config, device, dtype)
        grids = pyramid_grids(preset.prefill_image_side, config)
        self.pixel_values, self.image_grid_thw = random_pixels(grids, config, device, dtype)
        self.prompt_ids = image_prompt(grids, config, preset.question_tokens, device)
        with torch.inference_mode():
            self.embeds, self.visual_mask, _ = self.model.embed_tokens(
                self.prompt_ids, self.pixel_values, self.image_grid_thw
            )
        self.dense_embeds = torch.randn_like(self.embeds)
        # the model's pixel limits for the prompt image; the processors' defaults (the NaViL demo's) for the others
        self.processors = {
            "prompt": dict(zip(("slow", "fast"), image_processors(config, device))),
            "default": dict(slow=NaViLImageProcessor(), fast=NaViLImageProcessorFast(device=device)),
        }
        self.images = {side: photo_like_image(side) for side in (preset.prefill_image_side, *PROCESSOR_SIDES)}
        self.gemm_inputs = self.encoder_gemm_inputs(max(preset.patch_counts), device, dtype)

    def encoder_gemm_inputs(self, count, device, dtype):
        """Operands of the vision encoder's largest matmul at `count` patches: [count, hidden] x [hidden, mlp]."""
        vision = self.model.config.vision_config
        return (
            torch.randn(count, vision.hidden_size, device=device, dtype=dtype),
            torch.randn(vision.hidden_size, vision.intermediate_size, device=device, dtype=dtype),
        )

    def gemm(self):
        return torch.mm(*self.gemm_inputs)

    def preprocess(self, settings, which, side):
        return self.processors[settings][which](self.images[side], return_tensors="pt")

    @torch.inference_mode()
    def vision_of_prompt(self):
        return self.model.get_image_features(self.pixel_values, self.image_grid_thw).pooler_output

    @torch.inference_mode()
    def vision(self, count, kind, model=None):
        model = self.model if model is None else model
        return torch.cat(model.get_image_features(*self.vision_inputs[count, kind]).pooler_output)

    def compiled_vision_model(self):
        """A copy of NaViL whose vision layers run through `compile_layers()`."""
        model = copy.deepcopy(self.model)
        model.vision_model.compile_layers()
        return model

    @torch.inference_mode()
    def prefill(self, which):
        if which == "navil":
            return self.model.language_model(
                inputs_embeds=self.embeds, visual_token_mask=self.visual_mask, use_cache=True, logits_to_keep=1
            )
        return self.dense(inputs_embeds=self.dense_embeds, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def first_token(self):
        return self.model(
            input_ids=self.prompt_ids,
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            use_cache=True,
            logits_to_keep=1,
        )

    def generate(self, which, batch, new_tokens, compiled, clock):
        model = self.model if which == "navil" else self.dense
        input_ids = text_ids(self.preset.question_tokens, self.model.config, seed=2, batch=batch).to(self.device)
        kwargs = {}
        if compiled:  # navil's documented argument; the dense model gets the settings it stands for
            kwargs = dict(compile_decode=True) if which == "navil" else compiled_decode_settings(model.device)
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
            **kwargs,
        )


def memory_measurements(workload):
    """Peak memory in bytes of the vision encoder runs and of both prefills."""
    device = workload.device
    results = {}
    for count, kind in workload.vision_inputs:
        results[f"vision/{count}/{kind}"] = peak_memory(partial(workload.vision, count, kind), device)
    for which in ("navil", "dense"):
        results[f"prefill/{which}"] = peak_memory(partial(workload.prefill, which), device)
    return results


def memory_in_worker(args):
    """Runs `memory_measurements` in a fresh process with glibc's mmap threshold pinned (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    command = [sys.executable, __file__, "--memory-worker", "--preset", args.preset, "--device", args.device]
    command += ["--dtype", args.dtype, "--backbone", args.backbone]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def decode_seconds_per_step(workload, batch, compiled=False):
    """Median time of one greedy decode step of NaViL and of the dense model, over all steps of runs taken in turns."""
    preset = workload.preset
    clocks = {which: StepClock(workload.device) for which in ("navil", "dense")}
    for run in range(preset.warmup + preset.repeats):
        for which, clock in clocks.items():
            workload.generate(which, batch, preset.decode_tokens, compiled, clock)
            if run < preset.warmup:
                clock.marks = []
            else:
                clock.end_run()
    return {which: statistics.median(clock.step_seconds) for which, clock in clocks.items()}


# -- the table -------------------------------------------------------------------------------------------------


def measure(args, preset):
    workload = Workload(preset, args.backbone, args.device, DTYPES[args.dtype])
    memory = memory_in_worker(args) if args.device == "cpu" else memory_measurements(workload)
    functions = {
        f"vision/{count}/{kind}": partial(workload.vision, count, kind) for count, kind in workload.vision_inputs
    }
    functions.update({f"prefill/{which}": partial(workload.prefill, which) for which in ("navil", "dense")})
    functions["first-token"] = workload.first_token
    functions["first-token/vision"] = workload.vision_of_prompt
    functions["gemm"] = workload.gemm
    count = max(preset.patch_counts)
    if args.compile:
        functions[f"vision-compiled/{count}/single"] = partial(
            workload.vision, count, "single", workload.compiled_vision_model()
        )
    timed = median_times(functions, args.device, preset.warmup, preset.repeats)
    preprocessing = {}
    for which in ("slow", "fast"):
        preprocessing[f"preprocess/{which}/prompt"] = partial(
            workload.preprocess, "prompt", which, preset.prefill_image_side
        )
        for side in PROCESSOR_SIDES:
            preprocessing[f"preprocess/{which}/{side}"] = partial(workload.preprocess, "default", which, side)
    timed.update(median_times(preprocessing, args.device, 1, PROCESSOR_REPEATS))
    decode_runs = [("decode", 1, False), ("decode", 8, False)]
    if args.compile:
        decode_runs += [("decode-compiled", 1, True), ("decode-compiled", 8, True)]
    for name, batch, compiled in decode_runs:
        for which, seconds in decode_seconds_per_step(workload, batch, compiled).items():
            timed[f"{name}/{which}/{batch}"] = seconds
    counts = {
        key: int(sum(t * h * w for t, h, w in grids.tolist())) for key, (_, grids) in workload.vision_inputs.items()
    }
    count = max(preset.patch_counts)
    flops = dict(vision=flops_of(partial(workload.vision, count, "single")), gemm=flops_of(workload.gemm))
    shape = dict(
        flops=flops,
        vision_share_of_gemm_peak=(flops["vision"] / timed[f"vision/{count}/single"])
        / (flops["gemm"] / timed["gemm"]),
        compiled_vision_share_of_gemm_peak=(flops["vision"] / timed[f"vision-compiled/{count}/single"])
        / (flops["gemm"] / timed["gemm"])
        if args.compile
        else None,
        processor_slow_over_fast={
            side: timed[f"preprocess/slow/{side}"] / timed[f"preprocess/fast/{side}"] for side in PROCESSOR_SIDES
        },
        prompt_tokens=workload.prompt_ids.shape[1],
        visual_tokens=int(workload.visual_mask.sum()),
        prefill_scales=workload.image_grid_thw.tolist(),
        navil_parameters=sum(p.numel() for p in workload.model.parameters()),
        dense_parameters=sum(p.numel() for p in workload.dense.parameters()),
    )
    return timed, memory, counts, shape


def rows_from(args, preset, timed, memory, counts, shape):
    """Table rows: (measurement, NaViL, dense, ours/dense, target, met) with numbers as floats or None."""
    rows = []
    for (count, kind), total in counts.items():
        key = f"vision/{count}/{kind}"
        what = "single scale" if kind == "single" else f"pyramid, {total} patches"
        rows.append((f"vision encoder {count} patches ({what}): time ms", timed[key] * 1e3, None, None, "", None))
        rows.append((f"vision encoder {count} patches ({what}): peak MiB", memory[key] / MiB, None, None, "", None))
    small, large = preset.patch_counts[-2:]
    for kind in ("single", "pyramid"):
        growth = memory[f"vision/{large}/{kind}"] / (memory[f"vision/{small}/{kind}"] * large / small)
        label = f"vision peak memory {large} / ({large // small} x {small}) patches, {kind}"
        rows.append((label, growth, None, None, "<= 1.2", growth <= 1.2))
    tokens = f"{shape['prompt_tokens']} tokens, {shape['visual_tokens']} visual"
    ratio = timed["prefill/navil"] / timed["prefill/dense"]
    rows.append(
        (
            f"LLM prefill, 1 image + question ({tokens}): ms",
            timed["prefill/navil"] * 1e3,
            timed["prefill/dense"] * 1e3,
            ratio,
            "<= 1.15",
            ratio <= 1.15,
        )
    )
    rows.append(
        (
            "LLM prefill: peak MiB",
            memory["prefill/navil"] / MiB,
            memory["prefill/dense"] / MiB,
            memory["prefill/navil"] / memory["prefill/dense"],
            "",
            None,
        )
    )
    rows.append(("time to first token (vision + prefill): ms", timed["first-token"] * 1e3, None, None, "", None))
    side = preset.prefill_image_side
    parts = [
        (f"preprocessing ({side}x{side} px image, fast processor)", timed["preprocess/fast/prompt"]),
        ("vision encoder", timed["first-token/vision"]),
        ("embedding + LLM prefill", timed["first-token"] - timed["first-token/vision"]),
    ]
    for label, seconds in parts:
        rows.append((f"time to first token, {label}: ms", seconds * 1e3, None, None, "", None))
    slow, fast = timed["preprocess/slow/prompt"], timed["preprocess/fast/prompt"]
    label = (
        f"image processor, the prompt's {side}x{side} px image: slow / fast ({slow * 1e3:.0f} / {fast * 1e3:.0f} ms)"
    )
    rows.append((label, slow / fast, None, None, "", None))
    for processed in PROCESSOR_SIDES:
        slow, fast = timed[f"preprocess/slow/{processed}"], timed[f"preprocess/fast/{processed}"]
        label = f"image processor (defaults), {processed}x{processed} px multi-scale: slow / fast ({slow * 1e3:.0f} / {fast * 1e3:.0f} ms)"
        rows.append((label, slow / fast, None, None, ">= 4", slow / fast >= 4))
    count = max(preset.patch_counts)
    share = shape["vision_share_of_gemm_peak"]
    label = f"vision encoder {count} patches: FLOP/s over a [{count}, hidden] x [hidden, mlp] matmul's"
    rows.append((label, share, None, None, ">= 0.70", share >= 0.70))
    if args.compile:
        share = shape["compiled_vision_share_of_gemm_peak"]
        rows.append((f"{label}, compile_layers()", share, None, None, ">= 0.70", share >= 0.70))
    decode_rows = [(f"decode batch {batch}, eager", f"decode/{{}}/{batch}", batch) for batch in (1, 8)]
    if args.compile:
        decode_rows += [(f"decode batch {b}, compile_decode=True", f"decode-compiled/{{}}/{b}", b) for b in (1, 8)]
    for label, key, batch in decode_rows:
        ours, dense = timed[key.format("navil")], timed[key.format("dense")]
        ratio = ours / dense
        rows.append((f"{label}: tokens/s", batch / ours, batch / dense, ratio, "<= 1.05 (time/token)", ratio <= 1.05))
    if args.compile:
        for batch in (1, 8):
            speedup = timed[f"decode/navil/{batch}"] / timed[f"decode-compiled/navil/{batch}"]
            label = f"decode batch {batch}: compile_decode=True / eager speed (NaViL)"
            rows.append(
                (label, speedup, None, None, ">= 1.5" if batch == 1 else "", speedup >= 1.5 if batch == 1 else None)
            )
    return rows


def format_table(rows):
    def number(value):
        if value is None:
            return "—"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"

    lines = [
        "| measurement | NaViL | dense | ours/dense | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, ours, dense, ratio, target, met in rows:
        verdict = "" if met is None else ("yes" if met else "NO")
        lines.append(f"| {label} | {number(ours)} | {number(dense)} | {number(ratio)} | {target} | {verdict} |")
    return "\n".join(lines)


def draw_png(path, preset, rows, counts, timed, memory):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'navil[bench]'); skipping {path}")
        return
    figure, (ratios_axis, vision_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    compared = [row for row in rows if row[3] is not None]
    labels = []
    for label, *_ in compared:
        name, unit = label.rsplit(": ", 1)
        name = "LLM prefill" if name.startswith("LLM prefill") else name
        labels.append(f"{name} ({'memory' if 'MiB' in unit else 'time'})")
    ratios_axis.barh(labels, [row[3] for row in compared], color="tab:blue")
    ratios_axis.axvline(1.0, color="black", linewidth=0.8)
    ratios_axis.set_xlabel("NaViL / dense (time or memory)")
    ratios_axis.set_title("NaViL vs dense transformers LLM")
    for kind, style in (("single", "o-"), ("pyramid", "s--")):
        patches = [counts[count, kind] for count in preset.patch_counts]
        megabytes = [memory[f"vision/{count}/{kind}"] / MiB for count in preset.patch_counts]
        vision_axis.plot(patches, megabytes, style, label=f"peak MiB, {kind}")
    vision_axis.set_xscale("log")
    vision_axis.set_yscale("log")
    vision_axis.set_xlabel("patches")
    vision_axis.set_ylabel("peak memory (MiB)")
    vision_axis.set_title("vision encoder memory")
    vision_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"chart written to {path}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--backbone", choices=sorted(layout.backbone for layout in LAYOUTS.values()), default="internlm2"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add decode at batch 1 and 8 with generate(compile_decode=True) and the vision encoder's share with "
        "vision_model.compile_layers()",
    )
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--png", type=Path, help="draw the ratios and the vision memory curve (needs matplotlib)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.backbone not in preset.backbones:
        raise SystemExit(f"--preset {args.preset} has the {'/'.join(preset.backbones)} backbone only.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no GPU is available.")
    if args.memory_worker:
        workload = Workload(preset, args.backbone, args.device, DTYPES[args.dtype])
        print(json.dumps(memory_measurements(workload)))
        return
    started = time.perf_counter()
    timed, memory, counts, shape = measure(args, preset)
    rows = rows_from(args, preset, timed, memory, counts, shape)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    header = (
        f"NaViL benchmark — preset {args.preset} ({args.backbone}), {args.device} ({device_name}, "
        f"{torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {datetime.date.today()}"
    )
    print(header)
    if preset.note:
        print(f"Note: {preset.note}.")
    print(
        f"NaViL {shape['navil_parameters'] / 1e6:.1f} M parameters, dense {shape['dense_parameters'] / 1e6:.1f} M; "
        f"prefill image scales {shape['prefill_scales']}; medians of {preset.repeats} runs after {preset.warmup} "
        f"warm-up, taken in turns; decode: median time between consecutive steps of generate(), "
        f"{preset.decode_tokens} new tokens."
    )
    print(format_table(rows))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    header=header,
                    preset=args.preset,
                    preset_config=asdict(preset),
                    backbone=args.backbone,
                    device=args.device,
                    device_name=device_name,
                    dtype=args.dtype,
                    shape=shape,
                    vision_share_of_gemm_peak=shape["vision_share_of_gemm_peak"],
                    processor_slow_over_fast=shape["processor_slow_over_fast"],
                    seconds=timed,
                    peak_memory_bytes=memory,
                    rows=[dict(zip(("measurement", "navil", "dense", "ratio", "target", "met"), row)) for row in rows],
                ),
                indent=2,
            )
        )
    if args.png:
        draw_png(args.png, preset, rows, counts, timed, memory)


if __name__ == "__main__":
    main()
