"""Quantized loading: torchao weight-only int8 / int4 on CPU, and the original model card's load_in_8bit / load_in_4bit."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import BACKBONES, case_pixel_inputs, load_golden_model
from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

import navil
from navil import checks_navil
from navil.checks_navil import bitsandbytes_usable
from navil.modeling_navil import NaViLForConditionalGeneration

CHECKPOINT = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = CHECKPOINT.parent.parent / "examples" / "shapes.png"
EXAMPLE = json.loads((EXAMPLE_IMAGE.parent / "shapes.json").read_text())

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed (pip install -e '.[quant]')"
)


def torchao_config(bits: int):
    """transformers' TorchAoConfig for weight-only quantization that runs on CPU: int8 per row, or int4 per group of 32
    (torchao's Int4WeightOnlyConfig has CPU kernels for none of its layouts; IntxWeightOnlyConfig computes int4 on CPU)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    if bits == 8:
        return TorchAoConfig(Int8WeightOnlyConfig())
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def readme_reply(model) -> str:
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    return model.chat(tokenizer, str(EXAMPLE_IMAGE), EXAMPLE["question"], dict(max_new_tokens=16, do_sample=False))


def image_case_logits(model, backbone, manifest, image_processor_outputs, golden_outputs):
    case, spec = next((name, spec) for name, spec in manifest["models"][backbone]["cases"].items() if spec["images"])
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, spec["images"])
    with torch.no_grad():
        return model(
            input_ids=golden_outputs[backbone][f"case.{case}.input_ids"],
            pixel_values=pixel_values,
            image_grid_thw=grids,
        ).logits


# -- torchao on CPU --------------------------------------------------------------------------------------------


@needs_torchao
def test_torchao_int8_model_from_automodel_answers_the_readme_example_like_float32():
    float_model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, quantization_config=torchao_config(8)).eval()
    assert is_quantized(model.language_model.model.layers[0].mlp.up_proj.weight)
    assert readme_reply(model) == readme_reply(float_model) == EXAMPLE["answer"]


@needs_torchao
def test_torchao_int4_model_answers_the_readme_example():
    model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, quantization_config=torchao_config(4)).eval()
    assert is_quantized(model.language_model.model.layers[0].self_attn.q_proj_ve.weight)
    assert readme_reply(model) == EXAMPLE["answer"]


@needs_torchao
@pytest.mark.parametrize("backbone", BACKBONES)
def test_quantization_keeps_connector_and_lm_head_in_full_precision_and_treats_both_experts_alike(backbone):
    config = torchao_config(8)
    model = load_golden_model(backbone, quantization_config=config)
    assert config.modules_to_not_convert is None  # the caller's config is left as it was
    head = model.get_output_embeddings()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    kept = {name for name, module in linears.items() if name.startswith("mlp1.") or module is head}
    assert len(kept) == 3  # the connector's two linears and the head
    for name, module in linears.items():
        assert is_quantized(module.weight) != (name in kept), name
    twins = [name for name in linears if "_ve" in name]
    assert twins
    for name in twins:
        text_twin = name.replace("_ve", "")
        assert type(linears[name].weight) is type(linears[text_twin].weight), name


@needs_torchao
def test_modules_named_by_the_quantization_config_replace_the_models_defaults():
    config = torchao_config(8)
    config.modules_to_not_convert = []
    model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, quantization_config=config)
    assert is_quantized(model.mlp1[1].weight) and is_quantized(model.get_output_embeddings().weight)


