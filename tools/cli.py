"""The `navil` command: chat with a NaViL model (the embedded tiny one by default), train, evaluate, convert.

navil chat --image examples/shapes.png "What color is the circle?"
navil chat --image examples/shapes.png                 # interactive: one question per line
navil train --output-dir checkpoints/navil-tiny         # the recipe of the embedded model (see docs/training.md)
navil finetune --data examples/finetune/train.jsonl --output-dir runs/ft   # adapt a model to one's own chat data
navil eval --num-questions 3000 [--out-of-range|--drawn] # exact-match accuracy per question type
navil convert path/to/NaViL-2B NaViL-2B-hf              # make an original checkpoint loadable by Auto classes
navil serve checkpoints/navil-tiny --port 8000         # vLLM's OpenAI-compatible server (needs navil[vllm])
navil build-tokenizer tokenizer                         # rebuild the tiny model's tokenizer (deterministic)
"""

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Callable, Optional

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "navil-tiny"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers' SchedulerType names
TRUST_HELP = "run the model folder's own Python files (auto_map) instead of navil's; never files outside the folder"


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_model(model: Optional[str], device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """`(model, tokenizer)` from a folder or Hub id (the embedded tiny model when `model` is None), ready to chat: with
    the installed package's code, or with the folder's own code only with `trust_remote_code` (see tools/loading.py)."""
    from ..checks_navil import check_save_complete
    from .loading import load_navil_model, load_navil_tokenizer_safely

    path = str(model) if model else str(EMBEDDED_MODEL_DIR)
    if Path(path).is_dir():
        check_save_complete(Path(path))  # before the tokenizer, which an unfinished save may lack
    if not model and not EMBEDDED_MODEL_DIR.is_dir():
        raise SystemExit(f"The embedded model is missing ({EMBEDDED_MODEL_DIR}); train it with `navil train`.")
    device = _device(device)
    tokenizer = load_navil_tokenizer_safely(path, trust_remote_code)
    navil = load_navil_model(path, trust_remote_code, dtype=_dtype(dtype, device)).eval().to(device)
    navil.init_special_token_ids(tokenizer)
    return navil, tokenizer


def _answer(model, tokenizer, image, question: str, args) -> None:
    """Prints the reply to one question (streamed with --stream)."""
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    inputs = {}
    if image is not None and args.no_multiscale:
        processed = model.image_processor(image, return_tensors="pt")
        image = processed["pixel_values"]
        inputs = dict(num_patches_list=processed["image_grid_thw"], num_scales=processed["num_scales"])
    if args.stream:
        for piece in model.stream_chat(tokenizer, image, question, generation, **inputs):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.chat(tokenizer, image, question, generation, **inputs))


