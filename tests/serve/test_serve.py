"""``cnnlab serve``: the real server in a child process, driven over HTTP.

Its answers are the ones ``cnnlab predict`` gives for the same image (``Run.predict_files``
is what that command prints), its run list is what ``cnnlab.inspect`` and the run folder
say, and no bad request (empty, truncated, a decompression bomb, 25 MB, not an image, not
multipart, a full queue, a stalled upload, an image too large to predict, a foreign
``Host``) gets anything but a one-line 4xx or 503 JSON error, after which the next good
request is still answered.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cnnlab.data.images import BadImageError, encoded_size
from cnnlab.errors import CnnlabError
from cnnlab.heatmap import heatmap
from cnnlab.inspect.specs import summarize_spec
from cnnlab.runs import load_run
from cnnlab.serve import create_app
from cnnlab.serve.doors import AllowedHosts
from cnnlab.serve.pool import Gate, Job, Pool
from cnnlab.serve.served import Upload, load_served
from tests.conftest import run_cli

UPLOAD_TIMEOUT = 5  # the module's server: seconds for an upload to arrive


@pytest.fixture(scope="module")
def server(serve_runs, launch_server):
    """One server with the three runs; at most two predictions inside at once (and eight
    uploads arriving), answering the host name lab.example too."""
    runs = [serve_runs[task] for task in ("classify", "segment", "detect")]
    timeout = str(UPLOAD_TIMEOUT)
    flags = ("--queue-size", "2", "--upload-timeout", timeout, "--allow-host", "lab.example")
    return launch_server(*runs, *flags)


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def ids(client: httpx.Client) -> dict[str, str]:
    return {run["task"]: run["id"] for run in client.get("/api/runs").json()["runs"]}


def first_image(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*.png") if "masks" not in p.parts)[0]


def post(client: httpx.Client, run: str, data: bytes, name="x.png", kind="image/png", **fields):
    form = {"run": run, **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/predict", data=form, files={"file": (name, data, kind)})


def assert_close(got: object, want: object, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), where
    else:
        assert got == want, where


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for word in words:
        assert word in detail, detail


def test_health_and_the_run_list(client, serve_runs) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "runs": 3}
    listing = client.get("/api/runs").json()
    assert listing["max_upload"] == 20_000_000
    runs = {run["task"]: run for run in listing["runs"]}
    assert sorted(runs) == ["classify", "detect", "segment"]
    for task, run in runs.items():
        path = serve_runs[task]
        meta = json.loads((path / "model.json").read_text())
        _, summary, _ = summarize_spec(
            meta["architecture"], meta["model_args"], tuple(meta["input_size"]), depth=0
        )
        assert run["id"] == run["name"] == path.name  # an id, never a path
        assert run["model"] == meta["architecture"] and run["classes"] == meta["classes"]
        assert (run["parameters"], run["macs"]) == (summary.total_params, summary.total_macs)
        assert run["flops"] == summary.total_flops >= 2 * summary.total_macs
        assert run["metrics"] == json.loads((path / "report.json").read_text())
        curves = client.get(run["figures"]["curves"])
        assert curves.headers["content-type"] == "image/png"
        assert curves.content == (path / "curves.png").read_bytes()
        assert client.get(f"/api/runs/{run['id']}").json() == run
    assert runs["segment"]["colours"][0] is None  # the background is not tinted
    assert client.get(f"/api/runs/{runs['classify']['id']}/figures/model.png").status_code == 404
    assert client.get("/api/runs/nope/figures/curves.png").status_code == 404


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_a_prediction_is_what_cnnlab_predict_prints(client, serve_runs, task: str) -> None:
    image = first_image(serve_runs[f"{task}_data"])
    options = {"score_threshold": 0.0} if task == "detect" else {}
    response = post(client, ids(client)[task], image.read_bytes(), name=image.name, **options)
    assert response.status_code == 200, response.text
    answer = response.json()
    run = load_run(serve_runs[task], "cpu")
    [want], errors = run.predict_files([image], **options)
    assert not errors
    mask = want.pop("_mask", None)
    want["file"] = image.name  # the name the client gave, not a path on the server
    assert_close({k: v for k, v in answer.items() if k in want}, want)
    if task == "segment":
        encoded = answer["mask_png"].removeprefix("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert np.array_equal(np.asarray(png), mask.numpy())  # the class of each pixel
    if task == "detect":
        assert answer["detections"], "threshold 0 keeps every box"


def test_heat_maps_are_what_cnnlab_heatmap_gives(client, serve_runs) -> None:
    image = first_image(serve_runs["classify_data"])
    run_id = ids(client)["classify"]
    answer = post(client, run_id, image.read_bytes(), heatmaps="true", topk=3).json()
    maps = answer["heatmaps"]["maps"]
    assert [m["class"] for m in maps] == [t["class"] for t in answer["top"]]
    assert answer["heatmaps"]["size"] == [32, 32]  # within (8 x 16)^2 pixels: as it is
    for found in maps:
        assert_close(found, heatmap(serve_runs["classify"], image, found["class"], device="cpu"))
    # a strip too long to map at the training size still gets its prediction
    strip = png_bytes(np.zeros((4, 2000), np.uint8))
    answer = post(client, run_id, strip, heatmaps="true").json()
    assert answer["top"] and answer["heatmaps"] is None
    assert "too elongated" in answer["heatmaps_error"]
    # a detection run takes no heat-map or top-k option
    assert_refused(post(client, ids(client)["detect"], image.read_bytes(), topk=2), 400, "topk")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 10_000) -> bytes:
    """A valid grey PNG of side x side black pixels: 100 megapixels in about 100 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * ((side + 1) * side), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_bad_uploads_are_one_line_4xx_and_the_server_goes_on(client, serve_runs) -> None:
    run_id = ids(client)["classify"]
    good = first_image(serve_runs["classify_data"]).read_bytes()
    image = png_bytes(np.full((20, 20), 128, np.uint8))
    bad = {
        "empty": (lambda: post(client, run_id, b"", name="empty.png"), 400, "empty.png"),
        "truncated": (lambda: post(client, run_id, image[:60], name="cut.png"), 400, "cut.png"),
        "bomb": (lambda: post(client, run_id, bomb_png(), name="bomb.png"), 400, "limit"),
        "25 MB": (lambda: post(client, run_id, os.urandom(25_000_000)), 413, "20,000,000"),
        "text": (lambda: post(client, run_id, b"hi", "a.txt", "text/plain"), 415, "text/plain"),
        "not an image": (lambda: post(client, run_id, b"hello" * 9, "a.png"), 400, "not an image"),
        "json": (lambda: client.post("/api/predict", json={"run": run_id}), 415, "multipart"),
        "no file": (
            lambda: client.post("/api/predict", files={"run": (None, run_id)}),
            422,
            "file",
        ),
        "unknown run": (lambda: post(client, "runs/../x", good), 404, "no run"),
        "no run of several": (
            lambda: client.post("/api/predict", files={"file": ("a.png", good, "image/png")}),
            400,
            "run is required",
        ),
        "bad topk": (lambda: post(client, run_id, good, topk=0), 422, "topk"),
    }
    for name, (send, status, word) in bad.items():
        assert_refused(send(), status, word)
        assert post(client, run_id, good).status_code == 200, f"after {name}"


