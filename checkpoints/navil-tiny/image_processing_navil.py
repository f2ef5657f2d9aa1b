"""Image processor for NaViL: native-resolution patches with an optional multi-scale pyramid."""

import math
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

# ImagesKwargs annotates `resample` with this name: typing.get_type_hints of our kwargs (vLLM reads them) resolves it here
from transformers.image_utils import PILImageResampling  # noqa: F401
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .errors_navil import NaViLInputError
from .image_loading_navil import NaViLImageLoader

logger = logging.get_logger(__name__)

_MAX_ASPECT_RATIO = 200


def _as_scalar(value):
    """A 0-d tensor or array as a numpy scalar of its dtype; other values unchanged."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise NaViLInputError(
                f"min_pixels and max_pixels must be single numbers, got an array of shape {value.shape}.",
                "pixel limit is not a number",
            )
        value = value.reshape(())[()]
    return value


def check_pixel_limit(value, name: str):
    """`value` (a number, or a 0-d tensor or array, kept as a numpy scalar of its dtype) if it is a finite number of
    pixels, positive for `max_pixels` and non-negative for `min_pixels`; else a `ValueError` naming `name`."""
    value = _as_scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise NaViLInputError(
            f"{name} must be a number of pixels, got {type(value).__name__} {value!r:.40}.",
            "pixel limit is not a number",
        )
    if not isinstance(value, (int, np.integer)) and not math.isfinite(value):
        raise NaViLInputError(
            f"{name} must be a finite number of pixels, got {value}; pass e.g. {name}=256 * 16 * 16.",
            "pixel limit is not a number",
        )
    if value < 0 or (value == 0 and name == "max_pixels"):
        raise NaViLInputError(
            f"{name} must be {'positive' if name == 'max_pixels' else 'non-negative'}, got {value}.",
            "pixel limit is not a number",
        )
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_flag(value, name: str) -> bool:
    """`value` as a bool if it is one (a numpy bool too); else a `ValueError` naming `name`: a string such as
    `"false"` or `"no"` is truthy and `None` falsy, so either would silently flip the setting."""
    if not isinstance(value, (bool, np.bool_)):
        raise NaViLInputError(
            f"{name} must be True or False, got {value!r:.40}; write true or false (not a string or null) in "
            "preprocessor_config.json.",
            "multiscale is not a bool",
        )
    return bool(value)


def check_count_limit(value: Optional[int], name: str) -> Optional[int]:
    """`value` as an int if it is a positive whole number (or None, no limit); else a `ValueError` naming `name`."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise NaViLInputError(
            f"{name} must be a positive whole number or None (no limit), got {value!r:.40}.", "image processor setting"
        )
    return int(value)


# Bounds of the image processor that a saved file may only lower (`NaViLImageProcessor.from_dict`).
SAVED_BOUNDS = (
    "max_pixels",
    "max_image_pixels",
    "max_patches_per_scale",
    "max_patches_per_call",
    "max_images_per_call",
)


