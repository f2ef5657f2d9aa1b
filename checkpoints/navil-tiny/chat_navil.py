"""The original NaViL chat API (`chat`, `batch_chat`, `stream_chat`, `image_processor`), as a mixin of the model.

`NaViLForConditionalGeneration` inherits `NaViLChatMixin`, so the calls of the original model card work unchanged
(`model.chat(tokenizer, pixel_values, question, generation_config, ...)`). Everything here goes through the
processor, which owns the prompt format, and `generate`; the model itself never imports the processing modules.
"""

import atexit
from collections.abc import Mapping
from threading import Event, Thread
from typing import Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .checks_navil import check_generation_length, check_generation_settings, check_special_token_ids
from .configuration_navil import (
    END_OF_TURN_TOKEN,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    check_image_grid,
)
from .image_processing_navil import NaViLImageProcessor
from .processing_navil import NaViLProcessor, clean_reply, image_processor_of


class StopWhenSet(StoppingCriteria):
    """Stops generation at the next decode step once `event` is set (by another thread): binds a generation to the
    consumer of its stream."""

    def __init__(self):
        self.event = Event()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# (stop criterion, worker thread) of every stream whose generation may still run.
_LIVE_STREAMS = set()


@atexit.register
def _stop_live_streams() -> None:
    """Stops the generations of streams still open when the program ends: their workers are daemon threads, which
    the interpreter does not wait for, and each stops at its next decode step (waited for, briefly, here)."""
    for stop, _ in list(_LIVE_STREAMS):
        stop.event.set()
    for _, worker in list(_LIVE_STREAMS):
        worker.join(timeout=5)


