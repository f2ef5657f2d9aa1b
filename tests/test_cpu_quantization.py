"""`navil.quantize_for_cpu`: dynamic int8 linears (int8 weights and activations) for faster CPU inference."""

import pytest
import torch
from conftest import BACKBONES, load_golden_model
from test_quantization import CHECKPOINT, EXAMPLE, readme_reply

import navil
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.serving.cpu_quantization import DynamicInt8Linear


def test_dynamic_int8_linear_computes_the_float_linear_within_int8_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    inputs = torch.randn(2, 5, 96)  # [batch, tokens, in]
    quantized = DynamicInt8Linear(linear)
    with torch.no_grad():
        expected = linear(inputs)
        output = quantized(inputs)
    assert output.shape == expected.shape and output.dtype == torch.float32
    # 7-bit activations and 8-bit weights: an error of about 1 % of the output's scale
    assert (output - expected).abs().max() < 0.03 * expected.abs().max()


def test_quantize_for_cpu_answers_the_readme_example_like_float32():
    float_model = NaViLForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    model = navil.quantize_for_cpu(NaViLForConditionalGeneration.from_pretrained(CHECKPOINT).eval())
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj_ve, DynamicInt8Linear)
    assert any(isinstance(module, DynamicInt8Linear) for module in model.vision_model.modules())
    assert readme_reply(model) == readme_reply(float_model) == EXAMPLE["answer"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_quantize_for_cpu_keeps_the_models_full_precision_modules_unless_told_otherwise(backbone):
    model = navil.quantize_for_cpu(load_golden_model(backbone))
    float_linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert len(float_linears) == 3 and all(name.startswith(("mlp1.", "language_model.")) for name in float_linears)
    everything = navil.quantize_for_cpu(load_golden_model(backbone), modules_to_not_convert=[])
    assert not any(isinstance(module, torch.nn.Linear) for module in everything.modules())


def test_quantize_for_cpu_refuses_a_bfloat16_model_naming_the_dtype():
    model = load_golden_model(BACKBONES[0], dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 model.*torch.bfloat16"):
        navil.quantize_for_cpu(model)
