"""The runs a server holds: each loaded once (``load_run``), known to clients by an id made
from its folder name, never by a path; and what one batch of uploads gets back.

A prediction is the document ``cnnlab predict --format json`` prints for one image (with
``file`` the uploaded file's name), plus what a page needs to draw it: a segmentation's
class-index mask as a PNG data URL, a classification's heat maps (``cnnlab.heatmap``) of
its top classes when asked for.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.data.images import BadImageError, decode_bytes, to_channels
from cnnlab.dense_to_conv import FullyConvolutional
from cnnlab.draw import box_colour, hex_colour, mask_colour
from cnnlab.errors import CnnlabError
from cnnlab.files import read_json
from cnnlab.runs import Run, load_run

FIGURES = ("curves", "confusion", "errors")  # RUN/NAME.png a client may fetch by run id
# Heat maps are computed on at most (HEATMAP_SIDE x the training size) squared pixels.
HEATMAP_SIDE = 8


@dataclass(frozen=True)
class Upload:
    """One image a client sent: its bytes and the name it gave (not a path)."""

    name: str
    data: bytes


@dataclass
class Served:
    """One run behind the server."""

    id: str
    run: Run
    info: dict  # its GET /api/runs entry
    _maps_model: FullyConvolutional | None = field(default=None, repr=False)
    _maps_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def figure(self, name: str) -> Path | None:
        """RUN/NAME.png when NAME is one of ``FIGURES`` and the file is there."""
        path = self.run.path / f"{name}.png"
        return path if name in FIGURES and path.is_file() else None

    def predict(self, uploads: Sequence[Upload], options: dict) -> list[dict | Exception]:
        """One response document, or the exception to answer with, per upload. Images are
        decoded by cnnlab's guarded reader and predicted together; a batch the model
        refuses is retried one image at a time, so one bad image fails only its request."""
        answers: list[dict | Exception] = [{} for _ in uploads]
        images: dict[int, torch.Tensor] = {}  # by upload, the readable ones
        for i, upload in enumerate(uploads):
            try:
                image = decode_bytes(upload.data, upload.name)[0]
                images[i] = to_channels(image, self.run.task.in_channels)
            except BadImageError as error:
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
        return answers

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
        from cnnlab.explain import explain

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


def load_served(paths: Sequence[str | Path], device: str = "auto") -> dict[str, Served]:
    """Every run folder of ``paths`` loaded, by id (the folder's name, made URL-safe and
    unique: runs/a/demo and runs/b/demo become ``demo`` and ``demo-2``)."""
    served: dict[str, Served] = {}
    seen: dict[Path, str] = {}
    for path in map(Path, paths):
        where = path.resolve()
        if where in seen:
            raise CnnlabError(f"{path}: given twice (as {seen[where]})")
        run = load_run(path, device)
        run_id = unique_id(slug(where.name), served)
        seen[where] = str(path)
        served[run_id] = Served(run_id, run, describe(run_id, run))
    return served


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
            if (run.path / f"{name}.png").is_file()
        },
    }


def colours(task: str, count: int) -> list[str | None]:
    """The CSS colour ``cnnlab.draw`` gives each class: its box colour (detection), its mask
    tint (segmentation; the background, class 0, is not tinted), none for classification."""
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
