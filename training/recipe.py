"""The whole recipe of the embedded model: text pre-training, upcycling and the three multimodal stages."""

import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from transformers import Qwen3ForCausalLM

from ..modeling_navil import NaViLForConditionalGeneration
from .collators import caption_batches, question_batches, scene_batches, text_batches
from .configs import TrainingArguments, navil_processor, tiny_navil_config, tiny_text_config
from .evaluation import evaluate, format_accuracy
from .loop import freeze, set_activation_checkpointing, train_loop
from .scene_supervision import SceneProbes
from .synthetic_data import ShapesDataset
from .tokenizer import load_tokenizer
from .upcycling import upcycle_from_text_model


def pretrain_text_model(args: TrainingArguments, tokenizer, processor, progress=True) -> tuple[Qwen3ForCausalLM, list]:
    """Stage 0: a `Qwen3ForCausalLM` trained on the dataset's text conversations (scene stated in words)."""
    torch.manual_seed(args.seed)
    text_model = Qwen3ForCausalLM(tiny_text_config(args, len(tokenizer)))
    data = ShapesDataset(seed=args.seed, size_range=args.size_range)
    losses = train_loop(
        text_model,
        text_batches(processor, data, args.text_batch_size),
        args.text_steps,
        args.text_learning_rate,
        args.warmup_ratio,
        args.weight_decay,
        args.max_grad_norm,
        args.dtype,
        description="text pre-training",
        progress=progress,
    )
    return text_model, losses


def train_tiny_navil(args: TrainingArguments, progress: bool = True, log: Callable[[str], None] = print):
    """Runs the whole recipe and saves model, processor and tokenizer to `args.output_dir`.

    Returns `(model, processor, history)` where history holds the losses of every stage, the evaluations and the
    wall-clock time of each stage.
    """
    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    history = {"arguments": asdict(args), "seconds": {}, "evaluations": []}

    config = tiny_navil_config(args, tiny_text_config(args, len(tokenizer)), tokenizer)
    processor = navil_processor(config, tokenizer)
    text_model, history["text_losses"] = pretrain_text_model(args, tokenizer, processor, progress)
    history["seconds"]["text"] = time.perf_counter() - started

    torch.manual_seed(args.seed + 1)
    model = NaViLForConditionalGeneration(config)
    model.init_special_token_ids(tokenizer)
    upcycle_from_text_model(text_model, model)
    with torch.no_grad():
        # visual tokens start at the scale training gives them (RMS ≈ 0.5 rather than 0.05), so in the language model
        # each keeps its own content instead of being swamped by what it attends to (docs/training.md)
        model.mlp1[-1].weight.mul_(args.connector_init_gain)
    if args.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    data = ShapesDataset(seed=args.seed, size_range=args.size_range, position_questions=args.position_questions)

    def run_eval(step: int) -> None:
        accuracy = evaluate(model, processor, args.eval_questions, seed=args.seed + 100 + step)
        history["evaluations"].append({"step": step, **accuracy})
        log(f"step {step}: {format_accuracy(accuracy)}")

    def stage(name: str, batches, steps: int, learning_rate: float, description: str, **evaluation) -> None:
        if not steps:
            return
        stage_start = time.perf_counter()
        history[f"{name}_losses"] = train_loop(
            model,
            batches,
            steps,
            learning_rate,
            args.warmup_ratio,
            args.weight_decay,
            args.max_grad_norm,
            args.dtype,
            description=description,
            progress=progress,
            **evaluation,
        )
        history["seconds"][name] = time.perf_counter() - stage_start

    probes = SceneProbes(config.text_config.hidden_size, args.scene_decoder_layer)
    if args.scene_steps:
        freeze(model, 1)
        stage(
            "scene",
            scene_batches(processor, data, args.scene_batch_size, args.single_scale_fraction),
            args.scene_steps,
            args.scene_learning_rate,
            "stage 0: scene labels of every visual token (vision encoder and connector)",
            loss_fn=probes.vision_loss,
            extra_modules=[probes],
        )
    # the question stages' loss: the answers plus the scene loss, unless its weight is 0
    supervised = (
        dict(loss_fn=partial(probes.loss, weight=args.scene_loss_weight), extra_modules=[probes])
        if args.scene_loss_weight
        else {}
    )
    freeze(model, 1)
    stage(
        "caption",
        caption_batches(processor, data, args.caption_batch_size, args.single_scale_fraction),
        args.caption_steps,
        args.caption_learning_rate,
        "stage 1: captions (text frozen)",
    )
    freeze(model, 2)
    stage(
        "single_shape",
        question_batches(
            processor,
            data,
            args.qa_batch_size,
            args.single_scale_fraction,
            num_shapes=1,
            with_scene_targets=bool(supervised),
        ),
        args.single_shape_steps,
        args.qa_learning_rate,
        "stage 2: questions about one shape",
        **supervised,
    )
    stage(
        "qa",
        question_batches(
            processor,
            data,
            args.qa_batch_size,
            args.single_scale_fraction,
            first_index=args.single_shape_steps * args.qa_batch_size,
            with_scene_targets=bool(supervised),
        ),
        args.qa_steps,
        args.qa_learning_rate,
        "stage 3: questions about 1-3 shapes",
        callback=run_eval,
        callback_every=args.eval_every,
        **supervised,
    )
    history["seconds"]["total"] = time.perf_counter() - started

    if args.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "training_history.json").write_text(json.dumps(_summary(history), indent=2) + "\n")
    log(f"saved to {output_dir} after {history['seconds']['total'] / 60:.1f} min")
    return model, processor, history


def _summary(history: dict) -> dict:
    """The history without per-step losses, but with the mean loss of each stage's first and last 20 steps."""
    summary = {key: value for key, value in history.items() if not key.endswith("_losses")}
    for key, losses in history.items():
        if key.endswith("_losses") and losses:
            summary[key.replace("_losses", "_loss")] = {
                "first": sum(losses[:20]) / len(losses[:20]),
                "last": sum(losses[-20:]) / len(losses[-20:]),
            }
    return summary
