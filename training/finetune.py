"""Fine-tuning NaViL on one's own chat data with the ecosystem's tools: `transformers.Trainer`, TRL's `SFTTrainer`,
PEFT LoRA and `accelerate launch` (DDP, FSDP).

An example is a conversation in the format TRL and `datasets` use for vision-language SFT:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}],
     "images": ["circle.png"]}

`NaViLDataCollator` turns a list of them into a training batch whose prompts are exactly `chat()`'s, with the loss
on the assistant turns only; `freeze` (in `loop`) sets the trainable parameters of a training stage of the paper;
`lora_target_modules` names the layers LoRA adapts; `causal_lm_loss` is the token-mean loss over the whole global
batch (`Trainer(compute_loss_func=causal_lm_loss)`), so that several processes train exactly as one;
`check_combination` and `check_packing` refuse settings that cannot work; `finetune` is what `navil finetune` runs,
with the checkpoints, resume and output safety of `checkpointing` and, with `packing=True`, the packed batches of
`packing`.
"""

import copy
import gc
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from ..checks_navil import NaViLInputError, check_save_complete
from ..compat_navil import with_checkpointing_names
from ..configuration_navil import IMG_END_TOKEN, hub_repo_id_of, write_model_card
from ..layouts_navil import VE_SUFFIX
from ..processing_navil import NaViLProcessor, render_content
from .checkpointing import (
    NaViLTrainer,
    check_free_space,
    latest_checkpoint,
    needed_space,
    prepare_output_dir,
)
from .collators import (
    check_batch,
    check_example_fields,
    check_finetune_setup,
    check_split,
    encode_turns,
    pad_batch,
    read_jsonl,
)
from .loop import freeze


def lora_target_modules(config, experts: str = "both") -> str:
    """PEFT `target_modules` (a regular expression over module names) for the language model of a NaViL `config`:
    the attention projections and feed-forward layers of the text experts (`experts="text"`), of the visual experts
    (`"visual"`) or of both (`"both"`).

    InternLM2-VE: `attention.{wqkv,wo}`, `feed_forward.{w1,w2,w3}` and `attention.{wqkv_ve,wo_ve}`,
    `feed_forward_ve.{w1,w2,w3}`. Qwen3-VE: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` and
    `self_attn.{q,k,v,o}_proj_ve`, `mlp_ve.{gate,up,down}_proj`. The vision encoder's layers are never matched. A dense
    model (`text_config.modality_experts=False`) has only the text layers, which every token uses. The names come
    from the layout of `text_config` (`layouts_navil.Layout`: its attention projections and feed-forward parts).
    """
    if experts not in ("text", "visual", "both"):
        raise ValueError(f"experts must be 'text', 'visual' or 'both', got {experts!r}.")
    if experts == "visual" and not config.text_config.modality_experts:
        raise ValueError(
            "experts='visual' adapts the visual experts, but this model is dense (text_config.modality_experts=False): "
            "its image tokens use the text weights. Use experts='text' (or 'both', the same layers here)."
        )
    layout = config.text_config.layout
    suffix = {"text": "", "visual": VE_SUFFIX, "both": f"({VE_SUFFIX})?"}[experts]
    attention = f"{layout.attention}\\.({'|'.join(layout.projections)}){suffix}"
    feed_forward = f"{layout.ffn}{suffix}\\.({'|'.join(layout.ffn_parts)})"
    return f"language_model\\.model\\.layers\\.\\d+\\.({attention}|{feed_forward})"


