"""navil: NaViL native multimodal LLMs for Hugging Face transformers.

The files of this package double as Hub remote code: `configuration_navil.py`, `modeling_navil.py`,
`image_processing_navil.py`, `image_processing_navil_fast.py` and `processing_navil.py` are copied next to a checkpoint by `save_pretrained`.
"""

from transformers import AutoConfig

from .configuration_navil import NaViLConfig, NaViLTextConfig, NaViLVisionConfig
from .image_processing_navil import NaViLImageProcessor
from .image_processing_navil_fast import NaViLImageProcessorFast
from .modeling_navil import NaViLForConditionalGeneration, NaViLVisionModel
from .processing_navil import NaViLProcessor, add_navil_special_tokens

__version__ = "0.1.0"

# `AutoTokenizer.from_pretrained(folder)` reads the folder's config.json (transformers 5); with the config class known it
# needs no remote code for it and does not stop to ask for trust_remote_code.
AutoConfig.register(NaViLConfig.model_type, NaViLConfig, exist_ok=True)

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
]
