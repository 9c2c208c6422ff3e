"""What every explanation starts from: a run that can be explained, the layer to map
(``default_layer``), the class asked for, the model's input for an image
(``model_input``) and where that input lies in the image (``View``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from cnnlab.attribution import maps as attribution
from cnnlab.errors import CnnlabError
from cnnlab.models.factory import model_info
from cnnlab.registry import check_input_size
from cnnlab.runs import Run

TASKS = ("classify", "segment", "detect")


def default_layer(run: Run) -> str:
    """The registry's last convolutional stage of the run's model (``ModelInfo``); for a
    head on a zoo backbone whose registry layer is the backbone (a detector's), the
    backbone's deepest tapped stage (its ``feature_info`` module, e.g. ``layer3`` of a
    ResNet cut at stride 16): the backbone returns a dict of maps, not one map."""
    layer = model_info(run.meta.architecture).explain_layer
    if layer is None:
        raise CnnlabError(
            f"{run.meta.architecture} names no layer to explain by default; pass --layer"
        )
    tapped = getattr(run.model.get_submodule(layer), "feature_modules", None)
    return f"{layer}.{tapped[-1]}" if tapped else layer


@dataclass
class View:
    """Where the model's input lies in the image: (x0, y0, x1, y1) in the image's pixels."""

    box: tuple[float, float, float, float]

    @classmethod
    def of(cls, run: Run, height: int, width: int) -> View:
        if run.task.name != "classify":  # whole image (segment: own size; detect: resized)
            return cls((0.0, 0.0, float(width), float(height)))
        size = run.task.img_size  # shorter side resized to size, then a centred square crop
        short, long = sorted((height, width))
        resized_long = int(size * long / short)
        rh, rw = (size, resized_long) if height <= width else (resized_long, size)
        top, left = round((rh - size) / 2), round((rw - size) / 2)
        sy, sx = height / rh, width / rw
        return cls((left * sx, top * sy, (left + size) * sx, (top + size) * sy))

    def pixel(self, row: int, col: int, shape: Sequence[int]) -> tuple[float, float]:
        """The image (x, y) of the centre of a map cell (row, col) of a (H, W) map."""
        x0, y0, x1, y1 = self.box
        return (
            x0 + (col + 0.5) * (x1 - x0) / shape[1],
            y0 + (row + 0.5) * (y1 - y0) / shape[0],
        )

    def peak(self, heat: Tensor) -> tuple[float, float] | None:
        """The (H, W) map's peak in the image's pixels; None for an all-zero map (a CAM whose
        ReLU left nothing: no peak to point with)."""
        if float(heat.max()) <= 0:
            return None
        row, col = attribution.peak_of(heat)
        return self.pixel(row, col, heat.shape)


def check_run(run: Run) -> None:
    if run.task.name not in TASKS:
        raise CnnlabError(f"{run.path}: explain maps {', '.join(TASKS)} runs, not {run.task.name}")
    refusal = getattr(run.model, "explain_refusal", None)  # a detector that cannot be
    if refusal:
        raise CnnlabError(f"{run.path}: {run.meta.architecture} {refusal}")


def resolve_layer(run: Run, layer: str | None, x: Tensor) -> str:
    """``layer`` (default: the registry's) checked to exist and to output a map."""
    name = layer or default_layer(run)
    attribution.layer_module(run.model, name)
    attribution.check_spatial(run.model, name, x)
    return name


def class_index(run: Run, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in run.classes:
        raise CnnlabError(f"unknown class {class_name!r}; the run knows {', '.join(run.classes)}")
    return run.classes.index(class_name)


def model_input(run: Run, image: Tensor) -> Tensor:
    """(1, C, H, W) on the run's device; an image below the model's minimum size is
    refused (a classifier would enlarge it, inventing the detail it explains)."""
    height, width = image.shape[-2:]
    minimum = getattr(run.model, "min_input_size", 1)
    if min(height, width) < minimum:
        raise CnnlabError(
            f"a {width}x{height} image is below {run.meta.architecture}'s minimum size of"
            f" {minimum}x{minimum}"
        )
    x = run.task.preprocess(image)[None].to(run.device)
    check_input_size(run.model, *x.shape[-2:], "images")
    return x
