"""The layout spec (`layouts_navil`): the modules each layout's classes declare are the ones its spec names, and a
third layout needs only a spec entry plus its attention and MLP classes to run, take LoRA and be upcycled."""

import re

import pytest
import torch
from test_performance_paths import image_inputs, text_inputs
from torch import nn

from navil.configuration_navil import NaViLTextConfig
from navil.layouts_navil import LAYOUTS, QWEN3_VE_LAYOUT, VE_SUFFIX, Layout, layout_of_backbone
from navil.modeling_navil import (
    LANGUAGE_MODELS,
    ModalityExpertAttention,
    NaViLForConditionalGeneration,
    NaViLPreTrainedModel,
    NaViLRMSNorm,
    register_language_model,
    route,
)
from navil.testing import tiny_config
from navil.training import lora_target_modules, upcycle_from_text_model

BUILT_IN = tuple(LAYOUTS.values())


def linear_and_norm_children(module: nn.Module) -> tuple[set, set]:
    children = dict(module.named_children())
    linears = {name for name, child in children.items() if isinstance(child, nn.Linear)}
    norms = {name for name, child in children.items() if isinstance(child, NaViLRMSNorm)}
    return linears, norms


def twins(names) -> set:
    return {name + suffix for name in names for suffix in ("", VE_SUFFIX)}


def check_modules_match_layout(causal_lm: nn.Module, layout: Layout, experts: bool):
    expert_names = twins if experts else set
    assert type(causal_lm).__name__ == layout.architecture
    assert isinstance(getattr(causal_lm, layout.head), nn.Linear)
    assert causal_lm.get_output_embeddings() is getattr(causal_lm, layout.head)
    assert causal_lm.get_input_embeddings() is getattr(causal_lm.model, layout.embedding)
    for layer in causal_lm.model.layers:
        assert type(layer).__name__ == layout.decoder_layer
        assert layer.sublayers() == tuple(getattr(layer, name, None) for name in layout.sublayers())
        modules = {name for name, _ in layer.named_children()}
        assert modules == {layout.attention_norm, layout.attention, layout.ffn_norm, *expert_names([layout.ffn])}
        linears, norms = linear_and_norm_children(getattr(layer, layout.attention))
        assert linears == expert_names(layout.projections)
        assert norms == expert_names(layout.qk_norms)
        for ffn in expert_names([layout.ffn]):
            assert linear_and_norm_children(getattr(layer, ffn)) == (set(layout.ffn_parts), set())
    state = causal_lm.state_dict()
    layer_keys = {key.removeprefix("model.layers.0.") for key in state if key.startswith("model.layers.0.")}
    for text, visual in layout.expert_twins():  # what upcycling copies: every twin pair has weights on both sides
        text_keys = {key for key in layer_keys if key.startswith(f"{text}.")}
        assert text_keys
        if experts:
            assert {key.replace(text, visual, 1) for key in text_keys} <= layer_keys
    if layout.fused_qkv is not None:
        config = causal_lm.config
        rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        assert state[f"model.layers.0.{layout.attention}.{layout.fused_qkv}.weight"].shape[0] == rows


@pytest.mark.parametrize("experts", (True, False), ids=("experts", "dense"))
@pytest.mark.parametrize("layout", BUILT_IN, ids=lambda layout: layout.backbone)
def test_each_layouts_modules_are_the_ones_its_spec_names(layout, experts):
    config = tiny_config(layout.backbone, text={"modality_experts": experts})
    model = NaViLForConditionalGeneration(config)
    check_modules_match_layout(model.language_model, layout, experts)
    assert layout.decoder_layer in NaViLPreTrainedModel._no_split_modules
    assert f"language_model.{layout.head}" in NaViLPreTrainedModel._modules_to_not_quantize
    assert config.template == layout.template and config.text_config.layout is layout


def test_a_config_names_the_registered_layouts_when_it_refuses_an_architecture():
    with pytest.raises(ValueError, match="InternLM2VEForCausalLM.*Qwen3VEForCausalLM"):
        NaViLTextConfig(architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="Unknown backbone 'llama'"):
        layout_of_backbone("llama")


# -- a third layout: a spec entry and two classes ---------------------------------------------------------------

