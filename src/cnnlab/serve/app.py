"""The web server's FastAPI app: the page, its JSON API and the limits that keep it serving.

Routes (OpenAPI at /docs): ``GET /`` the page (``static/``: no script, style or font from
elsewhere), ``GET /api/runs``, ``GET /api/runs/{id}``, ``GET /api/runs/{id}/figures/NAME.png``,
``POST /api/predict`` (multipart: ``run`` and ``file``), ``GET /healthz``. Clients name runs
by id; no path on disk is ever taken from a request.

Every error is JSON ``{"detail": "one line"}`` with a 4xx status for a bad request (413 too
large, 415 not multipart or not an image type, 400 an image the guarded reader refuses,
404 unknown run, 422 a missing or malformed field) and 503 with ``Retry-After`` when
``queue_size`` predictions are already in the server. A prediction is admitted, and its
size checked, before its body is read.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.errors import CnnlabError
from cnnlab.serve.pool import Gate, Job, Pool
from cnnlab.serve.served import Served, Upload, load_served
from cnnlab.tasks import TASKS
from cnnlab.tasks.options import Option, options_for

MAX_UPLOAD = 20 * 1000 * 1000  # bytes of one uploaded image
FORM_OVERHEAD = 64 * 1024  # the multipart boundaries, headers and small fields around it
PREDICT_PATH = "/api/predict"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
# The page may load only what this server sends: no CDN, font or script from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self';"
        " connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    runs: Sequence[str | Path],
    queue_size: int = 32,
    max_upload: int = MAX_UPLOAD,
    workers: int = 1,
    max_batch: int = 8,
    device: str = "auto",
) -> FastAPI:
    """The app serving the run folders ``runs``, loaded here (``load_served``).

    ``queue_size`` predictions are in the server at once at most (waiting or running; more
    get 503); ``max_upload`` bytes per image; ``workers`` inference threads, each taking up
    to ``max_batch`` queued requests for one run into one forward pass.
    """
    served = load_served(runs, device)
    if not served:
        raise CnnlabError("no runs to serve")
    if max_upload < 1:
        raise CnnlabError(f"the upload limit must be a positive number of bytes, got {max_upload}")
    pool = Pool(lambda key, uploads: _predict(served, key, uploads), workers, max_batch)
    page = {name: _static(name) for name in ("index.html", *STATIC)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start()
        yield
        pool.stop()

    from cnnlab.version import __version__

    app = FastAPI(
        title="cnnlab serve",
        version=__version__,
        description="Predict with cnnlab run folders: classification, segmentation, detection.",
        lifespan=lifespan,
    )
    # Set when the server begins to stop (cnnlab.serve.Server): an upload still arriving
    # then gets a 503 at once, rather than holding the shutdown until it is cancelled.
    stopping = asyncio.Event()
    app.add_middleware(
        PredictLimits, gate=Gate(queue_size), max_upload=max_upload, stopping=stopping
    )
    app.state.served, app.state.stopping = served, stopping

    def find(run_id: str) -> Served:
        if run_id not in served:
            raise HTTPException(404, f"no run {run_id!r}; GET /api/runs lists them")
        return served[run_id]

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(page["index.html"], media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(page[name], media_type=STATIC[name], headers=SECURITY_HEADERS)

    @app.get("/healthz", summary="liveness: ok, and how many runs it holds")
    def healthz() -> dict:
        return {"status": "ok", "runs": len(served)}

    @app.get("/api/runs", summary="every run: task, model, classes, cost, test metrics")
    def list_runs() -> dict:
        return {"runs": [s.info for s in served.values()], "max_upload": max_upload}

    @app.get("/api/runs/{run_id}", summary="one run")
    def get_run(run_id: str) -> dict:
        return find(run_id).info

    @app.get("/api/runs/{run_id}/figures/{name}.png", summary="a figure of the run folder")
    def figure(run_id: str, name: str) -> FileResponse:
        path = find(run_id).figure(name)
        if path is None:
            raise HTTPException(404, f"run {run_id!r} has no figure {name!r}")
        return FileResponse(path, media_type="image/png")

    async def predict(run: str, file: UploadFile, **given: Any) -> dict:
        target = find(run)
        options = _options(target, given)
        name = Path(file.filename or "upload").name or "upload"
        kind = (file.content_type or "").split(";")[0].strip().lower()
        if kind and not kind.startswith("image/") and kind != "application/octet-stream":
            raise HTTPException(415, f"{name}: {kind} is not an image type")
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(
                413, f"{name}: larger than the upload limit of {max_upload:,} bytes"
            )
        job = Job((run, tuple(sorted(options.items()))), Upload(name, data))
        try:
            future = pool.submit(job)
        except RuntimeError:  # the pool is stopping
            raise HTTPException(503, "the server is stopping", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wrap_future(future)
        except CnnlabError as error:  # the image, or the model's refusal of it
            raise HTTPException(400, str(error)) from None

    # The form's fields: the run, the file, and every task's declared serve options.
    predict.__signature__ = predict_signature()  # type: ignore[attr-defined]
    app.post(
        PREDICT_PATH,
        summary="predict one image with one run",
        description=(
            "The document `cnnlab predict|segment predict|detect predict --format json` prints"
            " for one image (`file` is the uploaded name), plus `mask_png` (segmentation: the"
            " class index of each pixel as a PNG data URL) and, with `heatmaps`, `heatmaps`"
            " (classification: the probability map of each top class, `cnnlab heatmap`'s"
            " document) and, with `explain`, `explain` (classification: where the top"
            " class's evidence lies, `cnnlab explain`'s Grad-CAM document with `map_png`)."
        ),
    )(predict)

    _error_handlers(app)
    return app


def _predict(served: dict[str, Served], key: tuple, uploads: Sequence[Upload]) -> list:
    run_id, options = key
    return served[run_id].predict(uploads, dict(options))


def serve_options() -> dict[str, tuple[Option, list[str]]]:
    """Every task's ``serve`` options by name, with the tasks that declare each."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for task in TASKS.values():
        for option in options_for(task.options, "serve"):
            found.setdefault(option.name, (option, []))[1].append(task.name)
    return found