def smart_resize(height: int, width: int, min_pixels: float, max_pixels: Union[float, np.float32]) -> tuple[int, int]:
    """Target (height, width) of one pass: the original's "smart resize" with a factor of 1.

    The size is kept unless its area exceeds `max_pixels` (then both sides are scaled down by the same factor and
    floored) or falls below `min_pixels` (then scaled up and rounded up). As in the original, the result is not
    re-checked against the limits. When `max_pixels` is a `np.float32` (the multi-scale pyramid), the area ratio is
    computed in float32, like the original's float32 torch scalar.
    """
    aspect = max(height, width) / min(height, width)
    if aspect > _MAX_ASPECT_RATIO:
        raise NaViLInputError(
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, got {aspect} (image of {width}x{height} "
            "pixels); crop or pad the image to a less extreme shape.",
            "aspect ratio above 200",
        )
    area = height * width
    float32_limit = isinstance(max_pixels, np.float32)
    too_large = np.float32(area) > max_pixels if float32_limit else area > max_pixels
    if too_large:
        ratio = float(np.float32(area) / max_pixels) if float32_limit else area / max_pixels
        beta = math.sqrt(ratio)
        resized_height, resized_width = math.floor(height / beta), math.floor(width / beta)
    elif area < min_pixels:
        beta = math.sqrt(min_pixels / area)
        resized_height, resized_width = math.ceil(height * beta), math.ceil(width * beta)
    else:
        resized_height, resized_width = height, width
    if resized_height == 0 or resized_width == 0:
        raise NaViLInputError(
            f"max_pixels={float(max_pixels)} is too small for an image of {width}x{height} pixels: one side would "
            "shrink to 0 pixels; raise max_pixels or crop the image.",
            "max_pixels too small for the aspect ratio",
        )
    return resized_height, resized_width


class NaViLImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call settings of [`NaViLImageProcessor`] besides transformers' common image kwargs; a processor routes
    them to the image processor. Typed `Any` so that transformers' kwargs validation lets them through: the image
    processor checks them itself, accepting numpy and 0-d tensor limits (the model card's float32 limits) and naming
    the problem of a bad value in a `ValueError`."""

    min_pixels: Any
    max_pixels: Any
    multiscale: Any


class NaViLImageProcessor(NaViLImageLoader, BaseImageProcessor):
    r"""
    Image processor of NaViL. It reproduces the original preprocessing bit for bit (Qwen2-VL style, factor 1):

    1. convert to RGB with PIL's `convert("RGB")`;
    2. keep the native size unless the area is outside `[min_pixels, max_pixels]` ("smart resize", aspect ratio at
       most 200), resizing the uint8 image with PIL bicubic;
    3. zero-pad bottom/right to multiples of `patch_size * merge_size` and map every value `x` to
       `(x / 255 - mean) / std` in float32 (`x / 127.5 - 1` with the default mean = std = 0.5, padding becomes -1);
    4. cut into `patch_size` patches ordered by `merge_size` x `merge_size` blocks (blocks row-major, patches
       row-major inside a block), each patch flattened channel-major.

    With `multiscale=True` each image also gets the original demo's pyramid: after the full-size pass, another pass
    runs with `max_pixels` = (patches of the smallest scale so far) * `patch_size`² * `scale_downsample_ratio`²
    (computed in float32 like the original) until that limit drops below `min_pixels` or the grid stops shrinking.
    Scales are returned smallest first, so the full-size pass is always the last. Unlike the original demo, every image
    of a call starts from `max_pixels`: the demo carried the last `max_pixels` of one image over to the next one in a
    multi-image call (a bug that shrank every image after the first); here a multi-image call equals processing each
    image alone.

    Input decisions (the original only ever saw 8-bit RGB/L/P/RGBA files):

    - Alpha is dropped, not composited on white: RGBA/LA/PA images keep the colours stored under transparent pixels
      (as the original's `convert("RGB")`), and 4-channel arrays lose their 4th channel.
    - EXIF orientation is ignored by default, like the original; `apply_exif_orientation=True` rotates the image
      upright first.
    - 16-bit images (`I;16*` modes, uint16 arrays) are scaled to 8 bits (`x / 257`) instead of being clipped at 255
      as PIL's `convert("RGB")` would; 32-bit integer (`I`) images must lie in [0, 255] (used as is) or [0, 65535]
      (scaled like 16-bit). Float (`F`) images use [0, 1] when their maximum is at most 1, else PIL's [0, 255] scale.
      Float arrays and tensors must lie in [0, 1]. NaN or infinite values are refused.
    - A 1x1 image is valid: like every image below `min_pixels` it is upscaled to the minimum area. Zero-size images
      and aspect ratios above 200 raise `ValueError`.
    - Files, file objects, byte strings and PIL images larger than `max_image_pixels` are refused before their pixels
      are decoded (decompression bombs); PIL's own limit (`PIL.Image.MAX_IMAGE_PIXELS`) also applies to files.
      Larger arrays and tensors are refused too, before any conversion copy, so that the processor's memory is
      bounded by the limit. Accepted images are resized as uint8 PIL images; only the resized image becomes floats.
    - Animated images (GIF, APNG, WebP) read from files use their first frame; PIL images use their current frame.
    - Truncated or corrupt files raise `ValueError`, including a PNG whose compressed data ends before its last row
      (PIL would accept it and leave the missing rows black). `load_truncated_images=True` accepts truncated data
      instead, for this processor only: PIL's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` is never changed.
    - The output is bounded too: a resize target of more than `max_patches_per_scale` patches, or a call whose images
      add up to more than `max_patches_per_call` patches, is refused before the image is resized; a call with more
      than `max_images_per_call` images is refused before any is loaded. `min_pixels` and `max_pixels` must be
      finite numbers with `min_pixels <= max_pixels`.

    Args:
        patch_size (`int`, *optional*, defaults to 16):
            Side of a vision patch in pixels.
        merge_size (`int`, *optional*, defaults to 2):
            Side of the square of patches merged into one LLM token; images are padded to multiples of
            `patch_size * merge_size`.
        min_pixels (`int`, *optional*, defaults to `256 * 16 * 16`):
            Smaller images are upscaled to about this area (NaViL: `min_dynamic_patch * patch_size**2`).
        max_pixels (`int`, *optional*, defaults to `24576 * 16 * 16`):
            Larger images are downscaled to at most this area before padding (NaViL:
            `max_dynamic_patch * patch_size**2`).
        scale_downsample_ratio (`float`, *optional*, defaults to 0.7071):
            Side ratio between consecutive scales of the pyramid.
        multiscale (`bool`, *optional*, defaults to `True`):
            Whether to return the multi-scale pyramid (the NaViL demo) or only the full-size pass (the model's own
            processor, `model.image_processor`).
        image_mean (`float` or `list[float]`, *optional*, defaults to 0.5):
            Per-channel mean subtracted after scaling to [0, 1].
        image_std (`float` or `list[float]`, *optional*, defaults to 0.5):
            Per-channel standard deviation the values are divided by.
        resample (`int`, *optional*, defaults to `PIL.Image.Resampling.BICUBIC`):
            PIL resampling filter of the resize.
        max_image_pixels (`int`, *optional*, defaults to 100_000_000):
            Largest accepted image (width * height) for files and PIL images; `None` disables the check.
        apply_exif_orientation (`bool`, *optional*, defaults to `False`):
            Whether to rotate images upright according to their EXIF orientation tag (the original does not).
        max_patches_per_scale (`int`, *optional*, defaults to 32768):
            Most patches of one image-scale (after resizing and padding); `None` disables the check. The default
            holds every image the default `max_pixels` allows (at most 26 616 patches, at aspect ratio 200).
        max_patches_per_call (`int`, *optional*, defaults to 131072):
            Most patches of all images and scales of one call (384 MiB of float32 pixel values with 16-pixel
            patches); `None` disables the check.
        max_images_per_call (`int`, *optional*, defaults to 256):
            Most images of one call, checked before any is loaded; `None` disables the check.
        load_truncated_images (`bool`, *optional*, defaults to `False`):
            Whether to accept truncated image data (the missing pixels are left as PIL decodes them) instead of
            refusing it.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "num_scales"]
    valid_kwargs = NaViLImageProcessorKwargs

    patch_size = 16
    merge_size = 2
    min_pixels = 256 * 16 * 16
    max_pixels = 24576 * 16 * 16
    scale_downsample_ratio = 0.7071
    multiscale = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    resample = Image.Resampling.BICUBIC
    max_image_pixels = 100_000_000
    apply_exif_orientation = False
    max_patches_per_scale = 32768
    max_patches_per_call = 131072
    max_images_per_call = 256
    load_truncated_images = False

    def __init__(
        self,
        patch_size: int = 16,
        merge_size: int = 2,
        min_pixels: int = 256 * 16 * 16,
        max_pixels: int = 24576 * 16 * 16,
        scale_downsample_ratio: float = 0.7071,
        multiscale: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Union[float, list[float]] = 0.5,
        image_std: Union[float, list[float]] = 0.5,
        resample: int = Image.Resampling.BICUBIC,
        max_image_pixels: Optional[int] = 100_000_000,
        apply_exif_orientation: bool = False,
        max_patches_per_scale: Optional[int] = 32768,
        max_patches_per_call: Optional[int] = 131072,
        max_images_per_call: Optional[int] = 256,
        load_truncated_images: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("patch_size", patch_size), ("merge_size", merge_size)):
            if check_count_limit(value, name) is None:
                raise NaViLInputError(f"{name} must be a positive whole number, got None.", "image processor setting")
        if isinstance(scale_downsample_ratio, bool) or not isinstance(scale_downsample_ratio, (int, float)):
            raise NaViLInputError(
                f"scale_downsample_ratio must be a number in (0, 1), got {scale_downsample_ratio!r:.40}.",
                "image processor setting",
            )
        if not 0 < scale_downsample_ratio < 1:
            raise NaViLInputError(
                f"scale_downsample_ratio must be in (0, 1), got {scale_downsample_ratio}.", "image processor setting"
            )
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.min_pixels, self.max_pixels = self._pixel_limits(min_pixels, max_pixels)
        self.scale_downsample_ratio = scale_downsample_ratio
        self.multiscale = multiscale
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = self._per_channel(image_mean, "image_mean")
        self.image_std = self._per_channel(image_std, "image_std")
        filters = {int(member): member.name for member in Image.Resampling}
        if (
            isinstance(resample, (bool, np.bool_))
            or not isinstance(resample, (int, np.integer))
            or resample not in filters
        ):
            names = ", ".join(f"{number} = {name}" for number, name in filters.items())
            raise NaViLInputError(
                f"resample must be one of PIL's resampling filters ({names}), got {resample!r:.40}.",
                "image processor setting",
            )
        self.resample = int(resample)
        self.max_image_pixels = check_count_limit(max_image_pixels, "max_image_pixels")
        self.apply_exif_orientation = apply_exif_orientation
        self.max_patches_per_scale = check_count_limit(max_patches_per_scale, "max_patches_per_scale")
        self.max_patches_per_call = check_count_limit(max_patches_per_call, "max_patches_per_call")
        self.max_images_per_call = check_count_limit(max_images_per_call, "max_images_per_call")
        self.load_truncated_images = load_truncated_images
        for name in ("multiscale", "do_rescale", "do_normalize", "apply_exif_orientation", "load_truncated_images"):
            check_flag(getattr(self, name), name)
        self._value_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std)

    @staticmethod
    def _pixel_limits(min_pixels, max_pixels) -> tuple:
        """Checked (min_pixels, max_pixels): finite numbers, max_pixels positive, min_pixels <= max_pixels."""
        min_pixels, max_pixels = (
            check_pixel_limit(min_pixels, "min_pixels"),
            check_pixel_limit(max_pixels, "max_pixels"),
        )
        if min_pixels > max_pixels:
            raise NaViLInputError(
                f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}): no image size satisfies both; "
                "lower min_pixels or raise max_pixels.",
                "min_pixels above max_pixels",
            )
        return min_pixels, max_pixels

    @staticmethod
    def _per_channel(value: Union[float, list[float]], name: str) -> list[float]:
        if isinstance(value, (np.ndarray, torch.Tensor)):
            value = value.tolist()
        values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
        if len(values) != 3 or not all(_is_number(v) and math.isfinite(v) for v in values):
            raise NaViLInputError(
                f"{name} needs one finite number or three (one per RGB channel), got {value!r:.60}; e.g. {name}=0.5.",
                "image mean or std out of range",
            )
        return [float(v) for v in values]

    def _value_table(self, do_rescale: bool, rescale_factor: float, do_normalize: bool, mean, std) -> np.ndarray:
        """[3, 256] float32: the value of every uint8 level per channel, computed as the original does (rescale in
        float64, cast to float32, then subtract the mean and divide by the std in float32)."""
        check_flag(do_rescale, "do_rescale")
        check_flag(do_normalize, "do_normalize")
        # a negative factor is allowed: transformers' processor tests pass -1 to see that the kwarg reaches the pixels
        if not (_is_number(rescale_factor) and math.isfinite(rescale_factor) and rescale_factor != 0):
            raise NaViLInputError(
                f"rescale_factor must be a finite non-zero number, got {rescale_factor!r:.40}; e.g. 1/255.",
                "image mean or std out of range",
            )
        levels = np.arange(256, dtype=np.float64)
        if do_rescale:
            levels = levels * rescale_factor
        levels = np.broadcast_to(levels.astype(np.float32), (3, 256))
        if not do_normalize:
            return levels.copy()
        mean = np.asarray(self._per_channel(mean, "image_mean"), dtype=np.float32)[:, None]
        std = np.asarray(self._per_channel(std, "image_std"), dtype=np.float32)[:, None]
        top = float(levels[0, -1])  # the largest value before normalisation (1 after rescaling by 1/255)
        if top > 0 and not ((mean >= 0).all() and (mean <= top).all() and (std > 0).all() and (std <= top).all()):
            raise NaViLInputError(
                f"image_mean must lie in [0, {top:g}] and image_std in (0, {top:g}] (the range of the rescaled pixel "
                f"values), got image_mean={mean.ravel().tolist()} and image_std={std.ravel().tolist()}; NaViL uses 0.5 "
                "and 0.5.",
                "image mean or std out of range",
            )
        return (levels - mean) / std

    # -- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, image_processor_dict: dict, **kwargs):
        """`from_pretrained`'s constructor: a saved file (`preprocessor_config.json`, or a processor config) may lower
        the bounds of `SAVED_BOUNDS` but never remove them (null) or raise them above navil's defaults, since a
        downloaded model folder would then set the memory an image may take; `ValueError` naming the field. Only an
        argument in the caller's own code (`from_pretrained(folder, max_patches_per_scale=None)`) may."""
        for name in SAVED_BOUNDS:
            if name not in image_processor_dict or name in kwargs:
                continue
            value, default = image_processor_dict[name], getattr(cls, name)
            if value is None or (isinstance(value, (int, float)) and value > default):
                change = "removes" if value is None else "raises"
                raise NaViLInputError(
                    f"The saved image processor settings set {name}={value!r:.40}, which {change} navil's bound "
                    f"({name}={default}); a saved file may only lower it. Edit the file, or pass {name}=... to "
                    "from_pretrained in your own code if you trust the images.",
                    "saved bound removed or raised",
                )
        return super().from_dict(image_processor_dict, **kwargs)

    # -- processing ----------------------------------------------------------------------------------------------

    def _check_patches(self, patches: int, used: int, size: tuple, resized: tuple, min_pixels, max_pixels) -> None:
        """Refuses a resize target of more patches than `max_patches_per_scale`, or than the call has left."""
        target = (
            f"min_pixels={float(min_pixels):g} and max_pixels={float(max_pixels):g} resize the {size[0]}x{size[1]} "
            f"image to {resized[1]}x{resized[0]} pixels, {patches} patches"
        )
        if self.max_patches_per_scale is not None and patches > self.max_patches_per_scale:
            raise NaViLInputError(
                f"{target}: more than max_patches_per_scale={self.max_patches_per_scale}. Lower min_pixels or "
                "max_pixels, or raise the image processor's max_patches_per_scale (None disables it).",
                "too many patches",
            )
        if self.max_patches_per_call is not None and used + patches > self.max_patches_per_call:
            raise NaViLInputError(
                f"{target}, after {used} patches of earlier images and scales of this call: more than "
                f"max_patches_per_call={self.max_patches_per_call}. Pass fewer or smaller images per call (max_pixels, "
                "multiscale=False), or raise the image processor's max_patches_per_call (None disables it).",
                "too many patches",
            )

    def _plan_pass(
        self, size: tuple[int, int], min_pixels: float, max_pixels: Union[float, np.float32], used: int
    ) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """Resized (height, width) and (t, h, w) patch grid of one pass on an image of `size` (width, height).

        `used` patches of the call are already taken; the pass is refused if it would exceed a limit.
        """
        width, height = size
        resized = smart_resize(height, width, min_pixels, max_pixels)
        unit = self.patch_size * self.merge_size
        grid = tuple(math.ceil(side / unit) * self.merge_size for side in resized)
        self._check_patches(grid[0] * grid[1], used, size, resized, min_pixels, max_pixels)
        return resized, (1, *grid)

    def _plan_pyramid(
        self, size: tuple[int, int], min_pixels: float, max_pixels: float, multiscale: bool, used: int = 0
    ) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
        """(resized size, grid) of every scale of an image of `size` (width, height), smallest first (only the
        full-size pass when `multiscale` is False), after `used` patches of earlier images of the call."""
        plans = [self._plan_pass(size, min_pixels, max_pixels, used)]
        used += math.prod(plans[0][1])
        ratio = np.float32(self.scale_downsample_ratio**2)
        while multiscale:
            smallest = math.prod(plans[0][1])
            next_max = np.float32(smallest * self.patch_size**2) * ratio
            if next_max < min_pixels:
                break
            plan = self._plan_pass(size, min_pixels, next_max, used)
            if math.prod(plan[1]) >= smallest:
                break
            used += math.prod(plan[1])
            plans.insert(0, plan)
        return plans

    def _pyramid(self, image: Image.Image, plans: list, table: np.ndarray, device=None) -> torch.Tensor:
        """[patches, 3 * P * P] float32 pixel values of all planned scales of an RGB image (smallest first), each
        resized from the original with PIL; `device` is unused here (the caller moves the result)."""
        patch, merge = self.patch_size, self.merge_size
        scales = []
        for (resized_height, resized_width), (_, grid_h, grid_w) in plans:
            resized = image
            if (resized_width, resized_height) != image.size:
                resized = image.resize((resized_width, resized_height), resample=self.resample)
            pixels = np.zeros((grid_h * patch, grid_w * patch, 3), dtype=np.uint8)
            pixels[:resized_height, :resized_width] = np.asarray(resized)
            values = torch.from_numpy(table[np.arange(3), pixels])  # [H, W, 3]
            values = values.view(grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3)
            values = values.permute(0, 3, 1, 4, 6, 2, 5)  # [h/M, w/M, M, M, 3, P, P]
            scales.append(values.reshape(grid_h * grid_w, 3 * patch * patch))
        return torch.cat(scales)

    def preprocess(
        self,
        images,
        return_tensors=None,
        min_pixels: Optional[float] = None,
        max_pixels: Optional[float] = None,
        multiscale: Optional[bool] = None,
        do_rescale: Optional[bool] = None,
        rescale_factor: Optional[float] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Optional[Union[float, list[float]]] = None,
        image_std: Optional[Union[float, list[float]]] = None,
        device: Optional[Union[str, torch.device]] = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess one image or a (possibly nested, one list per conversation) list of images.

        Args:
            images:
                PIL images, numpy arrays or torch tensors ([H, W], [H, W, C] or [C, H, W]; uint8, or floats in
                [0, 1]), file paths, URLs, `data:image/...;base64,` URIs, bytes, or binary file objects.
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"` for torch tensors; numpy arrays otherwise.
            min_pixels (`float`, *optional*):
                Overrides `self.min_pixels` for this call.
            max_pixels (`float`, *optional*):
                Overrides `self.max_pixels` for this call. Both must be finite numbers with `min_pixels <= max_pixels`;
                the result is bounded by `max_patches_per_scale` and `max_patches_per_call` whatever they are.
            multiscale (`bool`, *optional*):
                Overrides `self.multiscale` for this call.
            do_rescale, rescale_factor, do_normalize, image_mean, image_std (*optional*):
                Override the instance's value mapping for this call: `x * rescale_factor` when `do_rescale`, then
                `(x - mean) / std` when `do_normalize`.
            device (`str` or `torch.device`, *optional*):
                Device of the returned tensors (with `return_tensors="pt"`). [`NaViLImageProcessorFast`] also
                resizes and normalizes there.

        Returns:
            [`BatchFeature`] with `pixel_values` (float32 `[patches, 3 * patch_size**2]`, all scales of all images,
            image by image, smallest scale first), `image_grid_thw` (int64 `[image_scales, 3]`) and `num_scales`
            (int64 `[images]`).
        """
        if kwargs:
            logger.warning(f"NaViLImageProcessor ignores the unrecognized arguments {sorted(kwargs)}.")
        # tensor limits (the model card computes smaller max_pixels as float32 torch scalars) become numpy scalars of
        # the same dtype, so that float32 limits keep the original's float32 arithmetic
        min_pixels, max_pixels = self._pixel_limits(
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
        )
        multiscale = check_flag(self.multiscale if multiscale is None else multiscale, "multiscale")
        if images is None:
            raise ValueError("NaViLImageProcessor got images=None; pass an image or a list of images.")
        flat = self._flatten(images)
        if self.max_images_per_call is not None and len(flat) > self.max_images_per_call:
            raise ValueError(
                f"Got {len(flat)} images in one call, more than max_images_per_call={self.max_images_per_call}; pass "
                "them in several calls, or raise the image processor's max_images_per_call (None disables it)."
            )
        table = self._value_table(
            self.do_rescale if do_rescale is None else do_rescale,
            self.rescale_factor if rescale_factor is None else rescale_factor,
            self.do_normalize if do_normalize is None else do_normalize,
            self.image_mean if image_mean is None else image_mean,
            self.image_std if image_std is None else image_std,
        )
        pixel_values, grids, num_scales = [], [], []
        for index, image in enumerate(flat):
            name = "the image" if len(flat) == 1 else f"image {index}"
            try:
                rgb = self.load_image(image, name)
                used = sum(len(values) for values in pixel_values)
                plans = self._plan_pyramid(rgb.size, min_pixels, max_pixels, multiscale, used)
                values = self._pyramid(rgb, plans, table, device)
            except ValueError as error:
                if len(flat) == 1:
                    raise
                message = f"Image {index} of {len(flat)}: {error}"
                raise (
                    NaViLInputError(message, error.kind) if isinstance(error, NaViLInputError) else ValueError(message)
                ) from None
            pixel_values.append(values)
            grids.extend(grid for _, grid in plans)
            num_scales.append(len(plans))
        if len(pixel_values) != 1:  # one image keeps its pyramid without a copy
            pixel_values = [torch.cat(pixel_values) if pixel_values else torch.zeros(0, 3 * self.patch_size**2)]
        data = {
            "pixel_values": pixel_values[0],
            "image_grid_thw": torch.tensor(grids, dtype=torch.int64).view(-1, 3),
            "num_scales": torch.tensor(num_scales, dtype=torch.int64),
        }
        if return_tensors != "pt":
            data = {key: value.cpu().numpy() for key, value in data.items()}
        elif device is not None:
            data = {key: value.to(device) for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _flatten(images) -> list:
        """Flat list of images from one image or a (nested) list/tuple of them."""
        if not isinstance(images, (list, tuple)):
            return [images]
        flat = []
        for item in images:
            flat.extend(NaViLImageProcessor._flatten(item) if isinstance(item, (list, tuple)) else [item])
        return flat


NaViLImageProcessor.register_for_auto_class()
