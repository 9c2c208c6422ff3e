"""What ``cnnlab explore`` shows of a network: its layers with the inspector's numbers, the
blocks they sit in and the joins where branches meet, one layer's feature maps for an
image, one unit's exact receptive field, and, for a classifier run, its top classes and the
Grad-CAM of one class at a layer.

``Explored.of_spec`` takes any model ``cnnlab summary`` takes (a registered name,
``torchvision:name``, ``file.py:Name``) and ``Explored.of_run`` a run folder. The layer rows
are ``summarize``'s, so every formula reads exactly as ``cnnlab summary --format json``
prints it. One more forward pass (on the meta device where the model runs there: no
weights, no memory) follows the receptive field of every row's output with the
inspector's ``FieldTracker`` and notes every addition or concatenation of maps (ResNet's
``+ x``, DenseNet's concatenation) with the rows that produced its inputs.

The field of a unit is the inspector's exact one (``receptive_field.Axis.span``): the first
and last input pixel the unit sees along each axis, which may lie outside the input where
padding is; its centre is the middle of that span (Araujo et al., "Computing Receptive
Fields of Convolutional Neural Networks", Distill 2019).

Feature maps are computed for one layer at a time, when asked, by a forward pass that
stops at that layer; weights are the run's, or for a bare model a fixed random
initialisation (seed 0), so the maps show what the architecture computes before training.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as tvf

from cnnlab.errors import CnnlabError
from cnnlab.inspect.receptive_field import Field, FieldTracker, tensors_in
from cnnlab.inspect.summary import LayerRow, Summary, summarize
from cnnlab.serve.served import png_data_url

SAMPLES = ("digit", "china", "flower")  # built-in images: scikit-learn ships all three
MAX_SHOWN = 256  # feature maps one request may ask for
DEFAULT_SHOWN = 32
MAX_SIDE = 1024  # the largest input side a request may name
SEED = 0  # the random initialisation of a bare model (its maps are reproducible)


class UnknownModel(CnnlabError):
    """A model name nobody knows (a 404 on the API)."""


class BadRequest(CnnlabError):
    """A layer, unit, class or image the explored model has not (a 400 on the API)."""


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


def parse_size(text: str) -> tuple[int, int, int]:
    """``C,H,W`` (or ``CxHxW``): 1 or 3 channels, sides from 1 to ``MAX_SIDE``."""
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or size[0] not in (1, 3) or not all(1 <= s <= MAX_SIDE for s in size[1:]):
        raise BadRequest(
            f"input {text!r}: expected C,H,W with C 1 or 3 and sides 1 to {MAX_SIDE} (3,224,224)"
        )
    return size  # type: ignore[return-value]


def is_container_only(module: nn.Module) -> bool:
    """A module without a forward of its own (a plain ModuleList or ModuleDict) only holds
    others: it is no level of ``cnnlab summary --depth`` (summary.py counts levels alike)."""
    return type(module).forward is nn.Module.forward


def block_levels(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Every module that is a level of ``--depth``: name -> (class name, its depth; the
    model's children are depth 1)."""
    levels: dict[str, int] = {"": 0}
    found = {}
    for name, module in model.named_modules():
        if not name:
            continue
        parent = levels[name.rpartition(".")[0]]
        if is_container_only(module):
            levels[name] = parent
            continue
        levels[name] = parent + 1
        found[name] = (type(module).__name__, parent + 1)
    return found


@dataclass
class Traced:
    """What the second forward pass found: each row's output field, and the joins."""

    fields: list[Field | None]
    joins: list[dict]