def run_chat(args) -> int:
    import torch

    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    image = args.image
    if image is not None and not str(image).startswith(("http://", "https://")) and not Path(image).is_file():
        raise SystemExit(f"No image at {image}.")
    with torch.inference_mode():
        if args.question:
            _answer(model, tokenizer, image, " ".join(args.question), args)
            return 0
        print("Ask a question per line (an empty line or Ctrl-D quits).", file=sys.stderr)
        while True:
            try:
                question = input("> ").strip()
            except EOFError:
                break
            if not question:
                break
            _answer(model, tokenizer, image, question, args)
    return 0


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of `TrainingArguments`, defaulting to the settings of the shipped model."""
    from ..training import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    for field in dataclasses.fields(TrainingArguments):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        default = field.default
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=int, nargs="+", default=list(default), metavar="N")
        else:
            kind = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
            parser.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper())


def run_train(args) -> int:
    from ..training import QUICK_RECIPE, TrainingArguments, train_tiny_navil

    fields = {field.name: field.default for field in dataclasses.fields(TrainingArguments)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    if args.quick:  # the quick recipe's settings, except where a flag gave another value
        values.update({name: value for name, value in QUICK_RECIPE.items() if values[name] == fields[name]})
    for name in ("vision_fullatt_block_indexes", "size_range"):
        values[name] = tuple(values[name])
    train_tiny_navil(TrainingArguments(**values), progress=not args.quiet)
    return 0


def _streaming_dataset(args, model: str):
    """The `StreamingDataset` of `navil finetune --streaming`: the shards of --data, checked with the model's
    processor, shuffled with --seed; every process reads the whole stream and keeps its part (accelerate)."""
    from ..training.finetune import with_max_image_patches
    from ..training.streaming import StreamingDataset
    from .loading import load_navil_processor

    if args.max_steps <= 0:
        raise SystemExit("--streaming reads a stream without a known length; give the run's length with --max-steps.")
    processor = with_max_image_patches(load_navil_processor(model, args.trust_remote_code), args.max_image_patches)
    multiscale = False if args.no_multiscale else None
    return StreamingDataset(
        args.data,
        processor=processor,
        max_length=args.max_length,
        multiscale=multiscale,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
    )


def run_finetune(args) -> int:
    from ..training import close_process_group, finetune
    from ..training.finetune import check_packing

    packing = dict(
        max_packed_tokens=args.max_packed_tokens,
        packing_strategy=args.packing_strategy,
        loss_reduction=args.loss_reduction,
    )
    try:  # a flag that cannot work with the others is refused before anything loads
        check_packing(args.packing, args.streaming, args.max_length, **packing)
    except ValueError as error:
        raise SystemExit(f"navil finetune: {error}") from None
    model = args.model or str(EMBEDDED_MODEL_DIR)
    streamed = _streaming_dataset(args, model) if args.streaming else None
    if streamed is None and not Path(args.data).is_file():
        raise SystemExit(f"No data file at {args.data}; pass a JSONL file (see the README's Fine-tuning section).")
    stage = int(args.stage) if args.stage.isdigit() else args.stage
    finetune(
        model,
        None if streamed is not None else args.data,
        args.output_dir,
        train_dataset=streamed,
        stage=stage,
        lora=args.lora,
        lora_rank=args.lora_rank,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        multiscale=False if args.no_multiscale else None,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=args.weight_decay,
        adam_beta2=args.adam_beta2,
        bf16=args.bf16,
        max_image_patches=args.max_image_patches,
        **({"warmup_steps": args.warmup_steps} if args.warmup_steps else {}),
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        seed=args.seed,
        disable_tqdm=args.quiet,
        trust_remote_code=args.trust_remote_code,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume=args.resume_from_checkpoint or args.resume,
        overwrite=args.overwrite,
        packing=args.packing,
        **packing,
    )
    close_process_group()  # under `accelerate launch`; the trainer (and its model) went with finetune's frame
    print(f"saved the fine-tuned model to {args.output_dir}")
    return 0


def run_eval(args) -> int:
    import torch

    from ..training import evaluate, navil_processor
    from ..training.drawn_shapes import DRAWN_QUESTION_TYPES, DRAWN_SIZE_RANGE, DrawnShapesDataset
    from ..training.synthetic_data import OUT_OF_RANGE_SIZES, QUESTION_TYPES, TRAIN_SIZE_RANGE

    data = None
    if args.drawn:
        # built before the model loads, so that a type the drawn set cannot ask (ocr) fails at once
        data = DrawnShapesDataset(seed=args.seed, question_types=args.types or DRAWN_QUESTION_TYPES)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    processor = navil_processor(model.config, tokenizer)
    size_range = OUT_OF_RANGE_SIZES if args.out_of_range else TRAIN_SIZE_RANGE
    types = args.types or list(QUESTION_TYPES)
    with torch.inference_mode():
        accuracy = evaluate(
            model,
            processor,
            num_questions=args.num_questions,
            seed=args.seed,
            size_range=size_range,
            batch_size=args.batch_size,
            multiscale=not args.no_multiscale,
            question_types=types,
            progress=not args.quiet,
            data=data,
        )
    if args.drawn:
        low, high = DRAWN_SIZE_RANGE
        images = f"shapes drawn with PIL ImageDraw, image sides {low}-{high} px"
    else:
        ranges = " or ".join(f"{low}-{high}" for low, high in (size_range if args.out_of_range else [size_range]))
        images = f"image sides {ranges} px"
    print(f"{args.num_questions} questions, {images}, seed {args.seed}")
    print("| question type | exact match |")
    print("|---|---|")
    for kind, value in accuracy.items():
        print(f"| {kind} | {100 * value:.1f}% |")
    return 0


def run_convert(args) -> int:
    from .convert import convert_checkpoint

    convert_checkpoint(
        args.src_dir, args.out_dir, tokenizer_dir=args.tokenizer, trust_remote_code=args.trust_remote_code
    )
    print(f"converted {args.src_dir} -> {args.out_dir}")
    return 0


def run_build_tokenizer(args) -> int:
    from ..training import build_tokenizer

    tokenizer = build_tokenizer(args.out_dir)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out_dir}")
    return 0


GIB = 1 << 30
# vLLM's KV-cache size on CPU when not asked for one: 4 GiB (vLLM's own default of VLLM_CPU_KVCACHE_SPACE before it
# reserved a fraction of memory), at most a quarter of the memory available, in whole 256 MiB.
SERVE_KV_CACHE_BYTES = 4 * GIB
SERVE_KV_CACHE_STEP = GIB // 4
_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
_COMPILATION_FLAGS = ("--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc", "-O")


def _flag_given(vllm_args: list[str], flags: tuple[str, ...]) -> bool:
    """Whether `vllm_args` sets one of `flags` (vLLM reads `--a_b` as `--a-b`, and `-O3` as `-O 3`)."""
    for arg in vllm_args:
        name = arg.split("=", 1)[0]
        name = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        if name in flags or (name.startswith("-O") and "-O" in flags):
            return True
    return False


def serve_defaults(
    vllm_args: list[str], on_cpu: bool, available_memory: int, env: dict
) -> tuple[list[str], list[str]]:
    """`(arguments, reasons)`: what `navil serve` adds to `vllm serve`'s arguments on a CPU, and why, one line each.

    vLLM's CPU backend otherwise reserves `--gpu-memory-utilization` (0.92) of the machine's memory and fails where
    that much is not free (any laptop with a browser open), and compiles the model with torch.compile at start-up.
    Unless the arguments (or VLLM_CPU_KVCACHE_SPACE) say otherwise: a KV cache of `SERVE_KV_CACHE_BYTES`, at most a
    quarter of `available_memory`, and eager mode, with which vLLM starts without a warm-up pass. Nothing on GPUs.
    """
    if not on_cpu:
        return [], []
    arguments, reasons = [], []
    if not _flag_given(vllm_args, _MEMORY_FLAGS) and "VLLM_CPU_KVCACHE_SPACE" not in env:
        kv_bytes = min(SERVE_KV_CACHE_BYTES, available_memory // 4) // SERVE_KV_CACHE_STEP * SERVE_KV_CACHE_STEP
        kv_bytes = max(kv_bytes, SERVE_KV_CACHE_STEP)
        arguments += ["--kv-cache-memory-bytes", str(kv_bytes)]
        reasons.append(
            f"KV cache: {kv_bytes / GIB:.2f} GiB ({available_memory / GIB:.1f} GiB of memory available) instead of "
            "92 % of the machine's memory; --kv-cache-memory-bytes sets another size"
        )
    if not _flag_given(vllm_args, _COMPILATION_FLAGS):
        arguments.append("--enforce-eager")
        reasons.append("eager mode: no torch.compile warm-up at start-up; --no-enforce-eager compiles the model")
    return arguments, reasons


def run_serve(args) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("navil serve needs vLLM, which is not installed: pip install navil[vllm]")
    from ..serving.vllm import memory_and_platform, serve
    from .loading import auto_map_modules

    model = args.model or str(EMBEDDED_MODEL_DIR)
    vllm_args = list(args.vllm_args)
    if "--trust-remote-code" in vllm_args:
        auto_map_modules(model)  # the folder's own code: never code outside it
    on_cpu, available_memory = memory_and_platform()
    added, reasons = serve_defaults(vllm_args, on_cpu, available_memory, dict(os.environ))
    for reason in reasons:
        print(f"navil serve (CPU): {reason}", file=sys.stderr, flush=True)
    return serve([model, *vllm_args, *added])


def number_type(convert: Callable, valid: Callable, description: str) -> Callable:
    """An argparse type: `convert(text)` (int or float) when `valid` holds for it, else an error saying that the value
    must be `description`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    return parse


