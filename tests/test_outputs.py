"""What cnnlab writes, and what happens when writing goes wrong (docs/safety.md).

Every command that writes follows one rule (``cnnlab.destinations``): a new or empty
folder, never an input, nothing inside the data, no existing file without ``--overwrite``,
never through a symbolic link. A full disk or a read-only folder is one line naming the
path (exit 2), SIGTERM stops a command as Ctrl-C does (exit 130), and neither leaves a
``.partial`` folder, a ``.tmp`` file or half a run behind. The faults are real: a tmpfs
filled to the last byte, a read-only tmpfs (both need root; CI runs the tests as root).

Most commands run in this process through ``cnnlab.cli.main`` (a child process costs
seconds of imports); the SIGTERM and concurrency tests need real child processes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.files import run_lock
from tests.conftest import train_tiny_classifier

TINY = ["--model", "convnet", "--cdims", "4", "--hdims", "8", "--img-size", "16"]


def cli(*args: object) -> tuple[int, str]:
    """``cnnlab ARGS`` in this process: (exit status, stderr). The SIGTERM handler the
    CLI installs is put back afterwards."""
    stderr = io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
            code = main([str(arg) for arg in args])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, stderr.getvalue()


def refused(result: tuple[int, str], *words: str) -> str:
    """Exit status 2 and, as the last line on stderr, one error naming each of ``words``."""
    code, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def leftovers(root: Path) -> list[str]:
    """What an interrupted or failed write could leave under ``root``."""
    return sorted(
        str(path)
        for path in root.rglob("*")
        if path.name.endswith(".tmp") or ".partial" in path.name or path.name == ".lock"
    )


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three class folders of six 16 px random PNGs. Read-only: other tests share it."""
    root = tmp_path_factory.mktemp("outputs") / "data"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A one-epoch run on ``data``. Read-only: other tests share it."""
    return train_tiny_classifier(data, tmp_path_factory.mktemp("outputs-run") / "run")


# ---------------------------------------------------------------------------- faults


def mount(folder: Path, options: str) -> None:
    """A tmpfs at ``folder``, or the test skipped, saying why, where it cannot be made."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"the kernel refused a tmpfs mount ({done.stderr.strip()})")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs filled to its last byte by one file, ``filler``."""
    folder = tmp_path / "full"
    mount(folder, "size=256k")
    try:
        with open(folder / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    mount(folder, "ro,size=64k")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# Each command that writes, given an output folder OUT (a full or read-only disk).
WRITERS: dict[str, Callable[[Path, Path, Path], list[object]]] = {
    "train": lambda data, run, out: ["train", data, "--out", out / "run", *TINY, "--quiet"],
    "predict --save": lambda data, run, out: ["predict", run, data / "cat", "--save", out / "p"],
    "predict --save-csv": lambda data, run, out: [
        "predict",
        run,
        data / "cat",
        "--save-csv",
        out / "p.csv",
    ],
    "export": lambda data, run, out: ["export", run, "--out", out / "m.pt2", "--images", 1],
    "data clean": lambda data, run, out: ["data", "clean", data, out / "clean"],
}


@pytest.mark.parametrize("command", WRITERS)
def test_a_full_disk_is_one_line_and_leaves_nothing(
    command: str, data: Path, run: Path, full_disk: Path
) -> None:
    before = files_of(run)
    line = refused(cli(*WRITERS[command](data, run, full_disk)), str(full_disk), "disk is full")
    print(line)  # what the user sees, for the record (pytest -s)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    assert files_of(run) == before and not leftovers(run)


@pytest.mark.parametrize("command", WRITERS)
def test_a_read_only_folder_is_one_line_and_leaves_nothing(
    command: str, data: Path, run: Path, read_only: Path
) -> None:
    line = refused(cli(*WRITERS[command](data, run, read_only)), str(read_only), "read-only")
    print(line)
    assert not any(read_only.iterdir())
    assert not leftovers(run)


def interrupt_when(
    args: list[object], ready: Callable[[], bool], tmp_path: Path
) -> subprocess.CompletedProcess:
    """Start ``cnnlab ARGS``, send SIGTERM as soon as ``ready()`` (it is mid-way), and
    return how it ended."""
    child = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 180
    while not ready():
        assert child.poll() is None, f"finished before it was interrupted: {child.stderr.read()}"
        assert time.monotonic() < deadline, "never got mid-way"
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def assert_stopped_as_by_ctrl_c(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"


@pytest.fixture(scope="module")
def many_digits(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """60 of each digit: enough files that copying or drawing them takes a while, so a
    signal sent once the first is written arrives mid-way. Read-only."""
    root = tmp_path_factory.mktemp("many_digits") / "digits"
    for folder in sorted(digits_dir.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:60]:
            shutil.copy(path, root / folder.name / path.name)
    return root


def test_sigterm_during_data_clean_leaves_no_partial_folder(
    many_digits: Path, tmp_path: Path
) -> None:
    def copying() -> bool:
        return any(any(p.rglob("*.png")) for p in tmp_path.glob(".clean.partial-*"))

    done = interrupt_when(["data", "clean", many_digits, tmp_path / "clean"], copying, tmp_path)
    assert_stopped_as_by_ctrl_c(done)
    assert not any(tmp_path.iterdir())


def test_sigterm_during_predict_save_leaves_no_drawings(
    run: Path, many_digits: Path, tmp_path: Path
) -> None:
    out = tmp_path / "drawn"
    args = ["predict", run, many_digits, "--save", out, "--device", "cpu"]
    done = interrupt_when(args, lambda: out.is_dir() and any(out.rglob("*.png")), tmp_path)
    assert_stopped_as_by_ctrl_c(done)
    assert not out.exists() and not leftovers(tmp_path)


def test_sigterm_during_export_leaves_no_partial_file(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    before = files_of(copy)
    args = ["export", copy, "--format", "pt2", "--images", 1]
    done = interrupt_when(args, lambda: (copy / ".lock").exists(), tmp_path)
    assert_stopped_as_by_ctrl_c(done)
    assert files_of(copy) == before and not leftovers(copy)


# ---------------------------------------------------------------------------- the rule


def test_data_shapes_never_writes_into_a_users_folder(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    for name in ("images/a.png", "masks/a.png", "classes.txt", "annotations.json"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(f"the user's own {name}")
    before = files_of(mine)
    for task in ("segment", "detect"):
        args = ["data", "shapes", mine, "--task", task, "--n", 2, "--size", 32]
        refused(cli(*args), str(mine), "not empty")
    assert files_of(mine) == before
    new = tmp_path / "new"
    assert cli("data", "shapes", new, "--task", "detect", "--n", 2, "--size", 32)[0] == 0
    assert (new / "annotations.json").is_file() and not leftovers(tmp_path)


def test_heatmap_never_replaces_its_photo_and_others_only_with_overwrite(
    run: Path, tmp_path: Path
) -> None:
    photo, other = tmp_path / "photo.png", tmp_path / "other.png"
    pixels = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    other.write_bytes(b"the user's")
    kept = photo.read_bytes()
    refused(cli("heatmap", run, photo, "--out", photo, "--overwrite"), "replace this input")
    refused(cli("heatmap", run, photo, "--out", other), str(other), "--overwrite")
    assert photo.read_bytes() == kept and other.read_bytes() == b"the user's"
    assert cli("heatmap", run, photo, "--out", other, "--overwrite")[0] == 0
    assert other.read_bytes().startswith(b"\x89PNG") and photo.read_bytes() == kept


def test_compare_plot_and_lr_find_replace_a_file_only_with_overwrite(
    data: Path, tmp_path: Path
) -> None:
    plot, curve = tmp_path / "plot.png", tmp_path / "lr.png"
    plot.write_bytes(b"mine")
    curve.write_bytes(b"mine too")
    compare = ["compare", "convnet", "--input", "3,32,32", "--plot", plot]
    lr_find = ["lr-find", data, "--out", curve, *TINY, "--steps", 3, "--batch-size", 4, "--quiet"]
    refused(cli(*compare), str(plot), "--plot or pass --overwrite")
    refused(cli(*lr_find), str(curve), "--overwrite")
    assert plot.read_bytes() == b"mine" and curve.read_bytes() == b"mine too"
    assert cli(*compare, "--overwrite")[0] == 0 and cli(*lr_find, "--overwrite")[0] == 0
    assert plot.read_bytes().startswith(b"\x89PNG") and curve.read_bytes().startswith(b"\x89PNG")
    refused(cli("lr-find", data, "--out", data / "cat", *TINY, "--steps", 3), "inside the data")


def test_export_keeps_a_users_own_export_json_and_replaces_only_with_overwrite(
    run: Path, tmp_path: Path
) -> None:
    (tmp_path / "mine").mkdir()
    mine = tmp_path / "mine" / "export.json"
    mine.write_text('{"my": "notes"}')
    refused(cli("export", run, "--out", mine.parent / "m.pt2"), str(mine), "not a cnnlab export")
    assert mine.read_text() == '{"my": "notes"}' and not (mine.parent / "m.pt2").exists()
    target = tmp_path / "m.pt2"
    target.write_bytes(b"an older file")
    refused(cli("export", run, "--out", target, "--images", 1), str(target), "--overwrite")
    assert target.read_bytes() == b"an older file"
    assert cli("export", run, "--out", target, "--images", 1, "--overwrite")[0] == 0
    assert "m.pt2" in json.loads((tmp_path / "export.json").read_text())


def test_predict_writes_nothing_inside_the_data(data: Path, run: Path, tmp_path: Path) -> None:
    before = files_of(data)
    photos = tmp_path / "photos"
    shutil.copytree(data / "cat", photos)
    for args in (
        [data / "cat", "--save", data / "cat" / "drawn"],  # a folder it reads
        [photos, "--save", data / "drawn"],  # the run's own data: the next train reads it
        [photos, "--save-csv", data / "dog" / "p.csv"],
    ):
        refused(cli("predict", run, *args, "--overwrite"), "inside the data folder")
    assert files_of(data) == before


def test_a_symbolic_link_as_the_output_is_refused(data: Path, run: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    photo = data / "cat" / "0.png"
    for name, args in {
        "run": ["train", data, "--out", "{}", *TINY],
        "p.csv": ["predict", run, photo, "--save-csv", "{}"],
        "heat.png": ["heatmap", run, photo, "--out", "{}"],
        "m.pt2": ["export", run, "--out", "{}"],
        "clean": ["data", "clean", data, "{}"],
        "shapes": ["data", "shapes", "{}", "--task", "detect", "--n", 1, "--size", 32],
    }.items():
        link = tmp_path / name
        link.symlink_to(nowhere / name)
        refused(cli(*[str(a).format(link) for a in args]), str(link), "symbolic link")
    assert not nowhere.exists()


def test_two_exports_into_one_folder_are_both_recorded(run: Path, tmp_path: Path) -> None:
    second = shutil.copytree(run, tmp_path / "second")
    shared = tmp_path / "exports"
    shared.mkdir()
    command = [sys.executable, "-m", "cnnlab", "export", "--images", "1"]
    children = [
        subprocess.Popen(
            [*command, source, "--out", shared / f"{name}.pt2"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for source, name in ((run, "first"), (second, "second"))
    ]
    for child in children:
        assert child.wait(timeout=300) == 0, child.stderr.read()
    assert sorted(json.loads((shared / "export.json").read_text())) == ["first.pt2", "second.pt2"]


def test_export_into_a_run_in_use_is_refused_by_the_run_lock(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    with run_lock(copy):
        refused(cli("export", copy, "--format", "pt2"), str(copy), "in use by process")
    assert not (copy / "model.pt2").exists()


# ---------------------------------------------------------------------------- deleted data


def test_resume_and_eval_name_a_deleted_split_image_before_any_work(
    data: Path, tmp_path: Path
) -> None:
    own = Path(shutil.copytree(data, tmp_path / "data"))
    run_dir = train_tiny_classifier(own, tmp_path / "run")
    recorded = json.loads((run_dir / "split.json").read_text())
    last = (run_dir / "last.pt").stat().st_mtime_ns
    for split in ("test", "val"):
        gone = own / recorded[split][0][0]
        kept = gone.read_bytes()
        gone.unlink()
        with pytest.raises(CnnlabError, match=f"{gone}: missing"):
            cnnlab.resume(run_dir)
        refused(cli("eval", run_dir, "--split", split), str(gone), "missing")
        gone.write_bytes(kept)
    assert (run_dir / "last.pt").stat().st_mtime_ns == last  # no epoch was trained
