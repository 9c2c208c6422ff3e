"""Image files: the one reader every part of cnnlab uses (the lister is
``cnnlab.data.listing``).

Any file becomes uint8 (C, H, W) with C in {1, 3} or a ``BadImageError`` that names the
file and says what is wrong with it; nothing a file holds can crash or exhaust the process.
Only regular files are opened (a FIFO would block). The image's size is read from its
header and refused above ``max_pixels()`` before anything is decoded (a 900 KB PNG can
decode to 30000 x 30000). JPEGs go to torchvision's fast libjpeg-turbo decoder once every
segment before the scan is known to lie inside the file; everything else, PNG included,
decodes through Pillow, which raises on bad data where torchvision's PNG decoder segfaults
(a chunk length past the end of the file, a broken zlib stream). A PNG's chunks are checked
first (inside the file, CRCs, IHDR first, IEND last) for a clear message.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import grayscale_to_rgb, rgb_to_grayscale, to_dtype

from cnnlab.data.listing import is_regular_file
from cnnlab.errors import CnnlabError

# Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS): about a quarter gigabyte of RGB.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_PIXELS_ENV = "CNNLAB_MAX_PIXELS"  # the setting: width x height above this is refused
# Pillow's modes of 16-bit grey pixels: native, little- and big-endian (a TIFF's byte order).
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SOURCE_PATH = re.compile(r"^.*\.cpp:\d+, ")  # torchvision prefixes C++ errors with its source


class BadImageError(CnnlabError):
    """A file with an image extension that cannot be decoded; ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _sniff(data: bytes) -> str | None:
    """The format by the file's signature: png, jpeg, or None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def _decode_jpeg(data: bytes, path: Path) -> torch.Tensor:
    # libjpeg-turbo through torchvision: the fastest JPEG decoder here, and one that turns
    # bad data into an error (fuzzed in tests/data/fuzz_reader.py).
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; still the
            # pinned, fastest way to decode here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(encoded, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    except RuntimeError as err:
        message = _SOURCE_PATH.sub("", str(err).splitlines()[0])
        raise BadImageError(path, f"corrupt or truncated JPEG: {message}") from None


def _decode_pil(data: bytes, path: Path) -> tuple[torch.Tensor, str]:
    # Every format but JPEG. Pillow raises on bad data where torchvision's PNG decoder
    # can crash the process (a CRC-valid PNG with a broken zlib stream segfaults it); it
    # is at most 1.7x slower on tiny PNGs (35 us), as fast on large ones, and a run
    # decodes a small set once into memory.
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning; the size is checked here against cnnlab's limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data))
        with pil:
            fmt = pil.format or "unknown"
            check_pixels(pil.size, path)
            pil.load()
            image = from_pil(pil)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (content is not a known image format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"{err} (set {MAX_PIXELS_ENV} to allow it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImageError(path, f"corrupt or truncated image: {err}") from None
    return image, fmt


def from_pil(pil: Any) -> torch.Tensor:
    """A loaded PIL image as (C, H, W), C in {1, 3}: turned upright by its EXIF
    orientation, grey or RGB, 16-bit grey as uint16 in either byte order (``decode_bytes``
    scales it to 8 bits) and everything else uint8."""
    from PIL import ImageOps

    pil = ImageOps.exif_transpose(pil)
    if pil.mode in _SIXTEEN_BIT:
        # Either byte order as native uint16, scaled to 8 bits alike (Pillow's convert
        # would clip big-endian pixels to white).
        array = torch.from_numpy(np.asarray(pil).astype(np.uint16))
    else:
        if pil.mode not in ("L", "RGB"):
            pil = pil.convert("L" if pil.mode in ("1", "LA", "I", "F") else "RGB")
        array = torch.from_numpy(np.array(pil))
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 of a decoded image: 16-bit values scaled to 8 bits, uint8 as it is."""
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def stored_mode(data: bytes) -> str:
    """How an encoded image stores its pixels, from its header (Pillow's mode names: "RGB",
    "L", "RGBA", "LA", "P", "CMYK", "I;16", ...); "unknown" when Pillow cannot tell.
    ``decode_bytes`` turns every one into grey or RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as pil:  # reads the header only
                return pil.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return "unknown"


def max_pixels() -> int:
    """The largest width x height decoded: ``$CNNLAB_MAX_PIXELS``, else Pillow's limit."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise CnnlabError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels")
    return limit


def _png_size(data: bytes, path: Path) -> tuple[int, int]:
    """(width, height) of a PNG whose every chunk lies inside the file with a valid CRC,
    IHDR first and IEND last; else BadImageError."""
    position, size, has_data = 8, None, False
    while position + 12 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        if end > len(data):
            raise BadImageError(
                path, f"truncated PNG ({kind!r} chunk at byte {position} runs past the end)"
            )
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[position + 4 : end - 4]) != crc:
            raise BadImageError(
                path, f"corrupt PNG ({kind!r} chunk at byte {position} fails its CRC)"
            )
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise BadImageError(path, "corrupt PNG (it does not start with an IHDR chunk)")
            size = (
                int.from_bytes(data[position + 8 : position + 12], "big"),
                int.from_bytes(data[position + 12 : position + 16], "big"),
            )
        has_data |= kind == b"IDAT"
        if kind == b"IEND":
            if not has_data:
                raise BadImageError(path, "corrupt PNG (no IDAT image data)")
            return size
        position = end
    raise BadImageError(path, "truncated PNG (no IEND chunk at the end)")


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes, path: Path) -> tuple[int, int]:
    """(width, height) of a JPEG whose segments up to the scan lie inside the file."""
    position, size = 2, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise BadImageError(path, f"corrupt JPEG (no marker at byte {position})")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2 or position + 2 + length > len(data):
            raise BadImageError(
                path, f"truncated JPEG (segment at byte {position} runs past the end)"
            )
        if marker in _JPEG_FRAMES and length >= 7:
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            size = (width, height)
        if marker == 0xDA:  # start of scan: the compressed image data follows
            if size is None:
                raise BadImageError(path, "corrupt JPEG (no frame header before the image data)")
            return size
        position += 2 + length
    raise BadImageError(path, "truncated JPEG (no image data)")


