"""The runs a server holds: each loaded once (``load_run``), known to clients by an id made
from its folder name, never by a path; and what one batch of uploads gets back.

A prediction is the document ``cnnlab predict --format json`` prints for one image (with
``file`` the uploaded file's name), plus what a page needs to draw it: a segmentation's
class-index mask as a PNG data URL, a classification's heat maps (``cnnlab.heatmap``) of
its top classes when asked for.

Nothing outside a run folder is served: a figure is the folder's own file once symlinks
are resolved. An image whose prediction would need more memory than the server's limit
is refused (``TooLargeToPredict``) before the model sees it: each run's need is estimated
once at load (``PredictionMemory``), from forward passes on PyTorch's meta device.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException, UploadFile
from torch import nn

from cnnlab.data.images import BadImageError, decode_bytes, encoded_size, to_channels
from cnnlab.dense_to_conv import FullyConvolutional
from cnnlab.draw import box_colour, hex_colour, mask_colour
from cnnlab.errors import CnnlabError
from cnnlab.files import read_json
from cnnlab.inspect.memory import StorageTracker
from cnnlab.runs import Run, load_run

# RUN/NAME.png a client may fetch by run id (per_class: a multi-label run's, for confusion)
FIGURES = ("curves", "confusion", "per_class", "errors")
# Heat maps are computed on at most (HEATMAP_SIDE x the training size) squared pixels.
HEATMAP_SIDE = 8
# Bytes per pixel and channel around the model: the decoded image and its copy in the
# run's channels (uint8), the float input and its normalised copy.
IMAGE_BYTES = 1 + 1 + 4 + 4
# Bytes per pixel of a per-pixel answer (segmentation): argmax's int64 index, its uint8
# mask, the int64 copy that counts the classes, the PNG sent back.
PER_PIXEL_ANSWER = 8 + 1 + 8 + 1


class TooLargeToPredict(CnnlabError):
    """An image whose prediction would need more memory than the server allows."""


@dataclass(frozen=True)
class PredictionMemory:
    """The bytes one prediction of a run needs: ``fixed`` plus ``per_pixel`` for each pixel
    of the image; ``whole`` when the model runs on the image at its own size (segmentation)
    rather than resized to the training size."""

    fixed: int
    per_pixel: float
    whole: bool

    def need(self, height: int, width: int) -> int:
        return int(self.fixed + self.per_pixel * height * width)


def prediction_memory(run: Run) -> PredictionMemory:
    """How a prediction's memory grows with the image: the model's forward peak (its
    activations, not its weights) on the meta device at the training size and at twice
    it, a straight line between them (a fully convolutional model's activations grow with
    the pixels), and the image's own copies. A model the meta device cannot run is counted
    by its image copies alone."""
    task = run.task
    channels, side = task.in_channels, task.img_size
    probe = torch.zeros(channels, side + 5, side + 3, dtype=torch.uint8)
    preprocess = getattr(task, "preprocess", None)
    whole = preprocess is not None and preprocess(probe).shape[-2:] == probe.shape[-2:]
    image = channels * IMAGE_BYTES + (PER_PIXEL_ANSWER if whole else 0)
    try:
        meta = copy.deepcopy(run.model).to("meta").eval()
        small = forward_peak(meta, channels, side)
        if not whole:
            return PredictionMemory(small, image, whole)
        large = forward_peak(meta, channels, 2 * side)
    except Exception:  # an operation with no meta kernel: the image copies are still known
        return PredictionMemory(0, image, whole)
    slope = max(0.0, (large - small) / (3 * side * side))
    return PredictionMemory(max(0, int(small - slope * side * side)), slope + image, whole)


def forward_peak(meta_model: nn.Module, channels: int, side: int) -> int:
    """The peak bytes of the tensors a forward pass of ``meta_model`` (on the meta device:
    nothing is allocated) keeps alive at once on one side x side image, its input included."""
    dtype = next((p.dtype for p in meta_model.parameters()), torch.get_default_dtype())
    x = torch.zeros(1, channels, side, side, device="meta", dtype=dtype)
    tracker = StorageTracker()
    tracker.add(x)
    tracker.reset_peak(forget_sizes=False)
    with torch.no_grad(), tracker:
        meta_model(x)
    return tracker.peak


def size_text(count: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Upload:
    """One image a client sent: its bytes and the name it gave (not a path)."""

    name: str
    data: bytes

    @classmethod
    async def read(cls, file: UploadFile, max_upload: int) -> Upload:
        """The uploaded file's body, named by its base name: a 415 when the client says it
        is no image, a 413 past ``max_upload`` bytes (read no further than one byte over)."""
        name = Path(file.filename or "upload").name or "upload"
        kind = (file.content_type or "").split(";")[0].strip().lower()
        if kind and not kind.startswith("image/") and kind != "application/octet-stream":
            raise HTTPException(415, f"{name}: {kind} is not an image type")
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(
                413, f"{name}: larger than the upload limit of {max_upload:,} bytes"
            )
        return cls(name, data)


@dataclass
class Served:
    """One run behind the server."""

    id: str
    run: Run
    described: dict  # what it is (``describe``)
    memory: PredictionMemory
    max_memory: int | None = None  # bytes one prediction may need (None: no limit)
    _maps_model: FullyConvolutional | None = field(default=None, repr=False)
    _maps_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _answered: bool = field(default=False, repr=False)

    @property
    def info(self) -> dict:
        """Its GET /api/runs entry: ``described`` and ``warm``, false until the run has
        answered once (and, for a classifier, built its heat-map network): the first
        prediction also warms the kernels up and takes seconds longer, which the page
        says."""
        needs_maps = self.run.task.name == "classify"
        warm = self._answered and (not needs_maps or self._maps_model is not None)
        return {**self.described, "warm": warm}

    def figure(self, name: str) -> Path | None:
        """RUN/NAME.png when NAME is one of ``FIGURES`` (``run_figure``)."""
        return run_figure(self.run.path, name)

    def predict(self, uploads: Sequence[Upload], options: dict) -> list[dict | Exception]:
        """One response document, or the exception to answer with, per upload. Images are
        decoded by cnnlab's guarded reader and predicted together; a batch the model
        refuses is retried one image at a time, so one bad image fails only its request."""
        answers: list[dict | Exception] = [{} for _ in uploads]
        images: dict[int, torch.Tensor] = {}  # by upload, the readable ones
        for i, upload in enumerate(uploads):
            try:
                with contextlib.suppress(BadImageError):  # decode_bytes says what is wrong
                    width, height = encoded_size(upload.data, upload.name)
                    self.check_memory(upload.name, height, width)  # before it is decoded
                image = decode_bytes(upload.data, upload.name)[0]
                self.check_memory(upload.name, *image.shape[-2:])
                images[i] = to_channels(image, self.run.task.in_channels)
            except (BadImageError, TooLargeToPredict) as error:
                answers[i] = error
        options = dict(options)
        heatmaps = options.pop("heatmaps", False)
        where_it_looks = options.pop("explain", False)
        results = self._results(list(images.values()), options)
        for i, result in zip(images, results, strict=True):
            if isinstance(result, Exception):
                answers[i] = result
                continue
            answer = {**_public(result), "file": uploads[i].name}  # file stays first
            if "_mask" in result:
                answer["mask_png"] = png_data_url(result["_mask"][None])
            if heatmaps:
                answer.update(self._heatmaps(images[i], [t["class"] for t in result["top"]]))
            if where_it_looks:
                answer["explain"] = self._explain(images[i], result["top"][0]["class"])
            answers[i] = answer
        self._answered = self._answered or bool(results)
        return answers

    def check_memory(self, name: str, height: int, width: int) -> None:
        """TooLargeToPredict when a ``height`` x ``width`` image needs more than
        ``max_memory``."""
        need = self.memory.need(height, width)
        if self.max_memory is None or need <= self.max_memory:
            return
        what = f"{self.run.task.name} at full size" if self.memory.whole else "predict"
        raise TooLargeToPredict(
            f"{name}: this {width}x{height} image needs ~{size_text(need)} to {what};"
            f" the server's limit is {size_text(self.max_memory)} (cnnlab serve --max-memory)"
        )

    def _results(self, images: list[torch.Tensor], options: dict) -> list[dict | Exception]:
        if not images:
            return []
        try:
            return self.run.predict(images, **options)
        except CnnlabError as error:
            if len(images) == 1:
                return [error]
        return [self._results([image], options)[0] for image in images]

    def _explain(self, image: torch.Tensor, class_name: str) -> dict:
        """The top class's Grad-CAM (``cnnlab explain``'s document) with ``map_png``, the
        map as a grey PNG data URL over ``view_box`` of the image, or ``{"error": why}``."""
        from cnnlab.explain.predictions import explain

        try:
            (found,) = explain(self.run, [image], "gradcam", class_name)
        except CnnlabError as error:  # a model with no layer to map, an image too small
            return {"error": str(error)}
        grey = (found.map * 255).round().to(torch.uint8)[None]
        return {**found.to_dict(), "map_png": png_data_url(grey)}

    def _heatmaps(self, image: torch.Tensor, classes: list[str]) -> dict:
        """``{"heatmaps": {"size": [H, W] of the image as mapped, "extent": [left, right,
        bottom, top] of the cells in those pixels, "maps": [heatmap's document per class]}}``,
        or ``{"heatmaps": None, "heatmaps_error": why}``."""
        from cnnlab.heatmap import class_maps, fully_convolutional

        try:
            with self._maps_lock:  # made once, on the first request that asks for maps
                if self._maps_model is None:
                    self._maps_model = fully_convolutional(self.run)
            bound = (HEATMAP_SIDE * self.run.task.img_size) ** 2
            maps = class_maps(self.run, image, self._maps_model, max_pixels=bound)
        except CnnlabError as error:  # a model that does not convert, an image too narrow
            return {"heatmaps": None, "heatmaps_error": str(error)}
        return {
            "heatmaps": {
                "size": list(maps.pixels.shape[-2:]),
                "extent": [round(v, 3) for v in maps.boxes.extent()],
                "maps": [maps.result(maps.index(name)) for name in classes],
            }
        }


def load_served(
    paths: Sequence[str | Path], device: str = "auto", max_memory: int | None = None
) -> dict[str, Served]:
    """Every run folder of ``paths`` loaded, by id (the folder's name, made URL-safe and
    unique: runs/a/demo and runs/b/demo become ``demo`` and ``demo-2``); a prediction may
    need ``max_memory`` bytes at most (None: no limit)."""
    served: dict[str, Served] = {}
    seen: dict[Path, str] = {}
    for path in map(Path, paths):
        where = path.resolve()
        if where in seen:
            raise CnnlabError(f"{path}: given twice (as {seen[where]})")
        run = load_run(path, device)
        run_id = unique_id(slug(where.name), served)
        seen[where] = str(path)
        info = describe(run_id, run)
        served[run_id] = Served(run_id, run, info, prediction_memory(run), max_memory)
    return served


def run_figure(folder: Path, name: str) -> Path | None:
    """FOLDER/NAME.png, resolved, when NAME is one of ``FIGURES`` and it is a file inside
    the folder: a symlink leading out of the run folder is no figure of it."""
    if name not in FIGURES:
        return None
    root = folder.resolve()
    try:
        path = (folder / f"{name}.png").resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


def slug(name: str) -> str:
    """``name`` as a URL path segment: letters, digits, ``.``, ``_`` and ``-``."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return text or "run"


def unique_id(base: str, taken: dict) -> str:
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def describe(run_id: str, run: Run) -> dict:
    """A run's GET /api/runs entry: what it is, what it costs, how it scored."""
    from cnnlab.inspect.specs import summarize_spec

    meta = run.meta
    _, summary, _ = summarize_spec(
        meta.architecture, meta.model_args, tuple(meta.input_size), depth=0
    )
    report = run.path / "report.json"
    return {
        "id": run_id,
        "name": run.path.resolve().name,
        "task": meta.task,
        "model": meta.architecture,
        "model_args": meta.model_args,
        "classes": run.classes,
        "colours": colours(meta.task, len(run.classes)),
        "input_size": list(meta.input_size),
        "parameters": summary.total_params,
        "macs": summary.total_macs,
        "flops": summary.total_flops,  # cnnlab.inspect.flops's convention: 2 per multiply-add
        "metrics": read_json(report) if report.is_file() else None,
        "figures": {
            name: f"/api/runs/{run_id}/figures/{name}.png"
            for name in FIGURES
            if run_figure(run.path, name) is not None
        },
    }


def colours(task: str, count: int) -> list[str | None]:
    """The CSS colour ``cnnlab.draw`` gives each class: its box colour (detection), its outline
    and class-map colour (segmentation; the background, class 0, has none), none for
    classification."""
    if task == "detect":
        return [hex_colour(box_colour(i)) for i in range(count)]
    if task == "segment":
        return [None, *(hex_colour(mask_colour(i)) for i in range(1, count))]
    return [None] * count


def png_data_url(image: torch.Tensor) -> str:
    """A uint8 (C, H, W) image as a ``data:image/png;base64,...`` URL."""
    from torchvision.io import encode_png

    encoded = encode_png(image.contiguous()).numpy().tobytes()
    return "data:image/png;base64," + base64.b64encode(encoded).decode("ascii")


def _public(result: dict[str, Any]) -> dict[str, Any]:
    """A prediction without its ``_`` entries (tensors), as ``cnnlab predict`` prints it."""
    return {key: value for key, value in result.items() if not key.startswith("_")}
