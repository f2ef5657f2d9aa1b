"""Image loading for NaViL's image processors: decoding paths, URLs, data URIs, bytes, PIL images, arrays and tensors
into RGB images, with the hardening that keeps a hostile input bounded (decompression bombs and oversized containers
such as ICO refused before decoding, truncated files refused or read as far as they go, downloads capped in bytes
and time, FIFOs and devices refused)."""

import base64
import contextlib
import io
import os
import re
import stat
import struct
import threading
import time
import types
import zlib
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors_navil import NaViLInputError

# Exceptions PIL raises while decoding a damaged file (truncated data, bad chunks, broken compression streams).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_CONVERT_HINT = (
    "The file is truncated or corrupt, or PIL cannot convert its mode to RGB; re-export or re-download it (e.g. as an "
    "8-bit PNG or JPEG), or pass load_truncated_images=True to the image processor to accept truncated data."
)
_CORRUPT_HINT = (
    "The file is truncated or corrupt; re-export or re-download it, or pass load_truncated_images=True to the image "
    "processor to accept the pixels that can be decoded."
)


@contextlib.contextmanager
def _decoding(name: str, failure: str, hint: str):
    """Turns what PIL raises while decoding `name` into a `ValueError`: a refused decompression bomb, or `failure`
    with PIL's error and `hint` (a truncated or corrupt file)."""
    try:
        yield
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name} was refused before decoding: {error}") from None
    except _DECODE_ERRORS as error:
        raise NaViLInputError(f"{failure}: {error}. {hint}", "truncated or corrupt file") from None


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_VALID_CHANNELS = (1, 3, 4)
# Channels of the PNG raw modes PIL decodes IDAT data into ("RGB;16B" = 3 channels of 16 bits).
_PNG_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "LA": 2, "RGB": 3, "RGBA": 4}
# (x0, y0, dx, dy) of the seven Adam7 passes of an interlaced PNG.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


# One deadline for a whole image download (connecting, redirects and the body together), in seconds.
DOWNLOAD_DEADLINE_S = 30.0
# Bytes a downloaded image may take per pixel allowed by `max_image_pixels` (uncompressed 8-bit RGBA), plus headers.
_DOWNLOAD_BYTES_PER_PIXEL = 4
_DOWNLOAD_HEADER_BYTES = 2**20


def _read_capped(chunks, max_bytes: Optional[int], deadline_at: float) -> bytes:
    """The chunks joined, refused as soon as they pass `max_bytes` or the clock passes `deadline_at`."""
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError(
                f"the response is larger than {max_bytes} bytes, more than an image of max_image_pixels pixels takes"
            )
        if time.monotonic() > deadline_at:
            raise TimeoutError("the response did not end before the deadline")
    return bytes(data)


def _download(url: str, max_bytes: Optional[int], deadline: Optional[float] = None) -> bytes:
    """The body of `url` (httpx, or requests on transformers 4), raising on HTTP errors, on a body of more than
    `max_bytes` bytes (None: no cap) and when the whole download takes more than `deadline` seconds (default
    `DOWNLOAD_DEADLINE_S`). The clients' own timeouts restart with every byte received: a daemon thread downloads,
    reading what has arrived and stopping at the deadline, and the caller waits for it at most `deadline` seconds
    (a read that receives nothing ends at the clients' timeout, `deadline` too)."""
    try:
        import httpx
    except ImportError:
        httpx = None
        try:
            import requests
        except ImportError:
            raise ValueError(
                f"Cannot download {url}: image URLs need httpx or requests, and neither is installed. Install one "
                "(pip install httpx), or download the image and pass its path, bytes or a PIL image."
            ) from None
    deadline = DOWNLOAD_DEADLINE_S if deadline is None else deadline
    deadline_at = time.monotonic() + deadline
    outcome = {}

    def fetch():
        try:
            if httpx is not None:
                with httpx.stream("GET", url, follow_redirects=True, timeout=deadline) as response:
                    response.raise_for_status()
                    outcome["data"] = _read_capped(response.iter_bytes(), max_bytes, deadline_at)
            else:
                with requests.get(url, stream=True, timeout=deadline) as response:
                    response.raise_for_status()
                    raw = response.raw  # read1: what has arrived (iter_content waits for whole chunks)
                    chunks = (
                        iter(lambda: raw.read1(2**16, decode_content=True), b"")
                        if hasattr(raw, "read1")
                        else response.iter_content(2**16)
                    )
                    outcome["data"] = _read_capped(chunks, max_bytes, deadline_at)
        except Exception as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=fetch, name="navil-image-download", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise TimeoutError(f"the download did not finish within {deadline:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _embedded_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the first bytes of an image embedded in a container: PNG, JPEG 2000 (codestream or
    JP2 box) or a BMP info header (ICO, whose height counts the mask too); None if none of these."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"\xff\x4f\xff\x51") and len(data) >= 24:  # codestream: SIZ marker segment
        width, height, x_offset, y_offset = struct.unpack(">IIII", data[8:24])
        return width - x_offset, height - y_offset
    box = data.find(b"ihdr")
    if data[4:8] == b"jP  " and box >= 0 and len(data) >= box + 12:
        height, width = struct.unpack(">II", data[box + 4 : box + 12])
        return width, height
    if len(data) >= 12 and struct.unpack("<I", data[:4])[0] in (40, 52, 56, 108, 124):
        width, height = struct.unpack("<ii", data[4:12])
        return abs(width), abs(height) // 2
    return None


