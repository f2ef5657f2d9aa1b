"""Turns an ORIGINAL NaViL checkpoint folder into one that loads with this code through the Auto classes.

The weights are copied byte for byte (the original state-dict names are ours), the config gains `auto_map` and the
special-token ids, and the code files, the image processor and processor configs are added next to them. The
original tokenizer files are kept as they are.
"""

import shutil
from pathlib import Path

import torch

# The Hub files: they import each other relatively and run as remote code next to a checkpoint.
CODE_FILES = (
    "configuration_navil.py",
    "compat_navil.py",
    "attention_navil.py",
    "checks_navil.py",
    "chat_navil.py",
    "modeling_navil.py",
    "image_processing_navil.py",
    "image_processing_navil_fast.py",
    "processing_navil.py",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "tokenization_*.py",
    "chat_template*",
)


def _copy_matching(src: Path, dst: Path, patterns) -> list:
    copied = []
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)
                copied.append(path.name)
    return copied


def convert_checkpoint(src_dir, out_dir, tokenizer_dir=None, verify=True) -> Path:
    """Writes a loadable copy of the original checkpoint `src_dir` to `out_dir` and returns `out_dir`.

    `tokenizer_dir` defaults to `src_dir` (original NaViL repos ship their tokenizer next to the weights). With
    `verify`, the result is loaded through `AutoModel`/`AutoProcessor` (`trust_remote_code=True`) and its logits on a
    short prompt are compared with the original folder loaded directly.
    """
    from transformers import AutoTokenizer

    from .compat_navil import make_saved_processor_portable
    from .modeling_navil import NaViLForConditionalGeneration
    from .processing_navil import NaViLProcessor

    src, out = Path(src_dir), Path(out_dir)
    tokenizer_src = Path(tokenizer_dir) if tokenizer_dir is not None else src
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: pass the folder of an original NaViL checkpoint.")
    if not any(src.glob("*.safetensors")):
        raise ValueError(
            f"{src} has no .safetensors weights. Pickled checkpoints (.bin) are not converted: load them with "
            "torch.load(weights_only=True) yourself and save them with safetensors first."
        )
    if src.resolve() == out.resolve():
        raise ValueError("out_dir must differ from src_dir: the original folder is left untouched.")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src, trust_remote_code=True)
    # loaded once to validate the config and weights and to fill the special-token ids; the weight files
    # themselves are copied unchanged
    probe = NaViLForConditionalGeneration.from_pretrained(src)
    probe.init_special_token_ids(tokenizer)

    _copy_matching(src, out, WEIGHT_PATTERNS)
    probe.config.save_pretrained(out)
    probe.generation_config.save_pretrained(out)
    processor = NaViLProcessor(
        image_processor=probe.chat_processor(tokenizer).image_processor,
        tokenizer=tokenizer,
        template=probe.config.template,
        system_message=probe.config.system_message,
    )
    processor.save_pretrained(out)
    _copy_matching(tokenizer_src, out, TOKENIZER_PATTERNS)
    make_saved_processor_portable(out)  # the copied tokenizer config, in the form every transformers release reads
    code_dir = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copy2(code_dir / name, out / name)

    if verify:
        verify_conversion(src, out, probe)
    return out


def verify_conversion(src: Path, out: Path, original) -> None:
    """Loads `out` through the Auto classes and checks it reproduces `original`'s logits on a short prompt."""
    from transformers import AutoModel, AutoProcessor

    converted = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = processor(text=[processor.build_prompt("Hello")], return_tensors="pt")
    with torch.no_grad():
        expected = original.eval()(**inputs).logits
        actual = converted(**inputs).logits
    if not torch.equal(expected, actual):
        raise RuntimeError(
            f"The converted folder {out} does not reproduce the logits of {src} "
            f"(max difference {(expected - actual).abs().max().item():.3g})."
        )
