"""The vision tower picks its attention kernel from transformers' attention registry, as the decoder does, and refuses
a kernel it cannot run instead of running SDPA in its place."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from navil import NaViLVisionModel
from navil.testing import tiny_config

# two images: windows of several lengths, then whole images (fullatt_block_indexes=[1])
GRID = torch.tensor([[1, 8, 12], [1, 4, 6]])


def vision_outputs(model, implementation):
    model.config._attn_implementation = implementation
    torch.manual_seed(1)
    pixel_values = torch.randn(int(GRID.prod(-1).sum()), 3 * model.config.patch_size**2)
    with torch.no_grad():
        return model(pixel_values, GRID).last_hidden_state


@pytest.fixture
def vision_model():
    torch.manual_seed(0)
    return NaViLVisionModel(tiny_config().vision_config).eval()


@pytest.fixture
def counting_kernel():
    """A kernel registered under a new name: SDPA that counts its calls."""
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = "navil_test_counting_sdpa"
    # transformers' AttentionInterface keeps registered kernels in `_global_mapping` (a plain dict in old releases)
    registry = getattr(ALL_ATTENTION_FUNCTIONS, "_global_mapping", ALL_ATTENTION_FUNCTIONS)
    registry[name] = attention
    yield name, calls
    del registry[name]


def test_vision_tower_runs_the_kernel_registered_under_its_attention_implementation(vision_model, counting_kernel):
    name, calls = counting_kernel
    expected = vision_outputs(vision_model, "sdpa")
    actual = vision_outputs(vision_model, name)
    assert calls, "the registered kernel was not called"
    # bidirectional attention over [blocks, heads, length, head_dim] batches
    assert all(len(shape) == 4 for shape in calls)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "implementation, named",
    [
        ("paged|eager", "paged KV cache"),
        ("flex_attention", "block mask"),
        ("navil_no_such_kernel", "not registered"),
    ],
)
def test_vision_tower_refuses_a_kernel_it_cannot_run_instead_of_running_sdpa(vision_model, implementation, named):
    with pytest.raises(ValueError, match=named) as error:
        vision_outputs(vision_model, implementation)
    assert repr(implementation) in str(error.value)
