"""One NaViL model with the settings an evaluation fixes (pixel limits, multi-scale, generation), answering batches of
questions and scoring continuations. The lmms-eval model and the VLMEvalKit wrapper are thin adapters around it.

Replies are `model.chat`'s: the same processor (`model.chat_processor`), prompt, preprocessing, `generate` arguments
and reply clean-up; a batch is left-padded as in `model.batch_chat`, which gives the replies of one-by-one chats.
"""

from typing import Optional, Sequence

import torch

from ..image_processing_navil import check_pixel_limit
from ..tools.cli import DTYPES, load_model

# The original demo's generation settings (greedy, at most 1024 new tokens); evaluations may lower max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = 1024


class NaViLEvalModel:
    """A NaViL checkpoint loaded for evaluation.

    Args:
        pretrained (`str`, *optional*): Model folder or Hub id; the embedded tiny model when omitted.
        device (`str`): `"auto"` (cuda when available), `"cpu"`, `"cuda"`, `"cuda:1"`, ...
        dtype (`str`): `"auto"` (bfloat16 on GPUs, float32 on CPUs), `"float32"`, `"bfloat16"` or `"float16"`.
        min_pixels, max_pixels (`int`, *optional*): Pixel limits of the full-size image; the checkpoint's
            (`min_dynamic_patch` / `max_dynamic_patch` · patch²) by default, as `model.chat` uses.
        multiscale (`bool`): The multi-scale pyramid of the original (on by default, as in `model.chat`).
        max_new_tokens (`int`): Default length limit of replies; a request may set its own.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        multiscale: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
        self.model, self.tokenizer = load_model(pretrained, device, dtype)
        self.processor = self.model.chat_processor(self.tokenizer)
        image_processor = self.processor.image_processor
        if min_pixels is not None:
            image_processor.min_pixels = check_pixel_limit(min_pixels, "min_pixels")
        if max_pixels is not None:
            image_processor.max_pixels = check_pixel_limit(max_pixels, "max_pixels")
        if image_processor.min_pixels > image_processor.max_pixels:
            raise ValueError(
                f"min_pixels ({image_processor.min_pixels}) is larger than max_pixels ({image_processor.max_pixels}); "
                "pass min_pixels <= max_pixels."
            )
        image_processor.multiscale = bool(multiscale)
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generation_config(self, overrides: Optional[dict] = None) -> dict:
        """`generate` arguments of a request: greedy and this model's `max_new_tokens` unless `overrides` say
        otherwise (`temperature` 0 means greedy, as the harnesses use it)."""
        config = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        for name, value in (overrides or {}).items():
            if value is not None:
                config[name] = value
        if not config.get("temperature"):
            config.pop("temperature", None)
            config.pop("top_p", None)
            config["do_sample"] = False
        elif "do_sample" not in (overrides or {}):
            config["do_sample"] = True
        return config

    @torch.no_grad()
    def answer(
        self, questions: Sequence[str], images: Sequence[Sequence], generation_config: Optional[dict] = None
    ) -> list[str]:
        """Replies to `questions[i]` about the images `images[i]` (PIL images, arrays or paths), in one left-padded
        batch; each equals `model.chat(tokenizer, images[i], questions[i], generation_config)` with this model's
        image settings."""
        if len(questions) != len(images):
            raise ValueError(
                f"Got {len(questions)} questions and {len(images)} image lists; pass one list per question."
            )
        images = [list(group) for group in images]
        _, inputs = self.model._prepare_chat_inputs(self.processor, list(questions), images, [None] * len(questions))
        prompt_length = inputs["input_ids"].shape[1]
        kwargs = self.model._generation_kwargs(
            self.generation_config(generation_config), self.tokenizer, prompt_length
        )
        output_ids = self.model.generate(**inputs, **kwargs)
        return self.processor.decode_reply(output_ids[:, prompt_length:])

    @torch.no_grad()
    def loglikelihood(self, question: str, images: Sequence, continuation: str) -> tuple[float, bool]:
        """Log-probability of `continuation` as the start of the reply to `question` about `images` (the prompt of
        `model.chat`, then the continuation's tokens), and whether greedy decoding would produce exactly it."""
        if not isinstance(continuation, str) or not continuation:
            raise ValueError(f"The continuation to score must be a non-empty string, got {continuation!r:.40}.")
        images = list(images)
        _, inputs = self.model._prepare_chat_inputs(self.processor, [question], [images], [None])
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        target = target.to(self.device)
        input_ids = torch.cat([inputs["input_ids"], target], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], dim=1)
        extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        # logits at the positions that predict the continuation's tokens: [1, continuation, vocab]
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=target.shape[1] + 1, **extra
        ).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        score = log_probs.gather(-1, target.unsqueeze(-1)).sum().item()
        greedy = bool((log_probs.argmax(-1) == target).all())
        return score, greedy