def test_a_body_longer_than_the_limit_is_cut_off_as_it_arrives(client, serve_runs) -> None:
    """No Content-Length (chunked): the bytes are counted as they come."""
    run_id = ids(client)["classify"]

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="run"\r\n\r\n' + run_id.encode()
        yield b'\r\n--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(21):
            yield b"\0" * 1_000_000
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    assert_refused(client.post("/api/predict", content=body(), headers=headers), 413, "limit")
    good = first_image(serve_runs["classify_data"]).read_bytes()
    assert post(client, run_id, good).status_code == 200


def stall(server) -> socket.socket:
    """A connection that sends the start of an upload and nothing more."""
    address = httpx.URL(server.url)
    stalled = socket.create_connection((address.host, address.port))
    stalled.sendall(
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    return stalled


def read_answer(connection: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP answer's head and its body (of its Content-Length), however it is split."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096) or b"\r\n\r\n"
    head, body = data.split(b"\r\n\r\n", 1)
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    while found and len(body) < int(found.group(1)) and (more := connection.recv(4096)):
        body += more
    connection.close()
    return head, body


def test_a_full_queue_is_503_with_retry_after_until_a_place_frees(client, server, serve_runs):
    """Eight uploads that never finish hold the eight places of uploads arriving (four per
    place in the queue of two)."""
    held = [stall(server) for _ in range(8)]
    run_id = ids(client)["classify"]
    good = first_image(serve_runs["classify_data"]).read_bytes()
    deadline = time.monotonic() + 10
    while (busy := post(client, run_id, good)).status_code == 200:  # until both are admitted
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_refused(busy, 503, "busy")
    assert busy.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200  # only predictions are queued
    for stalled in held:
        stalled.close()
    while (again := post(client, run_id, good)).status_code == 503:
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    assert again.status_code == 200


def test_stalled_uploads_time_out_and_never_hold_up_the_predictions_of_others(
    client, server, serve_runs
) -> None:
    """Three stalled uploads, more than the queue's two places: a prediction from another
    client is answered at once all the same (a place in the queue is taken once a body has
    arrived), and each stalled one is answered 408 once its time is up."""
    run_id = ids(client)["classify"]
    good = first_image(serve_runs["classify_data"]).read_bytes()
    held = [stall(server) for _ in range(3)]
    started = time.monotonic()
    assert post(client, run_id, good).status_code == 200
    assert time.monotonic() - started < UPLOAD_TIMEOUT  # before any of them timed out
    for stalled in held:
        stalled.settimeout(UPLOAD_TIMEOUT + 30)
        head, body = read_answer(stalled)
        assert head.startswith(b"HTTP/1.1 408 "), head
        detail = json.loads(body)["detail"]
        assert "did not arrive within 5 s" in detail and "\n" not in detail
    assert time.monotonic() - started >= UPLOAD_TIMEOUT - 0.5
    assert post(client, run_id, good).status_code == 200


def test_an_image_too_large_to_segment_is_a_413_with_the_memory_it_needs(client) -> None:
    """81 megapixels to a segmentation run: refused by the memory its prediction would need
    (the default limit is at most 4 GiB), not a 500."""
    run_id = ids(client)["segment"]
    response = post(client, run_id, bomb_png(9000), name="huge.png")
    assert_refused(response, 413, "huge.png: this 9000x9000 image needs ~", "GiB to segment")
    assert "limit is" in response.json()["detail"] and "--max-memory" in response.json()["detail"]
    max_memory = client.get("/api/runs").json()["max_memory"]
    assert 0 < max_memory <= 4 * 2**30


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),
        ("localhost:8000", 200),
        ("[::1]:8000", 200),
        ("lab.example:8000", 200),  # --allow-host lab.example
        ("LAB.example.", 200),
        ("evil.example", 403),  # a name that now points at 127.0.0.1: DNS rebinding
        ("10.1.2.3", 403),  # listening on 127.0.0.1 only
    ],
)
def test_only_the_servers_own_host_names_are_answered(client, host: str, status: int) -> None:
    for path in ("/healthz", "/api/runs", "/"):
        response = client.get(path, headers={"host": host})
        assert response.status_code == status, (host, path, response.text)
    if status == 403:
        assert_refused(response, 403, "--allow-host", host)


