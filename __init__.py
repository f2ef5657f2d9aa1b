"""navil: NaViL native multimodal LLMs for Hugging Face transformers.

The files of this package double as Hub remote code: `configuration_navil.py`, `modeling_navil.py`,
`image_processing_navil.py`, `image_processing_navil_fast.py` and `processing_navil.py` are
copied next to a checkpoint by `save_pretrained`.

The model and processor classes are imported when first used: importing transformers' model classes imports every
installed quantization library (torchao among them, with start-up messages of its own), which `navil --help` and the
commands that load no model do not need.
"""

from importlib import import_module

from transformers import AutoConfig

from .configuration_navil import NaViLConfig, NaViLTextConfig, NaViLVisionConfig

__version__ = "0.1.0"

# `AutoTokenizer.from_pretrained(folder)` reads the folder's config.json (transformers 5); with the config class known it
# needs no remote code for it and does not stop to ask for trust_remote_code.
AutoConfig.register(NaViLConfig.model_type, NaViLConfig, exist_ok=True)

_LAZY = {
    "NaViLForConditionalGeneration": ".modeling_navil",
    "NaViLImageProcessor": ".image_processing_navil",
    "NaViLImageProcessorFast": ".image_processing_navil_fast",
    "NaViLProcessor": ".processing_navil",
    "NaViLVisionModel": ".modeling_navil",
    "add_navil_special_tokens": ".processing_navil",
    "quantize_for_cpu": ".serving.cpu_quantization",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'navil' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "NaViLConfig",
    "NaViLForConditionalGeneration",
    "NaViLImageProcessor",
    "NaViLImageProcessorFast",
    "NaViLProcessor",
    "NaViLTextConfig",
    "NaViLVisionConfig",
    "NaViLVisionModel",
    "add_navil_special_tokens",
    "quantize_for_cpu",
]
