"""The layout of the code: the model file stands alone and names every checkpoint module literally."""

import ast
import re
from pathlib import Path

import pytest
from conftest import BACKBONES, GOLDEN
from safetensors import safe_open

PACKAGE = Path(__file__).resolve().parent.parent
MODELING = PACKAGE / "modeling_navil.py"


def test_model_file_uses_nothing_from_the_processing_modules():
    # transformers 4.x copies only the files a remote module imports itself, so modeling_navil.py names the processing
    # modules for the chat mixin's sake; the model code itself must not use them
    tree = ast.parse(MODELING.read_text(encoding="utf-8"))
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("processing_navil", "image_processing_navil")
        for alias in node.names
    }
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported & used == set()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_checkpoint_module_name_is_declared_literally_in_the_model_file(backbone):
    # each module on the path of every parameter is assigned as `self.<name> = ...` (or is the connector's index)
    with safe_open(GOLDEN / backbone / "model.safetensors", "pt") as weights:
        names = {part for key in weights.keys() for part in key.split(".")[:-1] if not part.isdigit()}
    declared = set(re.findall(r"self\.(\w+) = ", MODELING.read_text(encoding="utf-8")))
    assert sorted(names - declared) == []