@needs_torchao
@pytest.mark.parametrize("backbone", BACKBONES)
def test_routed_layers_with_quantized_linears_compute_the_float_model_of_the_dequantized_weights(
    backbone, manifest, golden_tokenizer, image_processor_outputs, golden_outputs
):
    # the image case routes the visual tokens to the `_ve` experts and the others to the text experts; any mistake
    # in gathering or scattering rows through quantized linears would change these logits
    model = load_golden_model(backbone, golden_tokenizer, quantization_config=torchao_config(8))
    float_model = load_golden_model(backbone, golden_tokenizer)
    float_linears = dict(float_model.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and is_quantized(module.weight):
                float_linears[name].weight.copy_(module.weight.dequantize())
    quantized = image_case_logits(model, backbone, manifest, image_processor_outputs, golden_outputs)
    expected = image_case_logits(float_model, backbone, manifest, image_processor_outputs, golden_outputs)
    torch.testing.assert_close(quantized, expected, atol=1e-4, rtol=1e-4)


@needs_torchao
@pytest.mark.parametrize("bits", [8, 4])
def test_saved_torchao_model_reloads_quantized_with_the_same_logits(bits, tmp_path):
    model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, quantization_config=torchao_config(bits)).eval()
    model.save_pretrained(tmp_path)
    reloaded = NaViLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert is_quantized(reloaded.language_model.model.layers[0].mlp_ve.down_proj.weight)
    input_ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


# -- load_in_8bit / load_in_4bit -------------------------------------------------------------------------------


class LoadingStopped(Exception):
    pass


@pytest.fixture
def captured_from_pretrained_kwargs(monkeypatch):
    """The kwargs that NaViL's from_pretrained hands to transformers' (which is stopped there)."""
    captured = {}

    def stop(cls, *args, **kwargs):
        captured.update(kwargs)
        raise LoadingStopped

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(stop))
    return captured


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_load_in_bits_without_usable_bitsandbytes_names_torchao(flag, monkeypatch):
    monkeypatch.setattr(checks_navil, "bitsandbytes_usable", lambda: False)
    with pytest.raises(ValueError, match="torchao") as error:
        NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, **{flag: True})
    assert "TorchAoConfig" in str(error.value) and flag in str(error.value)


def test_load_in_8bit_becomes_a_bitsandbytes_config_where_bitsandbytes_is_usable(
    monkeypatch, captured_from_pretrained_kwargs
):
    monkeypatch.setattr(checks_navil, "bitsandbytes_usable", lambda: True)
    with pytest.raises(LoadingStopped):
        NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, load_in_8bit=True)
    config = captured_from_pretrained_kwargs["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_skip_modules == NaViLForConditionalGeneration._modules_to_not_quantize
    assert "load_in_8bit" not in captured_from_pretrained_kwargs


def test_load_in_4bit_becomes_an_nf4_config_computing_in_the_requested_dtype(
    monkeypatch, captured_from_pretrained_kwargs
):
    monkeypatch.setattr(checks_navil, "bitsandbytes_usable", lambda: True)
    with pytest.raises(LoadingStopped):
        NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, load_in_4bit=True, torch_dtype=torch.bfloat16)
    config = captured_from_pretrained_kwargs["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs",
    [dict(load_in_8bit=True, load_in_4bit=True), dict(load_in_8bit=True, quantization_config=BitsAndBytesConfig())],
)
def test_two_quantization_requests_at_once_are_refused(kwargs, monkeypatch):
    monkeypatch.setattr(checks_navil, "bitsandbytes_usable", lambda: True)
    with pytest.raises(ValueError, match="pass only one"):
        NaViLForConditionalGeneration.from_pretrained(CHECKPOINT, **kwargs)


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_load_in_bits_false_loads_the_float_model(flag):
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, **{flag: False})
    assert not any(is_quantized(parameter) for parameter in model.parameters())


def test_bitsandbytes_that_cannot_be_imported_is_not_usable(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    assert not bitsandbytes_usable()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_bitsandbytes_for_cuda_only_is_not_usable_without_a_gpu(monkeypatch):
    cuda_only = types.ModuleType("bitsandbytes")
    cuda_only.supported_torch_devices = {"cuda"}
    monkeypatch.setitem(sys.modules, "bitsandbytes", cuda_only)
    assert not bitsandbytes_usable()
    cuda_only.supported_torch_devices = {"cpu", "cuda"}
    assert bitsandbytes_usable()