class NaViLChatMixin:
    """Chat helpers of the original NaViL remote code; needs `config`, `device`, `generate` and the special-token
    methods of `NaViLForConditionalGeneration`."""

    @property
    def image_processor(self) -> NaViLImageProcessor:
        """The image processor the original builds from the config: single-scale per call, min/max from the config."""
        return image_processor_of(self.config, multiscale=False)

    def chat_processor(self, tokenizer) -> NaViLProcessor:
        """The processor of this model's config for `tokenizer` ([`NaViLProcessor.from_model_config`]), built once
        per tokenizer and config settings and reused by later calls."""
        if not self.config.special_token_ids:
            self.init_special_token_ids(tokenizer)
        check_special_token_ids(self.config.special_token_ids, tokenizer)
        config = self.config
        settings = (config.template, config.system_message, config.min_dynamic_patch, config.max_dynamic_patch)
        cached = getattr(self, "_chat_processor", None)
        if cached is None or cached[0] is not tokenizer or cached[1] != settings:
            self._chat_processor = cached = (tokenizer, settings, NaViLProcessor.from_model_config(config, tokenizer))
        return cached[2]

    def _generation_kwargs(self, generation_config, tokenizer, prompt_length: int) -> dict:
        """`generate` arguments of the chat helpers: greedy, up to 512 new tokens and stopping at `<|im_end|>` unless
        `generation_config` says otherwise. Refuses a prompt plus `max_new_tokens` (or `max_length`) that does not
        fit in the model's positions, rather than clamping the reply."""
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise ValueError(
                f"generation_config must be a dict of generate() arguments, e.g. dict(max_new_tokens=64, "
                f"do_sample=False), got {type(generation_config).__name__}."
            )
        kwargs = check_generation_settings(dict(generation_config or {}), self.config.text_config.vocab_size)
        if "max_length" not in kwargs:
            kwargs.setdefault("max_new_tokens", 512)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("eos_token_id", self.special_token_id(END_OF_TURN_TOKEN))
        if tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        check_generation_length(self.config.text_config, self.generation_config, prompt_length, kwargs)
        return kwargs

    def _prepare_chat_inputs(self, processor, questions, images_per_question, histories, pixel_inputs=None):
        """Tokenised prompts (left padded) and image tensors for a batch of conversations."""
        for index, question in enumerate(questions):
            name = "The question" if len(questions) == 1 else f"Question {index}"
            if not isinstance(question, str):
                raise ValueError(f"{name} must be a string, got {type(question).__name__}.")
            if not question.strip():
                raise ValueError(
                    f"{name} is empty; ask something about the images, e.g. 'Describe the image.' (an image-only "
                    "question is '<image>')."
                )
        prompts = []
        for question, images, history in zip(questions, images_per_question, histories):
            prompts.append(processor.build_prompt(question, history=history, num_images=len(images)))
        flat_images = [image for images in images_per_question for image in images]
        if pixel_inputs is not None:
            prompts = [
                processor.expand_image_placeholders(prompt, pixel_inputs["image_grid_thw"], pixel_inputs["num_scales"])
                for prompt in prompts
            ]
            inputs = processor(text=prompts, return_tensors="pt")
            inputs.update(pixel_inputs)
        else:
            inputs = processor(text=prompts, images=flat_images or None, return_tensors="pt")
        return prompts, inputs.to(self.device)

    def chat(
        self,
        tokenizer,
        pixel_values,
        question: str,
        generation_config: Optional[dict] = None,
        history=None,
        return_history: bool = False,
        num_patches_list=None,
        num_scales=None,
        IMG_START_TOKEN: str = IMG_START_TOKEN,  # noqa: N803 (names of the original signature)
        IMG_END_TOKEN: str = IMG_END_TOKEN,  # noqa: N803
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,  # noqa: N803
        verbose: bool = False,
        anyres_image_size: bool = True,
        streamer=None,
    ):
        """Answers `question` about the images, as the original `chat()`.

        `pixel_values` are either preprocessed tensors ([patches, 3·P·P] or [patches, 3, P, P], all scales of all
        images) with `num_patches_list` (their image_grid_thw rows) and `num_scales` (scales per image), or, for
        convenience, images (PIL, arrays, paths) that are preprocessed here with the multi-scale pyramid, or `None`.
        Without `history`, one `<image>\\n` per image is prefixed to a question that has no `<image>`.

        Bad inputs raise a `ValueError` naming the problem before anything is generated: an empty or non-string
        question, a history that is not a list of (question, answer) string pairs, `<image>` placeholders that do not
        match the images, tensors whose `num_patches_list` / `num_scales` do not describe `pixel_values`, a
        `generation_config` that is not a dict, and a prompt plus `max_new_tokens` longer than the model's positions.
        """
        processor = self.chat_processor(tokenizer)
        images, pixel_inputs = [], None
        if isinstance(pixel_values, torch.Tensor):
            if anyres_image_size and num_patches_list is None:
                raise ValueError("Preprocessed pixel_values need num_patches_list (the image_grid_thw rows).")
            if pixel_values.device.type == "meta":
                raise ValueError("pixel_values are on the meta device (no values); pass the processor's output.")
            grids = torch.as_tensor(num_patches_list if num_patches_list is not None else [], dtype=torch.long)
            if grids.numel() % 3:
                raise ValueError(
                    f"num_patches_list must hold the (t, h, w) image_grid_thw rows of pixel_values, got "
                    f"{grids.numel()} numbers; pass the image processor's image_grid_thw."
                )
            grids = check_image_grid(grids.view(-1, 3), self.config.vision_config.merge_size)
            if int(grids.prod(-1).sum()) != len(pixel_values):  # before a prompt is built for these grids
                raise ValueError(
                    f"pixel_values has {len(pixel_values)} patches but image_grid_thw describes "
                    f"{int(grids.prod(-1).sum())}; pass num_patches_list=image_grid_thw from the same image processor "
                    "call."
                )
            scales = torch.as_tensor([len(grids)] if num_scales is None else num_scales, dtype=torch.long).view(-1)
            pixel_inputs = {
                "pixel_values": pixel_values,
                "image_grid_thw": grids,
                "num_scales": scales.cpu(),
            }
            images = [None] * len(scales)
        elif pixel_values is not None:
            images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else [pixel_values]
        prompts, inputs = self._prepare_chat_inputs(processor, [question], [images], [history], pixel_inputs)
        kwargs = self._generation_kwargs(generation_config, tokenizer, inputs["input_ids"].shape[1])
        output_ids = self.generate(**inputs, **kwargs, streamer=streamer)
        new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        reply = processor.decode_reply(new_ids)[0]
        question_as_asked = question
        if history is None and images and IMAGE_PLACEHOLDER not in question:
            question_as_asked = f"{IMAGE_PLACEHOLDER}\n" * len(images) + question
        if verbose:
            print(prompts[0].replace(IMG_CONTEXT_TOKEN, ""), reply)
        history = [*(history or []), (question_as_asked, reply)]
        return (reply, history) if return_history else reply

    def batch_chat(self, tokenizer, questions, images=None, generation_config=None, histories=None):
        """Answers several conversations in one batch (left padded); the same replies as `chat` one by one.

        `images[i]` is the list of images (PIL, arrays or paths) of conversation i; `histories[i]` its history.
        """
        if not isinstance(questions, (list, tuple)):
            raise ValueError(
                f"batch_chat takes a list of questions, got {type(questions).__name__}; for one question use chat()."
            )
        if not questions:
            raise ValueError("batch_chat got no questions; pass a list with at least one question.")
        processor = self.chat_processor(tokenizer)
        images = images if images is not None else [[] for _ in questions]
        histories = histories if histories is not None else [None] * len(questions)
        for name, value in (("images", images), ("histories", histories)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"batch_chat takes {name} as a list with one entry per conversation, got {type(value).__name__}."
                )
        if not len(questions) == len(images) == len(histories):
            raise ValueError(
                f"batch_chat got {len(questions)} questions, {len(images)} image lists and {len(histories)} "
                "histories; pass one of each per conversation."
            )
        images = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        _, inputs = self._prepare_chat_inputs(processor, questions, images, histories)
        kwargs = self._generation_kwargs(generation_config, tokenizer, inputs["input_ids"].shape[1])
        output_ids = self.generate(**inputs, **kwargs)
        return processor.decode_reply(output_ids[:, inputs["input_ids"].shape[1] :])

    def stream_chat(self, tokenizer, pixel_values, question, generation_config=None, history=None, **kwargs):
        """Like `chat`, yielding the reply in pieces as it is generated; the pieces join to `chat`'s reply.

        Bad inputs raise `chat`'s `ValueError`s when the iteration starts. Generation runs in a worker thread that
        stops within one decode step once the consumer goes away (`close()`, leaving the loop early, an exception
        such as KeyboardInterrupt in the loop, or the generator being garbage collected).
        """
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = StopWhenSet()
        if generation_config is None or isinstance(generation_config, Mapping):  # chat refuses the other types
            generation_config = dict(generation_config or {})
            criteria = [*generation_config.get("stopping_criteria", ()), stop]
            generation_config["stopping_criteria"] = StoppingCriteriaList(criteria)
        errors = []

        def generate():
            try:
                self.chat(tokenizer, pixel_values, question, generation_config, history, streamer=streamer, **kwargs)
            except Exception as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        worker = Thread(target=generate, daemon=True)  # never keeps the program running (see _stop_live_streams)
        _LIVE_STREAMS.add((stop, worker))
        worker.start()
        text, emitted = "", ""
        try:
            for piece in streamer:
                text += piece
                # emit only what more text cannot change (the reply is stripped and cleaned of partial <|im_end|>)
                if any(text.endswith(END_OF_TURN_TOKEN[:size]) for size in range(1, len(END_OF_TURN_TOKEN))):
                    continue
                stable = clean_reply(text)
                if stable.startswith(emitted) and len(stable) > len(emitted):
                    yield stable[len(emitted) :]
                    emitted = stable
        finally:
            stop.event.set()  # a no-op when generation has ended; otherwise the consumer has gone away
            worker.join()
            _LIVE_STREAMS.discard((stop, worker))
        if errors:
            raise errors[0]
        final = clean_reply(text)
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted) :]
