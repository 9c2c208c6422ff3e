"""What a trained network computes inside (``cnnlab features``): one layer's activation maps
for an image, and the first convolution's kernels, the "filters that became feature
detectors" of the notes, beside the same kernels at initialisation where the run kept
them (``RUN/initial.safetensors``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cnnlab.attribution.maps import check_spatial, layer_module, layer_output
from cnnlab.checkpoint import INITIAL_WEIGHTS
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.explain.inputs import default_layer, model_input
from cnnlab.models.factory import model_info
from cnnlab.runs import load_run


def feature_maps_file(
    run_dir: str | Path,
    image: str | Path,
    layer: str | None = None,
    top: int = 16,
    out: str | Path = "features.png",
    device: str = "auto",
) -> dict:
    """Draw ``layer``'s ``top`` most active channels (by mean activation) for ``image`` into
    ``out``; returns the layer, each drawn channel's index and mean, and a description."""
    run = load_run(run_dir, device, fast=False)
    pixels = read_image(Path(image), run.task.in_channels)
    x = model_input(run, pixels)
    name = layer or default_layer(run)
    layer_module(run.model, name)
    check_spatial(run.model, name, x)
    maps = layer_output(run.model, name, x)[0].float().cpu()  # (C, h, w)
    means = maps.mean(dim=(1, 2))
    order = means.argsort(descending=True)[: min(top, maps.shape[0])]
    channels = [(int(c), float(means[c])) for c in order]
    from cnnlab.explain_plots import plot_feature_maps

    title = f"{name} of {Path(image).name}: the {len(channels)} most active of {maps.shape[0]}"
    plot_feature_maps([maps[c].numpy() for c, _ in channels], channels, title, Path(out))
    return {
        "layer": name,
        "shape": list(maps.shape),
        "channels": [{"channel": c, "mean": round(m, 6)} for c, m in channels],
        "out": str(out),
        "description": f"{title} ({maps.shape[1]}x{maps.shape[2]} each), drawn to {out}",
    }


def first_conv(model: nn.Module, architecture: str) -> tuple[str, nn.Conv2d]:
    """The registry's first convolution of the model (``ModelInfo.first_conv``)."""
    name = model_info(architecture).first_conv
    if name is None:
        raise CnnlabError(f"{architecture} names no first convolution in the registry")
    module = model.get_submodule(name)
    if not isinstance(module, nn.Conv2d):
        raise CnnlabError(f"{architecture}'s first convolution {name} is not a Conv2d")
    return name, module


def filters_file(
    run_dir: str | Path, out: str | Path = "filters.png", device: str = "auto"
) -> dict:
    """Draw the first convolution's kernels as image tiles into ``out``, trained beside
    initial when the run kept its initial weights."""
    run = load_run(run_dir, device, fast=False)
    name, conv = first_conv(run.model, run.meta.architecture)
    trained = conv.weight.detach().float().cpu()
    initial = initial_kernels(Path(run_dir), name)
    from cnnlab.explain_plots import plot_filters

    panels = [("trained", trained)]
    if initial is not None:
        panels.insert(0, ("initial", initial))
    title = f"{run.meta.architecture} {name}: {trained.shape[0]} kernels of {trained.shape[1]}x"
    title += f"{trained.shape[2]}x{trained.shape[3]}"
    plot_filters(panels, title, Path(out))
    drawn = " and ".join(label for label, _ in panels)
    return {
        "layer": name,
        "shape": list(trained.shape),
        "initial": initial is not None,
        "out": str(out),
        "description": f"{title}, {drawn}, drawn to {out}",
    }


def initial_kernels(run_dir: Path, name: str) -> torch.Tensor | None:
    """The first convolution's weights before training, where the run kept them."""
    file = run_dir / INITIAL_WEIGHTS
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    weights = load_file(str(file))
    return weights.get(f"{name}.weight")
