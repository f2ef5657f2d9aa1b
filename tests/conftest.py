"""Shared fixtures and helpers: the golden outputs of the original NaViL implementation (copied into
tests/fixtures/golden), the golden Qwen3-VE model and its processor, and greedy decoding for comparisons."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from navil.layouts_navil import LAYOUTS

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
BACKBONES = tuple(layout.golden_name for layout in LAYOUTS.values())  # the golden models: one per layout


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's training runs: its default thread count oversubscribes small CPUs shared
    with other jobs (each step then takes seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def manifest():
    return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GOLDEN / "tokenizer")


@pytest.fixture(scope="session")
def golden_image_processor(manifest):
    """The image processor with the settings the golden files were recorded with."""
    from navil.image_processing_navil import NaViLImageProcessor

    config = manifest["image_processor"]["config"]
    return NaViLImageProcessor(
        patch_size=config["patch_size"],
        merge_size=config["merge_size"],
        min_pixels=config["min_pixels"],
        max_pixels=config["max_pixels"],
        scale_downsample_ratio=config["scale_downsample_ratio"],
        image_mean=config["image_mean"],
        image_std=config["image_std"],
    )


@pytest.fixture(scope="module")
def model(golden_tokenizer):
    """The golden Qwen3-VE model, ready to chat: the model of the test modules that do not define their own."""
    return load_golden_model("qwen3_ve", golden_tokenizer)


@pytest.fixture(scope="module")
def processor(model, golden_tokenizer):
    """The processor `model.chat` uses."""
    return model.chat_processor(golden_tokenizer)


@pytest.fixture(scope="session")
def image_processor_outputs():
    return load_file(GOLDEN / "image_processor.safetensors")


@pytest.fixture(scope="session")
def golden_outputs():
    return {name: load_file(GOLDEN / f"{name}.outputs.safetensors") for name in BACKBONES}


def case_pixel_inputs(ip_outputs, images):
    """The chat cases' image inputs: each image's multi-scale tensors, concatenated in order."""
    if not images:
        return None, None, None
    pixel_values = torch.cat([ip_outputs[f"ip.{image}.multi.pixel_values"] for image in images])
    grids = torch.cat([ip_outputs[f"ip.{image}.multi.image_grid_thw"] for image in images])
    num_scales = torch.cat([ip_outputs[f"ip.{image}.multi.num_scales"] for image in images])
    return pixel_values, grids, num_scales


def load_golden_model(name, tokenizer=None, **kwargs):
    from navil.modeling_navil import NaViLForConditionalGeneration

    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / name, **kwargs).eval()
    if tokenizer is not None:
        model.init_special_token_ids(tokenizer)
    return model


def greedy(model, inputs, new_tokens=10, **kwargs):
    """The tokens greedy decoding appends to `inputs`: exactly `new_tokens` of them (end of sequence cannot stop it),
    so that runs computed in different ways can be compared token for token."""
    generated = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
    )
    return generated[:, inputs["input_ids"].shape[1] :]


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A Hub in a folder, for `push_to_hub` without network: creating a repo is a no-op, a repo's model card is read
    from `<folder>/<repo_id>/README.md`, and an upload copies the files of the upload folder to `<folder>/<repo_id>`
    (so that `from_pretrained("<repo_id>")` run in the folder loads what was pushed). Returns the folder."""
    import shutil
    from types import SimpleNamespace

    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import hub

    root = tmp_path / "hub"
    root.mkdir()
    load_card = ModelCard.load.__func__

    def card_of(cls, repo_id, *args, **kwargs):
        card = root / repo_id / "README.md"
        if not card.is_file():
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return load_card(cls, card)

    def upload(self, working_dir, repo_id, *args, **kwargs):
        shutil.copytree(working_dir, root / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id), raising=False)
    monkeypatch.setattr(ModelCard, "load", classmethod(card_of))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    return root
