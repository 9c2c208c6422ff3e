"""Two processes on CPU (gloo) through torchrun: the run trains on the whole data, only rank
0 writes and prints, and a two-process run stopped mid-way resumes to the end; a signal
that reaches one process stops both at the same step."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import cnnlab.engine.distributed as distributed
import cnnlab.engine.state as state
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
    epoch is written; torchrun passes it on and the workers stop together at the next
    step (``cnnlab.engine.state.stop_together``), report and leave."""
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
        try:
            # torchrun gives its workers 30 s after SIGTERM, then SIGKILLs them.
            said = process.communicate(timeout=30)[1].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert "forcefully" not in said, said  # no worker outlived SIGTERM until SIGKILL
    # Both stopped together and reported once, through rank 0, on the epoch written.
    assert said.count("interrupted after epoch") == 1, said
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


STEPS, SIGNALLED_AT = 50, 3


def _train_steps(rank: int, store: Path, out: Path) -> None:
    """One process of two: steps with a collective each (as DDP's), Ctrl-C and SIGTERM held
    as ``fit`` holds them in a group; rank 0 alone is signalled, at step SIGNALLED_AT,
    while rank 1 is already on its way into the next step's collective. Writes the steps
    it took and what rank 0 sent after stopping (the report's collective)."""
    code = 1
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=20),  # a broken stop fails, not hangs
        )
        taken = []
        try:
            with state.hold_ctrl_c():
                for step in state.stop_together(range(STEPS)):
                    taken.append(step)
                    if rank == 0 and step == SIGNALLED_AT:
                        os.kill(os.getpid(), signal.SIGTERM)
                    dist.all_reduce(torch.ones(4))
        except KeyboardInterrupt:
            report = distributed.from_main({"stopped_after": taken[-1]} if rank == 0 else None)
            out.write_text(json.dumps({"taken": taken, "report": report}))
            code = 0
        dist.destroy_process_group()
    finally:
        os._exit(code)


def test_a_signal_to_one_process_stops_the_group_at_the_same_step(tmp_path: Path) -> None:
    fork = multiprocessing.get_context("fork")  # the children import nothing: a second
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    workers = [
        fork.Process(target=_train_steps, args=(rank, tmp_path / "store", outs[rank]))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=40)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    codes = [worker.exitcode for worker in workers]
    assert codes == [0, 0], f"exit codes {codes}: a process was left in a collective"
    results = [json.loads(out.read_text()) for out in outs]
    # Both left after the step that read the signal's vote: the next one.
    assert results[0]["taken"] == results[1]["taken"] == list(range(SIGNALLED_AT + 2))
    assert results[1]["report"] == {"stopped_after": SIGNALLED_AT + 1}
