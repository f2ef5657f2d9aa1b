"""NaViL as a VLMEvalKit model: `NaViLChat(model_path=...)` has VLMEvalKit's model interface (`generate`,
`generate_inner(message, dataset)`, `use_custom_prompt`, `build_prompt`, `set_dump_image`, `dump_image`).

VLMEvalKit has no plugin mechanism: register the class in a checkout's `vlmeval/config.py` (docs/evaluation.md shows
the lines). Nothing here imports VLMEvalKit; `build_prompt`, which only VLMEvalKit calls, asks it for the dataset's
type.

A message is VLMEvalKit's interleaved list `[{"type": "text" | "image", "value": ...}, ...]`. As in the original
NaViL demo, its texts are joined with newlines and its images (paths or PIL images) go before them, one `<image>`
each: the reply is `model.chat(tokenizer, images, "\\n".join(texts))`'s.
"""

from typing import Optional

from PIL import Image

from .benchmarks import benchmark_prompt, upscales_first_image
from .engine import DEFAULT_MAX_NEW_TOKENS, NaViLEvalModel

MESSAGE_TYPES = ("text", "image")


def split_message(message) -> tuple[list[str], list]:
    """The texts and the images of a VLMEvalKit message (a string, a dict, or a list of strings or dicts), in order;
    a `ValueError` for anything else."""
    if isinstance(message, (str, dict)):
        message = [message]
    if not isinstance(message, (list, tuple)) or not message:
        raise ValueError(
            'A message is a non-empty list of {"type": "text" | "image", "value": ...} dicts, got '
            f"{type(message).__name__} {message!r:.60}."
        )
    texts, images = [], []
    for index, item in enumerate(message):
        if isinstance(item, str):
            item = {"type": "text", "value": item}
        if not isinstance(item, dict) or item.get("type") not in MESSAGE_TYPES or "value" not in item:
            raise ValueError(
                f'Message item {index} must be a dict with "type" ("text" or "image") and "value", got {item!r:.60}.'
            )
        if item["type"] == "text":
            if not isinstance(item["value"], str):
                raise ValueError(f"Message item {index} is text but its value is {type(item['value']).__name__}.")
            texts.append(item["value"])
        else:
            images.append(item["value"])
    return texts, images


def _upscaled(image):
    """The image at twice its width and height (bilinear), as InternVL's wrapper feeds MMMU's first image."""
    image = image if isinstance(image, Image.Image) else Image.open(image)
    image = image.convert("RGB")
    return image.resize((image.width * 2, image.height * 2), Image.BILINEAR)


class NaViLChat:
    """A NaViL checkpoint behind VLMEvalKit's model interface.

    Args:
        model_path (`str`, *optional*): Model folder or Hub id (the embedded tiny model when omitted).
        device, dtype, min_pixels, max_pixels, multiscale: See [`NaViLEvalModel`]; by default the checkpoint's pixel
            limits with the multi-scale pyramid, as the original demo.
        kwargs: `generate` arguments, greedy with `max_new_tokens=1024` by default (the original demo's).
    """

    INTERLEAVE = True
    is_api = False
    allowed_types = list(MESSAGE_TYPES)

    def __init__(
        self,
        model_path: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        multiscale: bool = True,
        **kwargs,
    ):
        max_new_tokens = kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        self.engine = NaViLEvalModel(
            model_path,
            device=device,
            dtype=dtype,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            multiscale=multiscale,
            max_new_tokens=max_new_tokens,
        )
        self.generation_kwargs = kwargs
        self.dump_image_func = None

    # -- VLMEvalKit's prompt hooks -----------------------------------------------------------------------------

    def use_custom_prompt(self, dataset: Optional[str]) -> bool:
        """Image benchmarks get the prompts of `benchmark_prompt`; multi-turn ones (MMDU, MME-RealWorld) and
        video ones keep the dataset's own."""
        if dataset is None:
            return False
        from vlmeval.dataset import DATASET_MODALITY

        if any(name in dataset for name in ("MMDU", "MME-RealWorld", "MMAlignBench", "WeMath_COT")):
            return False
        return DATASET_MODALITY(dataset) != "VIDEO"

    def build_prompt(self, line, dataset: Optional[str] = None) -> list[dict]:
        """The message of one benchmark row: the question with the benchmark's suffix, then the row's images."""
        from vlmeval.dataset import DATASET_TYPE

        paths = self.dump_image(line, dataset)
        paths = [paths] if isinstance(paths, str) else list(paths)
        prompt = benchmark_prompt(line, dataset, DATASET_TYPE(dataset) if dataset else None)
        return [{"type": "text", "value": prompt}] + [{"type": "image", "value": path} for path in paths]

    def set_dump_image(self, dump_image_func) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset: Optional[str] = None):
        """The image paths of a row, written by the dataset's `dump_image` (which VLMEvalKit hands over through
        `set_dump_image`)."""
        if self.dump_image_func is None:
            raise ValueError(
                "dump_image needs the dataset's image writer; VLMEvalKit passes it with model.set_dump_image("
                "dataset.dump_image) before building prompts."
            )
        return self.dump_image_func(line)

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(self, message, dataset: Optional[str] = None) -> str:
        """VLMEvalKit's entry point: a string, dict or list of them → the reply (see `generate_inner`)."""
        split_message(message)  # refuses malformed messages before any work
        if isinstance(message, (str, dict)):
            message = [message]
        message = [{"type": "text", "value": item} if isinstance(item, str) else item for item in message]
        return self.generate_inner(message, dataset)

    def generate_inner(self, message: list[dict], dataset: Optional[str] = None) -> str:
        """The reply to an interleaved message: `model.chat(tokenizer, images, "\\n".join(texts))`, with the
        first image enlarged 2x for MMMU."""
        texts, images = split_message(message)
        if not texts:
            raise ValueError("The message has no text; add a question (VLMEvalKit messages end with one).")
        if images and upscales_first_image(dataset):
            images = [_upscaled(images[0]), *images[1:]]
        return self.engine.answer(["\n".join(texts)], [images], self.generation_kwargs)[0]
