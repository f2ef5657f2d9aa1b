"""Training batches in the processor's chat format: conversations, and question branches that share one image."""

import codecs
import json
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch

from ..checks_navil import NaViLInputError, check_special_token_ids
from ..configuration_navil import END_OF_TURN_TOKEN, IMAGE_PLACEHOLDER
from ..processing_navil import NaViLProcessor
from .scene_supervision import batch_scene_targets
from .synthetic_data import ShapesDataset

_GRID_KEYS = ("image_grid_thw", "num_scales")  # what image-token expansion reads of the image processor's output


class Conversation(NamedTuple):
    """One training conversation: an optional image and its (question, answer) turns, in order."""

    image: object
    turns: list[tuple[str, str]]


def collate_conversations(
    processor: NaViLProcessor,
    conversations: list[Conversation],
    multiscale: Union[bool, list[bool]] = True,
    loss_on_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenised, right-padded training batch in the processor's chat format.

    A conversation is tokenised as `chat()` builds its prompts: the first turn is `build_prompt(question)` (with the
    `<image>` prefix expanded into the image's tokens), each later turn adds the user role, the question,
    `<|im_end|>` and the assistant role; every answer is followed by `<|im_end|>`. Answers are tokenised on their own,
    exactly as the model generates them. Labels are -100 except on the answers and their `<|im_end|>` (or everywhere
    but padding with `loss_on_prompt`). `multiscale` (one flag, or one per conversation) chooses the image pyramid or
    the single full-size pass.

    Returns `input_ids`, `attention_mask`, `labels` ([batch, longest]) and, with images, `pixel_values`,
    `image_grid_thw` and `num_scales`.
    """
    flags = _per_example(multiscale, len(conversations))
    images, sequences = [], []
    for conversation, flag in zip(conversations, flags):
        has_image = conversation.image is not None
        questions = [question for question, _ in conversation.turns]
        prompts = processor.turn_prompts(questions, num_images=int(has_image))
        answers = [answer for _, answer in conversation.turns]
        conversation_images = [conversation.image] if has_image else []
        ids, labels, image_inputs = encode_turns(
            processor, prompts, answers, conversation_images, flag, loss_on_prompt
        )
        sequences.append((ids, labels))
        images += image_inputs
    return pad_batch(processor, sequences, images)


def encode_turns(
    processor: NaViLProcessor,
    prompts: list[str],
    answers: list[str],
    images: list,
    multiscale: Optional[bool] = True,
    loss_on_prompt: bool = False,
) -> tuple[list[int], list[int], list[dict]]:
    """Token ids and labels of one conversation given as the prompt before each answer and the answers.

    `prompts[i]` is the text the conversation adds before answer i (`build_prompt` for the first, `next_turn_prompt`
    for the later ones); their `<image>` placeholders are expanded, in order, into the tokens of `images`, each run
    through the image processor on its own (`multiscale` None: the image processor's setting). Answers are tokenised
    on their own, exactly as the model generates them, each followed by `<|im_end|>`. Labels are -100 on the prompts
    (their ids with `loss_on_prompt`) and the answer ids elsewhere.

    Returns `(input_ids, labels, image_inputs)` with the image processor's output of every image.
    """
    tokenizer, end_id = processor.tokenizer, end_of_turn_id(processor)
    ids, labels, image_inputs, next_image = [], [], [], 0
    for prompt, answer in zip(prompts, answers):
        count = prompt.count(IMAGE_PLACEHOLDER)
        if count:
            if next_image + count > len(images):
                raise NaViLInputError(
                    f"The conversation has more {IMAGE_PLACEHOLDER} placeholders than its {len(images)} images; give "
                    "one image per image block.",
                    "image placeholders do not match images",
                )
            prompt_images = [_process_image(processor, image, multiscale) for image in images[next_image:][:count]]
            grids, scales = (torch.cat([inputs[key] for inputs in prompt_images]) for key in _GRID_KEYS)
            prompt = processor.expand_image_placeholders(prompt, grids, scales)
            image_inputs += prompt_images
            next_image += count
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = _answer_ids(tokenizer, answer, end_id)
        ids += prompt_ids + answer_ids
        labels += (prompt_ids if loss_on_prompt else [-100] * len(prompt_ids)) + answer_ids
    if next_image != len(images):
        raise NaViLInputError(
            f"The conversation has {len(images)} images but {next_image} image blocks; give one image per image block.",
            "image placeholders do not match images",
        )
    return ids, labels, image_inputs


def pad_batch(
    processor: NaViLProcessor, sequences: list[tuple[list[int], list[int]]], images: list[dict]
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` ([batch, longest]) of `(ids, labels)` sequences and,
    with images, their `pixel_values`, `image_grid_thw` and `num_scales`."""
    longest = max(len(ids) for ids, _ in sequences)
    pad_id = _pad_id(processor.tokenizer, end_of_turn_id(processor))
    batch = {
        "input_ids": torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids, _ in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in sequences]),
        "labels": torch.tensor([labels + [-100] * (longest - len(labels)) for _, labels in sequences]),
    }
    if images:
        batch.update(_image_tensors(images))
    return batch


def end_of_turn_id(processor: NaViLProcessor) -> int:
    """The id of `<|im_end|>`, which ends every answer (the model's end of sequence)."""
    return processor.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)