def trace(model: nn.Module, rows: list[LayerRow], x: Tensor) -> Traced:
    """Follow ``x`` through ``model``: the receptive field of each row's output (rows
    matched by module name and call count, as ``summarize`` makes them) and each add or
    concatenation of maps, with the block whose forward made it, the row after which it
    happens and the rows whose outputs it joins (-1: the input; None: a tensor no row
    produced, e.g. a functional operation's)."""
    index_of: dict[tuple[str, int], int] = {}
    seen: Counter[str] = Counter()
    for i, row in enumerate(rows):
        index_of[(row.name, seen[row.name])] = i
        seen[row.name] += 1
    fields: list[Field | None] = [None] * len(rows)
    joins: list[dict] = []
    producer: dict[int, tuple[weakref.ref, int]] = {}
    calls: Counter[str] = Counter()
    stack: list[str] = []
    done = [-1]  # the last row whose output is known

    def made_by(tensor: Tensor) -> int | None:
        entry = producer.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def on_merge(name: str, inputs: list[Tensor], output: Tensor) -> None:
        if output.dim() < 3:
            return
        joins.append(
            {
                "kind": "concat" if name in ("cat", "concat", "concatenate") else "add",
                "block": stack[-1] if stack else "",
                "after": done[0],
                "from": [made_by(t) for t in inputs],
                "inputs": [list(t.shape[1:]) for t in inputs],
                "output": list(output.shape[1:]),
            }
        )

    tracker = FieldTracker(lambda _macs: None, on_merge)
    handles = []
    for name, module in model.named_modules():
        label = name or type(module).__name__

        def enter(_m: nn.Module, _args: Any, label: str = label) -> None:
            stack.append(label)

        def leave(_m: nn.Module, _args: Any, output: Any, label: str = label) -> None:
            stack.pop()
            i = index_of.get((label, calls[label]))
            calls[label] += 1
            tensor = next(tensors_in(output), None)
            if i is None or tensor is None:
                return
            fields[i] = tracker.field(tensor)
            producer[id(tensor)] = (weakref.ref(tensor), i)
            done[0] = max(done[0], i)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        producer[id(x)] = (weakref.ref(x), -1)
        with torch.no_grad(), tracker:
            tracker.start(x)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return Traced(fields, joins)


class _Stop(Exception):
    """Raised by a hook once the wanted layer's output is captured: the rest of the forward
    pass is not needed."""


