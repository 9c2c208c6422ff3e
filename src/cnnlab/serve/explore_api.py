"""The explore page's JSON API (``cnnlab explore``, and the "explore" link of every run
``cnnlab serve`` holds): the page is only a client of these routes.

``GET /api/explore`` says what can be explored (the command line's model, the served runs,
the sample images); ``GET /api/explore/layers`` a network's layers; ``POST
/api/explore/images`` takes an image (guarded as ``POST /api/predict``'s: size, arrival
time, the guarded reader, ``--max-memory``) and answers a token; ``GET
/api/explore/{view,maps,field,classes,gradcam}`` what the model sees of an image, one
layer's feature maps, one unit's receptive field, a classifier run's top classes and the
Grad-CAM of one class at one layer.

A model is named by ``model``: a served run's id, the model the command line named, or
any registered or torchvision model (``resnet50``, ``torchvision:vgg11``); a user's model
file is explored only when the command line named it (no path is taken from a request).
Unknown models and images are 404s, a model that fails to build and a layer or unit it
has not are 400s, all JSON ``{"detail": "one line"}``; the server goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from cnnlab.data.images import BadImageError, decode_bytes, encoded_size
from cnnlab.errors import CnnlabError
from cnnlab.inspect.specs import parse_input_size
from cnnlab.serve.explore import (
    DEFAULT_SHOWN,
    MAX_SHOWN,
    MAX_SIDE,
    SAMPLES,
    Explored,
    UnknownModel,
    sample_image,
)
from cnnlab.serve.served import IMAGE_BYTES, Served, Upload, size_text

IMAGES_PATH = "/api/explore/images"
KEPT_MODELS = 4  # explored networks kept built (the least recently used goes first)
KEPT_IMAGES = 16  # uploaded images kept for their token

ModelName = Annotated[
    str,
    Query(
        min_length=1,
        max_length=300,
        description="a served run's id, the model `cnnlab explore` named, or a registered"
        " or torchvision model (resnet50, torchvision:vgg11)",
    ),
]
SIDE = r"(?:[1-9][0-9]{0,2}|10[01][0-9]|102[0-4])"  # 1 to 1024 (MAX_SIDE)
InputSize = Annotated[
    str | None,
    Query(
        pattern=rf"^[13],{SIDE},{SIDE}$",
        description="C,H,W to explore a registered or torchvision model at (default: the"
        " command line's --input, else its natural size)",
    ),
]
Layer = Annotated[int, Query(ge=0, le=100000, description="a row index of GET layers")]
ImageToken = Annotated[
    str,
    Query(
        min_length=1,
        max_length=80,
        description=f"a sample ({', '.join(SAMPLES)}) or a token of POST {IMAGES_PATH}",
    ),
]


class Explorer:
    """The networks a server explores, built on first request and kept (``KEPT_MODELS``),
    and the images uploaded to it (``KEPT_IMAGES``)."""

    def __init__(
        self,
        target: str | None,
        input_size: tuple[int, int, int] | None,
        served: dict[str, Served],
        max_memory: int | None,
    ) -> None:
        self.target, self.input_size, self.served = target, input_size, served
        self.max_memory = max_memory
        self._models: OrderedDict[tuple, Explored] = OrderedDict()
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    def explored(self, model: str, input_text: str | None = None) -> Explored:
        size = parse_input_size(input_text or None, channels=(1, 3), max_side=MAX_SIDE)
        key, build = self._resolve(model, size)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one build per network, however many requests ask at once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            found = build()
            with self._lock:
                self._models[key] = found
                while len(self._models) > KEPT_MODELS:
                    self._models.popitem(last=False)
        return found

    def _resolve(
        self, model: str, size: tuple[int, int, int] | None
    ) -> tuple[tuple, Callable[[], Explored]]:
        if model in self.served:
            path = self.served[model].run.path
            return ("run", model), lambda: Explored.of_run(path, model)
        if model == self.target:
            if (Path(model) / "model.json").is_file():
                return ("run", model), lambda: Explored.of_run(model, Path(model).name)
            size = size or self.input_size
            source = model.rpartition(":")[0]
            changed = None
            if source.endswith(".py"):
                with contextlib.suppress(OSError):  # missing: building says so, in one line
                    changed = Path(source).stat().st_mtime
            # An edited model file is built again: fix it, reload the page.
            return ("model", model, size, changed), lambda: Explored.of_spec(model, size)
        source = model.rpartition(":")[0]
        if source and source != "torchvision":
            raise UnknownModel(
                f"{model}: not explored here; a model file is explored only when"
                " `cnnlab explore` names it"
            )
        return ("model", model, size, None), lambda: Explored.of_spec(model, size)

    def add_image(self, image: torch.Tensor, data: bytes) -> str:
        token = "u" + hashlib.sha256(data).hexdigest()[:24]
        with self._lock:
            self._images[token] = image
            self._images.move_to_end(token)
            while len(self._images) > KEPT_IMAGES:
                self._images.popitem(last=False)
        return token

    def image(self, token: str) -> torch.Tensor:
        if token in SAMPLES:
            return sample_image(token)
        with self._lock:
            found = self._images.get(token)
        if found is None:
            raise UnknownModel(
                f"no image {token!r}: upload it again (POST {IMAGES_PATH}) or use a sample"
            )
        return found

    def check_memory(self, explored: Explored) -> None:
        """413 when a forward pass of ``explored`` may need more than ``max_memory``."""
        need = explored.activation_bytes()
        if self.max_memory is not None and need > self.max_memory:
            raise HTTPException(
                413,
                f"{explored.spec} at {'x'.join(map(str, explored.input_size))} needs"
                f" ~{size_text(need)} for its maps; the server's limit is"
                f" {size_text(self.max_memory)} (--max-memory)",
            )


def add_explore_routes(
    app: FastAPI,
    explorer: Explorer,
    max_upload: int,
    problems: Callable[..., dict],
) -> None:
    """The routes above, on ``app`` (``problems``: the documented error answers)."""

    def answer(work: Callable[[], Any]) -> Any:
        """``work``'s result, or its failure as the status the module doc gives."""
        try:
            return work()
        except UnknownModel as error:
            raise HTTPException(404, str(error)) from None
        except (MemoryError, torch.OutOfMemoryError):
            raise HTTPException(503, "out of memory; try again", {"Retry-After": "5"}) from None
        except CnnlabError as error:  # BadRequest, or a model that fails to build or run
            raise HTTPException(400, str(error)) from None

    @app.get(
        "/api/explore",
        summary="what can be explored: the command line's model, the runs, the samples",
        responses=problems(),
    )
    def explore_index() -> dict:
        return {
            "target": explorer.target,
            "input": list(explorer.input_size) if explorer.input_size else None,
            "runs": list(explorer.served),
            "samples": list(SAMPLES),
            "max_upload": max_upload,
        }

    @app.get(
        "/api/explore/layers",
        summary="a network's layers: sizes and formulas, blocks, joins, receptive fields",
        description=(
            "`cnnlab summary --format json`'s document (its formulas are the same text),"
            " each layer with `index`, `blocks` (the containers it is in, outermost first),"
            " `params_so_far`, `macs_so_far` and `spatial`; `blocks` (name -> type, depth of"
            " `--depth`, first and last row), `joins` (each add or concatenation of maps: the"
            " block whose forward makes it, the row `after` which it happens, the rows it"
            " joins, -1 the input, null a tensor no layer made), and for a run `classes`."
        ),
        responses=problems(400, 404, 422, 503),
    )
    def layers(model: ModelName, input: InputSize = None) -> dict:
        explored = answer(lambda: explorer.explored(model, input))
        explored.prepare()  # weights made in the background while the page draws
        return explored.document()

    @app.post(
        IMAGES_PATH,
        summary="upload an image to explore with; answers its token",
        responses=problems(400, 408, 413, 415, 422, 503),
    )
    async def add_image(
        file: Annotated[UploadFile, File(description="the image (PNG, JPEG, BMP, GIF, ...)")],
    ) -> dict:
        upload = await Upload.read(file, max_upload)
        name, data = upload.name, upload.data
        try:
            width, height = encoded_size(data, name)
            need = width * height * 3 * IMAGE_BYTES
            if explorer.max_memory is not None and need > explorer.max_memory:
                raise HTTPException(
                    413,
                    f"{name}: this {width}x{height} image needs ~{size_text(need)}; the"
                    f" server's limit is {size_text(explorer.max_memory)} (--max-memory)",
                )
        except BadImageError:
            pass  # decode_bytes says what is wrong
        try:
            image = decode_bytes(data, name)[0]
        except CnnlabError as error:
            raise HTTPException(400, str(error)) from None
        token = explorer.add_image(image, data)
        channels, height, width = image.shape
        return {"image": token, "name": name, "size": [channels, height, width]}

    @app.get(
        "/api/explore/view",
        summary="what the model sees of an image: resized, centre-cropped, as a PNG",
        responses=problems(400, 404, 422, 503),
    )
    def view(model: ModelName, image: ImageToken, input: InputSize = None) -> dict:
        explored = answer(lambda: explorer.explored(model, input))
        return answer(lambda: explored.input_view(explorer.image(image)))

    @app.get(
        "/api/explore/maps",
        summary="one layer's feature maps for an image, its most active channels first",
        description=(
            "Each map a grey PNG at the layer's own resolution, scaled from its minimum"
            " (black) to its maximum (white); `channels` gives each one's index, mean, min"
            " and max. Computed when asked: the forward pass stops at the layer."
        ),
        responses=problems(400, 404, 413, 422, 503),
    )
    def maps(
        model: ModelName,
        layer: Layer,
        image: ImageToken,
        count: Annotated[int, Query(ge=1, le=MAX_SHOWN)] = DEFAULT_SHOWN,
        input: InputSize = None,
    ) -> dict:
        explored = answer(lambda: explorer.explored(model, input))
        explorer.check_memory(explored)
        return answer(lambda: explored.maps(layer, explorer.image(image), count))

    @app.get(
        "/api/explore/field",
        summary="one unit's exact receptive field: its box on the input, centre and chain",
        description=(
            "`box` [x0, y0, x1, y1]: the first and last input pixel the unit (`y`, `x`) of"
            " the layer's output sees (inclusive; beyond the input where padding is);"
            " `inside` the same box clipped to the input; `centre` [x, y]; `chain` the layers"
            " before it where the field grows, with `step` the recurrence rf + (k - 1)*jump."
        ),
        responses=problems(400, 404, 422, 503),
    )
    def unit_field(
        model: ModelName,
        layer: Layer,
        y: Annotated[int, Query(ge=0, le=100000)],
        x: Annotated[int, Query(ge=0, le=100000)],
        input: InputSize = None,
    ) -> dict:
        explored = answer(lambda: explorer.explored(model, input))
        return answer(lambda: explored.unit_field(layer, y, x))

    @app.get(
        "/api/explore/classes",
        summary="a classifier run's top classes for an image",
        responses=problems(400, 404, 422, 503),
    )
    def classes(
        model: ModelName,
        image: ImageToken,
        count: Annotated[int, Query(ge=1, le=100)] = 5,
    ) -> dict:
        explored = answer(lambda: explorer.explored(model))
        return {"top": answer(lambda: explored.top_classes(explorer.image(image), count))}

    @app.get(
        "/api/explore/gradcam",
        summary="a classifier run's Grad-CAM of one class at one layer",
        description="`cnnlab explain`'s document, with `map_png` the map over what the model sees.",
        responses=problems(400, 404, 413, 422, 503),
    )
    def gradcam(
        model: ModelName,
        layer: Layer,
        image: ImageToken,
        class_name: Annotated[
            str | None,
            Query(alias="class", max_length=200, description="default: the predicted class"),
        ] = None,
    ) -> dict:
        explored = answer(lambda: explorer.explored(model))
        explorer.check_memory(explored)
        return answer(lambda: explored.gradcam(layer, explorer.image(image), class_name))
