"""`NaViLVisionModel.compile_layers()`: the compiled vision encoder gives the golden features of the original."""

import torch
from conftest import BACKBONES, assert_golden_features, load_golden_model
from torch._dynamo.utils import counters

FEATURE_ATOL = 1e-4  # issue #35's bound for the compiled encoder


def test_compiled_vision_layers_give_the_golden_features_with_one_graph_for_every_size(
    manifest, image_processor_outputs, golden_outputs
):
    torch._dynamo.reset()
    counters.clear()
    for backbone in BACKBONES:
        model = load_golden_model(backbone)
        model.vision_model.compile_layers()
        with torch.inference_mode():
            assert_golden_features(model, backbone, manifest, image_processor_outputs, golden_outputs, FEATURE_ATOL)
    # the tensor work before and after attention: a graph each, whatever the layer, patch count or checkpoint
    assert counters["stats"]["unique_graphs"] == 2
