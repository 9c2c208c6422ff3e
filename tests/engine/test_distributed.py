"""Two processes on CPU (gloo) through torchrun: the run trains on the whole data, only rank
0 writes and prints, and a two-process run stopped mid-way resumes to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab import checkpoint
from cnnlab.data.digits import write_digits
from tests.conftest import read_metrics

EPOCHS = 4
BATCH = 32  # over both processes: 16 each


@pytest.fixture(scope="module")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits16") / "digits"
    write_digits(root, size=16)
    return root


def _torchrun(*args: str, command: tuple[str, ...] = ("train",)) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "cnnlab", *command, *args),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _finished(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_after_first_epoch(command: list[str], run: Path) -> None:
    """Start the two-process run and SIGTERM torchrun (as a job scheduler would) once an
    epoch is written; torchrun passes it on and the workers die at once."""
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    try:
        while not (run / "metrics.csv").is_file() or len(read_metrics(run)) < 1:
            if process.poll() is not None:
                pytest.fail(f"training ended early: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "no epoch finished within 60 s"
            time.sleep(0.05)
        workers = _children(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()
    assert len(workers) == 2
    for pid in workers:  # each worker runs in its own session: check none is left behind
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid), f"worker {pid} outlived torchrun"


def test_two_processes_train_resume_and_report_on_the_whole_data(
    digits16: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    start = _torchrun(
        *(str(digits16), "--out", str(run), "--model", "convnet", "--img-size", "16"),
        *("--cdims", "8,16", "--hdims", "64,", "--no-flip", "--epochs", str(EPOCHS)),
        *("--batch-size", str(BATCH), "--lr", "1e-2"),
    )
    _stop_after_first_epoch(start, run)
    done = checkpoint.load_state(run / "last.pt")["epoch"]
    assert 1 <= done < EPOCHS

    resumed = _finished(_torchrun("--resume", str(run), "--format", "json"), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)  # one JSON document: only rank 0 printed
    assert report["top1"] >= 0.9
    assert json.loads((run / "report.json").read_text()) == report
    # Only rank 0 prints progress: each remaining epoch's row appears once.
    rows_printed = [line.split()[0] for line in resumed.stderr.splitlines() if line.strip()]
    for epoch in range(done + 1, EPOCHS + 1):
        assert rows_printed.count(f"{epoch}/{EPOCHS}") == 1

    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    # Training numbers are over both shards: with 1,437 training images, each process has
    # 719 (padded) in 44 full batches of 16, so 1,408 images per epoch in all. Accuracies
    # are counts over 1,408; over one shard (704) some epoch would give a half count.
    train_size = len(json.loads((run / "split.json").read_text())["train"])
    per_process = (train_size + 1) // 2 // (BATCH // 2) * (BATCH // 2)
    counts = [float(r["train_top1"]) * 2 * per_process for r in rows]
    assert all(abs(c - round(c)) < 1e-6 for c in counts)
    assert any(round(c) % 2 for c in counts)


@pytest.mark.parametrize(
    ("task", "images", "size", "model_flags", "evaluated"),
    [
        ("segment", 12, 32, (), ("n", 3)),
        ("detect", 16, 48, ("--head-channels", "8", "--hidden", "16"), ("n_images", 4)),
    ],
)
def test_segmentation_and_detection_train_under_torchrun(
    tmp_path: Path,
    task: str,
    images: int,
    size: int,
    model_flags: tuple[str, ...],
    evaluated: tuple[str, int],
) -> None:
    from cnnlab.data.shapes import write_shapes

    data, run = tmp_path / "shapes", tmp_path / "run"
    write_shapes(data, task=task, n=images, size=48, seed=0)
    trained = _finished(
        _torchrun(
            *(str(data), "--out", str(run), "--epochs", "1", "--batch-size", "4"),
            *("--img-size", str(size), "--val-split", "0.25", "--format", "json"),
            *model_flags,
            command=(task, "train"),
        ),
        timeout=180,
    )
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)  # one JSON document: only rank 0 printed
    key, count = evaluated
    assert report[key] == count and json.loads((run / "report.json").read_text()) == report
    assert sum(line.split()[:1] == ["1/1"] for line in trained.stderr.splitlines()) == 1
    assert len(read_metrics(run)) == 1