def check_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Refuses the one launch that would silently train in a single process: `accelerate launch --cpu
    --num_processes N` (N > 1) without MPI. accelerate's CPU launcher starts several processes only through `mpirun`
    (`--mpirun_hostfile`); otherwise it starts one, which it marks by setting `MASTER_ADDR` with no `WORLD_SIZE`."""
    mpi = any(name in environ for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in environ:
        if "WORLD_SIZE" not in environ and not mpi:
            raise RuntimeError(
                "`accelerate launch --cpu --num_processes N` started a single process: accelerate starts several CPU "
                "processes only through mpirun (`--mpirun_hostfile`). On a machine without MPI, launch with "
                "`accelerate launch --multi_gpu --num_processes N`, which starts N processes that train on the CPU "
                "(gloo) when no GPU is present."
            )


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of `outputs.logits` [batch, seq, vocab] against `labels` [batch, seq] (-100 ignored),
    summed and divided by `num_items_in_batch`: the labelled tokens of the whole global batch, all processes and
    accumulation steps together, which `Trainer` counts. Every labelled token then weighs the same, however the batch
    is split over processes, so `accelerate launch` with N processes trains as one process with the same global batch.
    Pass it as `Trainer(compute_loss_func=causal_lm_loss)`; without `num_items_in_batch` it is the mean over `labels`.
    """
    logits = outputs["logits"].float()
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def fsdp_shard(model: torch.nn.Module, **fsdp_kwargs) -> torch.nn.Module:
    """Shards `model` with FSDP2 (`torch.distributed.fsdp.fully_shard`, in an initialised process group) with the
    wrap policy of accelerate's `TRANSFORMER_BASED_WRAP`: each vision block and each decoder layer (the model's
    `_no_split_modules`) is one unit, the rest (embeddings, connector, LM head) the root unit. For a custom loop, or
    where accelerate offers no FSDP (on CPU); on GPUs `accelerate launch --use_fsdp --fsdp_version 2
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` does the same from `_no_split_modules`. `fully_shard` changes the
    model's class, so save the gathered full state dict (`get_model_state_dict(..., full_state_dict=True)`) through
    an unsharded model's `save_pretrained`, which then copies the NaViL code next to it. End the run with
    `close_process_group()` once the sharded model and its optimizer are deleted."""
    from torch.distributed.fsdp import fully_shard

    units = tuple(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in units:
            fully_shard(module, **fsdp_kwargs)
    return fully_shard(model, **fsdp_kwargs)


def close_process_group() -> None:
    """Ends a `torch.distributed` run in order, on every rank: waits for all ranks (rank 0 may still be saving),
    collects the garbage (FSDP's sharded modules hold the process group, in reference cycles), then destroys the
    group. A gloo group left to the interpreter's exit can abort a rank after a successful run (SIGABRT, "terminate
    called without an active exception"). Call it after deleting the sharded model and its optimizer; it does
    nothing outside a distributed run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _text_of(content, role: str, index: int) -> tuple[str, list]:
    """The text of a message's content (a string or a list of blocks) as the processor renders it
    ([`render_content`]: one `<image>\\n` per image block before the text), and the image blocks."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise NaViLInputError(
            f"message {index} has content of type {type(content).__name__}; use a string or a list of "
            "{'type': 'text'|'image', ...} blocks.",
            "malformed chat example",
        )
    images = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "image":
            images.append(block)
        elif kind != "text" or not isinstance(block.get("text"), str):
            raise NaViLInputError(
                f"message {index} has the content block {block!r:.80}; NaViL chats take {{'type': 'text', 'text': "
                "...}} and {'type': 'image'} blocks.",
                "malformed chat example",
            )
    if images and role != "user":
        raise NaViLInputError(
            f"message {index} is a {role} message with an image; only user messages hold images.",
            "malformed chat example",
        )
    return render_content(content), images


