"""The one way a head (FCN, YOLOv1, Faster R-CNN) taps a zoo classifier's features.

``backbone(name, reductions)`` builds the classifier and cuts it after the last module of
its ``feature_info`` at each requested reduction (timm's ``features_only``): the forward
pass is traced with torch.fx, its outputs become the tapped maps and everything after the
deepest one (the rest of the trunk, the classifier head, auxiliary heads) is removed, so
it costs nothing and has no parameters. Modules keep their names, so a backbone's
state_dict keys are the classifier's and its weight files load.

torchvision's ``create_feature_extractor`` does the same, but addresses modules by graph
node names, which rename ``conv2d_00``-style modules (the ConvNet's); here modules are
matched by their own qualified names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.builder import build_model
from cnnlab.registry import lookup


def backbone(
    name: str,
    reductions: Sequence[int],
    in_channels: int = 3,
    weights: str | Path | None = None,
    args: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """The zoo classifier ``name`` as a feature extractor.

    Returns (module mapping (B, C, H, W) to ``{"0": map_0, "1": map_1, ...}``, one map per
    entry of ``reductions`` in that order, and the ``feature_info`` entry of each map).
    The module has ``min_input_size`` (the classifier's), ``out_channels`` (of map 0) and
    ``feature_modules`` (the names, inside it, of the modules whose outputs are the maps).
    """
    # One class: the head is cut off anyway, and VGG's would cost 100M parameters.
    model = build_model(
        lookup(name), num_classes=1, in_channels=in_channels, weights=weights, **(args or {})
    )
    info = getattr(model, "feature_info", None)
    if not info:
        raise CnnlabError(f"backbone {name} has no feature_info; pick a zoo classifier")
    by_reduction = {entry["reduction"]: entry for entry in info}  # the last at each stride
    missing = [r for r in reductions if r not in by_reduction]
    if missing:
        have = sorted(by_reduction)
        raise CnnlabError(f"backbone {name} has no stride-{missing[0]} stage (its strides: {have})")
    taps = [by_reduction[r] for r in reductions]
    body = _cut(model, [tap["module"] for tap in taps], name)
    body.min_input_size = model.min_input_size
    body.out_channels = taps[0]["num_chs"]
    body.feature_modules = tuple(tap["module"] for tap in taps)
    return body, taps


class _TapTracer(torch.fx.Tracer):
    """Traces through containers as usual, but keeps each tapped module as one call (a
    stage like ResNet's ``layer3`` would otherwise dissolve into its blocks)."""

    def __init__(self, taps: set[str]) -> None:
        super().__init__()
        self.taps = taps

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.taps or super().is_leaf_module(module, qualified_name)


def _cut(model: nn.Module, modules: list[str], name: str) -> torch.fx.GraphModule:
    """A GraphModule returning ``{"0": output of modules[0], ...}`` and nothing more."""
    training = model.training
    model.eval()  # trace the inference path (GoogLeNet's auxiliary heads are training-only)
    try:
        graph = _TapTracer(set(modules)).trace(model)
    except Exception as error:  # data-dependent Python control flow cannot be traced
        raise CnnlabError(f"backbone {name} cannot be traced for its features: {error}") from None
    finally:
        model.train(training)
    body = torch.fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Features")
    calls = {node.target: node for node in graph.nodes if node.op == "call_module"}
    outputs = {}
    for index, module in enumerate(modules):
        if module not in calls:
            raise CnnlabError(f"backbone {name}: feature module {module!r} is never called")
        outputs[str(index)] = calls[module]
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (outputs,)
    graph.eliminate_dead_code()
    graph.lint()
    body.recompile()
    body.delete_all_unused_submodules()
    body.train(training)
    return body
