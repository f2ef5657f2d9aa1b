"""Shared fixtures and helpers: the golden outputs of the original NaViL implementation (copied into
tests/fixtures/golden), the golden Qwen3-VE model and its processor, and greedy decoding for comparisons."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from navil.layouts_navil import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "navil-tiny"  # the embedded model
DATA = ROOT / "examples" / "finetune" / "train.jsonl"  # the example chats of `navil finetune`
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


def assert_golden_features(model, backbone, manifest, ip_outputs, golden_outputs, atol):
    """Checks the connector outputs of `model` on the golden images of `backbone` against the original's."""
    for image in manifest["models"][backbone]["features"]:
        features = model.get_image_features(
            ip_outputs[f"ip.{image}.multi.pixel_values"], ip_outputs[f"ip.{image}.multi.image_grid_thw"]
        ).pooler_output
        expected = golden_outputs[backbone][f"features.{image}.after_connector"]
        torch.testing.assert_close(torch.cat(features), expected, atol=atol, rtol=atol)


def chat_golden_case(model, tokenizer, spec, pixel_values, grids, num_scales, **kwargs):
    """`model.chat` of a golden chat case (`spec`: its question, generation settings and history) on the inputs of its
    images."""
    generation = dict(spec["generation"])
    return model.chat(
        tokenizer,
        pixel_values,
        spec["question"],
        generation,
        history=spec["history"],
        num_patches_list=grids,
        num_scales=num_scales,
        anyres_image_size=bool(spec["images"]),
        **kwargs,
    )


def chat_preprocessed(model, tokenizer, inputs, question, generation):
    """`model.chat` on images an image processor already made tensors of (`inputs`)."""
    pixel_values, grids, num_scales = inputs["pixel_values"], inputs["image_grid_thw"], inputs["num_scales"]
    return model.chat(tokenizer, pixel_values, question, generation, num_patches_list=grids, num_scales=num_scales)


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


def finetune_command(output_dir, *flags, launcher=(sys.executable,)):
    """The command line of `navil finetune` on the example chats into `output_dir`, started by `launcher`."""
    command = [*launcher, "-m", "navil.tools.cli", "finetune", "--data", str(DATA)]
    return [*command, "--output-dir", str(output_dir), *flags]


def trainer_arguments(output_dir, **overrides):
    """The settings of a quiet `transformers.Trainer` run on the CPU that logs every step and saves nothing, updated
    by `overrides`."""
    settings = dict(output_dir=str(output_dir), logging_steps=1, report_to="none", save_strategy="no")
    settings.update(remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return {**settings, **overrides}


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
