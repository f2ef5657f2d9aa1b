"""The training loop of every stage, and the freezing and checkpointing switches of the recipe."""

import math
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..layouts_navil import layout_of_backbone
from ..modeling_navil import NaViLForConditionalGeneration
from .upcycling import is_visual_expert


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: matrices with weight decay, vectors (norms, biases, layer scales) and embeddings
    without."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or "embed" in name or "special_token_embedding" in name
        (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_loop(
    model: torch.nn.Module,
    batches: Callable[[int], dict],
    steps: int,
    learning_rate: float,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    dtype: str = "float32",
    description: str = "train",
    callback: Optional[Callable[[int], None]] = None,
    callback_every: int = 0,
    progress: bool = True,
    loss_fn: Optional[Callable[[torch.nn.Module, dict], torch.Tensor]] = None,
    extra_modules: Sequence[torch.nn.Module] = (),
) -> list[float]:
    """Trains the parameters of `model` that require gradients for `steps` steps; returns the loss of every step.

    AdamW (β = 0.9, 0.95), linear warm-up over `warmup_ratio` of the steps then cosine decay to 0, gradient clipping
    at `max_grad_norm`; `dtype="bfloat16"` runs the forward under bfloat16 autocast (weights stay float32).
    `callback(step)` runs after every `callback_every` steps (e.g. an evaluation). `loss_fn(model, batch)` replaces
    the model's own loss (e.g. with auxiliary terms); the parameters of `extra_modules` (e.g. its probes) train too.
    """
    device = next(model.parameters()).device
    groups = _parameter_groups(model, weight_decay)
    for module in extra_modules:
        groups += _parameter_groups(module.to(device), weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=description, disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = {key: value.to(device) for key, value in batches(step).items()}
        with autocast:
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1)
            model.train()
    model.eval()
    return losses


# Training stages of the paper (S1.1, S1.2 and S2 of its Table 7): what each one trains.
FREEZING_STAGES = {
    1: "vision encoder, connector (mlp1), visual experts (*_ve) and special_token_embedding; text weights frozen",
    "1.2": "as stage 1, and the text weights of every attention block",
    2: "everything",
    "vision_frozen": "everything but the vision encoder",
}


def freeze(model: NaViLForConditionalGeneration, stage) -> NaViLForConditionalGeneration:
    """Sets `requires_grad` of every parameter of `model` for a training stage of the paper (`FREEZING_STAGES`) and
    returns `model`, ready for `Trainer` (which optimises the parameters that require gradients).

    Stage 1 (the paper's S1.1) trains the vision encoder, the connector, the visual experts of the language model and
    `special_token_embedding` while the text weights (text experts, word embeddings, norms, LM head) stay frozen;
    `"1.2"` (S1.2) also trains the text weights of the attention blocks (projections and q/k norms, the module the
    layout names `attention`); stage 2 (S2, supervised fine-tuning) trains everything; `"vision_frozen"` everything
    but the vision encoder. In a dense model
    (`text_config.modality_experts=False`) stage 1 has no visual experts to train: the vision encoder, connector and
    `special_token_embedding` learn to feed the frozen LLM (the usual alignment stage of a dense VLM).
    """
    if isinstance(stage, bool) or stage not in FREEZING_STAGES:  # True == 1 would act as stage 1
        raise ValueError(f"Unknown training stage {stage!r}; use one of {list(FREEZING_STAGES)}.")
    attention = f".{layout_of_backbone(model.config.text_config.backbone).attention}."
    for name, parameter in model.named_parameters():
        if stage in (1, "1.2"):
            text_weight = name.startswith("language_model.") and not is_visual_expert(name)
            parameter.requires_grad = not text_weight or (stage == "1.2" and attention in name)
        else:
            parameter.requires_grad = stage == 2 or not name.startswith("vision_model.")
    return model


def set_text_weights_trainable(model: NaViLForConditionalGeneration, trainable: bool) -> None:
    """Freezes the text weights of the language model (stage 1 of `freeze`) or unfreezes everything (stage 2)."""
    freeze(model, 2 if trainable else 1)


def set_activation_checkpointing(model: NaViLForConditionalGeneration, enabled: bool) -> None:
    """Turns activation (gradient) checkpointing on or off, non-reentrant; transformers 5 names it
    `activation_checkpointing_enable`, 4.x `gradient_checkpointing_enable`."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
