"""Dynamic int8 quantization of a float32 NaViL model for faster CPU inference.

`quantize_for_cpu(model)` replaces the model's `nn.Linear` layers by `DynamicInt8Linear`: int8 weights, one scale
per output row, prepacked once for the CPU's int8 GEMM (fbgemm / oneDNN through PyTorch's `quantized` engine);
every call quantizes its input rows to uint8 on the fly and multiplies in int8 with int32 accumulation. Unlike
torchao's weight-only modes, which convert the weights back to float at every matmul on CPU, this reads a quarter
of the weight bytes and uses the int8 units, so decoding runs faster than float32 (docs/benchmarks.md). It needs
nothing beyond torch; the result is for inference in this process (the prepacked weights are not saved by
`save_pretrained`; quantize again after loading).
"""

import torch
from torch import nn


class DynamicInt8Linear(nn.Module):
    """`nn.Linear` with int8 weights (symmetric, per output row) and input rows quantized at each call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # symmetric per-row scales; an all-zero row gets scale 1 (its codes are zero anyway)
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(quantized, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [..., in_features] -> [..., out_features]; reduce_range: 7-bit activations, so that the AVX2 int8
        # multiply-add (which saturates at int16) cannot overflow
        return torch.ops.quantized.linear_dynamic(hidden_states, self.packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


def int8_engine() -> str:
    """The quantized engine for this CPU ('x86', 'fbgemm', 'onednn' or 'qnnpack'), or an error saying there is none."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "onednn", "qnnpack"):
        if engine in engines and hasattr(torch.ops.quantized, "linear_dynamic"):
            return engine
    raise RuntimeError(
        f"This torch build has no CPU int8 engine (supported: {engines}); use a float32 or bfloat16 model instead "
        "of quantize_for_cpu."
    )


def quantize_for_cpu(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Replace the float32 `nn.Linear` layers of `model` (on the CPU) by `DynamicInt8Linear`, in place; returns it.

    `modules_to_not_convert` names modules (prefixes of qualified names, as in transformers' quantization configs)
    kept in float32; by default the model's `_modules_to_not_quantize` (for NaViL the connector and the LM head),
    `[]` quantizes every linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_for_cpu expects a torch nn.Module, got {type(model).__name__}.")
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"quantize_for_cpu is for models on the CPU; this one is on {sorted(devices)}: call .cpu().")
    dtypes = {module.weight.dtype for module in model.modules() if isinstance(module, nn.Linear)}
    if dtypes - {torch.float32}:
        raise TypeError(
            f"quantize_for_cpu needs a float32 model (its int8 kernels read float32 inputs); the linears are "
            f"{sorted(map(str, dtypes))}: load with dtype=torch.float32."
        )
    torch.backends.quantized.engine = int8_engine()
    if modules_to_not_convert is None:
        modules_to_not_convert = list(getattr(model, "_modules_to_not_quantize", None) or [])

    def kept(name: str) -> bool:
        return any(name == keep or name.startswith(keep + ".") for keep in modules_to_not_convert)

    targets = [
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and not kept(name)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, DynamicInt8Linear(module))
    return model