@dataclass
class Explored:
    """One explored network: its summary rows, blocks, joins and fields, and (once maps are
    asked for) a model with weights."""

    spec: str
    input_size: tuple[int, int, int]
    summary: Summary
    traced: Traced
    blocks: dict[str, tuple[str, int]]
    structure: nn.Module  # the model as summarised (on the meta device: no weights)
    build: Any  # () -> nn.Module with weights, on the CPU (called once, when maps are asked)
    run: Any = None  # a cnnlab.runs.Run for a run folder
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
        traced = _trace_anywhere(model, summary, size)
        blocks = block_levels(model)
        if next(model.parameters(), torch.zeros(0)).device.type != "meta":
            built = model  # the user's code ran on the CPU: it has weights already

            def build() -> nn.Module:
                return built
        else:

            def build() -> nn.Module:
                torch.manual_seed(SEED)
                return build_model(spec, {}, size)[0]

        return cls(spec, size, summary, traced, blocks, model, build)

    @classmethod
    def of_run(cls, run_dir: str | Path, label: str | None = None) -> Explored:
        """A run folder, with its trained weights (loaded as trained: BatchNorm unfolded)."""
        from cnnlab.runs import load_run

        run = load_run(run_dir, "cpu", fast=False)
        task = run.task
        size = (task.in_channels, task.img_size, task.img_size)
        summary = summarize(run.model, size)
        traced = _trace_anywhere(run.model, summary, size)
        explored = cls(
            label or str(run_dir),
            size,
            summary,
            traced,
            block_levels(run.model),
            run.model,
            None,
            run,
        )
        explored._model = run.model
        return explored

    # ---- the layers ----------------------------------------------------------------------

    def document(self) -> dict:
        """``cnnlab summary --format json``'s document, each layer with ``index``,
        ``blocks`` (the containers it sits in, outermost first), running totals and
        ``spatial``; and ``blocks`` (name -> type, depth, first and last row), ``joins``,
        the classes of a run."""
        document = self.summary.to_dict(self.spec)
        params = macs = 0
        spans: dict[str, list[int]] = {}
        for i, (layer, row) in enumerate(zip(document["layers"], self.summary.layers, strict=True)):
            params += row.params
            macs += row.macs
            inside = [name for name in _prefixes(row.name) if name in self.blocks]
            for name in inside:
                spans.setdefault(name, [i, i])[1] = i
            layer.update(
                index=i,
                blocks=inside,
                params_so_far=params,
                macs_so_far=macs,
                spatial=self.is_spatial(i),
            )
        document["blocks"] = {
            name: {"type": self.blocks[name][0], "depth": self.blocks[name][1], "rows": span}
            for name, span in spans.items()
        }
        document["joins"] = self.traced.joins
        document["classes"] = list(self.run.classes) if self.run is not None else None
        document["task"] = self.run.task.name if self.run is not None else None
        return document

    def row(self, index: int) -> LayerRow:
        if not 0 <= index < len(self.summary.layers):
            raise BadRequest(
                f"layer {index}: {self.spec} has layers 0 to {len(self.summary.layers) - 1}"
            )
        return self.summary.layers[index]

    def is_spatial(self, index: int) -> bool:
        shape = self.summary.layers[index].output_shape
        return len(shape) == 3 and self.traced.fields[index] is not None

    # ---- one unit's field -----------------------------------------------------------------

    def unit_field(self, index: int, y: int, x: int) -> dict:
        """The input pixels unit (y, x) of row ``index``'s output sees: ``box`` [x0, y0,
        x1, y1] (first and last pixel, inclusive; outside the input where padding is),
        ``inside`` the same box clipped to the input, ``centre`` [x, y], and ``chain``, the
        rows before it where the field grows, with their sizes."""
        row = self.row(index)
        found = self.traced.fields[index]
        if found is None or len(row.output_shape) != 3 or len(found.axes) != 2:
            raise BadRequest(f"layer {index} ({row.name}) has no spatial output: no units to pick")
        _, height, width = row.output_shape
        if not (0 <= y < height and 0 <= x < width):
            raise BadRequest(f"unit (y {y}, x {x}) is outside layer {index}'s {height}x{width} map")
        y0, y1 = found.axes[0].span(y)
        x0, x1 = found.axes[1].span(x)
        if x0 > x1 or y0 > y1:
            raise BadRequest(f"unit (y {y}, x {x}) of layer {index} sees no input pixel")
        _, in_h, in_w = self.input_size
        inside = [max(x0, 0), max(y0, 0), min(x1, in_w - 1), min(y1, in_h - 1)]
        return {
            "layer": index,
            "name": row.name,
            "unit": [y, x],
            "box": [_plain(v) for v in (x0, y0, x1, y1)],
            "inside": [_plain(v) for v in inside],
            "centre": [_plain((x0 + x1) / 2), _plain((y0 + y1) / 2)],
            "size": [_plain(x1 - x0 + 1), _plain(y1 - y0 + 1)],
            "jump": [_plain(found.axes[1].jump), _plain(found.axes[0].jump)],
            "input": list(self.input_size),
            "chain": self.chain(index),
        }

    def chain(self, index: int) -> list[dict]:
        """The rows up to ``index`` where the receptive field grows (or the jump does): the
        chain of sizes that leads to its field. ``step`` says how, for a window of kernel k
        (dilated: its span) after a jump j: ``rf + (k - 1)*j``, Araujo et al.'s recurrence."""
        chain: list[dict] = []
        rf, jump = 1.0, 1.0
        modules = dict(self.structure.named_modules())
        for i in range(index + 1):
            row = self.summary.layers[i]
            if row.rf is None or row.jump is None or (row.rf <= rf and row.jump <= jump):
                continue
            step = f"{_plain(rf)} -> {_plain(row.rf)}"
            kernel = _kernel_span(modules.get(row.name))
            if kernel is not None and rf + (kernel - 1) * jump == row.rf:
                step = f"{_plain(rf)} + ({kernel} - 1)*{_plain(jump)} = {_plain(row.rf)}"
            chain.append(
                {
                    "layer": i,
                    "name": row.name,
                    "type": row.type,
                    "output": row.output_shape,
                    "rf": _plain(row.rf),
                    "jump": _plain(row.jump),
                    "step": step,
                }
            )
            rf, jump = max(rf, row.rf), max(jump, row.jump)
        return chain

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

    def activation_bytes(self) -> int:
        """An upper bound of a forward pass's activations (every row's output kept)."""
        elements = sum(math.prod(row.output_shape) for row in self.summary.layers)
        return 4 * (elements + math.prod(self.input_size))


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


def _trace_anywhere(model: nn.Module, summary: Summary, size: tuple[int, int, int]) -> Traced:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *size, device=device, dtype=dtype)
    return trace(model, summary.layers, x)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _kernel_span(module: nn.Module | None) -> int | None:
    """The input span of a convolution's or pooling's window along its larger axis."""
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return None
    sizes = kernel if isinstance(kernel, tuple) else (kernel,)
    dilation = getattr(module, "dilation", 1)
    dilations = dilation if isinstance(dilation, tuple) else (dilation,) * len(sizes)
    return max(d * (k - 1) + 1 for k, d in zip(sizes, dilations, strict=False))


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 4)


def _png(image: Tensor) -> str:
    return png_data_url(image)
