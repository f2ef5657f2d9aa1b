"""The dense-decoder switch (`text_config.modality_experts=False`) and the native-ablations benchmark built on it."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM

from navil import modeling_navil
from navil.configuration_navil import NaViLConfig
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.training import (
    dense_text_config,
    freeze,
    load_tokenizer,
    lora_target_modules,
    navil_processor,
    tiny_config,
    upcycle_from_text_model,
)
from navil.training.synthetic_data import example_sample

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "native_ablations.py"
LAYOUTS = ("qwen3", "internlm2")


def dense_config(backbone: str) -> NaViLConfig:
    return tiny_config(backbone, text={"modality_experts": False})


def visual_expert_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if "_ve." in name]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# -- the dense switch --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", LAYOUTS)
def test_dense_decoder_has_no_visual_expert_parameters(backbone):
    assert visual_expert_names(NaViLForConditionalGeneration(tiny_config(backbone)))
    assert visual_expert_names(NaViLForConditionalGeneration(dense_config(backbone))) == []


def test_modality_experts_must_be_a_flag():
    with pytest.raises(ValueError, match=r"text_config\.modality_experts must be True or False"):
        tiny_config(text={"modality_experts": "no"})


@pytest.mark.parametrize("backbone", LAYOUTS)
def test_dense_model_equals_the_experts_model_with_every_token_on_the_text_weights(backbone, tokenizer, monkeypatch):
    sizes = dict(min_dynamic_patch=16, max_dynamic_patch=64)
    torch.manual_seed(0)
    experts = NaViLForConditionalGeneration(tiny_config(backbone, len(tokenizer), **sizes)).eval()
    dense = NaViLForConditionalGeneration(
        tiny_config(backbone, len(tokenizer), text={"modality_experts": False}, **sizes)
    ).eval()
    dense.load_state_dict({key: value for key, value in experts.state_dict().items() if "_ve." not in key})
    for model in (experts, dense):
        model.init_special_token_ids(tokenizer)
    processor = navil_processor(experts.config, tokenizer)
    sample = example_sample()
    inputs = processor(
        images=[sample.image], text=[processor.build_prompt(sample.question, num_images=1)], return_tensors="pt"
    )
    with torch.no_grad():
        routed = experts(**inputs).logits
        dense_logits = dense(**inputs).logits
        monkeypatch.setattr(modeling_navil.ModalityRouter, "build", classmethod(lambda cls, mask: None))
        text_weights_only = experts(**inputs).logits
    assert not torch.allclose(routed, dense_logits)  # the experts model does route its image tokens elsewhere
    assert torch.equal(dense_logits, text_weights_only)


@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_with_visual_experts_is_refused_by_a_dense_config(tmp_path, strict):
    NaViLForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"visual-expert weights.*modality_experts=False.*its own config"):
        NaViLForConditionalGeneration.from_pretrained(tmp_path, config=dense_config("qwen3"), strict=strict)


def test_dense_checkpoint_loaded_with_experts_names_the_switch(tmp_path):
    NaViLForConditionalGeneration(dense_config("qwen3")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no visual-expert weights.*text_config\.modality_experts=False"):
        NaViLForConditionalGeneration.from_pretrained(tmp_path, config=tiny_config())


@pytest.mark.parametrize("backbone", LAYOUTS)
def test_dense_model_round_trips_through_save_and_load(backbone, tmp_path):
    model = NaViLForConditionalGeneration(dense_config(backbone)).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["modality_experts"] is False
    loaded = NaViLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.text_config.modality_experts is False and visual_expert_names(loaded) == []
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_upcycling_a_dense_model_copies_each_text_weight_once():
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(dense_config("qwen3")).eval()
    text_model = Qwen3ForCausalLM(dense_text_config(model.config.text_config)).eval()
    report = upcycle_from_text_model(text_model, model)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert not any("_ve." in key for key in report.copied_keys)
    for key, value in text_model.state_dict().items():
        assert torch.equal(model.state_dict()[f"language_model.{key}"], value), key


def test_stage_one_on_a_dense_model_trains_only_what_feeds_the_frozen_llm():
    model = freeze(NaViLForConditionalGeneration(dense_config("qwen3")), 1)
    trainable = {name.split(".")[0] for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"vision_model", "mlp1", "special_token_embedding"}


def test_lora_on_visual_experts_of_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="dense.*experts='text'"):
        lora_target_modules(dense_config("qwen3"), "visual")
    pattern = re.compile(lora_target_modules(dense_config("qwen3"), "both"))
    names = [name for name, _ in NaViLForConditionalGeneration(dense_config("qwen3")).named_modules()]
    assert any(pattern.fullmatch(name) for name in names)


# -- the benchmark -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("native_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_efficiency_counts_steps_to_the_best_settings_loss_at_a_quarter_of_the_budget(ablations):
    curves = {
        "fast": [4.0, 2.0, 1.5, 1.0, 0.8, 0.7, 0.6, 0.5],
        "slow": [4.0, 3.5, 3.0, 2.5, 2.0, 1.8, 1.2, 1.1],
        "stuck": [4.0] * 8,
    }
    efficiency = ablations.data_efficiency(curves)
    assert (efficiency["best"], efficiency["target"], efficiency["at_step"]) == ("fast", 2.0, 2)
    assert efficiency["steps"] == {"fast": 2, "slow": 5, "stuck": None}
    assert efficiency["factors"] == {"fast": 1.0, "slow": 2.5, "stuck": None}


def test_smoke_run_writes_the_plot_and_a_table_of_the_four_settings(ablations, tmp_path):
    docs = (ROOT / "docs" / "native_ablations.md").read_text()
    subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--output-dir", str(tmp_path)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert (tmp_path / "native_ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["runs"]) == len(ablations.SETTINGS) * len(ablations.SMOKE.seeds)
    for run in history["runs"]:
        assert len(run["losses"]) == ablations.SMOKE.steps and all(math.isfinite(loss) for loss in run["losses"])
    table = (tmp_path / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| setting"))
    assert "data-efficiency factor" in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    factors = [rows[setting.name].rstrip(" |").split("|")[-1].strip() for setting in ablations.SETTINGS]
    assert all(re.fullmatch(r"\d+\.\d\d×|not reached \(> \d+×\)", factor) for factor in factors), factors
    # the best setting reaches its own loss at 25 % of the budget by then
    assert min(float(factor[:-1]) for factor in factors if factor.endswith("×") and factor[0].isdigit()) <= 1
    assert (ROOT / "docs" / "native_ablations.md").read_text() == docs  # a smoke run leaves the doc alone
