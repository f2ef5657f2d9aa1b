"""Reliability, round three (issue 33, items 8-21): no silently wrong answer, and a clear error naming the problem,
the file or the flag instead of a raw exception. One test (or one parametrized group) per item."""

import errno
import json
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file

from navil.configuration_navil import END_OF_TURN_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, NaViLConfig
from navil.modeling_navil import NaViLForConditionalGeneration

GENERATION = dict(max_new_tokens=2, do_sample=False)


@pytest.fixture
def golden_copy(tmp_path):
    """A writable copy of the golden Qwen3-VE checkpoint."""
    folder = tmp_path / "qwen3_ve"
    shutil.copytree(GOLDEN / "qwen3_ve", folder)
    return folder


# -- 8. integer tensors for float parameters ------------------------------------------------------------------------


def test_integer_tensors_for_float_parameters_are_refused_at_load(golden_copy):
    weights = load_file(golden_copy / "model.safetensors")
    name = next(key for key in weights if key.endswith("q_proj.weight"))
    weights[name] = weights[name].view(torch.int32)  # the same bytes relabelled I32
    save_file(weights, golden_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"stores {name} as I32, but the model's parameters are floating point"):
        NaViLForConditionalGeneration.from_pretrained(golden_copy)


# -- 9. finite, sane float config fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("text_config", "rope_theta", 1e-300),
        ("text_config", "rope_theta", 1.0),
        ("text_config", "rope_factor", float("nan")),
        ("text_config", "rope_factor", float("inf")),
        ("text_config", "rms_norm_eps", 5.0),
        ("vision_config", "layer_norm_eps", 1e10),
    ],
)
def test_float_config_fields_must_be_finite_and_in_range(section, field, value):
    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    config["llm_config" if section == "text_config" else section][field] = value
    with pytest.raises(ValueError, match=f"{field}"):
        NaViLConfig(**config)


# -- 10. special-token ids cross-checked against the tokenizer ------------------------------------------------------


@pytest.mark.parametrize("swap", [(END_OF_TURN_TOKEN, IMG_CONTEXT_TOKEN), (IMG_START_TOKEN, IMG_END_TOKEN)])
def test_special_token_ids_that_disagree_with_the_tokenizer_are_refused_by_chat(golden_tokenizer, swap):
    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / "qwen3_ve").eval()
    model.init_special_token_ids(golden_tokenizer)
    ids = model.config.special_token_ids
    first, second = swap
    ids[first], ids[second] = ids[second], ids[first]
    with pytest.raises(ValueError, match=f"special_token_ids disagree with the tokenizer: .*{first} is {ids[first]}"):
        model.chat(golden_tokenizer, None, "Hi", GENERATION)


# -- 11. image tokens without images --------------------------------------------------------------------------------


def test_image_tokens_without_pixel_values_are_refused(model, processor):
    prompt = processor.build_prompt("What is this?") + IMG_CONTEXT_TOKEN * 64
    inputs = processor(text=prompt, return_tensors="pt")
    with pytest.raises(ValueError, match=f"has 64 {IMG_CONTEXT_TOKEN} tokens but no pixel_values"):
        model.generate(**inputs, **GENERATION)


# -- 13. generation settings of chat --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=float("inf"), do_sample=True), "'temperature'\\] must be a positive finite number"),
        (dict(top_p=float("nan"), do_sample=True), "'top_p'\\] must be a number in \\(0, 1\\]"),
        (dict(top_p=2.0, do_sample=True), "'top_p'\\] must be a number in \\(0, 1\\]"),
        (dict(eos_token_id=-5), "'eos_token_id'\\] must be a token id in \\[0, "),
        (dict(num_beams=0), "'num_beams'\\] must be a whole number >= 1"),
        (dict(return_dict_in_generate=True), "sets return_dict_in_generate, which chat sets itself"),
        (dict(streamer=None), "streamer: pass it as chat's streamer argument"),
        (dict(input_ids=torch.zeros(1, 2, dtype=torch.long)), "sets input_ids, which chat sets itself"),
        (dict(pixel_values=torch.zeros(4, 768)), "pixel_values: pass the images as chat's pixel_values"),
    ],
    ids=["temperature-inf", "top_p-nan", "top_p-2", "eos-negative", "beams-0", "return-dict", "streamer", "ids", "pv"],
)
def test_chat_generation_settings_are_validated(model, golden_tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        model.chat(golden_tokenizer, None, "Hi", dict(GENERATION, **settings))


# -- 21. save_pretrained onto a full disk ---------------------------------------------------------------------------


def test_save_pretrained_on_a_full_disk_raises_oserror_and_writes_nothing(model, tmp_path, monkeypatch):
    import transformers.modeling_utils

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    target = tmp_path / "saved"
    with pytest.raises(OSError, match=f"Could not save the model to {target} .*No space left on device"):
        model.save_pretrained(target)
    assert list(tmp_path.iterdir()) == []  # no config without weights, no temporary folder


def test_save_pretrained_replaces_an_earlier_save_completely(model, tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (target / "notes.txt").write_text("kept")
    model.save_pretrained(target)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["saved"]
    assert not (target / "model-00001-of-00002.safetensors").exists() and (target / "notes.txt").is_file()
    reloaded = NaViLForConditionalGeneration.from_pretrained(target)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
