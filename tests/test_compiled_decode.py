"""`generate(compile_decode=True)`: compiled decode steps (static cache, inductor, one-row matmuls as fused
multiply-sums on a CPU) give eager decoding's greedy tokens."""

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy
from test_performance_paths import image_inputs, text_inputs, tiny_model
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from navil.compat_navil import _one_row_matmul, cpu_decode_backend


def test_one_row_matmul_is_the_linear_of_a_weight_stored_out_by_in():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator)  # [N, K] as nn.Linear stores it
    row = torch.randn(1, 40, generator=generator)
    torch.testing.assert_close(_one_row_matmul(row, weight.t()), F.linear(row, weight), atol=1e-5, rtol=1e-5)
    assert _one_row_matmul(torch.randn(2, 40), weight.t()) is NotImplemented  # several rows: aten's matmul
    assert _one_row_matmul(row, weight.t().contiguous()) is NotImplemented  # not a transposed [N, K] weight


@pytest.mark.parametrize("rows", [1, 3])
def test_cpu_decode_backend_streams_one_row_linears_and_leaves_larger_batches_to_aten(rows):
    torch._dynamo.reset()
    linear = torch.nn.Linear(64, 96).eval()
    inputs = torch.randn(rows, 64)
    compiled = torch.compile(linear, backend=cpu_decode_backend, fullgraph=True)
    with torch.inference_mode():
        output, code = run_and_get_code(compiled, inputs)
        torch.testing.assert_close(output, linear(inputs), atol=1e-5, rtol=1e-5)
    calls_aten_matmul = any("extern_kernels.addmm" in source or "extern_kernels.mm" in source for source in code)
    assert calls_aten_matmul == (rows > 1)


def test_compile_decode_gives_the_greedy_tokens_of_eager_decoding():
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("internlm2")  # the benchmarks' layout; both layouts trace whole in test_performance_paths
    with torch.inference_mode():
        for inputs in (text_inputs(), image_inputs()):
            assert torch.equal(greedy(model, inputs, 8, compile_decode=True), greedy(model, inputs, 8))
    assert counters["stats"]["unique_graphs"] > 0  # the decode steps did run compiled


def test_compile_decode_refuses_a_cache_implementation_of_its_own():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="compile_decode=True sets cache_implementation itself"):
        greedy(model, text_inputs(), 2, compile_decode=True, cache_implementation="dynamic")


def test_chat_takes_compile_decode_in_its_generation_config_and_gives_the_same_reply(model, golden_tokenizer):
    torch._dynamo.reset()
    settings = dict(max_new_tokens=6, min_new_tokens=6)
    eager = model.chat(golden_tokenizer, None, "What is a circle?", generation_config=settings)
    compiled = model.chat(
        golden_tokenizer, None, "What is a circle?", generation_config=dict(settings, compile_decode=True)
    )
    assert compiled == eager