def test_host_names_admitted_by_the_address_listened_on() -> None:
    everywhere = AllowedHosts("0.0.0.0")  # any address of the machine; names still refused
    assert everywhere.admits("192.168.1.5:8000") and everywhere.admits("localhost")
    assert not everywhere.admits("evil.example")
    assert AllowedHosts("::1").admits("[0:0::1]:8000")
    assert AllowedHosts("lab.local").admits("LAB.local:1")
    assert not AllowedHosts("lab.local").admits("10.0.0.1")
    assert AllowedHosts("127.0.0.1", ["*"]).admits("anything.example")
    assert AllowedHosts("127.0.0.1").admits(None)  # no Host at all: not a browser


def test_a_figure_symlinked_out_of_the_run_folder_is_not_served(serve_runs, tmp_path) -> None:
    from fastapi.testclient import TestClient

    run = tmp_path / "run"
    shutil.copytree(serve_runs["classify"], run)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the web")
    (run / "curves.png").unlink()
    (run / "curves.png").symlink_to(secret)
    (run / "kept").mkdir()
    (run / "confusion.png").rename(run / "kept" / "confusion.png")
    (run / "confusion.png").symlink_to(run / "kept" / "confusion.png")  # inside: served
    client = TestClient(create_app([run], device="cpu"), base_url="http://127.0.0.1")
    figures = client.get("/api/runs/run").json()["figures"]
    assert "curves" not in figures and "confusion" in figures
    assert_refused(client.get("/api/runs/run/figures/curves.png"), 404, "no figure 'curves'")
    inside = client.get(figures["confusion"])
    assert inside.content == (run / "kept" / "confusion.png").read_bytes()