# a whole number >= 1 (0 would give an empty result, e.g. a table of 0.0 %); a finite number > 0 (not nan or inf);
# a number in [0, 1)
positive_int = number_type(int, lambda value: value >= 1, "a whole number >= 1")
positive_float = number_type(float, lambda value: math.isfinite(value) and value > 0, "a positive finite number")
fraction = number_type(float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def device_name(text: str) -> str:
    """argparse type: `auto` or a torch device that holds values and exists on this machine (not `meta`, not
    `cuda` without a GPU)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta holds no values, so the model cannot run there; use auto, cpu or cuda")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise argparse.ArgumentTypeError(f"{text} is not available (this machine has {found}); use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return text


def build_parser(training_flags: bool = True) -> argparse.ArgumentParser:
    """The `navil` command line; without `training_flags`, `navil train` lacks its recipe flags, which import the
    training package (and with it transformers' model classes and any installed quantization library)."""
    parser = argparse.ArgumentParser(prog="navil", description="NaViL native multimodal LLMs for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_flags(sub):
        sub.add_argument("--model", help="model folder or Hub id (default: the embedded tiny model)")
        sub.add_argument(
            "--device", default="auto", type=device_name, help="cpu, cuda, cuda:1, … (default: cuda if available)"
        )
        sub.add_argument("--dtype", default="auto", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
        trust_flag(sub)

    def trust_flag(sub):
        sub.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    chat = commands.add_parser("chat", help="answer questions about an image")
    chat.add_argument("question", nargs="*", help="the question; interactive when omitted")
    chat.add_argument("--image", help="image file or URL")
    model_flags(chat)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--no-multiscale", action="store_true", help="encode the image at full size only")
    chat.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    chat.set_defaults(run=run_chat)

    train = commands.add_parser(
        "train", help="train a tiny NaViL end to end on synthetic data (defaults: the embedded model's recipe)"
    )
    if training_flags:
        _add_training_flags(train)
    train.add_argument(
        "--quick", action="store_true", help="the shortened recipe (QUICK_RECIPE, under 30 min on 2 threads)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=run_train)

    tune = commands.add_parser("finetune", help="fine-tune a model on chat data with images (JSONL) with Trainer")
    tune.add_argument("--model", help="model folder or Hub id (default: the embedded tiny model)")
    tune.add_argument("--data", required=True, help='JSONL file, one {"messages": [...], "images": [...]} per line')
    tune.add_argument("--output-dir", required=True, help="folder to save the fine-tuned model and processor to")
    tune.add_argument(
        "--stage", default="2", choices=["1", "1.2", "2", "vision_frozen"], help="what trains (default: 2, all)"
    )
    tune.add_argument("--lora", choices=["text", "visual", "both"], help="train LoRA adapters on these experts")
    tune.add_argument("--lora-rank", type=int, default=8)
    tune.add_argument("--epochs", type=positive_float, default=3.0)
    tune.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: --epochs)")
    tune.add_argument("--batch-size", type=positive_int, default=4, help="examples per step and process")
    tune.add_argument("--learning-rate", type=float, default=1e-4)
    tune.add_argument("--lr-scheduler", default="linear", choices=LR_SCHEDULERS, help="learning-rate schedule")
    tune.add_argument("--warmup-steps", type=positive_int, help="steps of linear warm-up (default: none)")
    tune.add_argument("--weight-decay", type=fraction, default=0.0, help="AdamW's decoupled weight decay")
    tune.add_argument("--adam-beta2", type=fraction, default=0.999, help="AdamW's second-moment decay")
    tune.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (where the device supports it)")
    tune.add_argument(
        "--max-image-patches", type=positive_int, help="resize larger images to this many 16-px patches (max_pixels)"
    )
    tune.add_argument("--eval-fraction", type=fraction, default=0.1, help="examples held out for evaluation")
    tune.add_argument("--max-length", type=int, help="longest sequence in tokens (longer examples are cut or dropped)")
    tune.add_argument("--no-multiscale", action="store_true", help="encode images at full size only")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    tune.add_argument("--logging-steps", type=int, default=1)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    trust_flag(tune)
    tune.add_argument("--save-steps", type=int, help="write a complete, loadable checkpoint-N every N steps")
    tune.add_argument("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    resume = tune.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint"
    )
    resume.add_argument("--resume-from-checkpoint", metavar="DIR", help="continue the run from this checkpoint-N")
    resume.add_argument("--overwrite", action="store_true", help="delete what --output-dir holds before training")
    # streaming and stage configs (navil.training.streaming, configs/stages)
    tune.add_argument("--streaming", action="store_true", help="stream --data: a .jsonl/.tar shard, folder or glob")
    tune.add_argument("--shuffle-buffer", type=int, default=1000, help="with --streaming: examples mixed at a time")
    tune.add_argument(
        "--config", help="a stage config (stage1, stage1_2, stage2 or sft, smoke, or a JSON file); flags override it"
    )
    # packed batches (navil.training.packing): --batch-size then counts packs
    tune.add_argument("--packing", action="store_true", help="train on packs of whole examples, one row per batch")
    tune.add_argument("--max-packed-tokens", type=positive_int, help="with --packing: token budget of a pack (8192)")
    tune.add_argument("--packing-strategy", choices=["greedy", "best_fit"], help="with --packing (default: greedy)")
    tune.add_argument(
        "--loss-reduction", choices=["token", "sample", "square"], help="with --packing: weight of each example's loss"
    )
    tune.set_defaults(run=run_finetune)

    evaluation = commands.add_parser("eval", help="exact-match accuracy per question type on fresh synthetic data")
    model_flags(evaluation)
    evaluation.add_argument(
        "--num-questions", type=positive_int, default=600, help="questions in all, cycling through types"
    )
    evaluation.add_argument("--seed", type=int, default=1234, help="data seed (training used 0)")
    held_out = evaluation.add_mutually_exclusive_group()
    held_out.add_argument("--out-of-range", action="store_true", help="image sizes outside the training range")
    held_out.add_argument(
        "--drawn", action="store_true", help="shapes drawn by another program (PIL ImageDraw primitives, 200-480 px)"
    )
    evaluation.add_argument(
        "--types", nargs="+", help="question types to ask (default: all; with --drawn all but ocr)"
    )
    evaluation.add_argument("--batch-size", type=positive_int, default=32)
    evaluation.add_argument("--no-multiscale", action="store_true", help="encode images at full size only")
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluation.set_defaults(run=run_eval)

    convert = commands.add_parser("convert", help="make an original NaViL checkpoint loadable with the Auto classes")
    convert.add_argument("src_dir", help="folder of the original checkpoint")
    convert.add_argument("out_dir", help="folder to write")
    convert.add_argument("--tokenizer", help="folder of the tokenizer, if not in src_dir")
    trust_flag(convert)
    convert.set_defaults(run=run_convert)

    serve = commands.add_parser(
        "serve", help="serve a model with vLLM's OpenAI-compatible server: `vllm serve MODEL ...` (navil's code)"
    )
    serve.add_argument("model", nargs="?", help="model folder (default: the embedded tiny model)")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further `vllm serve` arguments, after the model")
    serve.set_defaults(run=run_serve)

    tokenizer = commands.add_parser("build-tokenizer", help="rebuild the tiny model's tokenizer")
    tokenizer.add_argument("out_dir", help="folder to write (the packaged one is tokenizer/)")
    tokenizer.set_defaults(run=run_build_tokenizer)
    return parser


def main(argv=None) -> int:
    """Entry point of the `navil` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # the training package imports transformers' model classes: only when fine-tuning
        from ..training.stage_configs import with_stage_config

        argv = with_stage_config(argv)
    args = build_parser(training_flags=argv[:1] == ["train"]).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
