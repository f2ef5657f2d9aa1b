"""Fast image processor for NaViL: the tensor work of [`NaViLImageProcessor`] in torch, on the caller's device."""

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image_processing_navil import NaViLImageProcessor


class NaViLImageProcessorFast(NaViLImageProcessor):
    r"""
    [`NaViLImageProcessor`] with its tensor work in torch, on the CPU or on the device passed as `device` (e.g.
    `"cuda"`); loaded by `AutoImageProcessor.from_pretrained(..., use_fast=True)`. Loading, decoding and every guard
    (decompression bombs, aspect ratio, size and count limits, modes, EXIF) are the slow processor's, and so are the
    grids: `image_grid_thw` and `num_scales` are identical. Only the pixels are computed differently:

    - each scale is resized from the original as uint8 with torch's antialiased bicubic filter (the filter PIL uses,
      a = -0.5, in torch's own fixed-point arithmetic); a scale at the original size is not resized;
    - rescaling and normalization are one per-channel affine map applied after the patches are written as float32.

    Values differ from the slow processor's by at most a few uint8 levels (`docs/benchmarks.md` states the measured
    differences; transformers' fast-processor tests allow 1e-1 absolute and 5e-3 mean), and the golden chat replies
    are identical. Resizing each scale from the previous one instead was measured too: it saves little and differs by
    up to 0.28 on noisy images, more than that tolerance.

    Args:
        device (`str` or `torch.device`, *optional*):
            Default device of the tensor work and of the outputs; `preprocess(..., device=...)` overrides it. `None`
            is the CPU.
        kwargs:
            The arguments of [`NaViLImageProcessor`].
    """

    def __init__(self, *args, device: Optional[Union[str, torch.device]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = None if device is None else str(torch.device(device))

    def to_dict(self):
        """The settings without the run-time `device`; a saved `auto_map` names both classes, slow first (the form
        with which `AutoImageProcessor` picks the fast one under `use_fast=True`)."""
        output = super().to_dict()
        output.pop("device", None)
        auto_map = output.get("auto_map", {})
        reference = auto_map.get("AutoImageProcessor")
        fast_name = f"{__name__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        if isinstance(reference, str) and reference.endswith(fast_name):
            slow_name = f"{NaViLImageProcessor.__module__.rsplit('.', 1)[-1]}.{NaViLImageProcessor.__name__}"
            auto_map["AutoImageProcessor"] = [reference[: -len(fast_name)] + slow_name, reference]
        return output

    def preprocess(self, images, return_tensors=None, device: Optional[Union[str, torch.device]] = None, **kwargs):
        """[`NaViLImageProcessor.preprocess`], with the tensor work on `device` (default: the processor's)."""
        device = torch.device(device if device is not None else self.device or "cpu")
        return super().preprocess(images, return_tensors=return_tensors, device=device, **kwargs)

    def _pyramid(self, image: Image.Image, plans: list, table: np.ndarray, device=None) -> torch.Tensor:
        """[patches, 3 * P * P] float32 pixel values of all planned scales of an RGB image, computed on `device`."""
        device = torch.device("cpu") if device is None else torch.device(device)
        patch, merge = self.patch_size, self.merge_size
        ends = np.cumsum([grid_h * grid_w for _, (_, grid_h, grid_w) in plans]).tolist()
        values = torch.empty(ends[-1], 3 * patch * patch, dtype=torch.float32, device=device)
        original = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None]  # [1, 3, H, W], channels last
        for index in reversed(range(len(plans))):
            (resized_height, resized_width), (_, grid_h, grid_w) = plans[index]
            pixels = original
            if pixels.shape[-2:] != (resized_height, resized_width):
                pixels = self._resize(pixels, resized_height, resized_width)
            padded = pixels[0]
            if padded.shape[-2:] != (grid_h * patch, grid_w * patch):
                padded = F.pad(padded, (0, grid_w * patch - resized_width, 0, grid_h * patch - resized_height))
            # [3, H, W] -> [h/M, w/M, M, M, 3, P, P]: one patch per row, converted to float32 while it is written
            blocks = padded.view(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
            blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)
            values[ends[index] - grid_h * grid_w : ends[index]].view(blocks.shape).copy_(blocks)
        # value(x) = x * scale + shift per channel: the affine map the slow processor's [3, 256] table holds
        shift = torch.from_numpy(table[:, :1].copy()).to(device)
        scale = torch.from_numpy((table[:, 255:] - table[:, :1]) / np.float32(255)).to(device)
        values = values.view(-1, 3, patch * patch)
        return torch.addcmul(shift, values, scale, out=values).view(-1, 3 * patch * patch)

    @staticmethod
    def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[1, 3, height, width] uint8 resize with the antialiased bicubic filter; in float32 (rounded back to
        uint8) on devices without a uint8 kernel."""
        if pixels.device.type == "cpu":
            return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True)
        resized = F.interpolate(pixels.float(), size=(height, width), mode="bicubic", antialias=True)
        return resized.round_().clamp_(0, 255).to(torch.uint8)


NaViLImageProcessorFast.register_for_auto_class()


def wants_fast_image_processor(use_fast: Optional[bool] = None, backend: Optional[str] = None) -> bool:
    """Whether a processor loading its image processor should pick [`NaViLImageProcessorFast`]: as asked by
    `use_fast` or `backend` (`"torchvision"` is transformers 5's name for the fast processors), else as transformers
    chooses by default (5.x: fast when torchvision is installed; 4.x: slow)."""
    if use_fast is not None:
        return bool(use_fast)
    if backend is not None:
        return backend == "torchvision"
    from transformers.models.auto import image_processing_auto

    default_backend = getattr(image_processing_auto, "_resolve_backend", None)
    return default_backend is not None and default_backend(None, None, None) == "torchvision"
