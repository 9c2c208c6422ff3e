"""The web server's FastAPI app: the page, its JSON API and the limits that keep it serving.

Routes (OpenAPI at /openapi.json): ``GET /`` the page (``static/``: no script, style or font from
elsewhere), ``GET /api/runs``, ``GET /api/runs/{id}``, ``GET /api/runs/{id}/figures/NAME.png``,
``POST /api/predict`` (multipart: ``file``, and ``run`` unless one run is served), ``GET
/healthz``; ``GET /explore``, the explore page, and its API ``/api/explore/...``
(``explore_api``). Clients name runs by id; no path on disk is ever taken from a request.

Every error is JSON ``{"detail": "one line"}``, never a traceback: a 4xx status for a bad
request (413 too large, or an image whose prediction needs more than ``max_memory``; 415
not multipart or not an image type; 400 an image the guarded reader refuses, or no
``run`` when several are served; 403 a ``Host`` this server does not answer to; 404
unknown run; 408 an upload that did not arrive within ``upload_timeout``; 422 a missing
or malformed field), 503 with
``Retry-After`` when ``queue_size`` predictions are already in the server (or four times
as many uploads are arriving), 500 for a fault of the server itself.

The doors (``doors``, in front of every route): only the ``Host`` names of ``AllowedHosts``
are answered (a web page the user visits cannot reach this server by DNS rebinding, as
Jupyter checks); a prediction's size is checked before its body is read, and its body must
arrive within ``upload_timeout`` seconds, so stalled clients give their place back; a
prediction takes its place in the queue only once its body has arrived, so clients still
uploading never keep the others' predictions waiting.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import BaseModel

from cnnlab.device import free_memory
from cnnlab.errors import CnnlabError
from cnnlab.serve.doors import AllowedHosts, HostCheck, PredictLimits, add_error_handlers
from cnnlab.serve.explore_api import IMAGES_PATH, Explorer, add_explore_routes
from cnnlab.serve.pool import Gate, Job, Pool
from cnnlab.serve.served import Served, TooLargeToPredict, Upload, load_served
from cnnlab.tasks import TASKS
from cnnlab.tasks.options import Option, options_for

MAX_UPLOAD = 20 * 1000 * 1000  # bytes of one uploaded image
PREDICT_PATH = "/api/predict"
UPLOADS = (PREDICT_PATH, IMAGES_PATH)  # the routes that take an image: guarded alike
UPLOAD_TIMEOUT = 30.0  # seconds for a prediction's body to arrive, once its headers have
ARRIVING_PER_PLACE = 4  # uploads that may be arriving at once, per place in the queue
# One prediction may need at most this, or half the memory free at start over the workers.
MAX_MEMORY = 4 * 2**30
STATIC = {
    "common.js": "text/javascript",  # what both pages' scripts share
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
        paths=UPLOADS,
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
    add_error_handlers(app)
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