def conversation_turns(example: Mapping) -> tuple[Optional[str], list[tuple[str, str]], list]:
    """`(system_message, [(user text, assistant text), ...], images)` of an example `{"messages": [...], "images":
    [...]}`: an optional first system message, then user and assistant messages in turn, ending with an assistant
    message. Image blocks take their image from the block (`image`, `path` or `url`) or else, in order, from
    `images`. Raises `ValueError` naming the problem for any other shape."""
    if not isinstance(example, Mapping) or not isinstance(example.get("messages"), (list, tuple)):
        raise NaViLInputError(
            "A training example must be a dict with a list under 'messages' (and its images under 'images'), got "
            f"{example!r:.80}.",
            "malformed chat example",
        )
    check_example_fields(example)
    messages = list(example["messages"])
    supplied = list(example.get("images") or [])
    system = None
    if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
        system, _ = _text_of(messages[0].get("content"), "system", 0)
        messages = messages[1:]
    offset = 1 if system is not None else 0
    if not messages or len(messages) % 2:
        raise NaViLInputError(
            f"The conversation has {len(messages)} user/assistant messages; it needs user and assistant messages in "
            "turn, ending with an assistant message (the text the model learns).",
            "malformed chat example",
        )
    turns, images, next_supplied = [], [], 0
    for index, message in enumerate(messages, start=offset):
        role = "user" if (index - offset) % 2 == 0 else "assistant"
        if not isinstance(message, Mapping) or message.get("role") != role:
            found = message.get("role") if isinstance(message, Mapping) else message
            raise NaViLInputError(
                f"message {index} should be a {role} message (user and assistant take turns after an optional "
                f"system message), got {found!r:.40}.",
                "malformed chat example",
            )
        text, blocks = _text_of(message.get("content"), role, index)
        for block in blocks:
            source = next((block[key] for key in ("image", "path", "url") if block.get(key) is not None), None)
            if source is None:
                if next_supplied == len(supplied):
                    raise NaViLInputError(
                        f"The conversation has more image blocks than the {len(supplied)} images under 'images'; "
                        "give one image per {'type': 'image'} block.",
                        "images do not match image blocks",
                    )
                source = supplied[next_supplied]
                next_supplied += 1
            images.append(source)
        if role == "user":
            turns.append([text, None])
        else:
            turns[-1][1] = text
    if next_supplied != len(supplied):
        raise NaViLInputError(
            f"The example has {len(supplied)} images under 'images' but {next_supplied} image blocks take them; "
            "give one {'type': 'image'} block per image.",
            "images do not match image blocks",
        )
    return system, [tuple(turn) for turn in turns], images


class NaViLDataCollator:
    """Batches of chat examples (`{"messages": [...], "images": [...]}`) for `Trainer` and `SFTTrainer`.

    Each conversation is tokenised exactly as `chat()` builds its prompts (`processor.build_prompt` for the first
    user message, `next_turn_prompt` for each later one, which is what the processor's chat template renders), each
    `<image>` expanded into the image's tokens with the processor's image processor; every assistant message is
    tokenised on its own, as the model generates it, followed by `<|im_end|>`. Labels are the assistant tokens and
    their `<|im_end|>`; system, user, image and padding positions are -100. Batches are right-padded.

    Args:
        processor ([`NaViLProcessor`]): The model's processor (e.g. `AutoProcessor.from_pretrained(model_dir)`).
        max_length (`int`, *optional*): Longest sequence kept. A longer conversation is cut to `max_length` tokens
            when every image block lies before the cut; one whose images would be cut is dropped from its batch with
            a warning, and counted in `num_dropped`.
        multiscale (`bool`, *optional*): The image pyramid (True) or one full-size pass per image (False); the image
            processor's setting when None, which is what `chat()` uses for images given as files or PIL images.

    Returns `input_ids`, `attention_mask`, `labels` ([batch, longest]) and, with images, `pixel_values`,
    `image_grid_thw` and `num_scales`: the keyword arguments of the model's `forward`.
    """

    def __init__(self, processor: NaViLProcessor, max_length: Optional[int] = None, multiscale: Optional[bool] = None):
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive whole number or None, got {max_length!r}.")
        self.processor = processor
        self.max_length = max_length
        self.multiscale = multiscale
        self.num_dropped = 0
        self.image_end_id = processor.tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)

    def encode(self, example: Mapping) -> tuple[list[int], list[int], list[dict]]:
        """`(input_ids, labels, image_inputs)` of one example, before truncation."""
        system, turns, images = conversation_turns(example)
        prompts = self.processor.turn_prompts([question for question, _ in turns], system_message=system)
        answers = [answer for _, answer in turns]
        return encode_turns(self.processor, prompts, answers, images, self.multiscale)

    def cuts_an_image(self, ids: list[int]) -> bool:
        """Whether cutting `ids` to `max_length` tokens would cut through an image (the example is then dropped)."""
        last_image_end = max((i for i, token in enumerate(ids) if token == self.image_end_id), default=-1)
        return self.max_length is not None and last_image_end >= self.max_length

    def __call__(self, examples: list[Mapping]) -> dict[str, torch.Tensor]:
        sequences, images = [], []
        for example in examples:
            ids, labels, image_inputs = self.encode(example)
            if self.max_length is not None and len(ids) > self.max_length:
                if self.cuts_an_image(ids):
                    self.num_dropped += 1
                    warnings.warn(
                        f"Dropped a training example of {len(ids)} tokens: max_length={self.max_length} would cut "
                        f"through an image ({self.num_dropped} dropped so far). Raise max_length, or use smaller "
                        "images (the image processor's max_pixels).",
                        stacklevel=2,
                    )
                    continue
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            sequences.append((ids, labels))
            images += image_inputs
        if not sequences:
            check_batch(examples)
            raise NaViLInputError(
                f"Every example of the batch was dropped: max_length={self.max_length} cuts through their images. "
                "Raise max_length, or use smaller images (the image processor's max_pixels).",
                "example longer than max_length",
            )
        return pad_batch(self.processor, sequences, images)


