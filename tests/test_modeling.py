"""The model against the golden outputs of the original NaViL, and its generation, routing, saving and training."""

import pytest
import torch
from conftest import (
    BACKBONES,
    GOLDEN,
    assert_golden_features,
    case_pixel_inputs,
    chat_golden_case,
    greedy,
    load_golden_model,
)

from navil.training import set_activation_checkpointing

ATOL = 1e-4
FEATURE_ATOL = 1e-5


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    return request.param


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_image_features_and_logits_match_original(
    backbone, attn_implementation, manifest, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer, attn_implementation=attn_implementation)
    outputs = golden_outputs[backbone]
    with torch.no_grad():
        assert_golden_features(model, backbone, manifest, image_processor_outputs, golden_outputs, FEATURE_ATOL)
        for case, spec in manifest["models"][backbone]["cases"].items():
            pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, spec["images"])
            logits = model(
                input_ids=outputs[f"case.{case}.input_ids"], pixel_values=pixel_values, image_grid_thw=grids
            ).logits
            torch.testing.assert_close(logits, outputs[f"case.{case}.logits"], atol=ATOL, rtol=ATOL)


def test_vision_window_order_matches_original(backbone, manifest, image_processor_outputs, golden_outputs):
    from navil.modeling_navil import get_window_index

    model = load_golden_model(backbone)
    config = model.config.vision_config
    for image in manifest["models"][backbone]["features"]:
        grids = image_processor_outputs[f"ip.{image}.multi.image_grid_thw"]
        window_index, window_lengths = get_window_index(grids, config.window_size, config.merge_size)
        assert window_index.tolist() == golden_outputs[backbone][f"features.{image}.window_index"].tolist()
        cu_window_seqlens = golden_outputs[backbone][f"features.{image}.cu_window_seqlens"]
        assert window_lengths.tolist() == cu_window_seqlens.diff().tolist()


def test_pixel_values_accepted_flat_or_as_patches(backbone, image_processor_outputs):
    model = load_golden_model(backbone)
    pixel_values = image_processor_outputs["ip.shapes.multi.pixel_values"]
    grids = image_processor_outputs["ip.shapes.multi.image_grid_thw"]
    with torch.no_grad():
        as_patches = torch.cat(model.get_image_features(pixel_values, grids).pooler_output)
        flat = torch.cat(model.get_image_features(pixel_values.flatten(1), grids).pooler_output)
    assert torch.equal(as_patches, flat)


def test_chat_reproduces_original_replies(
    backbone, manifest, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer)
    for case, spec in manifest["models"][backbone]["cases"].items():
        pixel_values, grids, num_scales = case_pixel_inputs(image_processor_outputs, spec["images"])
        reply, history = chat_golden_case(
            model, golden_tokenizer, spec, pixel_values, grids, num_scales, return_history=True
        )
        assert reply == spec["response"], case
        assert history[-1][1] == reply


def test_generate_reproduces_original_token_ids(backbone, manifest, image_processor_outputs, golden_outputs):
    model = load_golden_model(backbone)
    outputs = golden_outputs[backbone]
    # the full special-token table, as init_special_token_ids would fill it for the golden tokenizer
    tokens = manifest["tokenizer_info"]["special_token_ids"]
    model.config.special_token_ids = {token: tokens[token] for token in tokens}
    for case, spec in manifest["models"][backbone]["cases"].items():
        pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, spec["images"])
        input_ids = outputs[f"case.{case}.input_ids"]
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            image_grid_thw=grids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokens["<|im_end|>"],
            pad_token_id=tokens["<|endoftext|>"],
        )
        assert generated[0, input_ids.shape[1] :].tolist() == outputs[f"case.{case}.generated_ids"].tolist(), case


def test_generation_with_cache_equals_without_cache(
    backbone, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer)
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, ["shapes"])
    input_ids = golden_outputs[backbone]["case.one_image.input_ids"]
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values, image_grid_thw=grids
    )
    assert torch.equal(
        greedy(model, inputs, use_cache=True, pad_token_id=1001),
        greedy(model, inputs, use_cache=False, pad_token_id=1001),
    )


