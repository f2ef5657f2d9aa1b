"""NaViLConfig reads original NaViL config.json files unchanged, writes configs that load back, validates values."""

import json

import pytest
from conftest import BACKBONES, GOLDEN

from navil.configuration_navil import NaViLConfig


@pytest.mark.parametrize("backbone", BACKBONES)
def test_original_config_is_read_unchanged(backbone):
    raw = json.loads((GOLDEN / backbone / "config.json").read_text())
    config = NaViLConfig.from_pretrained(GOLDEN / backbone)
    llm = raw["llm_config"]
    assert config.text_config.architectures == llm["architectures"]
    assert config.text_config.hidden_size == llm["hidden_size"]
    assert config.text_config.num_key_value_heads == llm["num_key_value_heads"]
    assert config.text_config.head_dim == llm.get("head_dim", llm["hidden_size"] // llm["num_attention_heads"])
    assert config.text_config.rope_theta == llm["rope_theta"]
    assert config.vision_config.fullatt_block_indexes == raw["vision_config"]["fullatt_block_indexes"]
    assert config.vision_config.window_size == raw["vision_config"]["window_size"]
    assert config.template == raw["template"]
    assert (config.min_dynamic_patch, config.max_dynamic_patch) == (raw["min_dynamic_patch"], raw["max_dynamic_patch"])
    assert config.llm_config is config.text_config


@pytest.mark.parametrize("backbone", BACKBONES)
def test_saved_config_loads_back_identically(backbone, tmp_path):
    config = NaViLConfig.from_pretrained(GOLDEN / backbone)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageTextToText"] == "modeling_navil.NaViLForConditionalGeneration"
    assert NaViLConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_rope_scaling_of_original_configs_is_understood():
    config = NaViLConfig(text_config={"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (config.text_config.rope_type, config.text_config.rope_factor) == ("dynamic", 2.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"text_config": {"architectures": ["LlamaForCausalLM"]}}, "architectures[0]"),
        ({"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}}, "multiple of num_key_value_heads"),
        ({"text_config": {"rope_scaling": {"type": "yarn", "factor": 2.0}}}, "not supported"),
        ({"text_config": {"rope_scaling": {"type": "linear", "factor": 0.5}}}, "factor"),
        ({"vision_config": {"hidden_size": 64, "num_attention_heads": 5}}, "divisible"),
        ({"vision_config": {"hidden_size": 72, "num_attention_heads": 4}}, "multiple of 4"),
        ({"vision_config": {"num_hidden_layers": 2, "fullatt_block_indexes": [3]}}, "outside"),
        ({"vision_config": {"norm_type": "batch_norm"}}, "norm_type"),
        ({"vision_config": {"window_size": 1}}, "window_size"),
        ({"template": "vicuna"}, "template"),
        ({"min_dynamic_patch": 10, "max_dynamic_patch": 5}, "min_dynamic_patch"),
        ({"downsample_ratio": 0.3}, "downsample_ratio"),
        ({"scale_downsample_ratio": 1.5}, "scale_downsample_ratio"),
    ],
)
def test_invalid_values_are_rejected_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        NaViLConfig(**kwargs)


def test_template_defaults_to_the_backbone_chat_format():
    assert NaViLConfig(text_config={"architectures": ["Qwen3VEForCausalLM"]}).template == "qwen3-chat"
    assert NaViLConfig().template == "internlm2-chat"
