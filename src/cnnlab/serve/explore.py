"""What ``cnnlab explore`` shows of a network for an image: what the model sees, one
layer's feature maps, and, for a classifier run, its top classes and the Grad-CAM of one
class at a layer (``Explored``: a ``explore_network.Network`` with weights).

``Explored.of_spec`` takes any model ``cnnlab summary`` takes (a registered name,
``torchvision:name``, ``file.py:Name``) and ``Explored.of_run`` a run folder.

Feature maps are computed for one layer at a time, when asked, by a forward pass that
stops at that layer; weights are the run's, or for a bare model a fixed random
initialisation (seed 0), so the maps show what the architecture computes before training.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as tvf

from cnnlab.errors import CnnlabError
from cnnlab.inspect.summary import summarize
from cnnlab.inspect.tracker import tensors_in
from cnnlab.serve.explore_network import BadRequest, Network, block_levels, trace_summary
from cnnlab.serve.served import png_data_url

SAMPLES = ("digit", "china", "flower")  # built-in images: scikit-learn ships all three
MAX_SHOWN = 256  # feature maps one request may ask for
DEFAULT_SHOWN = 32
MAX_SIDE = 1024  # the largest input side a request may name
SEED = 0  # the random initialisation of a bare model (its maps are reproducible)


class UnknownModel(CnnlabError):
    """A model name nobody knows (a 404 on the API)."""


@functools.lru_cache(maxsize=len(SAMPLES))
def sample_image(name: str) -> Tensor:
    """A built-in image as uint8 (C, H, W): ``digit`` (scikit-learn's first handwritten
    digit, upscaled to 64x64) or ``china`` / ``flower`` (its two photographs)."""
    if name == "digit":
        from cnnlab.data.digits import digit_images

        digit = digit_images(8)[0][0]  # at its own 8x8: upscaling all 1,797 takes a second
        return tvf.resize_image(digit, [64, 64], tvf.InterpolationMode.BICUBIC)
    if name in ("china", "flower"):
        from cnnlab.data.images import read_image

        # The JPEG load_sample_image reads, found without importing scikit-learn (seconds
        # on a busy machine), read by cnnlab's reader.
        package = importlib.util.find_spec("sklearn")
        if package is None or not package.submodule_search_locations:
            raise CnnlabError("the sample photographs come with scikit-learn, not installed")
        folder = Path(package.submodule_search_locations[0]) / "datasets" / "images"
        return read_image(folder / f"{name}.jpg", 3)
    raise BadRequest(f"no sample image {name!r}; the samples are {', '.join(SAMPLES)}")


class _Stop(Exception):
    """Raised by a hook once the wanted layer's output is captured: the rest of the forward
    pass is not needed."""


@dataclass
class Explored(Network):
    """One explored network, and (once maps are asked for) a model with weights."""

    # The model with weights, on the CPU: called once, when maps are asked (None for a run,
    # whose model has its weights already).
    build: Callable[[], nn.Module] | None = None
    _model: nn.Module | None = field(default=None, repr=False)
    _preparing: bool = field(default=False, repr=False)
    _built: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # One forward pass at a time: each hooks the shared model.
    _running: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of_spec(cls, spec: str, input_size: tuple[int, int, int] | None = None) -> Explored:
        """A model as ``cnnlab summary`` takes it (UnknownModel for a name nobody knows)."""
        from cnnlab.inspect.specs import build_model, summarize_spec

        check_known(spec)
        model, summary, size = summarize_spec(spec, {}, input_size)
        traced = trace_summary(model, summary, size)
        if next(model.parameters(), torch.zeros(0)).device.type != "meta":
            built = model  # the user's code ran on the CPU: it has weights already

            def build() -> nn.Module:
                return built
        else:

            def build() -> nn.Module:
                torch.manual_seed(SEED)
                return build_model(spec, {}, size)[0]

        return cls(spec, size, summary, traced, block_levels(model), model, build=build)

    @classmethod
    def of_run(cls, run_dir: str | Path, label: str | None = None) -> Explored:
        """A run folder, with its trained weights (loaded as trained: BatchNorm unfolded)."""
        from cnnlab.runs import load_run

        run = load_run(run_dir, "cpu", fast=False)
        task = run.task
        size = (task.in_channels, task.img_size, task.img_size)
        summary = summarize(run.model, size)
        traced = trace_summary(run.model, summary, size)
        blocks = block_levels(run.model)
        explored = cls(label or str(run_dir), size, summary, traced, blocks, run.model, run)
        explored._model = run.model
        return explored

    # ---- images and maps -----------------------------------------------------------------

    def model(self) -> nn.Module:
        """The model with weights (built on first use)."""
        with self._built:
            if self._model is None:
                self._model = self.build().eval()
            return self._model

    def prepare(self) -> None:
        """Build the model with weights, and read the sample images, in the background, so
        that the first layer opened waits for neither (a random ResNet-50 takes a second to
        initialise; the samples come from scikit-learn, a second to import)."""

        def ready() -> None:
            for name in SAMPLES:
                sample_image(name)
            self.model()

        with self._built:
            if self._model is not None or self._preparing:
                return
            self._preparing = True
        threading.Thread(target=ready, daemon=True).start()

    def view(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(what the model sees as uint8 (C, H, W) at its input size, the model's input
        (1, C, H, W)): the shorter side resized to the input's, the centre cropped (as a
        classifier run's evaluation does), then the run's normalisation (a bare model:
        ImageNet's for colour, 0.5 for grey)."""
        from cnnlab.data.images import to_channels
        from cnnlab.data.transforms import default_stats

        channels, height, width = self.input_size
        image = to_channels(image, channels)
        seen = tvf.resize_image(image, [min(height, width)], antialias=True)
        seen = tvf.center_crop_image(seen, [height, width])
        if self.run is not None and self.run.task.name == "classify":
            from cnnlab.explain.inputs import model_input

            return seen, model_input(self.run, image).cpu()
        mean, std = default_stats(channels)
        x = tvf.normalize_image(tvf.to_dtype_image(seen, torch.float32, scale=True), mean, std)
        return seen, x[None]

    def output(self, index: int, x: Tensor) -> Tensor:
        """Row ``index``'s output for input ``x``: the forward pass stops there."""
        row = self.row(index)
        model = self.model()
        wanted = sum(1 for other in self.summary.layers[:index] if other.name == row.name)
        modules = dict(model.named_modules())
        module = modules.get(row.name) or (model if row.name == type(model).__name__ else None)
        if module is None:
            raise BadRequest(f"layer {index} ({row.name}) is no module of the model")
        captured: list[Tensor] = []
        calls = [0]

        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            if calls[0] == wanted:
                captured.append(next(tensors_in(output)).detach().clone())
                raise _Stop
            calls[0] += 1

        with self._running:
            handle = module.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    model(x)
            except _Stop:
                pass
            finally:
                handle.remove()
        if not captured:
            raise BadRequest(f"layer {index} ({row.name}) did not run for this input")
        return captured[0]

    def maps(self, index: int, image: Tensor, count: int = DEFAULT_SHOWN) -> dict:
        """Row ``index``'s feature maps for ``image``: its ``count`` most active channels (by
        mean activation), each a grey PNG at the map's own size, scaled from its own
        minimum (black) to maximum (white)."""
        row = self.row(index)
        if not self.is_spatial(index):
            raise BadRequest(
                f"layer {index} ({row.name}) outputs {row.output_shape}, not maps (C, H, W)"
            )
        start = time.perf_counter()
        _, x = self.view(image)
        maps = self.output(index, x)[0].float()  # (C, h, w)
        means = maps.mean(dim=(1, 2))
        order = means.argsort(descending=True)[: min(count, maps.shape[0])]
        low = maps.amin(dim=(1, 2))
        high = maps.amax(dim=(1, 2))
        channels = []
        for c in order.tolist():
            scale = (high[c] - low[c]).clamp_min(1e-12)
            grey = ((maps[c] - low[c]) / scale * 255).round().to(torch.uint8)[None]
            channels.append(
                {
                    "channel": c,
                    "mean": round(float(means[c]), 6),
                    "min": round(float(low[c]), 6),
                    "max": round(float(high[c]), 6),
                    "png": _png(grey),
                }
            )
        return {
            "layer": index,
            "name": row.name,
            "shape": list(maps.shape),
            "channels": channels,
            "seconds": round(time.perf_counter() - start, 4),
        }

    def input_view(self, image: Tensor) -> dict:
        """What the model sees of ``image``, as a PNG at the input's size."""
        seen, _ = self.view(image)
        return {"size": list(seen.shape), "png": _png(seen)}

    # ---- a classifier run's answer --------------------------------------------------------

    def classifier(self) -> Any:
        if self.run is None or self.run.task.name != "classify":
            raise BadRequest(f"{self.spec} is no classifier run: it has no classes to show")
        return self.run

    def top_classes(self, image: Tensor, count: int = 5) -> list[dict]:
        """The run's ``count`` most probable classes for ``image``."""
        run = self.classifier()
        _, x = self.view(image)
        model = self.model()
        with torch.no_grad(), self._running:
            probs = model(x.to(run.device)).float().softmax(dim=1)[0]
        best = probs.argsort(descending=True)[: min(count, len(probs))]
        return [{"class": run.classes[i], "prob": round(float(probs[i]), 6)} for i in best.tolist()]

    def gradcam(self, index: int, image: Tensor, class_name: str | None) -> dict:
        """The Grad-CAM of ``class_name`` (default: the predicted one) at row ``index``'s
        module, over what the model sees (``cnnlab explain``'s document, with ``map_png``)."""
        from cnnlab.explain.predictions import explain

        run = self.classifier()
        row = self.row(index)
        if not self.is_spatial(index):
            raise BadRequest(f"layer {index} ({row.name}) has no maps: Grad-CAM needs one")
        if class_name is not None and class_name not in run.classes:
            raise BadRequest(f"unknown class {class_name!r}; the run knows {len(run.classes)}")
        with self._running:  # the CAM hooks the shared model
            (found,) = explain(run, [image], "gradcam", class_name, row.name)
        grey = (found.map * 255).round().to(torch.uint8)[None]
        return {**found.to_dict(), "map_png": _png(grey)}


def check_known(spec: str) -> None:
    """UnknownModel for a registry or torchvision name that does not exist."""
    source, _, name = spec.rpartition(":")
    if not source:
        from cnnlab.models.factory import model_info

        try:
            model_info(spec)
        except CnnlabError as error:
            raise UnknownModel(str(error)) from None
    elif source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UnknownModel(f"torchvision has no model {name!r}")


def _png(image: Tensor) -> str:
    return png_data_url(image)
