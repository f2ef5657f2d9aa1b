"""The `navil` model of lmms-eval (a "simple" model: the task's text and images, as InternVL's lmms-eval models).

    lmms-eval --model navil --model_args pretrained=DIR,max_pixels=...,multiscale=True --tasks mme --batch_size 8

navil's setup.py registers it under lmms-eval's `lmms_eval.models` entry-point group (`lmms_eval_model_manifest` in
`navil.evaluation`), so an installed navil is all lmms-eval needs. Each request is answered as
`model.chat(tokenizer, images, context)` (the context gets one `<image>\\n` per image unless it places them), in
batches of `batch_size` requests with the same generation settings.
"""

from typing import Optional, Union

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .engine import DEFAULT_MAX_NEW_TOKENS, NaViLEvalModel

# lmms-eval generation settings that are not `generate` arguments (handled here or meaningless for NaViL).
_HARNESS_ONLY_SETTINGS = ("until", "image_aspect_ratio", "image_sizes")


def _as_bool(value: Union[bool, str], name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def truncate_at_stop_strings(text: str, until) -> str:
    """`text` up to the first of the stop strings `until` (a string or a list of them), as lmms-eval's models do."""
    for stop in [until] if isinstance(until, str) else list(until or []):
        if stop:
            text = text.split(stop)[0]
    return text


class NaViL(lmms):
    """NaViL for lmms-eval.

    Model args (`--model_args key=value,...`): `pretrained` (folder or Hub id; the embedded tiny model when omitted),
    `device` (`auto`), `dtype` (`auto`: bfloat16 on GPUs, float32 on CPUs), `min_pixels`, `max_pixels` (the
    checkpoint's by default), `multiscale` (True), `max_new_tokens` (1024, used where a task sets none); the
    command's `--batch_size` batches generation.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: Optional[str] = None,
        device: Optional[str] = "auto",
        dtype: str = "auto",
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        multiscale: Union[bool, str] = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: Union[int, str] = 1,
        max_batch_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown model_args for navil: {', '.join(sorted(kwargs))}; the navil model takes pretrained, device, "
                "dtype, min_pixels, max_pixels, multiscale and max_new_tokens."
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("The navil model needs a fixed --batch_size (a whole number), not 'auto'.")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
        self.engine = NaViLEvalModel(
            pretrained,
            device=device or "auto",
            dtype=dtype,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            multiscale=_as_bool(multiscale, "multiscale"),
            max_new_tokens=max_new_tokens,
        )

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.engine.device

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        if visuals is None:
            return []
        return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Replies in the order of `requests`, batched by identical generation settings."""
        replies = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.get("until")
            generation = {key: value for key, value in settings.items() if key not in _HARNESS_ONLY_SETTINGS}
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts, images = [], []
                for index in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    contexts.append(context)
                    images.append(self._visuals(doc_to_visual, task, split, doc_id))
                for index, context, reply in zip(batch, contexts, self.engine.answer(contexts, images, generation)):
                    replies[index] = truncate_at_stop_strings(reply, until)
                    self.cache_hook.add_partial("generate_until", (context, settings), replies[index])
                progress.update(len(batch))
        progress.close()
        return replies

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) of each request's continuation after the chat prompt of its context."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Scoring"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = (
                doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
            )
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            results.append(self.engine.loglikelihood(context, visuals, str(continuation)))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "The navil lmms-eval model answers single-turn tasks (generate_until and loglikelihood requests); pick a "
            "task without multi-round generation."
        )
