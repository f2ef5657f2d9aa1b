"""docs/architecture.md is true about the files: its file map names every module and only files that exist, and the
package root holds only the Hub files (their manifest is `configuration_navil.CODE_FILES`), setup.py, the README and
config files."""

import re
from pathlib import Path

from navil.configuration_navil import CODE_FILES

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SUBPACKAGES = ("serving", "tools", "testing", "training", "evaluation")
# besides the Hub files: the package's __init__, packaging, the README and configuration
ROOT_FILES = {"__init__.py", "setup.py", "README.md", "ruff.toml"}


def file_map() -> set[str]:
    """The paths named in the first column of the tables of the "File map" section."""
    section = DOC.read_text(encoding="utf-8").split("## File map", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}


def modules() -> set[str]:
    """Every Python module of the package, and the benchmark and CI scripts."""
    found = {path.name for path in ROOT.glob("*.py")} - {"setup.py"}
    for folder in SUBPACKAGES:
        found |= {f"{folder}/{path.name}" for path in (ROOT / folder).glob("*.py")}
    found |= {f"benchmarks/{path.name}" for path in (ROOT / "benchmarks").iterdir() if path.suffix in (".py", ".sh")}
    found |= {f".ci/{path.name}" for path in (ROOT / ".ci").iterdir() if path.is_file()}
    return found


def test_architecture_file_map_names_every_module():
    assert sorted(modules() - file_map()) == []


def test_architecture_file_map_names_no_missing_file():
    assert sorted(name for name in file_map() if not (ROOT / name).exists()) == []


def test_architecture_file_map_lists_the_hub_files_at_the_root():
    assert set(CODE_FILES) <= file_map()


def test_package_root_holds_only_hub_files_setup_readme_and_config():
    others = {
        path.name
        for path in ROOT.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name not in set(CODE_FILES) | ROOT_FILES
    }
    assert sorted(others) == [], (
        "move these into a subpackage (serving/, tools/, testing/, ...) or list them as Hub files"
    )


def test_every_hub_file_in_the_manifest_is_at_the_root():
    assert sorted(name for name in CODE_FILES if not (ROOT / name).is_file()) == []
