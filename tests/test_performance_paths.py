"""The fast paths give the outputs of the straightforward ones: packed vision attention, modality routing, static
cache + torch.compile decoding, last-position logits in generation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy
from transformers import CompileConfig

from navil.layouts_navil import LAYOUTS
from navil.modeling_navil import ModalityRouter, NaViLForConditionalGeneration, NaViLVisionModel, get_window_index
from navil.testing import tiny_config

BACKBONES = tuple(layout.backbone for layout in LAYOUTS.values())
SPECIAL_IDS = tiny_config().special_token_ids


def tiny_model(backbone):
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(tiny_config(backbone)).eval()
    model.generation_config.pad_token_id = 0
    return model


def image_inputs(grids=((1, 6, 6), (1, 8, 10))):
    """Random pixels for `grids` and a prompt laid out as the processor does, then a few text tokens."""
    tokens = [SPECIAL_IDS["<img>"]]
    for _, h, w in grids:
        for _ in range(h // 2):
            tokens += [SPECIAL_IDS["<IMG_CONTEXT>"]] * (w // 2) + [SPECIAL_IDS["<IMG_LINE_BREAK>"]]
        tokens.append(SPECIAL_IDS["<IMG_FRAME_BREAK>"])
    tokens += [SPECIAL_IDS["</img>"], 5, 17, 42, 7]
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 16 * 16, generator=generator)
    return dict(input_ids=torch.tensor([tokens]), pixel_values=pixel_values, image_grid_thw=torch.tensor(grids))


def text_inputs():
    return dict(input_ids=torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]]))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_static_cache_compiled_greedy_decoding_equals_eager(backbone):
    model = tiny_model(backbone)
    # fullgraph: a graph break in a decode step fails the test; aot_eager traces exactly what inductor would compile
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True
    for inputs in (text_inputs(), image_inputs()):
        eager = greedy(model, inputs, 8)
        static = greedy(model, inputs, 8, cache_implementation="static")
        compiled = greedy(model, inputs, 8, cache_implementation="static", compile_config=compile_config)
        assert torch.equal(static, eager)
        assert torch.equal(compiled, eager)


def reference_vision_forward(model: NaViLVisionModel, pixel_values, grid_thw):
    """The original's layout: every layer attends over all patches at once with a dense block-diagonal mask."""
    config = model.config
    merge_units = config.merge_size**2
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    window_index, window_lengths = get_window_index(grid_thw, config.window_size, config.merge_size)
    image_lengths = grid_thw[:, 1:].prod(-1).repeat_interleave(grid_thw[:, 0])
    hidden = model.embeddings(pixel_values)
    num_patches, width = hidden.shape
    hidden = hidden.view(-1, merge_units, width)[window_index].view(num_patches, width)
    angles = model.rotary(grid_thw, hidden.device)
    angles = angles.view(-1, merge_units, angles.shape[-1])[window_index].view(num_patches, -1)
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]

    def rotate(states):
        first, second = states.chunk(2, dim=-1)
        return states * cos + torch.cat((-second, first), dim=-1) * sin

    for layer in model.encoder.layers:
        lengths = image_lengths if layer.full_attention else window_lengths
        mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in lengths.tolist()])
        query, key, value = layer.attn.qkv(layer.norm1(hidden)).view(num_patches, 3, heads, head_dim).unbind(1)
        query, key, value = rotate(query).transpose(0, 1), rotate(key).transpose(0, 1), value.transpose(0, 1)
        attention = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=head_dim**-0.5)
        hidden = hidden + layer.ls1 * layer.attn.proj(attention.transpose(0, 1).reshape(num_patches, width))
        hidden = hidden + layer.ls2 * layer.mlp(layer.norm2(hidden))
    return hidden


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "grids",
    [
        [[1, 8, 8]],  # one whole window per layer
        [[1, 12, 20]],  # partial windows on the right and bottom, of several lengths
        [[1, 4, 6], [1, 8, 10], [1, 14, 18]],  # a multi-scale pyramid: full-attention blocks of different lengths
        [[2, 6, 4], [1, 2, 2]],  # two frames, and a scale smaller than one window
    ],
)
def test_packed_vision_attention_equals_dense_block_diagonal_reference(grids, attn_implementation):
    torch.manual_seed(0)
    config = tiny_config(vision=dict(num_hidden_layers=3)).vision_config
    config._attn_implementation = attn_implementation
    model = NaViLVisionModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:  # layer scales of 1 so that attention errors are not damped
            layer.ls1.fill_(1.0)
            layer.ls2.fill_(1.0)
    grid_thw = torch.tensor(grids)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 16 * 16)
    with torch.no_grad():
        packed = model(pixel_values, grid_thw).last_hidden_state
        reference = reference_vision_forward(model, pixel_values, grid_thw)
    torch.testing.assert_close(packed, reference, atol=1e-6, rtol=0)


def _count_router_builds(monkeypatch):
    built = []
    original_init = ModalityRouter.__init__

    def counting_init(self, visual_token_mask):
        built.append(int(visual_token_mask.sum()))
        original_init(self, visual_token_mask)

    monkeypatch.setattr(ModalityRouter, "__init__", counting_init)
    return built


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_text_only_forward_builds_no_router_and_ignores_visual_experts(backbone, monkeypatch):
    model = tiny_model(backbone)
    built = _count_router_builds(monkeypatch)
    inputs = text_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
        for name, parameter in model.language_model.named_parameters():
            if "_ve." in name:
                parameter.normal_()
        assert torch.equal(model(**inputs).logits, logits)
    assert built == []


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_router_sends_each_token_through_its_own_expert(backbone):
    model = tiny_model(backbone)
    layer = model.language_model.model.layers[0]
    text_expert, visual_expert = layer.sublayers()[3:]
    hidden_states = torch.randn(2, 9, model.config.text_config.hidden_size)
    visual_token_mask = torch.rand(2, 9) < 0.5
    with torch.no_grad():
        routed = ModalityRouter(visual_token_mask)(hidden_states, text_expert, visual_expert)
        expected = torch.where(visual_token_mask[..., None], visual_expert(hidden_states), text_expert(hidden_states))
    torch.testing.assert_close(routed, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_generation_routes_the_prompt_once_and_decodes_densely_with_last_position_logits(backbone, monkeypatch):
    model = tiny_model(backbone)
    inputs = image_inputs()
    built = _count_router_builds(monkeypatch)
    logits_lengths = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: logits_lengths.append(output.shape[1]))
    greedy(model, inputs, 8)
    num_visual = int(
        ((inputs["input_ids"] == SPECIAL_IDS["<IMG_CONTEXT>"]) | (inputs["input_ids"] == SPECIAL_IDS["<img>"])).sum()
    )
    assert built == [num_visual]  # the prefill only; decode steps build no router
    assert logits_lengths == [1] * 8  # the prefill computes the logits of its last position only
