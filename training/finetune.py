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
`finetune` is what `navil finetune` runs.
"""

import gc
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from ..compat_navil import with_checkpointing_names
from ..configuration_navil import IMAGE_PLACEHOLDER, IMG_END_TOKEN, hub_repo_id_of, write_model_card
from ..processing_navil import NaViLProcessor
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

# Layers of the language model that LoRA adapts, per backbone: the attention projections (with their visual-expert twins
# `<name>_ve`) and the feed-forward layers (twins under `<ffn module>_ve`).
LORA_LAYERS = {
    "internlm2": {"attention": ("attention", ("wqkv", "wo")), "ffn": ("feed_forward", ("w1", "w2", "w3"))},
    "qwen3": {
        "attention": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        "ffn": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    },
}


def lora_target_modules(config, experts: str = "both") -> str:
    """PEFT `target_modules` (a regular expression over module names) for the language model of a NaViL `config`:
    the attention projections and feed-forward layers of the text experts (`experts="text"`), of the visual experts
    (`"visual"`) or of both (`"both"`).

    InternLM2-VE: `attention.{wqkv,wo}`, `feed_forward.{w1,w2,w3}` and `attention.{wqkv_ve,wo_ve}`,
    `feed_forward_ve.{w1,w2,w3}`. Qwen3-VE: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` and
    `self_attn.{q,k,v,o}_proj_ve`, `mlp_ve.{gate,up,down}_proj`. The vision encoder's layers are never matched. A dense
    model (`text_config.modality_experts=False`) has only the text layers, which every token uses.
    """
    if experts not in ("text", "visual", "both"):
        raise ValueError(f"experts must be 'text', 'visual' or 'both', got {experts!r}.")
    if experts == "visual" and not config.text_config.modality_experts:
        raise ValueError(
            "experts='visual' adapts the visual experts, but this model is dense (text_config.modality_experts=False): "
            "its image tokens use the text weights. Use experts='text' (or 'both', the same layers here)."
        )
    (attention_module, projections), (ffn_module, ffn_layers) = LORA_LAYERS[config.text_config.backbone].values()
    suffix = {"text": "", "visual": "_ve", "both": "(_ve)?"}[experts]
    attention = f"{attention_module}\\.({'|'.join(projections)}){suffix}"
    feed_forward = f"{ffn_module}{suffix}\\.({'|'.join(ffn_layers)})"
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
    """The text of a message's content (a string or a list of blocks) as the chat template renders it, with one
    `<image>\\n` per image block before the text, and the image blocks."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise ValueError(
            f"message {index} has content of type {type(content).__name__}; use a string or a list of "
            "{'type': 'text'|'image', ...} blocks."
        )
    images, texts = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "image":
            images.append(block)
        elif kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        else:
            raise ValueError(
                f"message {index} has the content block {block!r:.80}; NaViL chats take {{'type': 'text', 'text': "
                "...}} and {'type': 'image'} blocks."
            )
    if images and role != "user":
        raise ValueError(f"message {index} is a {role} message with an image; only user messages hold images.")
    return f"{IMAGE_PLACEHOLDER}\n" * len(images) + "".join(texts), images


def conversation_turns(example: Mapping) -> tuple[Optional[str], list[tuple[str, str]], list]:
    """`(system_message, [(user text, assistant text), ...], images)` of an example `{"messages": [...], "images":
    [...]}`: an optional first system message, then user and assistant messages in turn, ending with an assistant
    message. Image blocks take their image from the block (`image`, `path` or `url`) or else, in order, from
    `images`. Raises `ValueError` naming the problem for any other shape."""
    if not isinstance(example, Mapping) or not isinstance(example.get("messages"), (list, tuple)):
        raise ValueError(
            "A training example must be a dict with a list under 'messages' (and its images under 'images'), got "
            f"{example!r:.80}."
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
        raise ValueError(
            f"The conversation has {len(messages)} user/assistant messages; it needs user and assistant messages in "
            "turn, ending with an assistant message (the text the model learns)."
        )
    turns, images, next_supplied = [], [], 0
    for index, message in enumerate(messages, start=offset):
        role = "user" if (index - offset) % 2 == 0 else "assistant"
        if not isinstance(message, Mapping) or message.get("role") != role:
            found = message.get("role") if isinstance(message, Mapping) else message
            raise ValueError(
                f"message {index} should be a {role} message (user and assistant take turns after an optional "
                f"system message), got {found!r:.40}."
            )
        text, blocks = _text_of(message.get("content"), role, index)
        for block in blocks:
            source = next((block[key] for key in ("image", "path", "url") if block.get(key) is not None), None)
            if source is None:
                if next_supplied == len(supplied):
                    raise ValueError(
                        f"The conversation has more image blocks than the {len(supplied)} images under 'images'; "
                        "give one image per {'type': 'image'} block."
                    )
                source = supplied[next_supplied]
                next_supplied += 1
            images.append(source)
        if role == "user":
            turns.append([text, None])
        else:
            turns[-1][1] = text
    if next_supplied != len(supplied):
        raise ValueError(
            f"The example has {len(supplied)} images under 'images' but {next_supplied} image blocks take them; "
            "give one {'type': 'image'} block per image."
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
        (first_question, _), *later_turns = turns
        prompts = [self.processor.build_prompt(first_question, system_message=system)]
        prompts += [self.processor.next_turn_prompt(question) for question, _ in later_turns]
        answers = [answer for _, answer in turns]
        return encode_turns(self.processor, prompts, answers, images, self.multiscale)

    def __call__(self, examples: list[Mapping]) -> dict[str, torch.Tensor]:
        sequences, images = [], []
        for example in examples:
            ids, labels, image_inputs = self.encode(example)
            if self.max_length is not None and len(ids) > self.max_length:
                last_image_end = max((i for i, token in enumerate(ids) if token == self.image_end_id), default=-1)
                if last_image_end >= self.max_length:
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
            raise ValueError(
                f"Every example of the batch was dropped: max_length={self.max_length} cuts through their images. "
                "Raise max_length, or use smaller images (the image processor's max_pixels)."
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


def finetune(
    model_dir: str,
    data: Union[str, Path],
    output_dir: str,
    stage: Union[int, str] = 2,
    lora: Optional[str] = None,
    lora_rank: int = 8,
    eval_fraction: float = 0.1,
    max_length: Optional[int] = None,
    multiscale: Optional[bool] = None,
    trust_remote_code: bool = False,
    **training_arguments,
):
    """Fine-tunes the model in `model_dir` on the JSONL file `data` with `transformers.Trainer` and
    `NaViLDataCollator`, and saves model and processor to `output_dir` (loadable with `AutoModel` /
    `AutoProcessor` and `trust_remote_code=True`) with the logged losses in `log_history.json`. Returns the `Trainer`.

    `stage` chooses the trainable parameters (`freeze`); `lora` ("text", "visual" or "both") trains LoRA adapters of
    rank `lora_rank` on those experts instead, merged into the weights before saving. A random `eval_fraction` of the
    examples is held out and evaluated after training. `max_length` and `multiscale` go to the collator, further
    keyword arguments to `TrainingArguments`. Runs as it is under `accelerate launch` (DDP or FSDP). The installed
    navil code loads `model_dir`; its own Python files run only with `trust_remote_code` (`navil.loading_navil`).
    """
    from transformers import Trainer, TrainingArguments

    from ..loading_navil import load_navil_model, load_navil_processor

    check_launch()
    processor = load_navil_processor(model_dir, trust_remote_code)
    model = load_navil_model(model_dir, trust_remote_code, dtype=torch.float32)
    if not model.config.special_token_ids:
        model.init_special_token_ids(processor.tokenizer)
    check_finetune_setup(model.config, processor.tokenizer, stage, lora)
    train, held_out = split_examples(load_jsonl(data), eval_fraction)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        target = lora_target_modules(model.config, lora)
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=target))
    else:
        freeze(model, stage)
    settings = dict(
        output_dir=output_dir,
        remove_unused_columns=False,  # the collator reads "messages" and "images"
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )
    settings.update(training_arguments)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**with_checkpointing_names(settings)),
        train_dataset=train,
        eval_dataset=held_out or None,
        data_collator=NaViLDataCollator(processor, max_length=max_length, multiscale=multiscale),
        compute_loss_func=causal_lm_loss,
    )
    trainer.train()
    if held_out:
        trainer.evaluate()
    if lora is not None:
        trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.save_model(output_dir)  # the full state dict, gathered from every process under FSDP
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        write_model_card(output_dir, base_model=hub_repo_id_of(model_dir))
        history = Path(output_dir) / "log_history.json"
        history.write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    return trainer
