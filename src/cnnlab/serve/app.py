"""The web server's FastAPI app: the page, its JSON API and the limits that keep it serving.

Routes (OpenAPI at /openapi.json): ``GET /`` the page (``static/``: no script, style or font from
elsewhere), ``GET /api/runs``, ``GET /api/runs/{id}``, ``GET /api/runs/{id}/figures/NAME.png``,
``POST /api/predict`` (multipart: ``file``, and ``run`` unless one run is served), ``GET
/healthz``; ``GET /explore``, the explore page, and its API ``/api/explore/...``
(``explore_api``). Clients name runs
by id; no path on disk is ever taken from a request.

Every error is JSON ``{"detail": "one line"}``, never a traceback: a 4xx status for a bad
request (413 too large, or an image whose prediction needs more than ``max_memory``; 415
not multipart or not an image type; 400 an image the guarded reader refuses, or no
``run`` when several are served; 403 a ``Host`` this server does not answer to; 404
unknown run; 408 an upload that did not arrive within ``upload_timeout``; 422 a missing
or malformed field), 503 with
``Retry-After`` when ``queue_size`` predictions are already in the server (or four times
as many uploads are arriving), 500 for a fault of the server itself.

The doors: only the ``Host`` names of ``AllowedHosts`` are answered (a web page the user
visits cannot reach this server by DNS rebinding, as Jupyter checks); a prediction's
size is checked before its body is read, and its body must arrive within
``upload_timeout`` seconds, so stalled clients give their place back; a prediction takes
its place in the queue only once its body has arrived, so clients still uploading never
keep the others' predictions waiting.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.device import free_memory
from cnnlab.errors import CnnlabError
from cnnlab.serve.explore_api import IMAGES_PATH, Explorer, add_explore_routes
from cnnlab.serve.pool import Gate, Job, Pool
from cnnlab.serve.served import Served, TooLargeToPredict, Upload, load_served
from cnnlab.tasks import TASKS
from cnnlab.tasks.options import Option, options_for

MAX_UPLOAD = 20 * 1000 * 1000  # bytes of one uploaded image
FORM_OVERHEAD = 64 * 1024  # the multipart boundaries, headers and small fields around it
PREDICT_PATH = "/api/predict"
UPLOADS = (PREDICT_PATH, IMAGES_PATH)  # the routes that take an image: guarded alike
UPLOAD_TIMEOUT = 30.0  # seconds for a prediction's body to arrive, once its headers have
ARRIVING_PER_PLACE = 4  # uploads that may be arriving at once, per place in the queue
# One prediction may need at most this, or half the memory free at start over the workers.
MAX_MEMORY = 4 * 2**30
WILDCARDS = ("", "0.0.0.0", "::")  # addresses that listen on every interface
STATIC = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "explore.js": "text/javascript",
    "explore.css": "text/css",
}
# The page may load only what this server sends: no CDN, font or script from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self';"
        " connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Problem(BaseModel):
    """Every error's body (documented in the OpenAPI document for each status)."""

    detail: str


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, and the 403 (Host) and 500 of all."""
    return {status: {"model": Problem} for status in sorted({403, 500, *statuses})}


def create_app(
    runs: Sequence[str | Path],
    queue_size: int = 32,
    max_upload: int = MAX_UPLOAD,
    workers: int = 1,
    max_batch: int = 8,
    device: str = "auto",
    host: str = "127.0.0.1",
    allow_hosts: Sequence[str] = (),
    upload_timeout: float = UPLOAD_TIMEOUT,
    max_memory: int | None = None,
    explore: str | None = None,
    explore_input: tuple[int, int, int] | None = None,
) -> FastAPI:
    """The app serving the run folders ``runs``, loaded here (``load_served``), and the
    explore page (``/explore``) of each and of ``explore`` (any model ``cnnlab summary``
    takes, or a run folder; at ``explore_input`` C,H,W), built when first asked for.

    ``queue_size`` predictions are in the server at once at most (waiting or running; more
    get 503); ``max_upload`` bytes per image, arriving within ``upload_timeout`` seconds;
    ``workers`` inference threads, each taking up to ``max_batch`` queued requests for one
    run into one forward pass; ``max_memory`` bytes for one prediction (default: half the
    memory free now over the workers, at most ``MAX_MEMORY``). Requests are answered when
    their ``Host`` is ``host`` (the address the server listens on), a loopback name or
    address, or one of ``allow_hosts`` (``AllowedHosts``).
    """
    if max_upload < 1:
        raise CnnlabError(f"the upload limit must be a positive number of bytes, got {max_upload}")
    if not upload_timeout > 0:  # also refuses nan
        raise CnnlabError(f"--upload-timeout {upload_timeout}: expected a positive time")
    if max_memory is not None and max_memory < 1:
        raise CnnlabError(f"--max-memory {max_memory}: expected a positive number of bytes")
    allowed = AllowedHosts(host, allow_hosts)
    served = load_served(runs, device)
    if not served and explore is None:
        raise CnnlabError("no runs to serve")
    if max_memory is None:
        where = next(iter(served.values())).run.device if served else torch.device("cpu")
        max_memory = min(MAX_MEMORY, free_memory(where) // (2 * workers))
    for run in served.values():
        run.max_memory = max_memory
    pool = Pool(lambda key, uploads: _predict(served, key, uploads), workers, max_batch)
    page = {name: _static(name) for name in ("index.html", "explore.html", *STATIC)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stopping.clear()  # a lifespan run again (two test clients in turn) serves again
        pool.start()
        yield
        pool.stop()

    from cnnlab.version import __version__

    app = FastAPI(
        title="cnnlab serve",
        version=__version__,
        description="Predict with cnnlab run folders: classification, segmentation, detection.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: the server serves nothing it
        # does not hold, so the API is described by /openapi.json alone.
        docs_url=None,
        redoc_url=None,
    )
    # Set when the server begins to stop (cnnlab.serve.Server): an upload still arriving
    # then gets a 503 at once, rather than holding the shutdown until it is cancelled.
    stopping = asyncio.Event()
    queue = Gate(queue_size)
    app.add_middleware(
        PredictLimits,
        queue=queue,
        arriving=Gate(ARRIVING_PER_PLACE * queue_size),
        max_upload=max_upload,
        upload_timeout=upload_timeout,
        stopping=stopping,
    )
    app.add_middleware(HostCheck, allowed=allowed)  # the outermost: before anything else
    app.state.served, app.state.stopping, app.state.max_memory = served, stopping, max_memory

    def find(run_id: str) -> Served:
        if run_id not in served:
            raise HTTPException(404, f"no run {run_id!r}; GET /api/runs lists them")
        return served[run_id]

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        if not served:  # `cnnlab explore MODEL`: the explore page is the page
            return RedirectResponse("/explore")
        return Response(page["index.html"], media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/explore", include_in_schema=False)
    def explore_page() -> Response:
        return Response(page["explore.html"], media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(page[name], media_type=STATIC[name], headers=SECURITY_HEADERS)

    @app.get("/healthz", summary="liveness: ok, and how many runs it holds", responses=problems())
    def healthz() -> dict:
        return {"status": "ok", "runs": len(served)}

    @app.get(
        "/api/runs",
        summary="every run: task, model, classes, cost, test metrics",
        responses=problems(),
    )
    def list_runs() -> dict:
        return {
            "runs": [s.info for s in served.values()],
            "max_upload": max_upload,
            "max_memory": max_memory,
        }

    @app.get("/api/runs/{run_id}", summary="one run", responses=problems(404, 422))
    def get_run(run_id: str) -> dict:
        return find(run_id).info

    @app.get(
        "/api/runs/{run_id}/figures/{name}.png",
        summary="a figure of the run folder",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}, **problems(404, 422)},
    )
    def figure(run_id: str, name: str) -> FileResponse:
        path = find(run_id).figure(name)
        if path is None:
            raise HTTPException(404, f"run {run_id!r} has no figure {name!r}")
        return FileResponse(path, media_type="image/png")

    async def predict(run: str | None, file: UploadFile, **given: Any) -> dict:
        if run is None and len(served) != 1:  # with one run served, it is the one meant
            raise HTTPException(400, f"run is required: {len(served)} runs are served")
        target = find(next(iter(served)) if run is None else run)
        options = _options(target, given)
        upload = await Upload.read(file, max_upload)
        job = Job((target.id, tuple(sorted(options.items()))), upload)
        # The body has arrived: now the prediction takes a place in the queue.
        if not queue.enter():
            raise HTTPException(503, "busy: too many predictions queued", {"Retry-After": "1"})
        try:
            try:
                future = pool.submit(job)
            except RuntimeError:  # the pool is stopping
                raise HTTPException(503, "the server is stopping", {"Retry-After": "1"}) from None
            return await asyncio.wrap_future(future)
        except TooLargeToPredict as error:
            raise HTTPException(413, str(error)) from None
        except (MemoryError, torch.OutOfMemoryError):  # the estimate fell short, or others ran
            raise HTTPException(
                503,
                f"{upload.name}: out of memory while predicting; try again",
                {"Retry-After": "5"},
            ) from None
        except CnnlabError as error:  # the image, or the model's refusal of it
            raise HTTPException(400, str(error)) from None
        finally:
            queue.leave()

    # The form's fields: the run, the file, and every task's declared serve options.
    predict.__signature__ = predict_signature()  # type: ignore[attr-defined]
    app.post(
        PREDICT_PATH,
        summary="predict one image with one run",
        responses=problems(400, 404, 408, 413, 415, 422, 503),
        description=(
            "The document `cnnlab predict|segment predict|detect predict --format json` prints"
            " for one image (`file` is the uploaded name), plus `mask_png` (segmentation: the"
            " class index of each pixel as a PNG data URL) and, with `heatmaps`, `heatmaps`"
            " (classification: the probability map of each top class, `cnnlab heatmap`'s"
            " document) and, with `explain`, `explain` (classification: where the top"
            " class's evidence lies, `cnnlab explain`'s Grad-CAM document with `map_png`)."
        ),
    )(predict)

    explorer = Explorer(explore, explore_input, served, max_memory)
    add_explore_routes(app, explorer, max_upload, problems)
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
            default=None,
            # Not ``| None``, as the options below: unset is left out of the form.
            annotation=Annotated[
                str,
                Form(
                    min_length=1,
                    description="a run id from GET /api/runs (optional when one run is served)",
                ),
            ],
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
        # Not ``| None``: unset is left out of the form, and "null" is no value a form has.
        annotation = Annotated[option.type, form]
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
    """ASGI middleware for the uploads (``POST /api/predict`` and ``POST
    /api/explore/images``), all before the body is read: 415 unless
    multipart, 413 past ``max_upload`` and the form around it (the Content-Length, then
    the bytes as they arrive), 503 when the ``queue`` is full or ``arriving`` holds as many
    uploads as it takes. While the body arrives: 408 once ``upload_timeout`` seconds have
    passed since its headers (a stalled or trickling client gives its place back), 503
    once ``stopping`` is set. The place in ``arriving`` is given back as soon as the body
    has arrived; the route then takes one in ``queue``."""

    def __init__(
        self,
        app: ASGIApp,
        queue: Gate,
        arriving: Gate,
        max_upload: int,
        upload_timeout: float,
        stopping: asyncio.Event,
    ) -> None:
        self.app, self.queue, self.arriving, self.stopping = app, queue, arriving, stopping
        self.max_body = max_upload + FORM_OVERHEAD
        self.upload_timeout = upload_timeout
        self.too_large = f"the upload is larger than the limit of {max_upload:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in UPLOADS or scope["method"] != "POST":
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
        elif self.queue.full():
            refusal = _error(503, "busy: too many predictions queued", {"Retry-After": "1"})
        elif not self.arriving.enter():
            refusal = _error(503, "busy: too many uploads arriving", {"Retry-After": "1"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.upload_timeout
        received, arrived = 0, False

        def give_back() -> None:
            nonlocal arrived
            if not arrived:
                arrived = True
                self.arriving.leave()

        async def counted() -> Message:
            nonlocal received
            if arrived:  # the body is in: no deadline on what the app waits for next
                return await receive()
            message = await self._next(receive, deadline)
            received += len(message.get("body", b""))
            if received > self.max_body:  # a body longer than its Content-Length, or chunked
                raise HTTPException(413, self.too_large)
            if not message.get("more_body", False):
                give_back()
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            give_back()

    async def _next(self, receive: Receive, deadline: float) -> Message:
        """The next message, or a 408 once ``deadline`` passes, a 503 once stopping."""
        arrived = asyncio.ensure_future(receive())
        stop = asyncio.ensure_future(self.stopping.wait())
        left = deadline - asyncio.get_running_loop().time()
        await asyncio.wait((arrived, stop), timeout=max(left, 0), return_when="FIRST_COMPLETED")
        stop.cancel()
        if arrived.done():
            return arrived.result()
        arrived.cancel()
        if self.stopping.is_set():
            raise HTTPException(503, "the server is stopping", {"Retry-After": "1"})
        raise HTTPException(
            408, f"the upload did not arrive within {self.upload_timeout:g} s (--upload-timeout)"
        )


class AllowedHosts:
    """The ``Host`` names a server answers to: the address it listens on, ``localhost``
    and loopback addresses, and ``extra`` (``--allow-host``; ``*`` admits any). Listening
    on every interface (0.0.0.0 or ::), any IP address is admitted too: a name is what a
    DNS-rebinding page sends, an address never is. Ports are not compared."""

    def __init__(self, bound: str, extra: Sequence[str] = ()) -> None:
        self.any_host = "*" in extra
        self.any_address = bound in WILDCARDS
        self.names = {"localhost", *(host_name(name) for name in extra)}
        if not self.any_address:
            self.names.add(host_name(bound))

    def admits(self, header: str | None) -> bool:
        if header is None or self.any_host:  # no Host: not a browser (it always sends one)
            return True
        name = host_name(header)
        if name in self.names:
            return True
        address = _address(name)
        if address is None:
            return False
        bound = {_address(known) for known in self.names} - {None}
        return address.is_loopback or self.any_address or address in bound


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without its port or final dot."""
    text = header.strip().lower()
    if text.startswith("["):  # [IPv6]:port
        return text[1:].split("]")[0]
    if text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    return text.rstrip(".")


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """ASGI middleware answering 403 to a request whose ``Host`` is not ``allowed``."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = Headers(scope=scope).get("host")
            if not self.allowed.admits(header):
                name = _one_line(host_name(header or ""))[:100]
                detail = (
                    f"Host {name!r} is not an address of this server (a page elsewhere"
                    f" reaching it?); if you opened it by that name, start it with"
                    f" --allow-host {name}"
                )
                if scope["type"] == "http":
                    await _error(403, detail)(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


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
