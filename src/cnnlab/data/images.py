"""Image files: the one lister and the one reader every part of cnnlab uses.

Listing: folders are searched recursively and sorted; names starting with ``.``
(``.DS_Store``, macOS ``._photo.jpg``) and ``__MACOSX`` folders are never images.
Reading: any file becomes uint8 (C, H, W) with C in {1, 3} or a ``BadImageError`` that
names the file and says what is wrong with it.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import grayscale_to_rgb, rgb_to_grayscale, to_dtype

from cnnlab.errors import CnnlabError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
_SKIP_NAMES = frozenset({"__MACOSX"})
_SOURCE_PATH = re.compile(r"^.*\.cpp:\d+, ")  # torchvision prefixes C++ errors with its source


class BadImageError(CnnlabError):
    """A file with an image extension that cannot be decoded; ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --- listing ---------------------------------------------------------------------------


def visible(name: str) -> bool:
    """Whether a file or folder name can hold images (not hidden, not macOS metadata)."""
    return not name.startswith(".") and name not in _SKIP_NAMES


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, sorted by path."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if visible(d)]
        for name in filenames:
            if not visible(name):
                continue
            path = Path(dirpath, name)
            (images if is_image_name(path) else others).append(path)
    return sorted(images), sorted(others)


def list_images(paths: Sequence[str | Path] | str | Path) -> tuple[list[Path], list[str]]:
    """Files named directly, plus the image files found under folders; and one error line
    ``"path: reason"`` for each path that gives nothing (missing, or a folder without
    images). Nothing is raised: callers go on with what was found."""
    files: list[Path] = []
    errors: list[str] = []
    for path in map(Path, [paths] if isinstance(paths, str | Path) else paths):
        if path.is_dir():
            found = walk_files(path)[0]
            files += found
            if not found:
                errors.append(f"{path}: no image files in this folder")
        elif path.exists():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


# --- reading -------------------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _decode_torchvision(data: bytes, fmt: str, path: Path) -> torch.Tensor:
    # Colour type 3 (palette): decode_image(UNCHANGED) returns the palette *indices* as one
    # grey channel, so palette PNGs are expanded to RGB instead.
    palette = fmt == "png" and len(data) > 25 and data[25] == 3
    mode = ImageReadMode.RGB if palette else ImageReadMode.UNCHANGED
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; still the
            # pinned, fastest way to decode here.
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(encoded, mode=mode, apply_exif_orientation=True)
    except RuntimeError as err:
        message = _SOURCE_PATH.sub("", str(err).splitlines()[0])
        raise BadImageError(path, f"corrupt or truncated {fmt.upper()}: {message}") from None
    return image[0] if image.ndim == 4 else image  # an animated GIF: (N, C, H, W) -> frame 0


def _decode_pil(data: bytes, path: Path) -> tuple[torch.Tensor, str]:
    # torchvision cannot decode BMP or TIFF; Pillow can, and refuses everything else here.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as pil:
            fmt = pil.format or "unknown"
            pil.load()
            if pil.mode not in ("L", "RGB", "I;16"):
                pil = pil.convert("L" if pil.mode in ("1", "LA", "I", "F") else "RGB")
            array = torch.from_numpy(np.array(pil))
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (content is not a known image format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(path, f"corrupt or truncated image: {err}") from None
    image = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    return image, fmt


def decode_bytes(data: bytes, path: Path | str = "<bytes>") -> tuple[torch.Tensor, str]:
    """Decode an encoded image to uint8 (C, H, W) with C in {1, 3}; also return its format.

    Grey stays one channel; grey+alpha drops alpha; palette and RGBA become RGB; 16-bit
    images are scaled to 8 bits; EXIF orientation is applied. Raises BadImageError.
    """
    path = Path(path)
    if not data:
        raise BadImageError(path, "empty file")
    fmt = _sniff(data)
    if fmt == "png" and b"IEND" not in data[-64:]:
        raise BadImageError(path, "truncated PNG (no IEND chunk at the end)")
    if fmt is None:
        image, fmt = _decode_pil(data, path)
    else:
        image = _decode_torchvision(data, fmt, path)
    if image.dtype != torch.uint8:
        image = to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG/TIFF
    channels = image.shape[0]
    if channels in (2, 4):
        image = image[: channels - 1]  # drop alpha
    if image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
        raise BadImageError(path, f"unsupported image shape {tuple(image.shape)}")
    return image, fmt.lower()


def read_bytes(path: Path | str) -> bytes:
    """The file's bytes; a file that cannot be read is a BadImageError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from None


def read_image(path: Path | str, in_channels: int | None = None) -> torch.Tensor:
    """Read an image file as uint8 (C, H, W): C in {1, 3} as stored, or ``in_channels``
    (grey repeated, colour averaged). BadImageError names the path and the reason."""
    image = decode_bytes(read_bytes(path), path)[0]
    return image if in_channels is None else to_channels(image, in_channels)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise BadImageError(path, f"not a readable image ({error})") from None


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


def require_folder(root: Path | str) -> Path:
    """``root`` made absolute, or a CnnlabError when it is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise CnnlabError(f"{root}: folder not found")
    if not root.is_dir():
        raise CnnlabError(f"{root}: not a folder")
    return root.absolute()
