"""Which code runs when a `navil` command loads a model folder (the trust rules of docs/reliability.md).

A model folder (or Hub repository) may carry Python files that the Auto classes import when its JSON files name
them in `auto_map` (`modeling_*.py`, `processing_*.py`, `tokenization_*.py`, ...). The `navil` commands load a
folder with the installed package's classes and run none of its files, unless the user passes
`--trust-remote-code`; even then an `auto_map` entry that points outside the folder (another repository or folder,
`"/elsewhere--modeling_navil.X"`, or a relative path) is refused before anything is imported.

Not a Hub file: the remote code never loads itself through these helpers.
"""

import json
import re
from pathlib import Path

# The JSON files whose `auto_map` the Auto classes follow.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
# `module.Class`: a module file of the folder itself, nothing else (no `repo--` prefix, no path).
_LOCAL_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def _references(value):
    """Every string of an `auto_map` value (a string, or the [slow, fast] pair of `AutoTokenizer`)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item)
    elif value is not None:
        yield repr(value)


def _json_file(pretrained_model_name_or_path, name: str):
    """Path of the folder's (or Hub repository's) file `name`, or None when it has none."""
    folder = Path(str(pretrained_model_name_or_path))
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        str(pretrained_model_name_or_path),
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None


def auto_map_modules(pretrained_model_name_or_path) -> dict:
    """`{module file: JSON file naming it}` of every `auto_map` entry of the folder, refusing (`ValueError`) an entry
    that points outside the folder: `repo--module.Class` (another repository or folder), or a module that is a path."""
    modules = {}
    for name in AUTO_MAP_FILES:
        path = _json_file(pretrained_model_name_or_path, name)
        if path is None:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path} is not a readable JSON file ({error}); download or save it again.") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        for reference in _references(auto_map):
            if not _LOCAL_REFERENCE.fullmatch(reference):
                raise ValueError(
                    f"{path} has an auto_map entry {reference!r:.200} that points outside "
                    f"{pretrained_model_name_or_path} (another repository or folder, or a path); navil never runs "
                    "such code, even with --trust-remote-code. Remove the entry, or copy the code into the folder "
                    "and name it as module.Class."
                )
            modules[reference.split(".")[0] + ".py"] = name
    return modules


def _check_trust(pretrained_model_name_or_path, trust_remote_code) -> None:
    if trust_remote_code is not True and trust_remote_code is not False:
        raise ValueError(f"trust_remote_code must be True or False, got {trust_remote_code!r:.40}.")
    if trust_remote_code:
        auto_map_modules(pretrained_model_name_or_path)


def load_navil_model(pretrained_model_name_or_path, trust_remote_code: bool = False, **kwargs):
    """The model of a NaViL folder or Hub id: the installed package's `NaViLForConditionalGeneration`, or with
    `trust_remote_code` the folder's own code through `AutoModel`, after every `auto_map` entry of the folder is
    checked to stay inside it. `kwargs` go to `from_pretrained` (e.g. `dtype`)."""
    _check_trust(pretrained_model_name_or_path, trust_remote_code)
    if trust_remote_code:
        from transformers import AutoModel

        return AutoModel.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
    from ..modeling_navil import NaViLForConditionalGeneration

    return NaViLForConditionalGeneration.from_pretrained(pretrained_model_name_or_path, **kwargs)


def load_navil_processor(pretrained_model_name_or_path, trust_remote_code: bool = False):
    """The processor of a NaViL folder or Hub id: the installed `NaViLProcessor` (its tokenizer loaded without remote
    code), or with `trust_remote_code` the folder's own code through `AutoProcessor`, after the `auto_map` check."""
    _check_trust(pretrained_model_name_or_path, trust_remote_code)
    if trust_remote_code:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True)
    from ..processing_navil import NaViLProcessor  # its image processor class is registered by navil/__init__.py

    return NaViLProcessor.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False)


def load_navil_tokenizer_safely(pretrained_model_name_or_path, trust_remote_code: bool = False):
    """The tokenizer of a NaViL folder: with the installed classes only (no `tokenization_*.py` of the folder runs),
    or with `trust_remote_code` after the `auto_map` check."""
    from ..processing_navil import load_navil_tokenizer

    _check_trust(pretrained_model_name_or_path, trust_remote_code)
    return load_navil_tokenizer(pretrained_model_name_or_path, trust_remote_code=trust_remote_code)
