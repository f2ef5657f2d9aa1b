"""Saved and converted folders load through the Auto classes and the pipeline in a fresh process (remote code)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BACKBONES, GOLDEN, load_golden_model

import navil
from navil.configuration_navil import CODE_FILES

IMAGE = GOLDEN / "images" / "shapes.png"
QUESTION = "Describe the image shortly."


def run_fresh_python(script: str, *args) -> dict:
    """Runs `script` in a new interpreter (offline, no navil on sys.path) and returns the JSON it prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


AUTO_AND_PIPELINE = """
    import json, sys
    import torch
    from transformers import AutoModel, AutoProcessor, AutoTokenizer, pipeline

    folder, image, question = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generation = dict(max_new_tokens=12, do_sample=False)
    chat_reply = model.chat(tokenizer, image, question, generation)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": question}]}]
    out = pipe(text=messages, generate_kwargs=generation, return_full_text=False)
    print(json.dumps({
        "model_class": type(model).__name__,
        "processor_class": type(processor).__name__,
        "pipeline_reply": out[0]["generated_text"],
        "chat_reply": chat_reply,
    }))
"""


def save_tiny_folder(backbone, folder, golden_tokenizer):
    from navil.processing_navil import NaViLProcessor

    model = load_golden_model(backbone, golden_tokenizer)
    processor = NaViLProcessor(
        image_processor=model.chat_processor(golden_tokenizer).image_processor,
        tokenizer=golden_tokenizer,
        template=model.config.template,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def assert_loads_and_pipeline_matches_chat(folder):
    result = run_fresh_python(AUTO_AND_PIPELINE, folder, IMAGE, QUESTION)
    assert result["model_class"] == "NaViLForConditionalGeneration"
    assert result["processor_class"] == "NaViLProcessor"
    assert result["pipeline_reply"] == result["chat_reply"]
    return result


@pytest.mark.parametrize("backbone", BACKBONES)
def test_saved_folder_loads_with_auto_classes_and_pipeline_in_fresh_process(backbone, tmp_path, golden_tokenizer):
    model = save_tiny_folder(backbone, tmp_path, golden_tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    for auto_class in ("AutoConfig", "AutoModel", "AutoModelForImageTextToText"):
        assert auto_class in config["auto_map"]
    for name in CODE_FILES:
        assert (tmp_path / name).is_file()
    result = assert_loads_and_pipeline_matches_chat(tmp_path)
    expected = model.chat(golden_tokenizer, str(IMAGE), QUESTION, dict(max_new_tokens=12, do_sample=False))
    assert result["chat_reply"] == expected


@pytest.mark.parametrize("backbone", BACKBONES)
def test_convert_turns_original_checkpoint_into_loadable_folder(backbone, tmp_path):
    from navil.tools.convert import convert_checkpoint

    out = convert_checkpoint(GOLDEN / backbone, tmp_path / "converted", tokenizer_dir=GOLDEN / "tokenizer")
    original = (GOLDEN / backbone / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == original
    assert_loads_and_pipeline_matches_chat(out)


MODEL_CARD = """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    path, image_file, question, dtype = sys.argv[1:5]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
    model = AutoModel.from_pretrained(
        path,
        low_cpu_mem_usage=True,
        torch_dtype=getattr(torch, dtype),
        trust_remote_code=True,
        load_in_8bit=False,
    ).eval()
    model.init_special_token_ids(tokenizer)
    if hasattr(model.config, "tie_word_embeddings") and model.config.tie_word_embeddings:
        model.language_model.tie_weights()

    image_processor = model.image_processor
    patch_size = model.config.vision_config.patch_size
    min_pixels = model.config.min_dynamic_patch * patch_size * patch_size
    max_pixels = model.config.max_dynamic_patch * patch_size * patch_size
    ratio = model.config.scale_downsample_ratio

    def preprocess(image, max_pixels):
        ret = image_processor(image, return_tensors="pt", min_pixels=min_pixels, max_pixels=max_pixels)
        grid = ret["image_grid_thw"]
        pixels = ret["pixel_values"].reshape(grid.prod(), -1, image_processor.patch_size, image_processor.patch_size)
        return pixels, grid[0]

    image = Image.open(image_file).convert("RGB")
    pixels, grid = preprocess(image, max_pixels)
    scales, grids = [pixels], [grid]
    while True:
        smallest = grids[0]
        next_max = smallest.prod() * patch_size * patch_size * ratio**2
        if next_max < min_pixels:
            break
        pixels, grid = preprocess(image, next_max)
        if grid.prod() >= smallest.prod():
            break
        scales.insert(0, pixels)
        grids.insert(0, grid)
    pixel_values = torch.cat(scales).to(getattr(torch, dtype))
    image_grid_thws = torch.stack(grids)
    num_scales = torch.tensor([len(grids)])
    generation_config = dict(do_sample=False, max_new_tokens=12, top_p=None, num_beams=1)
    with torch.no_grad():
        response = model.chat(
            tokenizer,
            pixel_values=pixel_values,
            question=question,
            generation_config=generation_config,
            verbose=True,
            anyres_image_size=True,
            num_patches_list=image_grid_thws,
            num_scales=num_scales,
        )
    print(json.dumps({"response": response}))
"""


@pytest.mark.parametrize("backbone", BACKBONES)
def test_original_model_card_snippet_runs_unchanged_on_converted_checkpoint(backbone, tmp_path, manifest):
    from navil.tools.convert import convert_checkpoint

    out = convert_checkpoint(
        GOLDEN / backbone, tmp_path / "converted", tokenizer_dir=GOLDEN / "tokenizer", verify=False
    )
    case = manifest["models"][backbone]["cases"]["one_image"]
    float32 = run_fresh_python(MODEL_CARD, out, IMAGE, case["question"], "float32")
    assert float32["response"] == case["response"]
    # the card's own dtype: runs on CPU and answers (random tiny weights need not agree token for token in bf16)
    bfloat16 = run_fresh_python(MODEL_CARD, out, IMAGE, case["question"], "bfloat16")
    assert isinstance(bfloat16["response"], str)


def test_load_in_8bit_false_is_accepted_and_true_is_explained():
    from navil.modeling_navil import NaViLForConditionalGeneration

    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / "qwen3_ve", load_in_8bit=False)
    assert model.dtype == torch.float32
    with pytest.raises(ValueError, match="quantization_config"):
        NaViLForConditionalGeneration(model.config, load_in_8bit=True)


@pytest.mark.parametrize("part", ["model", "processor"])
def test_push_to_hub_uploads_the_navil_model_card_instead_of_the_generic_one(part, tmp_path, monkeypatch):
    # push_to_hub saves into a folder, writes transformers' generic card (or the repo's own) there, then uploads the
    # folder with `_upload_modified_files`, which is stubbed here to read what would be uploaded
    from transformers.utils.hub import PushToHubMixin

    from navil import NaViLForConditionalGeneration, NaViLProcessor
    from navil.configuration_navil import GENERIC_CARD_SENTENCE

    checkpoint = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
    loaded = (NaViLForConditionalGeneration if part == "model" else NaViLProcessor).from_pretrained(checkpoint)
    uploaded = []
    monkeypatch.setattr(
        PushToHubMixin,
        "_upload_modified_files",
        lambda self, folder, *args, **kwargs: uploaded.append((Path(folder) / "README.md").read_text()),
    )
    generic = tmp_path / "generic"
    generic.mkdir()
    (generic / "README.md").write_text(f"---\nlibrary_name: transformers\n---\n{GENERIC_CARD_SENTENCE}\n")
    loaded._upload_modified_files(generic, "you/navil-model", {})
    own = tmp_path / "own"
    own.mkdir()
    (own / "README.md").write_text("# The repo's own card\n")
    loaded._upload_modified_files(own, "you/navil-model", {})
    assert "pipeline_tag: image-text-to-text" in uploaded[0] and GENERIC_CARD_SENTENCE not in uploaded[0]
    assert uploaded[1] == "# The repo's own card\n"
