"""`navil.training`: end-to-end training of NaViL in miniature, the recipe of the paper that produced the embedded
`navil-tiny` model.

1. A small text LLM (transformers' own `Qwen3ForCausalLM`) is pre-trained on the text of the synthetic dataset:
   conversations in the chat format where the scene is stated in words. The Qwen3 layout is used because it is a
   native transformers class (no remote code for the text stage), its per-head q/k RMSNorms keep the attention
   logits of a tiny model trained with a high learning rate in range, and it is the layout of NaViL-9B.
2. `upcycle_from_text_model` copies every text weight into the NaViL language model and into its visual-expert twin
   (`q_proj` → `q_proj_ve`, …, `mlp` → `mlp_ve`), and the text embeddings of the NaViL special tokens into
   `special_token_embedding`, so that the upcycled model computes exactly the text model on text.
3. Stage 0 (scene labels, a departure from the paper): the vision encoder and the connector learn, through linear
   probes (`scene_supervision.SceneProbes`), what every visual token shows: the colour and kind of its shape, whether
   other shapes lie to its left and right, and the number of shapes. The same probes, on the connector and on the
   visual tokens inside the language model, add their loss to the answer loss of stages 2 and 3.
4. Stage 1 (captioning): the text weights are frozen; the vision encoder, the connector (`mlp1`), the visual experts
   and `special_token_embedding` learn to caption images.
5. Stage 2 (questions about one shape): everything trains on images with a single shape, each with every question
   its scene allows, with the loss on the answer tokens only. The questions are separate branches after the shared
   image tokens (`collate_question_branches`), so each is computed exactly as `chat()` asks it alone while the image
   is encoded once. Here the answer's attention has one object to find.
6. Stage 3 (questions about 1–3 shapes): the same on the full data, where colours must be bound to shapes and shapes
   ordered from left to right.

Each stage uses AdamW with linear warm-up and cosine decay and gradient clipping. `train_tiny_navil` runs the whole
recipe from `TrainingArguments` (the flags of `navil train`) and saves model, processor and tokenizer with
`save_pretrained`; `evaluate` measures exact-match accuracy per question type on freshly generated questions.

Modules, by concern: `synthetic_data` (the shapes-and-words dataset), `drawn_shapes` (a held-out set of shapes drawn
by another program, for `navil eval --drawn`), `tokenizer` (its BPE), `configs` (the recipe's settings and model, the
dense-LLM mapping; the tiny test config it starts from is `navil.testing.tiny_config`, re-exported here), `upcycling`, `collators` (batches in the processor's chat format),
`scene_supervision` (per-token scene targets and their probes), `loop` (optimiser, schedule, freezing), `evaluation`
and `recipe` (the stages in order); `finetune` adapts a NaViL checkpoint to one's own chat data with
`transformers.Trainer` / TRL's `SFTTrainer` (`NaViLDataCollator`, `freeze`, LoRA targets; `navil finetune`).
"""

from ..testing.configs import special_token_ids_at_end, tiny_config  # the test fixture, public here too
from .collators import (
    Conversation,
    caption_batches,
    collate_conversations,
    collate_question_branches,
    question_batches,
    text_batches,
)
from .configs import (
    QUICK_RECIPE,
    TrainingArguments,
    dense_text_config,
    navil_processor,
    navil_text_config,
    tiny_navil_config,
    tiny_text_config,
)
from .evaluation import answer_questions, evaluate, format_accuracy
from .finetune import (
    NaViLDataCollator,
    causal_lm_loss,
    check_launch,
    close_process_group,
    finetune,
    fsdp_shard,
    load_jsonl,
    lora_target_modules,
)
from .loop import FREEZING_STAGES, freeze, set_activation_checkpointing, set_text_weights_trainable, train_loop
from .recipe import pretrain_text_model, train_tiny_navil
from .tokenizer import TOKENIZER_DIR, build_tokenizer, load_tokenizer, tokenizer_corpus
from .upcycling import UpcycleReport, upcycle_from_text_model

__all__ = [
    "QUICK_RECIPE",
    "FREEZING_STAGES",
    "TOKENIZER_DIR",
    "Conversation",
    "NaViLDataCollator",
    "TrainingArguments",
    "UpcycleReport",
    "answer_questions",
    "build_tokenizer",
    "caption_batches",
    "causal_lm_loss",
    "check_launch",
    "close_process_group",
    "collate_conversations",
    "collate_question_branches",
    "dense_text_config",
    "evaluate",
    "finetune",
    "format_accuracy",
    "freeze",
    "fsdp_shard",
    "load_jsonl",
    "load_tokenizer",
    "lora_target_modules",
    "navil_processor",
    "navil_text_config",
    "pretrain_text_model",
    "question_batches",
    "set_activation_checkpointing",
    "set_text_weights_trainable",
    "special_token_ids_at_end",
    "text_batches",
    "tiny_config",
    "tiny_navil_config",
    "tiny_text_config",
    "tokenizer_corpus",
    "train_loop",
    "train_tiny_navil",
    "upcycle_from_text_model",
]
