"""Shared fixtures and helpers: one way to run the CLI, read a run's metrics.csv, configure a
tiny training and get a shapes data set. Test modules import the helpers as
``from tests.conftest import run_cli`` (every tests folder is a package)."""

from __future__ import annotations

import csv
import io
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cnnlab.config import TrainConfig
from cnnlab.data.digits import write_digits
from cnnlab.data.shapes import write_shapes


def run_cli(
    *args: object,
    cwd: Path | None = None,
    timeout: float = 300,
    memory_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """``cnnlab ARGS`` as a user types it, in a child process with one torch thread and this
    process's environment (so PYTHONPATH and the tests' cnnlab cache carry over); stdout and
    stderr captured as text. ``memory_limit`` caps the child's address space in bytes."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if memory_limit else None,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def run_cli_here(capsys: pytest.CaptureFixture, *args: object) -> subprocess.CompletedProcess:
    """``run_cli`` in this process, for a test of what the command prints and the status it
    ends with rather than of the process (a child pays ~2 s for ``import torch``): main's
    status, or the one argparse's SystemExit carries, and what it printed (read from
    ``capsys``, which is cleared before and after)."""
    from cnnlab import cli

    capsys.readouterr()  # what came before is not this command's
    argv = [str(arg) for arg in args]
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["cnnlab", *argv], status, printed.out, printed.err)


def read_metrics(run: Path, *, timed: bool = True) -> list[dict[str, str]]:
    """The rows of ``run``/metrics.csv as strings; ``timed=False`` leaves out each epoch's
    seconds, the one column that differs between two runs of the same training."""
    return metrics_rows((Path(run) / "metrics.csv").read_text(), timed=timed)


def metrics_rows(text: str, *, timed: bool = True) -> list[dict[str, str]]:
    """``read_metrics`` for the text of a metrics.csv kept elsewhere."""
    rows = list(csv.DictReader(io.StringIO(text)))
    return rows if timed else [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def tiny_config(data: Path | str, out: Path | str, **changes: object) -> TrainConfig:
    """A TrainConfig that trains a tiny convnet on the CPU in seconds, quietly; ``changes``
    replace any of its settings."""
    settings = {
        "data": str(data),
        "out": str(out),
        "model": "convnet",
        "model_args": {"cdims": [8, 16], "hdims": [32]},
        "img_size": 16,
        "epochs": 2,
        "batch_size": 64,
        "lr": 3e-3,
        "flip": False,
        "device": "cpu",
        "quiet": True,
    }
    return TrainConfig(**{**settings, **changes})


def train_tiny_classifier(data: Path, out: Path, **changes: object) -> Path:
    """``out``: a classification run of a tiny convnet trained one epoch on ``data`` (split
    60/20/20), for tests that need any trained run rather than a good one; ``changes``
    replace any of its settings."""
    import cnnlab

    cnnlab.train(
        data,
        out,
        model="convnet",
        model_args={"cdims": [4], "hdims": [8]},
        img_size=16,
        epochs=1,
        batch_size=4,
        val_split=0.2,
        test_split=0.2,
        quiet=True,
        **changes,
    )
    return out


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tests' layers are tiny and two pytest workers share two cores: with more than one
    thread each, OpenMP threads wait for a core and small ops run ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def own_cnnlab_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tests' cnnlab cache (``cnnlab models``' table) is theirs, not the user's."""
    folder = tmp_path_factory.mktemp("cnnlab-cache")
    previous = os.environ.get("CNNLAB_CACHE")
    os.environ["CNNLAB_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("CNNLAB_CACHE", None)
    else:
        os.environ["CNNLAB_CACHE"] = previous


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits as 32x32 grayscale PNGs, DIR/<digit>/NNNN.png, written once per
    session (1,797 files, about 1.5 s). Treat it as read-only: other tests share it."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, size=32)
    return root


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``shapes_dir(task, n, size, seed=0)``: a synthetic shapes set written once per session
    for each distinct set of arguments. Treat it as read-only: other tests share it (what
    cnnlab itself caches beside the data, such as proposals, may be added)."""
    written: dict[tuple, Path] = {}

    def folder(task: str = "detect", n: int = 12, size: int = 64, seed: int = 0) -> Path:
        key = (task, n, size, seed)
        if key not in written:
            written[key] = tmp_path_factory.mktemp(f"shapes-{task}-{n}-{size}-{seed}")
            write_shapes(written[key], task=task, n=n, size=size, seed=seed)
        return written[key]

    return folder


@pytest.fixture(scope="session")
def few_digits(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """Digits 0, 1 and 2 of ``digits_dir``, 40 of each (96 train / 12 val / 12 test at the
    default splits): for a training that needs a few steps, not 1,797 images. Read-only."""
    root = tmp_path_factory.mktemp("few_digits") / "digits"
    for digit in ("0", "1", "2"):
        (root / digit).mkdir(parents=True)
        for path in sorted((digits_dir / digit).iterdir())[:40]:
            shutil.copy(path, root / digit / path.name)
    return root


def save_torchvision_file(
    state: dict, folder: Path, torchvision_name: str, patch: pytest.MonkeyPatch
) -> Path:
    """Save ``state`` into the torch hub cache ``folder`` as cnnlab's stand-in for
    torchvision's weight file. torchvision's names carry the first hex digits of the real
    file's SHA-256, which cnnlab checks, so the file gets a name carrying its own and cnnlab
    is pointed at that name (nothing can be downloaded here)."""
    import hashlib

    from cnnlab import weights

    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    path = staged.rename(folder / f"{torchvision_name}-{digest[:8]}.pth")
    real = weights.torchvision_weight_urls
    patch.setattr(
        weights,
        "torchvision_weight_urls",
        lambda name: (
            [f"https://example.invalid/{path.name}"] if name == torchvision_name else real(name)
        ),
    )
    return path


@pytest.fixture
def torchvision_file(monkeypatch: pytest.MonkeyPatch):
    """``save_torchvision_file`` with this test's monkeypatch."""
    return lambda state, folder, name: save_torchvision_file(state, folder, name, monkeypatch)


# --- cnnlab serve: three tiny runs and the real server in a child process ----------------


@pytest.fixture(scope="session")
def serve_runs(
    tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, shapes_dir: Callable[..., Path]
) -> dict[str, Path]:
    """A tiny run of each task, by task, and ``{task}_data``, the folder it was trained on:
    a convnet on 20 of each digit (32x32, trained at 16x16; ten classes, as the page shows
    a top 10), FCN-32s on a convnet backbone and YOLOv1 on VGG-11 cut at stride 2 on 6
    synthetic shapes images each. A few seconds."""
    import cnnlab

    root = tmp_path_factory.mktemp("serve_runs")
    runs = {"classify": root / "digits", "classify_data": root / "digits_data"}
    for digit in sorted(p.name for p in digits_dir.iterdir()):
        (root / "digits_data" / digit).mkdir(parents=True)
        for path in sorted((digits_dir / digit).iterdir())[:20]:
            shutil.copy(path, root / "digits_data" / digit / path.name)
    cnnlab.train(
        runs["classify_data"],
        runs["classify"],
        model="convnet",
        model_args={"cdims": [4], "hdims": [8]},
        img_size=16,
        epochs=1,
        batch_size=64,
        quiet=True,
    )
    runs["segment"], runs["segment_data"] = root / "shapes-fcn", shapes_dir("segment", 6, 32)
    cnnlab.train(
        runs["segment_data"],
        runs["segment"],
        task="segment",
        model="fcn32s",
        model_args={"backbone": "convnet", "backbone_args": {"cdims": [4] * 5, "img_size": 32}},
        epochs=1,
        batch_size=2,
        val_split=0.34,
        quiet=True,
    )
    runs["detect"], runs["detect_data"] = root / "shapes-yolo", shapes_dir("detect", 6, 64)
    yolo = {"backbone": "vgg11", "reduction": 2, "head": "conv", "grid": 32, "head_channels": 8}
    cnnlab.train(
        runs["detect_data"],
        runs["detect"],
        task="detect",
        model="yolov1",
        model_args=yolo,
        img_size=64,
        epochs=1,
        batch_size=2,
        val_split=0.34,
        quiet=True,
    )
    return runs


class ServerProcess:
    """``cnnlab serve ARGS --port 0`` in a child process; ``url`` once it said where."""

    COMMAND = "serve"
    ANNOUNCED = re.compile(r"^cnnlab serve: .* at (http://\S+/) ")

    def __init__(self, *args: object, timeout: float = 120) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnlab", self.COMMAND, *map(str, args), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # the pipe never fills
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no address after {timeout} s: {self.stderr}") from None
            if line is None:
                raise AssertionError(f"the server ended: {''.join(self.stderr)}")
            if found := self.ANNOUNCED.match(line):
                self.url = found.group(1)
                return

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and return the exit status (the test fails if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running {timeout} s after signal {sig}") from None


@pytest.fixture(scope="session")
def launch_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``cnnlab serve ARGS`` servers; any still running at the end is stopped."""
    started: list[ServerProcess] = []

    def launch(*args: object) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]

    yield launch
    for server in started:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