def test_the_page_is_served_with_nothing_from_elsewhere(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    texts = [page.text, *(client.get(f"/static/{n}").text for n in ("app.js", "style.css"))]
    for text in texts:
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert client.get("/static/../served.py").status_code == 404
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/predict", "/api/runs"}
    for cdn_page in ("/docs", "/redoc"):  # FastAPI's viewers load their scripts from a CDN
        assert client.get(cdn_page).status_code == 404


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_it_cleanly_with_status_0(serve_runs, launch_server, sig) -> None:
    """Even with an upload that never finishes: it is answered 503 as the server stops,
    so the stop does not wait out uvicorn's grace period and cancel it."""
    server = launch_server(serve_runs["classify"])
    assert httpx.get(server.url + "healthz", timeout=30).status_code == 200
    address = httpx.URL(server.url)
    with socket.create_connection((address.host, address.port)) as stalled:
        stalled.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        time.sleep(0.2)
        started = time.monotonic()
        assert server.stop(sig) == 0
        assert time.monotonic() - started < 15
        stalled.settimeout(5)
        assert stalled.recv(4096).startswith(b"HTTP/1.1 503 ")
    log = "".join(server.stderr)
    assert "Traceback" not in log and "cnnlab serve: stopped" in log
    assert "timeout graceful shutdown exceeded" not in log  # the upload did not hold it


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port 70000: expected 0 to 65535"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0.0: expected a positive size"),
        (["--queue-size", "0"], "--queue-size: invalid positive value: '0'"),
        (["--max-memory", "0"], "--max-memory '0': expected a size such as 8GB"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, flags: list[str], message: str) -> None:
    done = run_cli("serve", tmp_path, *flags, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr


def test_bad_limits_are_refused_before_any_run_is_loaded(tmp_path) -> None:
    with pytest.raises(CnnlabError, match="--upload-timeout 0: expected a positive time"):
        create_app([tmp_path], upload_timeout=0)
    with pytest.raises(CnnlabError, match="--max-memory -1: expected a positive number"):
        create_app([tmp_path], max_memory=-1)


def test_a_folder_that_is_no_run_or_a_port_in_use_is_one_line(serve_runs, tmp_path) -> None:
    done = run_cli("serve", tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert str(tmp_path) in done.stderr and "not a cnnlab run folder" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", serve_runs["classify"], "--port", port, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"127.0.0.1:{port}: cannot listen" in done.stderr


def test_the_pool_batches_the_queued_jobs_of_a_key_oldest_first() -> None:
    taken, release, batches = threading.Event(), threading.Event(), []

    def work(key, payloads):
        taken.set()
        release.wait(10)
        batches.append((key, list(payloads)))
        return [ValueError(p) if p == "bad" else p.upper() for p in payloads]

    pool = Pool(work, workers=1, max_batch=3)
    pool.start()
    first = pool.submit(Job("a", "x"))
    assert taken.wait(10)  # the worker holds "x"; the rest queue behind it
    queued = [("a", "p"), ("b", "q"), ("a", "bad"), ("a", "r"), ("a", "s")]
    futures = [pool.submit(Job(key, payload)) for key, payload in queued]
    release.set()
    assert [f.result(10) for f in (first, *futures[:2], *futures[3:])] == list("XPQRS")
    with pytest.raises(ValueError, match="bad"):  # only its own request fails
        futures[2].result(10)
    pool.stop()
    assert batches == [("a", ["x"]), ("a", ["p", "bad", "r"]), ("b", ["q"]), ("a", ["s"])]
    with pytest.raises(RuntimeError, match="stopping"):
        pool.submit(Job("a", "late"))
    pool.start()  # an app's lifespan run again (two test clients in turn) serves again
    assert pool.submit(Job("a", "again")).result(10) == "AGAIN"
    pool.stop()


def test_the_gate_lets_in_its_capacity() -> None:
    gate = Gate(2)
    assert gate.enter() and gate.enter() and not gate.enter()
    gate.leave()
    assert gate.enter()


def test_in_a_batch_each_bad_image_fails_only_its_own_request(serve_runs) -> None:
    """A segmentation batch with an image below the model's minimum size, one that is no
    image, and a good one: the model refuses the batch, so each is retried alone."""
    [served] = load_served([serve_runs["segment"]], "cpu").values()
    good = first_image(serve_runs["segment_data"]).read_bytes()
    uploads = [
        Upload("tiny.png", png_bytes(np.zeros((4, 4, 3), np.uint8))),
        Upload("junk.png", b"junk"),
        Upload("good.png", good),
    ]
    tiny, junk, answer = served.predict(uploads, {})
    assert isinstance(tiny, CnnlabError) and "at least 32x32, got 4x4" in str(tiny)
    assert isinstance(junk, CnnlabError) and str(junk).startswith("junk.png: ")
    assert answer["file"] == "good.png" and answer["mask_png"].startswith("data:image/png")


def test_with_one_run_served_the_run_field_may_be_left_out(serve_runs) -> None:
    """And GET /api/runs says whether the run has answered yet (``warm``: its first answer
    takes longer, which the page says)."""
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    app = create_app([serve_runs["segment"]], device="cpu")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert [run["warm"] for run in client.get("/api/runs").json()["runs"]] == [False]
        good = first_image(serve_runs["segment_data"]).read_bytes()
        answer = client.post("/api/predict", files={"file": ("s.png", good, "image/png")})
        assert answer.status_code == 200 and "class_fractions" in answer.json()
        assert client.get("/api/runs").json()["runs"][0]["warm"]


def test_the_size_is_read_from_the_header_alone() -> None:
    assert encoded_size(png_bytes(np.zeros((20, 30), np.uint8))) == (30, 20)
    assert encoded_size(bomb_png(3000)) == (3000, 3000)
    with pytest.raises(BadImageError, match=r"x\.png: not a readable image"):
        encoded_size(b"junk", "x.png")


def test_a_predictions_memory_grows_with_the_pixels_the_model_sees(serve_runs) -> None:
    """A segmentation model runs on the image at its own size, so its activations grow
    with the pixels; a classifier's input is resized, so only the image's copies do."""
    classify, segment = load_served([serve_runs["classify"], serve_runs["segment"]], "cpu").values()
    assert segment.memory.whole and not classify.memory.whole
    image_only = classify.memory.need(1000, 1000) - classify.memory.need(10, 10)
    assert image_only == pytest.approx(1_000_000 * 10 * classify.run.task.in_channels, rel=1e-3)
    assert classify.memory.fixed > 0  # the model's activations at its training size
    # the FCN's activations per pixel: several feature maps of 4 channels, and the logits
    assert segment.memory.per_pixel > 4 * 4 * 2 + 10 * 3