def _per_example(flag: Union[bool, list[bool]], count: int) -> list[bool]:
    """One flag for every example: `flag` itself when it is already a list, else `flag` repeated."""
    return flag if isinstance(flag, list) else [flag] * count


def _answer_ids(tokenizer, answer: str, end_id: int) -> list[int]:
    """An answer's tokens as the model generates them (tokenised on its own), then `<|im_end|>`."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]


def _pad_id(tokenizer, end_id: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id


def _process_image(processor: NaViLProcessor, image, multiscale: Optional[bool]) -> dict:
    """The image processor's output for one image (`multiscale` None: the image processor's setting)."""
    settings = {} if multiscale is None else {"multiscale": multiscale}
    return processor.image_processor(image, return_tensors="pt", **settings)


def _add_image(processor: NaViLProcessor, image, multiscale: bool, prompt: str, images: list[dict]) -> str:
    """Runs the image processor on `image`, appends its outputs to `images` and returns `prompt` with the `<image>`
    placeholder expanded into the image's tokens."""
    image_inputs = _process_image(processor, image, multiscale)
    images.append(image_inputs)
    return processor.expand_image_placeholders(prompt, *(image_inputs[key] for key in _GRID_KEYS))


def _image_tensors(images: list[dict]) -> dict[str, torch.Tensor]:
    """The image processor's outputs of several images as one batch."""
    return {
        key: torch.cat([inputs[key] for inputs in images]) for key in ("pixel_values", "image_grid_thw", "num_scales")
    }


def collate_question_branches(
    processor: NaViLProcessor, examples: list[Conversation], multiscale: Union[bool, list[bool]] = True
) -> dict[str, torch.Tensor]:
    """Training batch in which every question about an image is a separate branch after the image's tokens.

    Each row holds one image's prompt up to `</img>`, then one branch per (question, answer) turn: the rest of the
    question's chat prompt (`"\\n" + question`, `<|im_end|>`, the assistant role), the answer and `<|im_end|>`. A 4-D
    attention mask lets a branch see the shared prefix and itself only, and its position ids continue from the
    prefix, so each branch is computed exactly as `chat()` would compute that single question while the vision
    encoder and the image tokens run once for all of them. Labels cover the answers and their `<|im_end|>`.

    Returns `input_ids`, `labels`, `position_ids` ([batch, longest]), a boolean `attention_mask` ([batch, 1,
    longest, longest], True where attention is allowed), `pixel_values`, `image_grid_thw` and `num_scales`.
    """
    tokenizer, end_id = processor.tokenizer, end_of_turn_id(processor)
    flags = _per_example(multiscale, len(examples))
    images, rows = [], []
    # every question's prompt starts with the same text up to its image: the shared prefix
    head = processor.build_prompt(None, num_images=1).split(IMAGE_PLACEHOLDER)[0] + IMAGE_PLACEHOLDER
    for example, flag in zip(examples, flags):
        prefix = _add_image(processor, example.image, flag, head, images)
        branches = []
        for question, answer in example.turns:
            prompt = processor.build_prompt(question, num_images=1)[len(head) :]
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = _answer_ids(tokenizer, answer, end_id)
            branches.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        rows.append((tokenizer(prefix, add_special_tokens=False)["input_ids"], branches))

    longest = max(len(prefix) + sum(len(ids) for ids, _ in branches) for prefix, branches in rows)
    pad_id = _pad_id(tokenizer, end_id)
    input_ids = torch.full((len(rows), longest), pad_id)
    labels = torch.full((len(rows), longest), -100)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    attention_mask = torch.eye(longest, dtype=torch.bool).repeat(len(rows), 1, 1, 1)  # padding sees itself only
    for row, (prefix, branches) in enumerate(rows):
        length = len(prefix)
        input_ids[row, :length] = torch.tensor(prefix)
        position_ids[row, :length] = torch.arange(length)
        attention_mask[row, 0, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        start = length
        for ids, branch_labels in branches:
            branch = slice(start, start + len(ids))
            input_ids[row, branch] = torch.tensor(ids)
            labels[row, branch] = torch.tensor(branch_labels)
            position_ids[row, branch] = torch.arange(length, length + len(ids))
            attention_mask[row, 0, branch, :length] = True
            attention_mask[row, 0, branch, branch] = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            start += len(ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        **_image_tensors(images),
    }


def _multiscale_flags(seed: int, step: int, size: int, single_scale_fraction: float) -> list[bool]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(size, generator=generator) >= single_scale_fraction).tolist()


