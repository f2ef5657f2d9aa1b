"""The paper's training stages as config files for `navil finetune --config` (configs/stages/*.json, shipped in the
package).

A config is a JSON object with `description` (what the stage trains and why), `paper` (what the NaViL paper, arXiv
2510.08565, states for the stage, which `finetune` values come from it, and what it does not state) and `finetune`:
the values of `navil finetune` flags, named as the flags without the leading dashes (`learning-rate` or
`learning_rate`). Flags given on the command line override the file's values.
"""

import json
from pathlib import Path
from typing import Union

STAGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "stages"
# Other names of shipped configs: the paper's stage 2 is its supervised fine-tuning.
STAGE_CONFIG_ALIASES = {"sft": "stage2"}


def stage_config_path(config: Union[str, Path]) -> Path:
    """The file of `config`: a path, or the name of a shipped config (`stage1`, `stage1_2`, `stage2` or `sft`,
    `smoke`)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = STAGE_CONFIG_DIR / f"{STAGE_CONFIG_ALIASES.get(str(config), config)}.json"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted([*(item.stem for item in STAGE_CONFIG_DIR.glob("*.json")), *STAGE_CONFIG_ALIASES]))
    raise FileNotFoundError(f"No stage config at {config}; pass a JSON file or one of the shipped configs: {names}.")


def load_stage_config(config: Union[str, Path]) -> dict:
    """The `navil finetune` settings of a stage config (keys as argparse destinations: `learning_rate`). Raises
    `ValueError` naming the problem when the file is not a config."""
    path = stage_config_path(config)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    settings = content.get("finetune") if isinstance(content, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} has no 'finetune' object of flag values; see configs/stages/sft.json.")
    return {name.replace("-", "_"): value for name, value in settings.items()}


def with_stage_config(argv: list[str]) -> list[str]:
    """`navil finetune` arguments with the flags of `--config FILE` inserted right after the `finetune` command, so
    that argparse checks and converts them as typed flags and the flags given after them (on the command line)
    override them. `argv` without `--config` comes back unchanged."""
    if "finetune" not in argv:
        return argv
    command = argv.index("finetune")
    config, rest = None, list(argv[command + 1 :])
    for index, argument in enumerate(rest):
        if argument == "--config" and index + 1 < len(rest):
            config, rest = rest[index + 1], rest[:index] + rest[index + 2 :]
            break
        if argument.startswith("--config="):
            config, rest = argument.partition("=")[2], rest[:index] + rest[index + 1 :]
            break
    if config is None:
        return argv
    flags = []
    for name, value in load_stage_config(config).items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return [*argv[: command + 1], *flags, *rest]
