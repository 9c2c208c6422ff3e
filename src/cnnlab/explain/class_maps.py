"""A classifier's or a segmenter's evidence, one map per image: where the evidence for a
class lies (the predicted one by default; a segmenter's over the region its mask gives the
class), over the model's view of the image (a classifier's centre crop, a segmenter's
whole image)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cnnlab.attribution import maps as attribution
from cnnlab.explain.inputs import View, class_index, model_input, resolve_layer
from cnnlab.runs import Run


@dataclass
class Explanation:
    """One image's map and what it says."""

    file: str | None
    method: str
    layer: str
    class_name: str
    probability: float  # the class's probability (a segmenter's: mean over its region)
    map: Tensor  # (H, W) in [0, 1] over the model's input
    image: Tensor  # uint8 (C, H, W) as read
    view: View
    seconds: float

    def to_dict(self) -> dict:
        peak = self.view.peak(self.map)
        return {
            "file": self.file,
            "method": self.method,
            "layer": self.layer,
            "class": self.class_name,
            "probability": round(self.probability, 6),
            "peak_xy": None if peak is None else [round(v, 2) for v in peak],
            "top10_share": round(attribution.top_share(self.map), 4),
            "map_shape": list(self.map.shape),
            "view_box": [round(v, 2) for v in self.view.box],
            "seconds": round(self.seconds, 4),
        }


def target_for(run: Run, x: Tensor, index: int | None) -> tuple[attribution.Target, int, float]:
    """(the scalar to explain, its class, the class's probability) for one input."""
    with torch.no_grad():
        logits = run.model(x).float()
    if run.task.name == "classify":
        probs = logits.softmax(dim=1)[0]
        index = int(probs.argmax()) if index is None else index
        return attribution.class_score(index), index, float(probs[index])
    # A segmenter: the class's logits summed over the region the mask gives it (its largest
    # class other than the first, background, when none is named).
    predicted = logits.argmax(dim=1)[0]  # (H, W)
    if index is None:
        counts = torch.bincount(predicted.flatten(), minlength=logits.shape[1])
        counts[0] = 0 if counts[1:].sum() > 0 else counts[0]
        index = int(counts.argmax())
    region = (predicted == index).float()
    if region.sum() == 0:
        region = torch.ones_like(region)  # no pixel of the class: the whole image
    probs = logits.softmax(dim=1)[0, index]
    probability = float((probs * region).sum() / region.sum())
    chosen = index

    def region_score(output: Tensor) -> Tensor:
        return (output[:, chosen] * region.to(output.device)).sum(dim=(1, 2)) / region.sum()

    return region_score, index, probability


def explain_classes(
    run: Run,
    images: Sequence[Tensor],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    files: Sequence[str | None] | None = None,
) -> list[Explanation]:
    """A classification or segmentation run's ``method`` map of each uint8 image
    (in_channels, H, W) for ``class_name`` (default: the predicted class) at ``layer``
    (default: ``default_layer``)."""
    wanted = class_index(run, class_name)
    found = []
    name = None
    for i, image in enumerate(images):
        x = model_input(run, image)
        name = name or resolve_layer(run, layer, x)
        start = time.perf_counter()
        target, index, probability = target_for(run, x, wanted)
        heat = attribution.attribute(run.model, x, target, method, name)[0].cpu()
        seconds = time.perf_counter() - start
        view = View.of(run, *image.shape[-2:])
        file = files[i] if files is not None else None
        found.append(
            Explanation(
                file, method, name, run.classes[index], probability, heat, image, view, seconds
            )
        )
    return found


def draw(result: Explanation, out: Path) -> None:
    """The map over the image (its view box), with a colour bar and the peak marked."""
    from cnnlab.explain_plots import plot_attribution

    title = f"{result.method} at {result.layer}: {result.class_name} (p={result.probability:.2f})"
    if float(result.map.max()) <= 0:
        title += " (map all zero)"
    plot_attribution(
        result.image, result.map.numpy(), result.view.box, result.view.peak(result.map), title, out
    )