def text_batches(processor, data: ShapesDataset, batch_size: int) -> Callable[[int], dict]:
    """Step → batch of text-only conversations (scene stated in words), loss on every token (LM pre-training)."""

    def batch(step: int) -> dict:
        examples = [data.text_example(step * batch_size + i) for i in range(batch_size)]
        conversations = [Conversation(None, [example]) for example in examples]
        return collate_conversations(processor, conversations, loss_on_prompt=True)

    return batch


def caption_batches(processor, data: ShapesDataset, batch_size: int, single_scale_fraction=0.0, num_shapes=None):
    """Step → batch of captioning conversations: the image alone as the question, its caption as the answer
    (`num_shapes` shapes per image, or 1–3)."""

    def batch(step: int) -> dict:
        samples = [data.caption(step * batch_size + i, num_shapes) for i in range(batch_size)]
        conversations = [Conversation(sample.image, [(sample.question, sample.answer)]) for sample in samples]
        flags = _multiscale_flags(data.seed, step, batch_size, single_scale_fraction)
        return collate_conversations(processor, conversations, multiscale=flags)

    return batch


def question_batches(
    processor,
    data: ShapesDataset,
    batch_size: int,
    single_scale_fraction=0.0,
    num_shapes=None,
    first_index=0,
    with_scene_targets=False,
):
    """Step → batch of images with every question their scenes allow (`ShapesDataset.questions`), each question a
    separate branch after its image (`collate_question_branches`); `num_shapes` shapes per image, or 1–3. Step `s`
    uses examples `first_index + s * batch_size` onwards. `with_scene_targets` adds the per-token `scene_targets` of
    the scene supervision."""

    def batch(step: int) -> dict:
        indices = range(first_index + step * batch_size, first_index + (step + 1) * batch_size)
        scenes, questions = zip(*(data.question_scene(index, num_shapes) for index in indices))
        examples = [
            Conversation(scene.render(), [question[:2] for question in turns])
            for scene, turns in zip(scenes, questions)
        ]
        flags = _multiscale_flags(data.seed + 1, first_index + step, batch_size, single_scale_fraction)
        inputs = collate_question_branches(processor, examples, multiscale=flags)
        if with_scene_targets:
            inputs["scene_targets"] = batch_scene_targets(processor.image_processor, scenes, flags)
        return inputs

    return batch


def scene_batches(processor, data: ShapesDataset, batch_size: int, single_scale_fraction=0.0, first_index=0):
    """Step → images alone with their per-token `scene_targets` (the vision stage of the scene supervision): the
    captioning scenes of `data` from example `first_index + s * batch_size` on."""

    def batch(step: int) -> dict:
        indices = range(first_index + step * batch_size, first_index + (step + 1) * batch_size)
        scenes = [data.caption_scene(index) for index in indices]
        flags = _multiscale_flags(data.seed + 2, first_index + step, batch_size, single_scale_fraction)
        images = [_process_image(processor, scene.render(), flag) for scene, flag in zip(scenes, flags)]
        return {
            **_image_tensors(images),
            "scene_targets": batch_scene_targets(processor.image_processor, scenes, flags),
        }

    return batch


# -- chat examples from JSONL files (navil finetune) -----------------------------------------------------------------

# Keys under which an image block of a message names its image, as `conversation_turns` reads them.
IMAGE_BLOCK_KEYS = ("image", "path", "url")