# Qwen3-VE's template and separate q/k/v, under module names of its own
TOY_LAYOUT = QWEN3_VE_LAYOUT._replace(
    architecture="ToyVEForCausalLM",
    backbone="toy",
    embedding="word_embeddings",
    head="lm_out",
    decoder_layer="ToyVEDecoderLayer",
    attention_norm="ln_1",
    attention="attn",
    projections=("query", "key", "value", "dense"),
    qk_norms=(),
    ffn_norm="ln_2",
    ffn="ffn",
    ffn_parts=("fc_gate", "fc_in", "fc_out"),
)


class ToyVEAttention(ModalityExpertAttention):
    """Separate q/k/v projections without q/k norms, each with a `_ve` twin."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        hidden, dim = config.hidden_size, config.head_dim
        experts = config.modality_experts
        sizes = {"query": self.num_heads * dim, "key": self.num_key_value_heads * dim}
        sizes["value"] = sizes["key"]
        for name, size in sizes.items():
            setattr(self, name, nn.Linear(hidden, size))
            setattr(self, name + VE_SUFFIX, nn.Linear(hidden, size) if experts else None)
        self.dense = nn.Linear(self.num_heads * dim, hidden)
        self.dense_ve = nn.Linear(self.num_heads * dim, hidden) if experts else None

    def project_qkv(self, hidden_states, router):
        # [batch, seq, hidden] -> query, key, value [batch, seq, heads, D]
        states = []
        for name in ("query", "key", "value"):
            text, visual = getattr(self, name), getattr(self, name + VE_SUFFIX)
            states.append(route(router, hidden_states, text, visual).view(*hidden_states.shape[:2], -1, self.head_dim))
        return tuple(states)

    def project_out(self, attn_output, router):
        return route(router, attn_output, self.dense, self.dense_ve)


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.fc_out(nn.functional.gelu(self.fc_gate(hidden_states)) * self.fc_in(hidden_states))


@pytest.fixture
def toy_layout():
    """`TOY_LAYOUT` registered for the test, the registries restored afterwards."""
    saved = dict(LAYOUTS), dict(LANGUAGE_MODELS)
    saved_lists = list(NaViLPreTrainedModel._no_split_modules), list(NaViLPreTrainedModel._modules_to_not_quantize)
    register_language_model(TOY_LAYOUT, ToyVEAttention, ToyMLP)
    yield TOY_LAYOUT
    for registry, entries in zip((LAYOUTS, LANGUAGE_MODELS), saved):
        registry.clear()
        registry.update(entries)
    NaViLPreTrainedModel._no_split_modules[:], NaViLPreTrainedModel._modules_to_not_quantize[:] = saved_lists


def toy_model():
    torch.manual_seed(0)
    return NaViLForConditionalGeneration(tiny_config(TOY_LAYOUT.backbone)).eval()


def test_a_third_layout_runs_forward_with_its_visual_experts_on_image_tokens_only(toy_layout):
    model = toy_model()
    assert model.config.text_config.backbone == "toy"
    check_modules_match_layout(model.language_model, toy_layout, experts=True)
    with torch.no_grad():
        image, text = model(**image_inputs()).logits, model(**text_inputs()).logits
        assert image.shape[-1] == text.shape[-1] == 320 and image.isfinite().all() and text.isfinite().all()
        for layer in model.language_model.model.layers:
            layer.ffn_ve.fc_out.weight.zero_()
        assert not torch.allclose(model(**image_inputs()).logits, image)  # image tokens go to the `_ve` experts
        assert torch.equal(model(**text_inputs()).logits, text)  # text tokens never do


def test_a_third_layout_gets_lora_targets_from_its_spec(toy_layout):
    model = toy_model()
    config = model.config
    names = [name for name, _ in model.named_modules()]
    for experts, suffixes in (("text", ("",)), ("visual", (VE_SUFFIX,)), ("both", ("", VE_SUFFIX))):
        pattern = re.compile(lora_target_modules(config, experts))
        selected = {name for name in names if pattern.fullmatch(name)}
        expected = {
            f"language_model.model.layers.{i}.{module}"
            for i in range(2)
            for suffix in suffixes
            for module in (
                *(f"attn.{name}{suffix}" for name in toy_layout.projections),
                *(f"ffn{suffix}.{name}" for name in toy_layout.ffn_parts),
            )
        }
        assert selected == expected


def test_a_third_layout_is_upcycled_into_both_experts(toy_layout):
    model = toy_model()
    torch.manual_seed(1)
    text_weights = {
        key: torch.randn_like(value)
        for key, value in model.language_model.state_dict().items()
        if f"{VE_SUFFIX}." not in key and "rotary_emb" not in key
    }
    report = upcycle_from_text_model(text_weights, model)
    assert report.missing_keys == [] and report.unexpected_keys == []
    navil = model.state_dict()
    for key, value in text_weights.items():
        assert torch.equal(navil[f"language_model.{key}"], value)
    for name in ("attn.query", "attn.dense", "ffn"):
        twin = name.replace(name.split(".")[-1], name.split(".")[-1] + VE_SUFFIX)
        for key, value in text_weights.items():
            if f".{name}." in key:
                assert torch.equal(navil[f"language_model.{key.replace(f'.{name}.', f'.{twin}.')}"], value)


def test_registering_a_layout_twice_is_refused(toy_layout):
    with pytest.raises(ValueError, match="already registered"):
        register_language_model(toy_layout, ToyVEAttention, ToyMLP)
    with pytest.raises(TypeError, match="ModalityExpertAttention"):
        register_language_model(toy_layout._replace(architecture="OtherForCausalLM", backbone="other"), ToyMLP, ToyMLP)


# -- the serving loader ----------------------------------------------------------------------------------------

# The fused engine parameters of checkpoint name parts, as vLLM's NaViL model declares them (the loader's contract
# before the layout spec, kept literally here to pin it).
FUSED_PARTS = {
    "internlm2": {
        ".feed_forward.w1.": (".feed_forward.gate_up_proj.", 0),
        ".feed_forward.w3.": (".feed_forward.gate_up_proj.", 1),
        ".feed_forward_ve.w1.": (".feed_forward_ve.gate_up_proj.", 0),
        ".feed_forward_ve.w3.": (".feed_forward_ve.gate_up_proj.", 1),
    },
    "qwen3": {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", "q"),
        ".self_attn.k_proj.": (".self_attn.qkv_proj.", "k"),
        ".self_attn.v_proj.": (".self_attn.qkv_proj.", "v"),
        ".self_attn.q_proj_ve.": (".self_attn.qkv_proj_ve.", "q"),
        ".self_attn.k_proj_ve.": (".self_attn.qkv_proj_ve.", "k"),
        ".self_attn.v_proj_ve.": (".self_attn.qkv_proj_ve.", "v"),
        ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
        ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
        ".mlp_ve.gate_proj.": (".mlp_ve.gate_up_proj.", 0),
        ".mlp_ve.up_proj.": (".mlp_ve.gate_up_proj.", 1),
    },
}


def expected_shards(backbone, name):
    for part, (target, shard) in FUSED_PARTS[backbone].items():
        if part in name:
            return [(name.replace(part, target), shard)]
    return [(name, None)]


@pytest.mark.parametrize("layout", BUILT_IN, ids=lambda layout: layout.backbone)
def test_the_serving_loader_maps_every_golden_tensor_as_vllms_model_declares(layout):
    from conftest import GOLDEN
    from safetensors.torch import load_file

    from navil.configuration_navil import NaViLConfig
    from navil.serving.core import deinterleave_wqkv, weight_shards

    config = NaViLConfig.from_pretrained(GOLDEN / layout.golden_name)
    text = config.text_config
    for name, tensor in load_file(GOLDEN / layout.golden_name / "model.safetensors").items():
        shards = weight_shards(name, tensor, config)
        if ".attention.wqkv" in name:
            parts = deinterleave_wqkv(tensor, text)
            assert [(n, s) for n, _, s in shards] == [(name, "q"), (name, "k"), (name, "v")]
            assert all(torch.equal(part, parts[s]) for _, part, s in shards)
            rows = [part.shape[0] for _, part, _ in shards]
            assert rows == [text.num_attention_heads * text.head_dim] + [text.num_key_value_heads * text.head_dim] * 2
            continue
        assert [(n, s) for n, _, s in shards] == expected_shards(layout.backbone, name), name
    tied = NaViLConfig.from_pretrained(GOLDEN / layout.golden_name)
    tied.text_config.tie_word_embeddings = True
    head = f"language_model.{layout.head}.weight"
    assert weight_shards(head, torch.zeros(1), tied) == []
    assert weight_shards("language_model.model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(1), config) == []
