"""Loading pretrained weights from local files only: nothing is ever downloaded."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.registry import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to each tensor of a pretrained state_dict."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first conv summed/repeated to in_channels
    skipped: list[str] = field(default_factory=list)  # shape differs: the new head, say


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def torchvision_weight_urls(torchvision_name: str) -> list[str]:
    """Where torchvision publishes a model's weight files, its default first."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(torchvision_name)
    default = enum.DEFAULT
    return [w.url for w in (default, *(w for w in enum if w is not default))]


def torchvision_weight_files(torchvision_name: str) -> list[str]:
    """File names torchvision uses for a model's weights, its default first."""
    return [url.rsplit("/", 1)[-1] for url in torchvision_weight_urls(torchvision_name)]


def find_torchvision_weights(info: ModelInfo) -> Path:
    """The local torchvision weight file for a model, or a clear error saying where to put it."""
    if info.torchvision is None:
        raise CnnlabError(f"{info.name} has no torchvision weights; pass a file path instead")
    folder = torch_hub_checkpoints()
    urls = torchvision_weight_urls(info.torchvision)
    for url in urls:
        path = folder / url.rsplit("/", 1)[-1]
        if path.is_file():
            check_hash_in_name(path, url)
            return path
    name = urls[0].rsplit("/", 1)[-1]
    raise CnnlabError(
        f"no torchvision weights for {info.name} on this machine: expected {folder / name} "
        f"(download {urls[0]} where there is internet and copy it there, or set TORCH_HOME;"
        " nothing is downloaded)"
    )


# torchvision names each file NAME-<the first hex digits of its SHA-256>.pth.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")


def check_hash_in_name(path: Path, url: str) -> None:
    """CnnlabError unless the SHA-256 of ``path`` starts with the digits torchvision's file
    name carries, as torch.hub checks a download: a damaged or other file is refused."""
    from cnnlab.files import sha256_of

    found = _HASH_IN_NAME.search(path.name)
    if found is None:
        return
    digest = sha256_of(path)
    if not digest.startswith(found.group(1)):
        raise CnnlabError(
            f"{path}: its SHA-256 starts {digest[: len(found.group(1))]}, not {found.group(1)}"
            f" as torchvision's file name says; it is damaged or another file (fetch {url}"
            " again)"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a .pt/.pth state_dict without unpickling objects."""
    if not path.is_file():
        raise CnnlabError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any decoding failure is the file's fault, not ours
        raise CnnlabError(f"{path}: not a readable weight file ({error})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CnnlabError(f"{path}: does not hold a state_dict of tensors")
    return state


# torchvision's DenseNet files predate its module names ("denselayer1.norm.1.weight" for
# "denselayer1.norm1.weight"); torchvision renames them on load, and so do we.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _modern_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_OLD_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # timm's recipe: grayscale sums the RGB filters; more channels repeat them, rescaled so
    # activations keep their scale.
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def model_in_rgb(model: nn.Module, info: ModelInfo) -> bool:
    """Whether the model's first convolution (``ModelInfo.first_conv``) takes three channels."""
    return info.first_conv is not None and model.get_submodule(info.first_conv).in_channels == 3


def load_pretrained(model: nn.Module, info: ModelInfo, weights: str | Path) -> LoadReport:
    """Load weights into ``model``: matching tensors load, the first conv
    (``ModelInfo.first_conv``) adapts to ``in_channels``, tensors of another shape (a head
    for other classes) stay new."""
    path = find_torchvision_weights(info) if weights == "torchvision" else Path(weights)
    if weights != "torchvision" and info.torchvision is not None and path.is_file():
        # A file given by path under one of torchvision's names is held to that name's hash.
        for url in torchvision_weight_urls(info.torchvision):
            if url.endswith(f"/{path.name}"):
                check_hash_in_name(path, url)
    source = _modern_keys(read_state_dict(path))
    target = model.state_dict()
    report = LoadReport(source=path)
    first_conv = f"{info.first_conv}.weight" if info.first_conv else None
    merged = dict(target)
    for key, tensor in source.items():
        if key not in target:
            continue
        wanted = target[key].shape
        if tensor.shape == wanted:
            merged[key] = tensor
            report.loaded.append(key)
        elif key == first_conv and tensor.shape[0] == wanted[0] and tensor.shape[2:] == wanted[2:]:
            merged[key] = _adapt_input_conv(tensor, wanted[1])
            report.adapted.append(key)
        else:
            report.skipped.append(key)
    if not report.loaded:
        raise CnnlabError(f"{path}: no tensor matches {info.name}; is it a weight file for it?")
    # Old checkpoints have no BatchNorm step counters; they are bookkeeping, not weights.
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    model.load_state_dict(merged)
    if weights == "torchvision" and hasattr(model, "transform_input") and model_in_rgb(model, info):
        # torchvision's GoogLeNet weights were trained on inputs it re-normalises itself;
        # torchvision switches this on whenever it loads them, and so must we.
        model.transform_input = True
    for key in report.adapted:
        have, want = source[key].shape[1], target[key].shape[1]
        how = "summed" if want == 1 else "repeated and rescaled"
        log.info(
            "%s: %s: the file's %d-channel filters %s to %d channel%s (timm's rule: a gray"
            " image then gives the response the RGB filters give to R = G = B)"
            if want == 1
            else "%s: %s: the file's %d-channel filters %s to %d channel%s",
            path.name, key, have, how, want, "" if want == 1 else "s",
        )  # fmt: skip
    if report.skipped or missing:
        log.warning(
            "%s: loaded %d tensors; new (not in the file or of another shape): %s",
            path.name,
            len(report.loaded) + len(report.adapted),
            ", ".join(report.skipped + missing),
        )
    model.pretrained_report = report
    return report
