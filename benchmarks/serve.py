"""Serving: ``cnnlab serve`` under concurrent clients against ``load_run(RUN).predict`` in a loop.

Ours is the real server (``python -m cnnlab serve RUN``, its defaults: one inference thread
taking up to 8 queued requests into one forward pass) in a child process, and 8 client
threads in this process, each with its own keep-alive connection, posting the image files
as a browser's form does to ``/api/predict`` until 400 requests are answered; each
request's time is from sending to the parsed JSON answer. The baseline is the same run
loaded in this process, ``run.predict(path)`` on the same files one at a time, 400 times
(each call reads, decodes and predicts one file, as a request does). Rounds alternate,
after a warm-up round each; throughput is the median round's, latencies are over every
timed request. Both sides use the torch thread count the server picks by default (the
CPUs less one, for its event loop; ``--threads`` sets another): on a busy 2-core machine
two threads make a 1 ms ConvNet prediction take 38 ms, which would flatter the server's
batching.

The run is a classification run folder written here with random but "trained-looking"
weights: ``--model resnet18`` (the default: 224x224 RGB, 10 classes, 320x240 JPEG
photos-to-be) or ``--model convnet`` (the digits demo's ConvNet at 16x16 on 32x32 grey
PNGs, where a forward pass costs less than an HTTP request does). Targets: throughput
ratio >= 0.8 and p99 < 10 x p50, no failed request.

    python benchmarks/serve.py
    python benchmarks/serve.py --model convnet --format json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from torch import nn

from _bench import Row, add_load_flag, interleaved, rate_row, report_loads, under_loads
from cnnlab import checkpoint, create_model
from cnnlab.demo import DIGITS_DEMO
from cnnlab.runs import load_run
from cnnlab.serve import default_threads

CLASSES = 10
# name -> (architecture, builder arguments, input size [C, H, W], image (H, W), format)
MODELS = {
    "resnet18": ("resnet18", {}, [3, 224, 224], (240, 320), "JPEG"),
    "convnet": ("convnet", DIGITS_DEMO["model_args"], [1, 16, 16], (32, 32), "PNG"),
}
FILES = 16  # distinct images, sent in turn


def trained_looking(name: str, args: dict, size: list[int]) -> nn.Module:
    torch.manual_seed(0)
    extra = {"img_size": size[1]} if name == "convnet" else {}
    model = create_model(name, num_classes=CLASSES, in_channels=size[0], **args, **extra)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_run(folder: Path, key: str) -> Path:
    name, args, size, _, _ = MODELS[key]
    model = trained_looking(name, args, size)
    folder.mkdir(parents=True)
    checkpoint.save_weights(folder / "best.safetensors", model)
    model_args = {"num_classes": CLASSES, "in_channels": size[0], **args}
    if name == "convnet":
        model_args["img_size"] = size[1]
    grey = size[0] == 1
    meta = {
        "task": "classify",
        "architecture": name,
        "model_args": model_args,
        "classes": [f"class{i}" for i in range(CLASSES)],
        "input_size": size,
        "mean": [0.5] if grey else [0.485, 0.456, 0.406],
        "std": [0.5] if grey else [0.229, 0.224, 0.225],
    }
    checkpoint.save_model_json(folder, checkpoint.ModelMeta(**meta))
    return folder


def write_images(folder: Path, key: str) -> list[Path]:
    """Smooth random pictures (upsampled noise), as photos compress, not as noise does."""
    _, _, size, (height, width), fmt = MODELS[key]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(FILES):
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        if size[0] == 1:
            image = image.convert("L")
        path = folder / f"{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}"
        image.save(path, format=fmt, quality=90)
        paths.append(path)
    return paths


class Server:
    """``cnnlab serve RUN --port 0`` in a child process."""

    def __init__(self, run: Path, threads: int | None) -> None:
        given = ["--threads", str(threads)] if threads else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", "0", *given],
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stderr:
            if found := re.match(r"^cnnlab serve: .* at (http://\S+/) ", line):
                self.url = found.group(1)
                break
        else:
            raise SystemExit("the server did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


def multipart(run_id: str, name: str, data: bytes, kind: str) -> tuple[bytes, str]:
    """The request body a browser's FormData makes of (run, file), and its content type."""
    boundary = "cnnlabbenchmarkboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="run"\r\n\r\n{run_id}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def client_round(url: str, bodies: list[tuple[bytes, str]], args, log: list) -> None:
    """``args.requests`` posts from ``args.clients`` threads; appends (seconds, ok) to log.

    The clients are http.client on keep-alive connections sending bodies encoded once:
    they share the machine with the server, and httpx would spend about 1.2 ms of CPU on
    each request (measured), as much as the server spends answering one for the ConvNet.
    """
    address = httpx.URL(url)
    counter = iter(range(args.requests))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(address.host, address.port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, kind = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/predict", body, {"Content-Type": kind})
                response = connection.getresponse()
                answer = response.read()
                ok = response.status == 200 and bool(json.loads(answer)["top"])
            except (OSError, http.client.HTTPException):
                connection.close()  # reconnects on the next request
                ok = False
            log.append((time.perf_counter() - started, ok))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--requests", type=int, default=400, help="per round and side")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side")
    parser.add_argument(
        "--threads", type=int, help="torch threads, both sides (default: what the server picks)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    threads = args.threads or default_threads(workers=1)
    if threads:
        torch.set_num_threads(threads)

    def measure(load: int) -> list[Row]:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = write_run(Path(tmp) / "run", args.model)
            paths = write_images(Path(tmp), args.model)
            kind = "image/jpeg" if paths[0].suffix == ".jpg" else "image/png"
            uploads = [(p.name, p.read_bytes(), kind) for p in paths]
            bodies = [multipart("run", *upload) for upload in uploads]
            run = load_run(run_dir, "cpu")
            server = Server(run_dir, threads)
            try:
                check = httpx.post(
                    server.url + "api/predict", data={"run": "run"}, files={"file": uploads[0]}
                ).json()
                local = run.predict(paths[0])[0]
                if check["top"][0]["class"] != local["top"][0]["class"]:
                    raise SystemExit(f"the server and load_run disagree: {check} vs {local}")
                rounds: dict[str, list[list]] = {"ours": [], "baseline": []}

                def ours() -> None:
                    rounds["ours"].append([])
                    client_round(server.url, bodies, args, rounds["ours"][-1])

                def baseline() -> None:
                    rounds["baseline"].append([])
                    for i in range(args.requests):
                        started = time.perf_counter()
                        ok = bool(run.predict(paths[i % len(paths)])[0]["top"])
                        rounds["baseline"][-1].append((time.perf_counter() - started, ok))

                seconds = interleaved({"ours": ours, "baseline": baseline}, args.repeats, warmup=1)
            finally:
                status = server.stop()
        timed = {side: [x for r in found[1:] for x in r] for side, found in rounds.items()}
        latency = {side: [t * 1000 for t, _ in found] for side, found in timed.items()}
        failures = sum(not ok for _, ok in timed["ours"])
        rate = {side: args.requests / s for side, s in seconds.items()}
        label = f"{args.model} {args.clients} clients"
        rows = [rate_row(f"{label}: throughput", rate["ours"], rate["baseline"], "requests/s")]
        for q in (50, 95, 99):
            ours_ms, loop_ms = percentile(latency["ours"], q), percentile(latency["baseline"], q)
            rows.append(Row(f"{label}: p{q} latency", ours_ms, loop_ms, "ms", loop_ms / ours_ms))
        spread = percentile(latency["ours"], 99) / percentile(latency["ours"], 50)
        rows.append(Row(f"{label}: p99 / p50 (target < 10)", spread, 10.0, "x", 10.0 / spread))
        total = len(timed["ours"])
        rows.append(
            Row(f"{label}: failed of {total}", failures, 0, "requests", float(failures == 0))
        )
        print(
            f"median round of {args.requests}: server {seconds['ours']:.2f} s, loop"
            f" {seconds['baseline']:.2f} s; the server exited with {status}; {os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        return rows

    title = "serve: cnnlab serve vs load_run(RUN).predict in a loop"
    report_loads(under_loads(args.load, measure), args.format, title)


if __name__ == "__main__":
    main()