def check_example_fields(example: dict) -> None:
    """Refuses an example whose `images` is not a list (a string would count its characters as images, a number
    fails deep inside) and whose texts are not valid Unicode (a lone surrogate from a bad decode), naming the place."""
    images = example.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        raise NaViLInputError(
            f"'images' must be a list of images (paths, URLs or PIL images), got {type(images).__name__} "
            f'{images!r:.60}; write "images": ["a.png"] even for one image.',
            "images is not a list of images",
        )
    missing = [index for index, image in enumerate(images or ()) if image is None]
    if missing:
        raise NaViLInputError(
            f"'images' entry {missing[0]} is null; give every image a path, URL or image.",
            "images is not a list of images",
        )
    for index, message in enumerate(example.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [{"text": content}] if isinstance(content, str) else content if isinstance(content, list) else []
        for block in blocks:
            text = block.get("text") if isinstance(block, dict) else None
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise NaViLInputError(
                        f"message {index} is not valid Unicode: it holds the lone surrogate {text[error.start]!r} at "
                        f"position {error.start}; fix the text (a bad decode or a cut emoji).",
                        "text is not valid Unicode",
                    ) from None


def check_batch(examples: list) -> None:
    """Refuses an empty batch, which would otherwise be blamed on `max_length`."""
    if not examples:
        raise NaViLInputError(
            "The collator got an empty batch (no examples); pass at least one example.", "empty batch"
        )


def _resolve(image, folder):
    """A relative image path against `folder`; URLs, data URIs, absolute paths and non-strings unchanged."""
    if not isinstance(image, str) or re.match(r"^[a-z][a-z0-9+.-]*:", image) or Path(image).is_absolute():
        return image
    return str(folder / image)


def read_jsonl(path: Union[str, Path], check: Callable[[dict], object]) -> list[dict]:
    """The examples of a JSONL file, one JSON object per line (blank lines skipped; lines end at `\\n` only, so a
    U+2028 inside a string stays in its line), each passed to `check`. Relative image paths, under `images` and in
    image blocks alike, are resolved against the file's folder. Every problem is a `ValueError` naming the file and
    the line: a file that is not UTF-8 (Latin-1, UTF-16), a line that is not JSON or nested too deeply, and the
    example's own problems (from `check`)."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data[:4096]:
        raise NaViLInputError(
            f"{path} looks like UTF-16 (it has zero bytes); JSONL files are UTF-8: re-save it as UTF-8.",
            "JSONL file not UTF-8",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise NaViLInputError(
            f"{path}:{line} is not UTF-8 (byte 0x{data[error.start]:02x}); JSONL files are UTF-8: re-save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8).",
            "JSONL file not UTF-8",
        ) from None
    examples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise NaViLInputError(
                f"{path}:{number} is not valid JSON ({error.msg}); write one example per line.", "JSONL line not JSON"
            ) from None
        except RecursionError:
            raise NaViLInputError(
                f"{path}:{number} is nested too deeply to be a chat example.", "JSONL line not JSON"
            ) from None
        try:
            check(example)
        except NaViLInputError as error:
            raise NaViLInputError(f"{path}:{number}: {error}", error.kind) from None
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        example["images"] = [_resolve(image, path.parent) for image in example.get("images") or []]
        for message in example["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else ():
                for key in IMAGE_BLOCK_KEYS:
                    if block.get("type") == "image" and block.get(key) is not None:
                        block[key] = _resolve(block[key], path.parent)
        examples.append(example)
    if not examples:
        raise NaViLInputError(
            f"{path} holds no examples; write one JSON example per line.", "JSONL file without examples"
        )
    return examples


def check_finetune_setup(config, tokenizer, stage, lora: Optional[str]) -> None:
    """Refuses a fine-tuning setup that would train silently wrong: special-token ids of the config that disagree
    with the tokenizer, and a `stage` other than the default (2) together with `lora`, which trains only its
    adapters whatever the stage says."""
    check_special_token_ids(config.special_token_ids, tokenizer)
    if lora is not None and (isinstance(stage, bool) or stage != 2):
        raise ValueError(
            f"stage={stage!r} has no effect with lora={lora!r}: LoRA trains only its adapters (on the {lora} experts) "
            "and freezes everything else. Drop --stage to train with LoRA, or drop --lora to train the stage."
        )


def check_split(num_examples: int, num_held_out: int, eval_fraction: float) -> None:
    """Refuses an evaluation split that leaves no example to train on."""
    if num_held_out >= num_examples:
        raise ValueError(
            f"eval_fraction={eval_fraction} holds out {num_held_out} of the {num_examples} examples, leaving none to "
            "train on; lower --eval-fraction (0 holds out none) or add examples."
        )