def container_image_sizes(file) -> list[tuple[int, int]]:
    """(width, height) of every image embedded in an ICO / CUR or ICNS file, read from the headers of the embedded
    images themselves (PIL decodes an ICO's largest image inside `Image.open`, and the size an ICO directory or an
    ICNS block type declares need not be that of the image stored there); [] for other formats. `file` is a binary
    file object, left at the position it had."""
    position = file.tell()
    try:
        head = file.read(8)
        sizes = []
        if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):  # ICO, CUR
            count = struct.unpack("<H", head[4:6])[0]
            file.seek(position + 6)
            directory = file.read(16 * count)
            for index in range(len(directory) // 16):
                entry = directory[16 * index : 16 * index + 16]
                offset = struct.unpack("<I", entry[12:16])[0]
                sizes.append((entry[0] or 256, entry[1] or 256))
                file.seek(position + offset)
                embedded = _embedded_size(file.read(64))
                if embedded is not None:
                    sizes.append(embedded)
        elif head[:4] == b"icns":
            end, offset = position + struct.unpack(">I", head[4:8])[0], position + 8
            while offset + 8 <= end:
                file.seek(offset)
                block = file.read(8)
                length = struct.unpack(">I", block[4:8])[0] if len(block) == 8 else 0
                if length < 8:
                    break
                embedded = _embedded_size(file.read(min(length - 8, 256)))
                if embedded is not None:
                    sizes.append(embedded)
                offset += length
        return sizes
    except (OSError, struct.error):
        return []  # a damaged header: PIL refuses it
    finally:
        file.seek(position)


def _png_data_size(image: Image.Image) -> Optional[int]:
    """Bytes of filtered scanlines the zlib stream of a PNG frame must decompress to; None for unknown raw modes."""
    _, extents, _, rawmode = image.tile[0]
    rawmode = rawmode if isinstance(rawmode, str) else rawmode[0]
    base, _, suffix = rawmode.partition(";")
    bits = re.match(r"\d*", suffix).group()
    if base not in _PNG_CHANNELS:
        return None
    bits_per_pixel = _PNG_CHANNELS[base] * (int(bits) if bits else 1 if base == "1" else 8)
    width, height = extents[2] - extents[0], extents[3] - extents[1]
    size = 0
    for x0, y0, dx, dy in _ADAM7 if image.info.get("interlace") else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            size += rows * (1 + -(-columns * bits_per_pixel // 8))
    return size


def png_data_ends_early(image: Image.Image) -> bool:
    """Whether a PNG whose pixels are not decoded yet has a zlib stream that ends before its last row.

    PIL accepts such a file (a cut IDAT followed by a valid IEND) and leaves the missing rows black. This re-reads the
    IDAT chunks, decompressing in bounded pieces until all rows are found or the stream ends, then restores the file
    position. Data cut off inside the stream is not reported here: PIL itself refuses it as truncated.
    """
    expected = _png_data_size(image)
    if expected is None or image.tile[0][2] < 8:
        return False
    file, position = image.fp, image.fp.tell()
    decompressor, produced = zlib.decompressobj(), 0
    try:
        file.seek(image.tile[0][2] - 8)
        while produced < expected and not decompressor.eof:
            header = file.read(8)
            if len(header) < 8 or header[4:] != b"IDAT":
                return False
            remaining = struct.unpack(">I", header[:4])[0]
            while remaining and produced < expected and not decompressor.eof:
                data = file.read(min(remaining, 1 << 16))
                if not data:
                    return False
                remaining -= len(data)
                while data and produced < expected and not decompressor.eof:
                    produced += len(decompressor.decompress(data, 1 << 20))
                    data = decompressor.unconsumed_tail
            file.read(4)  # CRC
    except zlib.error:
        return False  # a broken stream: PIL's decoder reports it
    finally:
        file.seek(position)
    return produced < expected


def _load_accepting_truncation(image: Image.Image) -> None:
    """`image.load()` with PIL's tolerance for truncated data switched on for this call only.

    PIL reads the switch from its module global `ImageFile.LOAD_TRUNCATED_IMAGES`; setting it would change every
    image loaded by the process, in every thread. The loader runs instead with a copy of its module namespace in
    which the switch is on. Formats with their own loader (WebP, TIFF) load as usual.
    """
    load = type(image).load
    if load is not ImageFile.ImageFile.load:
        image.load()
        return
    namespace = {**vars(ImageFile), "LOAD_TRUNCATED_IMAGES": True}
    types.FunctionType(load.__code__, namespace, load.__name__, load.__defaults__, load.__closure__)(image)


def _pending(image: Image.Image) -> bool:
    """Whether a PIL image's pixels are still to be decoded from its file."""
    return bool(getattr(image, "tile", None)) and getattr(image, "fp", None) is not None


class NaViLImageLoader:
    """Loading of one image (`load_image`), shared by [`NaViLImageProcessor`] and [`NaViLImageProcessorFast`]; reads
    the processor's `max_image_pixels`, `load_truncated_images` and `apply_exif_orientation`."""

    def _check_pixel_count(self, width: int, height: int, when: str = "before decoding") -> None:
        """Refuses more than `max_image_pixels` pixels; `when` says truthfully where: "before decoding", "before
        conversion" (arrays and tensors) or "after decoding" (a PIL image whose pixels are loaded already)."""
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            reason = f"it was refused {when}" + (" (possible decompression bomb)" if when == "before decoding" else "")
            raise NaViLInputError(
                f"The image declares {width}x{height} = {width * height} pixels, more than max_image_pixels="
                f"{self.max_image_pixels}; {reason}. Downscale the image, or raise the processor's "
                "max_image_pixels (None disables the check) if you trust it.",
                "image above max_image_pixels",
            )

    def _open(self, source, name: str) -> Image.Image:
        """Decodes a file path, file object or bytes into an RGB image, refusing oversized images first (for
        containers such as ICO, every embedded image, before PIL opens the file)."""
        for size in self._container_sizes(source):
            self._check_pixel_count(*size)
        with self._open_file(source, name) as image:
            self._check_pixel_count(*image.size, "before decoding" if _pending(image) else "after decoding")
            with _decoding(name, f"Could not read the first frame of {name}", _CORRUPT_HINT):
                image.seek(0)
            return self._pil_to_rgb(image, name)

    @staticmethod
    def _container_sizes(source) -> list[tuple[int, int]]:
        """`container_image_sizes` of a path or seekable file object; [] when it cannot be read (PIL then says why)."""
        if isinstance(source, str):
            try:
                with open(source, "rb") as file:
                    return container_image_sizes(file)
            except OSError:
                return []
        seekable = getattr(source, "seekable", None)
        return container_image_sizes(source) if seekable is not None and seekable() else []

    @staticmethod
    def _open_file(source, name: str) -> Image.Image:
        """`PIL.Image.open(source)` (header only), with a `ValueError` for every way it fails."""
        try:
            return Image.open(source)
        except FileNotFoundError:
            raise NaViLInputError(f"Image file not found: {name}; check the path.", "image file not found") from None
        except IsADirectoryError:
            raise ValueError(f"{name} is a directory, not an image file; pass the path of an image file.") from None
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"{name} was refused before decoding: {error} Downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS "
                "and the processor's max_image_pixels if you trust it."
            ) from None
        except UnidentifiedImageError:
            raise NaViLInputError(
                f"Cannot read {name} as an image: it is not in a format PIL can decode (PNG, JPEG, GIF, WebP, BMP, "
                "TIFF, ...) or its header is corrupt; check that the file is an image.",
                "not an image file",
            ) from None
        except PermissionError as error:
            raise ValueError(f"Cannot open {name}: {error}; check the file permissions.") from None
        except _DECODE_ERRORS as error:
            raise NaViLInputError(
                f"Cannot read the header of {name}: {error}. The file is truncated or corrupt; re-export or "
                "re-download it.",
                "truncated or corrupt file",
            ) from None

    def _fetch(self, image) -> tuple[object, str]:
        """Turns a path / URL / data URI string into something `PIL.Image.open` reads, plus a name for errors."""
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            limit = self.max_image_pixels
            max_bytes = None if limit is None else limit * _DOWNLOAD_BYTES_PER_PIXEL + _DOWNLOAD_HEADER_BYTES
            try:
                data = _download(text, max_bytes)
            except Exception as error:
                raise ValueError(f"Could not download the image at {text}: {error}") from None
            return io.BytesIO(data), text
        if text.startswith("data:image/"):
            try:
                return io.BytesIO(base64.b64decode(text.split(",", 1)[1], validate=True)), "the data URI"
            except (IndexError, ValueError):
                raise ValueError(
                    "The image data URI is not valid base64 ('data:image/<type>;base64,<data>')."
                ) from None
        try:
            mode = os.stat(text).st_mode
        except FileNotFoundError:
            raise NaViLInputError(f"Image file not found: {text}; check the path.", "image file not found") from None
        except OSError as error:
            raise ValueError(f"Cannot open {text}: {error}; check the path and its permissions.") from None
        if stat.S_ISDIR(mode):
            raise ValueError(f"{text} is a directory, not an image file; pass the path of an image file.")
        if not stat.S_ISREG(mode):
            # reading a FIFO blocks until something writes to it, a device may never end
            raise ValueError(
                f"{text} is not a regular file (a FIFO, socket or device), which may never end; save the image to a "
                "file and pass its path."
            )
        return text, text

    def _pil_to_rgb(self, image: Image.Image, name: str) -> Image.Image:
        """RGB uint8 copy of a PIL image, decoding its pixels if they are not loaded yet."""
        width, height = image.size
        self._check_pixel_count(width, height, "before decoding" if _pending(image) else "after decoding")
        if width == 0 or height == 0:
            raise ValueError(f"{name} has zero size ({width}x{height} pixels); pass a non-empty image.")
        high_depth = image.mode in _HIGH_DEPTH_MODES
        pending = bool(getattr(image, "tile", None)) and getattr(image, "fp", None) is not None  # not decoded yet
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pending and pil_limit and width * height > 2 * pil_limit:
            raise ValueError(
                f"{name} declares {width}x{height} pixels, more than twice PIL.Image.MAX_IMAGE_PIXELS ({pil_limit}); it "
                "was refused before decoding (possible decompression bomb). Raise PIL.Image.MAX_IMAGE_PIXELS if you "
                "trust it."
            )
        if pending and not self.load_truncated_images and image.format == "PNG" and image.tile[0][0] == "zip":
            if png_data_ends_early(image):
                raise NaViLInputError(
                    f"{name} is truncated: its PNG image data ends before the last row (PIL would leave the missing "
                    f"rows black). {_CORRUPT_HINT}",
                    "truncated or corrupt file",
                )
        with _decoding(name, f"Could not decode {name} (mode {image.mode})", _CONVERT_HINT):
            if pending and self.load_truncated_images:
                _load_accepting_truncation(image)
            if self.apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # same colours as a direct RGB conversion, without PIL's warning
            converted = np.asarray(image) if high_depth else image.convert("RGB")
        return self._array_to_rgb(converted, name, pil_mode=image.mode) if high_depth else converted

    def _array_to_rgb(self, array: np.ndarray, name: str, pil_mode: Optional[str] = None) -> Image.Image:
        """RGB image from a [H, W], [H, W, C] or [C, H, W] array (C in 1, 3, 4), converting the dtype to uint8."""
        if array.ndim == 3:
            last, first = array.shape[-1] in _VALID_CHANNELS, array.shape[0] in _VALID_CHANNELS
            if not (last or first):
                raise ValueError(
                    f"{name} has shape {tuple(array.shape)}: no channel axis of size 1, 3 or 4 (gray, RGB, RGBA) "
                    "first or last; pass [H, W], [H, W, C] or [C, H, W]."
                )
            if not last:
                array = np.moveaxis(array, 0, -1)
        elif array.ndim == 2:
            array = array[..., None]
        else:
            raise ValueError(
                f"{name} has {array.ndim} dimensions (shape {tuple(array.shape)}); one image must be [H, W], "
                "[H, W, C] or [C, H, W]. Pass several images as a list."
            )
        height, width = array.shape[:2]
        if height == 0 or width == 0:
            raise ValueError(f"{name} has zero size ({width}x{height} pixels); pass a non-empty image.")
        self._check_pixel_count(width, height, "before conversion")
        array = self._to_uint8(array, name, pil_mode)
        channels = array.shape[-1]
        if channels == 1:
            array = np.repeat(array, 3, axis=-1)
        elif channels == 4:
            array = array[..., :3]
        return Image.fromarray(np.ascontiguousarray(array))

    @staticmethod
    def _to_uint8(array: np.ndarray, name: str, pil_mode: Optional[str]) -> np.ndarray:
        """uint8 copy of an image array: see the class docstring for the accepted ranges per dtype."""
        if array.dtype == np.uint8:
            return array
        if array.dtype == np.bool_:
            return array.astype(np.uint8) * 255
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise NaViLInputError(
                    f"{name} contains NaN or infinite values; replace or clip them first.", "NaN or infinite values"
                )
            low, high = float(array.min()), float(array.max())
            scale = 255.0 if pil_mode != "F" or high <= 1.0 else 1.0
            top = 255.0 / scale
            if low < 0 or high > top:
                hint = (
                    "divide 8-bit data by 255 or clip it"
                    if pil_mode != "F"
                    else "rescale it to [0, 1] or [0, 255] first"
                )
                raise NaViLInputError(
                    f"{name} is a float image with values in [{low}, {high}] but must lie in [0, {top:g}]; {hint}.",
                    "float values out of range",
                )
            return np.rint(array.astype(np.float64) * scale).astype(np.uint8)
        if np.issubdtype(array.dtype, np.integer):
            low, high = int(array.min()), int(array.max())
            sixteen_bit = array.dtype == np.uint16 or (pil_mode or "").startswith("I;16")
            if low >= 0 and (sixteen_bit or 255 < high <= 65535):
                return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
            if low >= 0 and high <= 255:
                return array.astype(np.uint8)
            raise ValueError(
                f"{name} is an integer image ({array.dtype}) with values in [{low}, {high}]; expected 8-bit [0, 255] "
                "or 16-bit [0, 65535] data. Convert it to uint8 first."
            )
        raise ValueError(f"{name} has dtype {array.dtype}; pass uint8 (or uint16) integers or floats in [0, 1].")

    def load_image(self, image, name: str = "the image") -> Image.Image:
        """Converts one supported input to an RGB PIL image (see the class docstring for the accepted inputs)."""
        if isinstance(image, (str, os.PathLike)):
            source, name = self._fetch(image)
            return self._open(source, name)
        if isinstance(image, (bytes, bytearray)):
            return self._open(io.BytesIO(image), name)
        if hasattr(image, "read"):
            return self._open(image, name)
        if isinstance(image, Image.Image):
            return self._pil_to_rgb(image, name)
        if isinstance(image, torch.Tensor):
            if image.device.type == "meta":
                raise ValueError(
                    f"{name} is a tensor on the meta device, which holds no values; pass a tensor with data (e.g. "
                    "load the weights or image first)."
                )
            tensor = image.detach().cpu()
            if tensor.is_floating_point():
                tensor = tensor.float()
            array = tensor.numpy()
            # tensors are channel-first by convention: prefer CHW when the first axis looks like channels
            if array.ndim == 3 and array.shape[0] in _VALID_CHANNELS:
                array = np.moveaxis(array, 0, -1)
            return self._array_to_rgb(array, name)
        if isinstance(image, np.ndarray):
            return self._array_to_rgb(image, name)
        raise ValueError(
            f"Unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or torch tensor "
            "([H, W, C] or [C, H, W]), a file path or URL, bytes, or a binary file object."
        )
