"""The byte-level BPE tokenizer of the tiny model, learnt from the synthetic dataset's text (deterministic)."""

from pathlib import Path
from typing import Optional, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..configuration_navil import END_OF_TURN_TOKEN, NAVIL_SPECIAL_TOKENS, PAD_TOKEN
from ..processing_navil import CHAT_TEMPLATES
from .configs import SYSTEM_MESSAGE
from .synthetic_data import COLORS, NUMBER_WORDS, SHAPES, WORDS, ShapesDataset

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "tokenizer"


def tokenizer_corpus(num_examples: int = 3000, seed: int = 0) -> list[str]:
    """The text the tokenizer is trained on: questions, answers, captions and scene descriptions of the dataset, the
    vocabulary lists, the system message and the chat-template strings (without their special tokens)."""
    data = ShapesDataset(seed=seed)
    # the fixed strings of every prompt, weighted like the examples so that they become few tokens
    fixed = [SYSTEM_MESSAGE, " ".join([*COLORS, *SHAPES, *WORDS, *NUMBER_WORDS, "left", "right"])]
    for roles in CHAT_TEMPLATES.values():
        fixed += [_strip_special_tokens(value) for value in roles.values()]
    texts = fixed * (num_examples // 10)
    for index in range(num_examples):
        sample_question, sample_answer = data.text_example(index)
        texts += [sample_question, sample_answer, data.caption_scene(index).caption()]
    return texts


def _strip_special_tokens(text: str) -> str:
    for token in NAVIL_SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def build_tokenizer(output_dir: Optional[Union[str, Path]] = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE of the tiny model and appends the NaViL special tokens (deterministic).

    The BPE (`vocab_size` entries including the 256 bytes) is learnt from `tokenizer_corpus()`; the special tokens
    follow, in the order of `NAVIL_SPECIAL_TOKENS`. End of sequence is `<|im_end|>`, padding `<|endoftext|>`, and no
    BOS token is added. With `output_dir` the tokenizer is saved there (`AutoTokenizer.from_pretrained` loads it).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(NAVIL_SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in NAVIL_SPECIAL_TOKENS if t not in (END_OF_TURN_TOKEN, PAD_TOKEN)],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if output_dir is not None:
        wrapped.save_pretrained(output_dir)
    return wrapped


def load_tokenizer(tokenizer_dir: Optional[Union[str, Path]] = None):
    """The tokenizer saved in `tokenizer_dir`, by default the packaged one (`tokenizer/`)."""
    return AutoTokenizer.from_pretrained(str(tokenizer_dir or TOKENIZER_DIR))
