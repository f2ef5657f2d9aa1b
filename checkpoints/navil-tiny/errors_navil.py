"""`NaViLInputError`, the `ValueError` of every refused input, and `ERROR_KINDS`, the kinds programs (the fuzz) tell
them apart by. It imports nothing, so that every Hub file can raise it (`checks_navil` holds the checks themselves).
"""

# The kinds of refused input, for programs (the fuzz classifies errors by them): kind -> what was refused.
ERROR_KINDS = {
    "placeholder count mismatch": "the <image> placeholders of a prompt are not one per image",
    "images per text": "images is not one image, a flat list or one list per text",
    "text contains <IMG_CONTEXT>": "a prompt given with images already holds the token reserved for image features",
    "text is not valid Unicode": "a text holds a lone surrogate",
    "image grid": "image_grid_thw or num_scales do not describe the images",
    "image tokens without images": "a prompt holds image tokens but no pixel_values were given",
    "special token ids disagree with the tokenizer": "config.special_token_ids name other ids than the tokenizer",
    "image tokens do not match the images": "the prompt's image tokens are not the ones the image grids give",
    "pixel values": "pixel_values the vision tower cannot take",
    "prompt": "a prompt the model cannot run (shape, dtype, device, ids or length)",
    "generation length": "max_new_tokens / max_length out of range or beyond the model's positions",
    "generation setting out of range": "a generation setting chat checks is out of range",
    "generation key that chat owns": "a generate() argument that chat sets itself",
    "JSONL file not UTF-8": "a fine-tuning JSONL file is not UTF-8",
    "JSONL line not JSON": "a line of a fine-tuning JSONL file is not a JSON object",
    "JSONL file without examples": "a fine-tuning JSONL file holds no examples",
    "images is not a list of images": "a training example's 'images' is not a list of images",
    "malformed chat example": "a training example is not user and assistant messages in turn with text/image blocks",
    "images do not match image blocks": "a training example's images are not one per image block",
    "image placeholders do not match images": "a training conversation's <image> placeholders are not one per image",
    "empty batch": "the collator got no examples",
    "example longer than max_length": "every example of a batch would be cut through an image",
    "aspect ratio above 200": "an image more than 200 times wider than tall, or taller than wide",
    "float values out of range": "a float image whose values lie outside [0, 1] (or [0, 255])",
    "NaN or infinite values": "an image array or tensor holding NaN or infinite values",
    "truncated or corrupt file": "an image file that cannot be decoded to the end",
    "not an image file": "a file that is no image format PIL can decode",
    "max_pixels too small for the aspect ratio": "max_pixels leaves the short side of an image below one patch grid",
    "pixel limit is not a number": "min_pixels or max_pixels is not a single number of pixels",
    "min_pixels above max_pixels": "no image size lies between min_pixels and max_pixels",
    "multiscale is not a bool": "multiscale or another switch of the image processor is not True or False",
    "too many patches": "an image or call above max_patches_per_scale or max_patches_per_call",
    "unreadable safetensors file": "a weights file that is truncated, empty or not safetensors",
    "checkpoint does not match the model": "a checkpoint's tensors are missing, extra or of other shapes",
    "image file not found": "an image path that names no file",
    "saved bound removed or raised": "a saved preprocessor file removes or raises one of the safety bounds",
    "image above max_image_pixels": "an image declaring more pixels than max_image_pixels (a decompression bomb)",
    "image processor setting": "an image processor setting that is not a positive whole number or pixel count",
    "image mean or std out of range": "image_mean, image_std or rescale_factor not finite or outside the pixel range",
    "config contradicts the weights": "config.json gives sizes that the checkpoint's tensors contradict",
    "config too large for the memory": "a config whose model would not fit in the memory available",
    "invalid config value": "a config field out of its range or inconsistent with another field",
}


class NaViLInputError(ValueError):
    """A refused input: the message names the problem and the fix for people, `kind` (a key of `ERROR_KINDS`)
    names the problem for programs."""

    def __init__(self, message: str, kind: str):
        if kind not in ERROR_KINDS:
            raise KeyError(f"{kind!r} is not one of ERROR_KINDS")
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return type(self), (str(self), self.kind)