def load_jsonl(path: Union[str, Path]) -> list[dict]:
    """The examples of a JSONL file, one `{"messages": [...], "images": [...]}` per line (blank lines skipped), with
    relative image paths resolved against the file's folder."""
    return read_jsonl(path, conversation_turns)  # a clear error now rather than in the middle of training


def split_examples(examples: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """`(train, eval)`: a held-out `eval_fraction` of `examples` (at least one when the fraction is positive and
    there are two or more), chosen at random with `seed`."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}.")
    size = math.ceil(eval_fraction * len(examples)) if len(examples) > 1 else 0
    check_split(len(examples), size, eval_fraction)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:size])
    train = [example for index, example in enumerate(examples) if index not in held_out]
    return train, [examples[index] for index in sorted(held_out)]


def check_combination(model, lora: Optional[str], training_arguments: Mapping) -> None:
    """Refuses, before the first step, the settings that would fail later or train nothing useful: a quantized model
    (torchao, bitsandbytes) with LoRA, whose adapters are merged into the weights before saving, or without it, whose
    integer weights cannot be trained; and a learning rate that is not a positive finite number."""
    rate = training_arguments.get("learning_rate")
    if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {rate!r}.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None and not getattr(model, "is_quantized", False):
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "quantized")
    method = getattr(method, "value", method)
    if lora is not None:
        raise ValueError(
            f"LoRA on a {method} model cannot be saved: navil finetune merges the adapters into the weights, which "
            "the quantized weights cannot hold. Fine-tune the full-precision checkpoint (with or without --lora) and "
            "quantize the result."
        )
    raise ValueError(
        f"The model's weights are {method}-quantized integers, which the optimizer cannot update. Fine-tune the "
        "full-precision checkpoint and quantize the result."
    )


# `finetune(packing=True)` settings a run leaves at None take these values.
PACKING_DEFAULTS = {"max_packed_tokens": 8192, "packing_strategy": "greedy", "loss_reduction": "token"}


def check_packing(packing: bool, streaming: bool, max_length: Optional[int], **packing_settings) -> dict:
    """The packing settings of a run (`PACKING_DEFAULTS` where None), after refusing the combinations that cannot
    work: a packing setting without `packing`, `max_length` with it (packs never cut an example: the budget is
    `max_packed_tokens`), and the "best_fit" strategy on a stream, whose packs must be greedy to resume exactly."""
    given = {name: value for name, value in packing_settings.items() if value is not None}
    flag = {name: "--" + name.replace("_", "-") for name in PACKING_DEFAULTS}
    if not packing:
        if given:
            name = next(iter(given))
            raise ValueError(
                f"{name}={given[name]!r} ({flag[name]}) sets how examples are packed, but packing is off; pass "
                f"packing=True (--packing) or leave {flag[name]} out."
            )
        return {}
    if max_length is not None:
        raise ValueError(
            "max_length (--max-length) cuts examples, which packing never does (a cut could split an image block); "
            "with packing=True (--packing) set the token budget of a pack with max_packed_tokens (--max-packed-tokens)."
        )
    settings = {**PACKING_DEFAULTS, **given}
    if streaming and settings["packing_strategy"] != "greedy":
        raise ValueError(
            f"packing_strategy={settings['packing_strategy']!r} (--packing-strategy) cannot pack a stream so that a "
            "resumed run continues at the exact next example; streamed packs are greedy: leave --packing-strategy "
            "out or pass greedy."
        )
    return settings


def _checkpoints_kept(num_examples: Optional[int], save_steps: Optional[int], limit, settings: Mapping) -> int:
    """How many checkpoints a run holds at most at once (for the free-space check)."""
    if not save_steps:
        return 0
    steps = settings.get("max_steps", -1)
    if steps is None or steps <= 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = settings.get("per_device_train_batch_size", 8) * world
        batches = math.ceil((num_examples or 0) / per_step)
        steps = math.ceil(
            settings.get("num_train_epochs", 3.0) * batches / settings.get("gradient_accumulation_steps", 1)
        )
    saved = max(steps // save_steps, 1)
    return min(saved, limit + 1) if limit else saved


def _is_streaming_dataset(dataset) -> bool:
    from .streaming import StreamingDataset  # streaming builds on this module

    return isinstance(dataset, StreamingDataset)


def _check_packs(packs, budget: int) -> None:
    """Refuses a run whose every example is longer than the budget; warns of the examples left out."""
    if not len(packs):
        raise ValueError(
            f"Every training example is longer than max_packed_tokens={budget} (packs never cut an example); raise "
            "--max-packed-tokens."
        )
    if packs.num_skipped:
        warnings.warn(
            f"Left out {packs.num_skipped} training examples longer than max_packed_tokens={budget} (packs never cut "
            "an example); raise --max-packed-tokens to train on them.",
            stacklevel=3,
        )


def with_max_image_patches(processor: NaViLProcessor, max_image_patches: Optional[int]) -> NaViLProcessor:
    """`processor`, or a copy whose image processor resizes images to at most `max_image_patches` patches (its
    `max_pixels`); `processor` itself is left as it is."""
    if max_image_patches is None:
        return processor
    image_processor = copy.deepcopy(processor.image_processor)
    max_pixels = max_image_patches * image_processor.patch_size**2
    if max_pixels < image_processor.min_pixels:
        raise ValueError(
            f"max_image_patches={max_image_patches} is below the image processor's lower limit of "
            f"{image_processor.min_pixels // image_processor.patch_size**2} patches (min_pixels); raise it."
        )
    image_processor.max_pixels = max_pixels
    training_processor = copy.copy(processor)
    training_processor.image_processor = image_processor
    return training_processor


def finetune(
    model_dir: str,
    data: Optional[Union[str, Path]],
    output_dir: str,
    stage: Union[int, str] = 2,
    lora: Optional[str] = None,
    lora_rank: int = 8,
    eval_fraction: float = 0.1,
    max_length: Optional[int] = None,
    multiscale: Optional[bool] = None,
    trust_remote_code: bool = False,
    train_dataset=None,
    save_steps: Optional[int] = None,
    save_total_limit: Optional[int] = None,
    resume: Union[bool, str, Path] = False,
    overwrite: bool = False,
    packing: bool = False,
    max_packed_tokens: Optional[int] = None,
    packing_strategy: Optional[str] = None,
    loss_reduction: Optional[str] = None,
    max_image_patches: Optional[int] = None,
    **training_arguments,
):
    """Fine-tunes the model in `model_dir` on the JSONL file `data` with `transformers.Trainer` and
    `NaViLDataCollator`, and saves model and processor to `output_dir` (loadable with `AutoModel` /
    `AutoProcessor` and `trust_remote_code=True`) with the logged losses in `log_history.json`. Returns the `Trainer`.

    `stage` chooses the trainable parameters (`freeze`); `lora` ("text", "visual" or "both") trains LoRA adapters of
    rank `lora_rank` on those experts instead, merged into the weights before saving. A random `eval_fraction` of the
    examples is held out and evaluated after training. `max_length` and `multiscale` go to the collator, further
    keyword arguments to `TrainingArguments`. Runs as it is under `accelerate launch` (DDP or FSDP). The installed
    navil code loads `model_dir`; its own Python files run only with `trust_remote_code` (`navil.tools.loading`).

    Instead of `data`, `train_dataset` gives the training examples directly: a list, a map-style dataset, or an
    `IterableDataset`; a `streaming.StreamingDataset` has its position saved in each checkpoint
    (`StreamingStateCallback`) and restored on resume. Nothing is held out then.

    Output safety (`checkpointing`): `output_dir` is locked for this run and checked for writability and free space
    before training; a folder holding files is refused unless `overwrite` (which deletes them) or `resume`. Every
    `save_steps` steps a complete checkpoint (weights, optimizer, scheduler, RNG, data position, processor,
    tokenizer, code) appears atomically as `output_dir/checkpoint-N`; the newest `save_total_limit` are kept.
    `resume=True` continues from the newest checkpoint, `resume=<folder>` from that one. Map-style examples are all
    checked before step 1 (`streaming.check_examples`): bad ones are left out, counted and logged.
    A non-finite loss, gradient or weight stops the run with `checkpointing.NonFiniteError` naming the step.

    `packing=True` trains on packs of whole examples of at most `max_packed_tokens` tokens (`packing`; default 8192)
    laid in one row per batch, with `per_device_train_batch_size` packs per batch and the `loss_reduction` ("token",
    "sample" or "square") over the global batch: map-style examples are packed with `PackedDataset`
    (`packing_strategy` "greedy" or "best_fit"), a `StreamingDataset` with `StreamedPacks` (greedy, with its position
    saved in each checkpoint). An example longer than the budget is left out with a warning. `check_packing` refuses
    the settings that cannot work together.

    `max_image_patches` resizes the training images to at most that many patches (the paper's "maximum number of
    image patches" of each stage); the saved processor keeps its own limit for inference.
    """
    from transformers import TrainingArguments

    from ..tools.loading import load_navil_model, load_navil_processor

    check_launch()
    if (data is None) == (train_dataset is None):
        raise ValueError("Pass the training examples either as data (a JSONL file) or as train_dataset, not both.")
    if save_total_limit is not None and not save_steps:
        raise ValueError("save_total_limit keeps the newest checkpoints, which only save_steps writes; pass both.")
    streaming = isinstance(train_dataset, torch.utils.data.IterableDataset)
    packing_settings = check_packing(
        packing,
        streaming,
        max_length,
        max_packed_tokens=max_packed_tokens,
        packing_strategy=packing_strategy,
        loss_reduction=loss_reduction,
    )
    if packing and streaming and not _is_streaming_dataset(train_dataset):
        raise ValueError(
            "packing=True packs a stream (resumably) only when it is a streaming.StreamingDataset (navil finetune "
            f"--streaming), got {type(train_dataset).__name__}; wrap the data in a StreamingDataset, or pass a list "
            "or map-style dataset."
        )
    checkpoint = None
    if resume and not overwrite:  # found before the folder is touched: a finished run's folder stays complete
        checkpoint = latest_checkpoint(output_dir) if resume is True else Path(resume)
        check_save_complete(checkpoint)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ValueError(f"{checkpoint} is not a checkpoint of a run (it has no trainer_state.json).")
    lock = prepare_output_dir(output_dir, overwrite, bool(resume), protected=(model_dir, *([data] if data else [])))
    try:
        processor = load_navil_processor(model_dir, trust_remote_code)
        model = load_navil_model(model_dir, trust_remote_code, dtype=torch.float32)
        check_combination(model, lora, training_arguments)
        if not model.config.special_token_ids:
            model.init_special_token_ids(processor.tokenizer)
        check_finetune_setup(model.config, processor.tokenizer, stage, lora)
        training_processor = with_max_image_patches(processor, max_image_patches)
        collator = NaViLDataCollator(training_processor, max_length=max_length, multiscale=multiscale)
        held_out, callbacks, settings = [], [], {}
        if not streaming:
            from .streaming import check_examples

            examples = load_jsonl(data) if train_dataset is None else list(train_dataset)
            checked = check_examples(examples, training_processor, max_length, multiscale)
            if checked.skipped:
                warnings.warn(
                    f"Left out {len(checked.skipped)} of {len(examples)} training examples that cannot be trained on "
                    f"(the first: {checked.skipped[0][0]}, {checked.skipped[0][1]}); the log names each.",
                    stacklevel=2,
                )
            if train_dataset is None:
                train_dataset, held_out = split_examples(checked.examples, eval_fraction)
            else:
                train_dataset = checked.examples
            if packing:
                from .packing import PackedDataset

                budget, strategy = packing_settings["max_packed_tokens"], packing_settings["packing_strategy"]
                train_dataset, held_out = (
                    PackedDataset(examples, collator.encode, budget, strategy, too_long="skip") if examples else []
                    for examples in (train_dataset, held_out)
                )
                _check_packs(train_dataset, budget)
        else:
            from .streaming import (
                STREAMING_TRAINING_ARGUMENTS,
                StreamedPacks,
                StreamingDataset,
                StreamingStateCallback,
            )

            if packing:
                budget = packing_settings["max_packed_tokens"]
                train_dataset = StreamedPacks(train_dataset, collator.encode, budget, too_long="skip")
            if isinstance(train_dataset, (StreamingDataset, StreamedPacks)):
                callbacks.append(StreamingStateCallback(train_dataset, resume_from_checkpoint=checkpoint))
                settings.update(STREAMING_TRAINING_ARGUMENTS)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            target = lora_target_modules(model.config, lora)
            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=target))
        else:
            freeze(model, stage)
        settings.update(
            output_dir=output_dir,
            remove_unused_columns=False,  # the collator reads "messages" and "images"
            report_to="none",
            save_strategy="steps" if save_steps else "no",
            use_cpu=not torch.cuda.is_available(),
            logging_nan_inf_filter=False,  # a NaN loss stops the run (NaViLTrainer) rather than being logged as 0
        )
        if save_steps:
            settings.update(save_steps=save_steps, save_total_limit=save_total_limit)
        settings.update(training_arguments)
        if lock is not None:
            num_examples = None if isinstance(train_dataset, torch.utils.data.IterableDataset) else len(train_dataset)
            kept = _checkpoints_kept(num_examples, save_steps, save_total_limit, settings)
            check_free_space(output_dir, needed_space(model, kept))
        if packing:
            from .packing import PackingCollator, packing_trainer_class

            trainer_class = packing_trainer_class(NaViLTrainer)
            collator = PackingCollator(training_processor, packing_settings["loss_reduction"])
            loss = {}  # the packed loss of the collator's reduction (PackingTrainerMixin)
        else:
            trainer_class, loss = NaViLTrainer, {"compute_loss_func": causal_lm_loss}
        trainer = trainer_class(
            model=model,
            args=TrainingArguments(**with_checkpointing_names(settings)),
            train_dataset=train_dataset,
            eval_dataset=held_out or None,
            data_collator=collator,
            processing_class=processor,  # saved with its tokenizer into every checkpoint and the final folder
            callbacks=callbacks,
            **loss,
        )
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        if held_out:
            trainer.evaluate()
        if lora is not None:
            trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        trainer.save_final(output_dir)
        if trainer.is_world_process_zero():
            write_model_card(output_dir, base_model=hub_repo_id_of(model_dir))
    finally:
        if lock is not None:
            lock.release()
    return trainer
