"""Turns an ORIGINAL NaViL checkpoint folder into one that loads with this code through the Auto classes.

The weights are copied byte for byte (the original state-dict names are ours), the config gains `auto_map` and the
special-token ids, and the code files, the image processor and processor configs are added next to them. The
original tokenizer files are kept as they are, except their code: none of the source's Python files runs or is copied
unless `trust_remote_code` (then only the tokenizer's own `tokenization_*.py`, named by its `auto_map`).
"""

import json
import shutil
from pathlib import Path

import torch

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
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


def _drop_tokenizer_auto_map(out: Path) -> None:
    """Removes the `AutoTokenizer` entry of the copied tokenizer config: its code files were not copied."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
        del auto_map["AutoTokenizer"]
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_checkpoint(src_dir, out_dir, tokenizer_dir=None, verify=True, trust_remote_code=False) -> Path:
    """Writes a loadable copy of the original checkpoint `src_dir` to `out_dir` and returns `out_dir`.

    `tokenizer_dir` defaults to `src_dir` (original NaViL repos ship their tokenizer next to the weights). With
    `verify`, the result is loaded through `AutoModel`/`AutoProcessor` (`trust_remote_code=True`) and its logits on a
    short prompt are compared with the original folder loaded directly.

    The tokenizer loads without running its folder's code unless `trust_remote_code` (an original tokenizer that
    needs its `tokenization_*.py` is then refused, naming the flag); with it, that code must lie in the folder.
    """
    from .. import configuration_navil
    from ..compat_navil import make_saved_processor_portable
    from ..configuration_navil import CODE_FILES, hub_repo_id_of, write_model_card
    from ..modeling_navil import NaViLForConditionalGeneration
    from ..processing_navil import NaViLProcessor
    from .loading import auto_map_modules, load_navil_tokenizer_safely

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

    tokenizer = load_navil_tokenizer_safely(tokenizer_src, trust_remote_code)
    # loaded once to validate the config and weights and to fill the special-token ids; the weight files
    # themselves are copied unchanged
    probe = NaViLForConditionalGeneration.from_pretrained(src)
    probe.init_special_token_ids(tokenizer)

    _copy_matching(src, out, WEIGHT_PATTERNS)
    probe.config.save_pretrained(out)
    probe.generation_config.save_pretrained(out)
    processor = NaViLProcessor.from_model_config(probe.config, tokenizer)
    processor.save_pretrained(out)
    _copy_matching(tokenizer_src, out, TOKENIZER_PATTERNS)
    if trust_remote_code:
        tokenizer_code = [name for name in auto_map_modules(tokenizer_src) if name.startswith("tokenization_")]
        _copy_matching(tokenizer_src, out, tokenizer_code)
    else:
        _drop_tokenizer_auto_map(out)
    make_saved_processor_portable(out)  # the copied tokenizer config, in the form every transformers release reads
    write_model_card(out, base_model=hub_repo_id_of(src))
    hub_dir = Path(configuration_navil.__file__).parent
    for name in CODE_FILES:
        shutil.copy2(hub_dir / name, out / name)

    if verify:
        verify_conversion(src, out, probe)
    return out


def verify_conversion(src: Path, out: Path, original) -> None:
    """Loads `out` through the Auto classes and checks it reproduces `original`'s logits on a short prompt."""
    from transformers import AutoModel, AutoProcessor

    # out's code files are the installed package's own, copied by convert above (none come from src)
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