def check_pixels(size: tuple[int, int], path: Path) -> None:
    """BadImageError unless (width, height) is a real size within ``max_pixels()``."""
    width, height = size
    if width < 1 or height < 1:
        raise BadImageError(path, f"corrupt image header (size {width}x{height})")
    limit = max_pixels()
    if width * height > limit:
        raise BadImageError(
            path,
            f"{width}x{height} is {width * height:,} pixels, above the limit of {limit:,}"
            f" (a decompression bomb? set {MAX_PIXELS_ENV} to allow it)",
        )


def decode_bytes(data: bytes, path: Path | str = "<bytes>") -> tuple[torch.Tensor, str]:
    """Decode an encoded image to uint8 (C, H, W) with C in {1, 3}; also return its format.

    Grey stays one channel; grey+alpha drops alpha; palette and RGBA become RGB; 16-bit
    images are scaled to 8 bits; EXIF orientation is applied. Raises BadImageError (see the
    module doc for what is checked before decoding).
    """
    path = Path(path)
    if not data:
        raise BadImageError(path, "empty file")
    fmt = _sniff(data)
    if fmt == "jpeg":
        check_pixels(_jpeg_size(data, path), path)
        image = _decode_jpeg(data, path)
    else:
        if fmt == "png":
            check_pixels(_png_size(data, path), path)
        image, fmt = _decode_pil(data, path)
    image = to_uint8(image)  # 16-bit PNG/TIFF
    channels = image.shape[0]
    if channels in (2, 4):
        image = image[: channels - 1]  # drop alpha
    if image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
        raise BadImageError(path, f"unsupported image shape {tuple(image.shape)}")
    return image, fmt.lower()


def read_bytes(path: Path | str) -> bytes:
    """The bytes of a regular file; anything else is a BadImageError naming it."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, "not a regular file (a folder, pipe or device)")
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from None


def read_image(path: Path | str, in_channels: int | None = None) -> torch.Tensor:
    """Read an image file as uint8 (C, H, W): C in {1, 3} as stored, or ``in_channels``
    (grey repeated, colour averaged). BadImageError names the path and the reason."""
    image = decode_bytes(read_bytes(path), path)[0]
    return image if in_channels is None else to_channels(image, in_channels)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of the image ``read_image`` returns, from the file's header without
    decoding the pixels: turned a quarter when its EXIF orientation turns it (as the
    reader does), so labels and masks are placed on the pixels as they are read."""
    from PIL import Image, UnidentifiedImageError

    if not is_regular_file(Path(path)):
        raise BadImageError(path, "not a regular file (a folder, pipe or device)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = exif_orientation(image) in _QUARTER_TURNS
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as error:
        raise BadImageError(path, f"not a readable image ({error})") from None
    return (height, width) if turned else (width, height)


# EXIF orientations (tag 0x0112) that turn the image a quarter: its width becomes height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def exif_orientation(image: Any) -> int | None:
    """The EXIF orientation of an opened PIL image, or None without one (or when its EXIF
    cannot be parsed, which the decoders then ignore as well)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # Pillow raises many types for a damaged EXIF block
        return None
    return value if isinstance(value, int) else None


def encoded_size(data: bytes, path: Path | str = "<bytes>") -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding the pixels (a
    BadImageError when there is no header to read; ``decode_bytes`` says more)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as error:
        raise BadImageError(path, f"not a readable image ({error})") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"{error} (set {MAX_PIXELS_ENV} to allow it)") from None


def to_channels(image: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (..., C, H, W), C in {1, 3, 4} -> (..., in_channels, H, W): alpha dropped, grey
    repeated to RGB or RGB averaged to grey."""
    if in_channels not in (1, 3):
        raise CnnlabError(f"in_channels must be 1 or 3, got {in_channels}")
    if image.shape[-3] == 4:
        image = image[..., :3, :, :]
    channels = image.shape[-3]
    if channels == in_channels:
        return image
    return grayscale_to_rgb(image) if channels == 1 else rgb_to_grayscale(image)


def is_grayscale(image: torch.Tensor, tolerance: int = 3) -> bool:
    """True for one channel, or three channels equal within ``tolerance`` (grey saved as RGB)."""
    if image.shape[0] == 1:
        return True
    spread = image.amax(dim=0).to(torch.int16) - image.amin(dim=0).to(torch.int16)  # (H, W)
    return int(spread.max()) <= tolerance


def detect_in_channels(paths: Iterable[Path | str], max_samples: int = 32) -> int:
    """1 when every sampled readable image is grayscale, else 3 (also 3 when none is readable)."""
    paths = sorted(Path(p) for p in paths)
    step = max(1, math.ceil(len(paths) / max_samples))
    readable = 0
    for path in paths[::step]:
        try:
            image = read_image(path)
        except BadImageError:
            continue
        if not is_grayscale(image):
            return 3
        readable += 1
    return 1 if readable else 3