def predict_signature() -> inspect.Signature:
    """``POST /api/predict``'s form as FastAPI reads it from a signature: ``run`` and
    ``file``, then one optional field per declared serve option, with its range (FastAPI
    checks it and writes it into the OpenAPI schema) and its tasks in the description."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    fields = [
        inspect.Parameter(
            "run",
            keyword,
            annotation=Annotated[str, Form(description="a run id from GET /api/runs")],
        ),
        inspect.Parameter(
            "file",
            keyword,
            annotation=Annotated[
                UploadFile, File(description="the image (PNG, JPEG, BMP, GIF, ...)")
            ],
        ),
    ]
    for name, (option, tasks) in serve_options().items():
        shown = "off" if option.type is bool else f"{option.default_in('serve'):g}"
        form = Form(
            ge=option.minimum,
            le=option.maximum,
            description=f"{', '.join(tasks)} runs: {option.help} (default: {shown})",
        )
        annotation = Annotated[option.type | None, form]
        fields.append(inspect.Parameter(name, keyword, default=None, annotation=annotation))
    return inspect.Signature(fields, return_annotation=dict)


def _options(target: Served, given: dict[str, Any]) -> dict:
    """The prediction options given for ``target``'s task (unset ones are None, an unset
    switch False too); one of another task's is a 400."""
    task = target.run.task
    takes = {option.name for option in options_for(task.options, "serve")}
    # A threshold of 0.0 is set: compare by identity, as 0.0 == False.
    options = {k: v for k, v in given.items() if v is not None and v is not False}
    wrong = sorted(set(options) - takes)
    if wrong:
        raise HTTPException(400, f"{wrong[0]} does not apply to {target.id!r}, a {task.name} run")
    return options


def _static(name: str) -> bytes:
    return resources.files("cnnlab.serve").joinpath("static", name).read_bytes()


class PredictLimits:
    """ASGI middleware for ``POST /api/predict``: 415 unless multipart, 413 past
    ``max_upload`` and the form around it (the Content-Length, then the bytes as they
    arrive), 503 when ``gate`` is full; all before the body is read. Once ``stopping`` is
    set, a body still being read is cut short with a 503."""

    def __init__(self, app: ASGIApp, gate: Gate, max_upload: int, stopping: asyncio.Event) -> None:
        self.app, self.gate, self.stopping = app, gate, stopping
        self.max_body = max_upload + FORM_OVERHEAD
        self.too_large = f"the upload is larger than the limit of {max_upload:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length", "0")
        refusal = None
        if kind != "multipart/form-data":
            refusal = _error(415, f"expected a multipart/form-data upload, not {kind or 'none'}")
        elif not length.isdigit():
            refusal = _error(400, f"malformed Content-Length {length!r}")
        elif int(length) > self.max_body:
            refusal = _error(413, self.too_large)
        elif not self.gate.enter():
            refusal = _error(503, "busy: too many predictions queued", {"Retry-After": "1"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await self._unless_stopping(receive)
            received += len(message.get("body", b""))
            if received > self.max_body:  # a body longer than its Content-Length, or chunked
                raise HTTPException(413, self.too_large)
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self.gate.leave()

    async def _unless_stopping(self, receive: Receive) -> Message:
        arrived = asyncio.ensure_future(receive())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait((arrived, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not arrived.done():
            arrived.cancel()
            raise HTTPException(503, "the server is stopping", {"Retry-After": "1"})
        return arrived.result()


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers=headers)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, _one_line(str(error.detail)), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return _error(422, _one_line(f"{where}: {first['msg']}"))

    @app.exception_handler(Exception)
    async def failure(request: Request, error: Exception) -> JSONResponse:
        # Starlette raises the error again once this is sent: uvicorn logs its traceback.
        return _error(500, _one_line(f"internal error: {type(error).__name__}: {error}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())