def test_left_padded_batch_generates_the_same_tokens_as_each_prompt_alone(
    backbone, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer)
    cases = {"one_image": ["shapes"], "two_images": ["grad", "strip"]}
    alone, prompts, pixels, grids = [], [], [], []
    for case, images in cases.items():
        input_ids = golden_outputs[backbone][f"case.{case}.input_ids"]
        pixel_values, grid, _ = case_pixel_inputs(image_processor_outputs, images)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            image_grid_thw=grid,
        )
        alone.append(greedy(model, inputs, pad_token_id=1001)[0])
        prompts.append(input_ids[0])
        pixels.append(pixel_values)
        grids.append(grid)
    length = max(len(p) for p in prompts)
    input_ids = torch.stack([torch.cat([p.new_full((length - len(p),), 1001), p]) for p in prompts])
    attention_mask = torch.stack([torch.arange(length) >= length - len(p) for p in prompts]).long()
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids),
    )
    batch = greedy(model, inputs, pad_token_id=1001)
    for row, expected in zip(batch, alone):
        assert row.tolist() == expected.tolist()


def _perturb(model, select):
    with torch.no_grad():
        for name, parameter in model.language_model.named_parameters():
            if select(name):
                parameter.add_(torch.randn_like(parameter))


def _is_visual_expert(name):
    return "_ve." in name


def _is_text_expert(name):
    experts = (
        "wqkv.",
        "wo.",
        "feed_forward.",
        "q_proj.",
        "k_proj.",
        "v_proj.",
        "o_proj.",
        "q_norm.",
        "k_norm.",
        "mlp.",
    )
    return any(f".{expert}" in name for expert in experts)


def test_visual_expert_weights_do_not_touch_text_only_logits(backbone, golden_tokenizer, golden_outputs):
    model = load_golden_model(backbone, golden_tokenizer)
    input_ids = golden_outputs[backbone]["case.text.input_ids"]
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        _perturb(model, _is_visual_expert)
        assert torch.equal(model(input_ids=input_ids).logits, reference)
        _perturb(model, _is_text_expert)
        assert not torch.allclose(model(input_ids=input_ids).logits, reference, atol=1e-2)


def test_visual_expert_weights_change_image_logits(
    backbone, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer)
    input_ids = golden_outputs[backbone]["case.one_image.input_ids"]
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, ["shapes"])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids)
    with torch.no_grad():
        reference = model(**inputs).logits
        _perturb(model, _is_visual_expert)
        assert not torch.allclose(model(**inputs).logits, reference, atol=1e-2)


def test_original_checkpoint_loads_with_no_missing_or_unexpected_keys(backbone, manifest):
    from navil.modeling_navil import NaViLForConditionalGeneration

    model, info = NaViLForConditionalGeneration.from_pretrained(GOLDEN / backbone, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = {key: shape for key, (shape, _) in manifest["models"][backbone]["state_dict_keys"].items()}
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected


def test_save_and_reload_reproduces_logits_exactly(
    backbone, tmp_path, golden_tokenizer, image_processor_outputs, golden_outputs
):
    from navil.modeling_navil import NaViLForConditionalGeneration

    model = load_golden_model(backbone, golden_tokenizer)
    input_ids = golden_outputs[backbone]["case.one_image.input_ids"]
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, ["shapes"])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids)
    model.save_pretrained(tmp_path)
    reloaded, info = NaViLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.special_token_ids == model.config.special_token_ids
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_step_gives_finite_loss_and_gradients_on_both_experts(
    backbone, gradient_checkpointing, golden_tokenizer, image_processor_outputs, golden_outputs
):
    model = load_golden_model(backbone, golden_tokenizer).train()
    if gradient_checkpointing:
        set_activation_checkpointing(model, True)
    input_ids = golden_outputs[backbone]["case.one_image.input_ids"]
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, ["shapes"])
    labels = input_ids.clone()
    labels[:, : input_ids.shape[1] // 2] = -100
    loss = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    layer = model.language_model.model.layers[0]
    if backbone == "internlm2_ve":
        experts = (layer.attention.wqkv, layer.attention.wqkv_ve, layer.feed_forward.w1, layer.feed_forward_ve.w1)
    else:
        experts = (layer.self_attn.q_proj, layer.self_attn.q_proj_ve, layer.mlp.gate_proj, layer.mlp_ve.gate_proj)
    for module in experts:
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_loss_ignores_image_context_positions(backbone, golden_tokenizer, image_processor_outputs, golden_outputs):
    model = load_golden_model(backbone, golden_tokenizer)
    input_ids = golden_outputs[backbone]["case.one_image.input_ids"]
    pixel_values, grids, _ = case_pixel_inputs(image_processor_outputs, ["shapes"])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids)
    context = input_ids == model.config.special_token_ids["<IMG_CONTEXT>"]
    masked = input_ids.masked_fill(context, -100)
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=input_ids).loss, model(**inputs, labels=masked).loss)
