"""Image data: folder scanning, checking, cleaning and splitting, transforms, datasets.

Importing this package does not import scikit-learn (``write_digits`` does, when called).
"""

from cnnlab.data.datasets import ImageDataset, balanced_sampler, class_weights, collate_skip_bad
from cnnlab.data.digits import write_digits
from cnnlab.data.folders import (
    IMAGE_EXTENSIONS,
    BadImageError,
    Sample,
    Splits,
    check_folder,
    clean_folder,
    decode_bytes,
    detect_in_channels,
    make_splits,
    read_image,
    scan_class_folders,
    summarize_check,
)
from cnnlab.data.transforms import default_stats, eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageDataset",
    "Sample",
    "Splits",
    "balanced_sampler",
    "check_folder",
    "class_weights",
    "clean_folder",
    "collate_skip_bad",
    "decode_bytes",
    "default_stats",
    "detect_in_channels",
    "eval_transform",
    "make_splits",
    "read_image",
    "scan_class_folders",
    "summarize_check",
    "train_transform",
    "write_digits",
]
