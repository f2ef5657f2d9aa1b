"""Upcycling: a NaViL language model initialised from a text-only LLM, so that it computes exactly that LLM on text.

Every text weight goes to its place in the NaViL language model and, for the modules that have a visual-expert twin,
to the twin as well; the rows of `special_token_embedding` get the text embeddings of their special tokens.
"""

import re
from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import torch

from ..configuration_navil import SPECIAL_TOKEN_EMBEDDING_ROWS
from ..layouts_navil import LAYOUTS, VE_SUFFIX
from ..modeling_navil import NaViLForConditionalGeneration


def expert_twins() -> list[tuple[str, str]]:
    """Text modules and their visual-expert twins of every registered layout, as substrings of state-dict keys
    (`.self_attn.q_proj.` -> `.self_attn.q_proj_ve.`, `.feed_forward.` -> `.feed_forward_ve.`, …)."""
    return [(f".{text}.", f".{visual}.") for layout in LAYOUTS.values() for text, visual in layout.expert_twins()]


def heads_and_embeddings() -> list[tuple[str, str]]:
    """Output heads and input embeddings of every registered layout (a tied text model has no head in its state
    dict)."""
    return [pair for layout in LAYOUTS.values() for pair in layout.tied_weights().items()]


# Rotary tables some older checkpoints store; they are recomputed, never loaded.
_IGNORED_KEY = re.compile(r"rotary_emb\.inv_freq$")


def is_visual_expert(name: str) -> bool:
    """Whether a parameter name of the language model belongs to a visual expert (`q_proj_ve`, `mlp_ve`, …)."""
    return f"{VE_SUFFIX}." in name


class UpcycleReport(NamedTuple):
    """What `upcycle_from_text_model` did: NaViL keys written, NaViL language-model keys left untouched, source keys
    with no NaViL counterpart, source keys skipped (rotary tables), and the special tokens whose
    `special_token_embedding` row was set."""

    copied_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    ignored_keys: list[str]
    special_token_rows: list[str]


def _expert_twin(key: str) -> Optional[str]:
    for text_name, visual_name in expert_twins():
        if text_name in key:
            return key.replace(text_name, visual_name, 1)
    return None


@torch.no_grad()
def upcycle_from_text_model(
    text_model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    navil_model: NaViLForConditionalGeneration,
    tokenizer=None,
    strict: bool = True,
) -> UpcycleReport:
    """Initialises the language model of `navil_model` from a text-only LLM, in place.

    Every text weight is copied to the NaViL language model (`language_model.` + its key) and, for attention
    projections, q/k norms and feed-forward blocks, also to the visual-expert twin (Qwen3 layout: `q_proj`,
    `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`, `mlp` → `…_ve`; InternLM2 layout: `wqkv`, `wo`, `feed_forward`
    → `…_ve`); a dense NaViL (`text_config.modality_experts=False`) has no twins and gets each weight once. The
    rows of `special_token_embedding` get the text embeddings of their special tokens, so that the
    upcycled model's text-only logits equal the text model's. A text model without an output head (tied
    embeddings) gets its embedding matrix as head.

    Args:
        text_model_or_state_dict: A causal LM (e.g. `Qwen3ForCausalLM`) or its state dict, with keys such as
            `model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight` (Qwen3) or
            `model.tok_embeddings.weight`, `model.layers.0.attention.wqkv.weight`, `output.weight` (InternLM2).
        navil_model ([`NaViLForConditionalGeneration`]): The model to initialise; its special-token ids must be known
            (`init_special_token_ids`) unless `tokenizer` is given.
        tokenizer (*optional*): Passed to `navil_model.init_special_token_ids` first.
        strict (`bool`, *optional*, defaults to `True`): Raise a `ValueError` listing missing and unexpected keys
            instead of only reporting them.

    Returns:
        [`UpcycleReport`]. Shape mismatches always raise a `ValueError` naming the tensors.
    """
    if tokenizer is not None:
        navil_model.init_special_token_ids(tokenizer)
    source = dict(
        text_model_or_state_dict.state_dict()
        if isinstance(text_model_or_state_dict, torch.nn.Module)
        else text_model_or_state_dict
    )
    for head, embeddings in heads_and_embeddings():
        if embeddings in source and head not in source:
            source[head] = source[embeddings]
    targets = navil_model.state_dict()
    experts = navil_model.config.text_config.modality_experts
    copied, unexpected, ignored, mismatched = [], [], [], []
    for key, tensor in source.items():
        if _IGNORED_KEY.search(key):
            ignored.append(key)
            continue
        names = [f"language_model.{key}"]
        twin = _expert_twin(key) if experts else None
        if twin is not None:
            names.append(f"language_model.{twin}")
        if not all(name in targets for name in names):
            unexpected.append(key)
            continue
        for name in names:
            if targets[name].shape != tensor.shape:
                mismatched.append(f"{key} {list(tensor.shape)} -> {name} {list(targets[name].shape)}")
                continue
            targets[name].copy_(tensor.to(dtype=targets[name].dtype, device=targets[name].device))
            copied.append(name)
    if mismatched:
        raise ValueError(
            "The text model does not match the NaViL language model (check hidden size, layers, heads, head_dim and "
            f"vocabulary): {'; '.join(mismatched)}."
        )
    written = set(copied)
    missing = sorted(name for name in targets if name.startswith("language_model.") and name not in written)

    special_ids = navil_model.config.special_token_ids
    if not special_ids:
        raise ValueError(
            "The special-token ids of the NaViL model are unknown: call navil_model.init_special_token_ids(tokenizer) "
            "or pass tokenizer=."
        )
    embeddings = navil_model.get_input_embeddings().weight
    special_rows = targets["special_token_embedding.weight"]
    rows = []
    for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS):
        if token in special_ids:
            special_rows[row] = embeddings[special_ids[token]]
            rows.append(token)
    report = UpcycleReport(sorted(copied), missing, sorted(unexpected), sorted(ignored), rows)
    if strict and (missing or unexpected):
        raise ValueError(
            "Upcycling left NaViL language-model weights uninitialised or found text weights with no place in NaViL "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'}). Pass strict=False to accept this."
        )
    return report
