"""Nothing a user feeds cnnlab crashes it, leaks out of its folder or destroys a file.

Each bad input is built here and given to the real command line in a child process whose
address space is capped (``resource.setrlimit``): the child must end with exit status 2
and one line on stderr naming the file (no traceback, no death by a signal, no runaway
memory), and every file that existed before must be byte-identical afterwards. Where the
input holds nothing that could run away (arguments, folders, small JSON, YAML and
checkpoint files, valid images), the command runs in this process instead
(``run_cli_here``: the same status and one line, without a child's seconds of imports).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab import checkpoint, files
from cnnlab.data.shapes import write_shapes
from tests.conftest import run_cli, run_cli_here, train_tiny_classifier

MEMORY_LIMIT = 6 << 30  # the children's address space: torch alone maps about 3 GiB


# Every command here runs with its address space capped: a runaway read fails the test.
cli = functools.partial(run_cli, timeout=180, memory_limit=MEMORY_LIMIT)


def assert_refused(done: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2 and one line on stderr that names each of ``names``."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (links not followed)."""
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before


# ---------------------------------------------------------------------------- bad files


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 8-bit grey PNG of zeros (``rows`` of them in its data: fewer is a header
    that claims more than the file holds). Zeros compress ~1000:1: a small bomb."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[offset] = value
    return bytes(changed)


def good_png(seed: int = 0, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def bad_images() -> dict[str, bytes]:
    """Files named like images that must each be refused, by what is wrong with them."""
    png = good_png()
    idat = png.index(b"IDAT")
    return {
        "idat_byte.png": with_byte(png, idat + 10, png[idat + 10] ^ 0xFF),  # fails its CRC
        # A chunk length pointing past the end: torchvision's decoder segfaulted on this.
        "chunk_length.png": with_byte(png, idat - 1, 0xFF),
        "bomb.png": grey_png(20000, 20000),  # 400 megapixels in about 400 KB
        "claims_60000.png": grey_png(60000, 60000, rows=2),
        "text.png": b"this is not an image at all",
        "truncated.jpg": _jpeg()[:200],
        "empty.jpg": b"",
    }


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three class folders of small random PNGs."""
    root = tmp_path_factory.mktemp("classes") / "data"
    for label, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f"{i}.png").write_bytes(good_png(10 * label + i))
    return root


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory, classes_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "classify"
    return train_tiny_classifier(classes_dir, out)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_predict_names_each_bad_image_and_still_predicts_the_good_one(
    classify_run: Path, tmp_path: Path, name: str
) -> None:
    bad = tmp_path / name
    bad.write_bytes(bad_images()[name])
    good = tmp_path / "good.png"
    good.write_bytes(good_png(99))
    before = snapshot(tmp_path)
    done = cli("predict", classify_run, bad, good, "--format", "json")
    line = assert_refused(done, name)
    assert [r["file"] for r in json.loads(done.stdout)] == [str(good)]
    assert_unchanged(before, tmp_path)
    if name.startswith(("bomb", "claims")):
        assert "above the limit" in line


def test_data_check_reports_every_bad_file_and_survives_links_and_pipes(
    classes_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(classes_dir, data)
    for name, content in bad_images().items():
        (data / "cat" / name).write_bytes(content)
    os.symlink(data, data / "dog" / "loop")  # a link back up the tree: never followed
    os.symlink(tmp_path / "elsewhere", data / "fox" / "away")  # out of the tree
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "stray.png").write_bytes(good_png(5))
    os.mkfifo(data / "fox" / "pipe.png")  # reading it would block forever
    before = snapshot(data)
    done = cli("data", "check", data, "--format", "json", timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["classes"] == {"cat": 6, "dog": 6, "fox": 6}
    assert sorted(b["path"] for b in report["bad_files"]) == sorted(
        f"cat/{name}" for name in bad_images()
    )
    assert_unchanged(before, data)


def test_training_skips_bad_files_and_refuses_nothing_else(
    classes_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(classes_dir, data)
    (data / "cat" / "chunk_length.png").write_bytes(bad_images()["chunk_length.png"])
    (data / "dog" / "bomb.png").write_bytes(bad_images()["bomb.png"])
    args = ["--model", "convnet", "--cdims", "4", "--hdims", "8", "--img-size", "16"]
    done = cli(
        "train",
        data,
        "--out",
        tmp_path / "run",
        *args,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert "chunk_length.png" in done.stderr and "bomb.png" in done.stderr
    assert (tmp_path / "run" / "best.safetensors").is_file()


# ---------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def segment_run(
    tmp_path_factory: pytest.TempPathFactory, shapes_dir: Callable[..., Path]
) -> tuple[Path, Path]:
    root, shapes = tmp_path_factory.mktemp("segment"), shapes_dir("segment", 6, 32)
    backbone = {"backbone": "convnet", "backbone_args": {"cdims": [4] * 5, "img_size": 32}}
    cnnlab.train(
        shapes,
        root / "run",
        task="segment",
        model="fcn32s",
        model_args=backbone,
        epochs=1,
        batch_size=2,
        val_split=0.34,
        quiet=True,
    )
    return root / "run", shapes


def test_segment_predict_never_writes_over_its_input(
    segment_run, tmp_path: Path, capsys, monkeypatch
) -> None:
    # Valid inputs and folders, not a bad file: the command runs in this process (five
    # children cost ~25 s of imports), from tmp_path as its working folder.
    run, shapes = segment_run
    monkeypatch.chdir(tmp_path)
    here = functools.partial(run_cli_here, capsys)
    photo = tmp_path / "photo.png"
    shutil.copy(shapes / "images" / "0.png", photo)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(shapes / "images" / "1.png", tmp_path / "a" / "x.png")
    shutil.copy(shapes / "images" / "2.png", tmp_path / "b" / "x.png")
    before = snapshot(tmp_path)
    done = here("segment", "predict", run, "photo.png", "a/x.png", "b/x.png")
    assert done.returncode == 0, done.stderr
    assert_unchanged(before, tmp_path)  # photo.png is still the photo
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "predictions").rglob("*"))
    assert written == [
        "predictions/a",
        "predictions/a/x.png",
        "predictions/a/x_overlay.png",
        "predictions/b",
        "predictions/b/x.png",
        "predictions/b/x_overlay.png",
        "predictions/photo.png",
        "predictions/photo_overlay.png",
    ]
    # The default folder is new each time; an explicit one refuses to replace files.
    assert here("segment", "predict", run, "photo.png").returncode == 0
    assert (tmp_path / "predictions2" / "photo.png").is_file()
    before = snapshot(tmp_path)
    refused = here("segment", "predict", run, "photo.png", "--out", "predictions")
    assert_refused(refused, "predictions/photo.png", "--overwrite")
    assert_unchanged(before, tmp_path)
    again = here("segment", "predict", run, "photo.png", "--out", "predictions", "--overwrite")
    assert again.returncode == 0, again.stderr
    # --out pointing at the input's own folder: the input is never the output.
    before = snapshot(tmp_path)
    clash = here("segment", "predict", run, "a/x.png", "--out", "a", "--overwrite")
    assert_refused(clash, "x.png", "replace this input")
    assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------------------- run folders


def test_train_out_must_be_new_empty_or_a_run_to_resume(
    classes_dir: Path, tmp_path: Path, capsys
) -> None:
    # Folders, not file contents: refused before any data is read, so in this process.
    cli = functools.partial(run_cli_here, capsys)
    args = ["--model", "convnet", "--cdims", "4", "--hdims", "8", "--img-size", "16"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own file\n")
    (mine / "metrics.csv").write_text("precious\n")
    before = snapshot(tmp_path)
    assert_refused(cli("train", classes_dir, "--out", mine, *args), str(mine), "not empty")
    assert_unchanged(before, tmp_path)
    inside = classes_dir / "cat" / "run"
    assert_refused(cli("train", classes_dir, "--out", inside, *args), "inside the data folder")
    assert not inside.exists()
    # --num-classes that disagrees with the data fails before anything is written.
    assert_refused(
        cli("train", classes_dir, "--out", tmp_path / "five", *args, "--num-classes", "5"),
        "num_classes is 5",
        "3 classes",
    )
    assert not (tmp_path / "five").exists()


def test_two_trainings_on_one_out_cannot_both_write(classes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "train",
        str(classes_dir),
        "--out",
        str(out),
        "--model",
        "convnet",
        "--cdims",
        "4",
        "--hdims",
        "8",
        "--img-size",
        "16",
        "--epochs",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=180), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by process" in refused or "already holds a run" in refused
    assert cli("eval", out, "--format", "json").returncode == 0  # one whole run, not a hybrid


def test_ctrl_c_saves_exits_130_and_says_how_to_resume(classes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "train",
            str(classes_dir),
            "--out",
            str(out),
            "--model",
            "convnet",
            "--cdims",
            "4",
            "--hdims",
            "8",
            "--img-size",
            "16",
            "--epochs",
            "500",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"cnnlab train --resume {out}" in stderr
    assert "top-1" in stdout  # the report of the best weights
    assert (out / "report.json").is_file()


def test_a_leftover_temporary_file_goes_when_the_run_is_opened(
    classify_run: Path, tmp_path: Path, capsys
) -> None:
    cli = functools.partial(run_cli_here, capsys)  # a finished run's files: in this process
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    leftover = run / ".metrics.csv.4242.deadbeef.tmp"
    leftover.write_text("half a file")
    done = cli("train", "--resume", run, "--quiet")
    assert done.returncode == 0, done.stderr
    assert not leftover.exists() and not (run / ".lock").exists()


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda meta: meta["model_args"].update(colour=3), "unexpected keyword"),
        (lambda meta: meta.update(classes="cat,dog,fox"), "classes must be"),
        (lambda meta: meta.update(input_size=[3, "16", 16]), "input_size must be"),
        (lambda meta: meta.update(architecture="resnet1"), "unknown model 'resnet1'"),
    ],
)
def test_an_edited_model_json_is_one_line(
    classify_run: Path, tmp_path: Path, edit, complaint, capsys
) -> None:
    cli = functools.partial(run_cli_here, capsys)  # a small JSON file: in this process
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    meta = files.read_json(run / "model.json")
    edit(meta)
    files.write_json(run / "model.json", meta)
    assert_refused(cli("eval", run), "model.json", complaint)


@pytest.mark.parametrize(
    "state",
    [
        {"epoch": 1},  # keys missing
        "not a dict at all",
        "a state of another model",
    ],
)
def test_a_foreign_last_pt_is_one_line(
    classify_run: Path, tmp_path: Path, state: object, capsys
) -> None:
    cli = functools.partial(run_cli_here, capsys)  # a small checkpoint: in this process
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    config = files.read_yaml(run / "config.yaml")
    files.write_yaml(run / "config.yaml", {**config, "epochs": 3})
    if state == "a state of another model":
        saved = checkpoint.load_state(run / "last.pt")
        other = cnnlab.create_model(
            "convnet", num_classes=3, in_channels=3, img_size=16, cdims=[8], hdims=[8]
        )
        state = {**saved, "model": other.state_dict()}
    checkpoint.save_state(run / "last.pt", state)
    before = snapshot(run)
    assert_refused(cli("train", "--resume", run), "last.pt")
    assert_unchanged(before, run)


def test_bad_split_and_config_files_are_one_line(
    classify_run: Path, tmp_path: Path, capsys
) -> None:
    # Small JSON and YAML files, no memory at stake: the commands run in this process.
    cli = functools.partial(run_cli_here, capsys)
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    split = files.read_json(run / "split.json")
    files.write_json(run / "split.json", {**split, "test": [["../../../etc/passwd", 0]]})
    assert_refused(cli("eval", run), "split.json", "not a path inside")
    files.write_json(run / "split.json", {**split, "test": [["cat/0.png", "zero"]]})
    assert_refused(cli("eval", run), "split.json")
    files.write_json(run / "split.json", split)
    (run / "config.yaml").write_text("epochs: [\n")
    assert_refused(cli("train", "--resume", run), "config.yaml", "not valid YAML")
    (run / "config.yaml").write_text("epochs: 3\nepoch: 4\n")
    assert_refused(cli("train", "--resume", run), "config.yaml", "unknown config key 'epoch'")


# ---------------------------------------------------------------------------- annotations


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_shapes(root, task="detect", n=4, size=32, seed=0)
    return root


def _edit_coco(root: Path, change) -> None:
    data = json.loads((root / "annotations.json").read_text())
    change(data)
    (root / "annotations.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d["images"][0].update(file_name="../outside.png"), "without '..'"),
        (lambda d: d["images"][0].update(file_name="/etc/hostname"), "not absolute"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "NaN"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 1e400, 4]), "Infinity"),
        (lambda d: d["images"][0].update(width="wide"), "not a positive int"),
    ],
)
def test_coco_annotations_cannot_leave_the_folder_or_hold_non_numbers(
    coco: Path, tmp_path: Path, change, complaint: str
) -> None:
    (tmp_path / "outside.png").write_bytes(good_png(1, 32))
    _edit_coco(coco, change)
    before = snapshot(tmp_path)
    done = cli("detect", "train", coco, "--out", tmp_path / "run", "--epochs", "1")
    assert_refused(done, "annotations.json", complaint)
    assert_unchanged(before, tmp_path)


def test_binary_and_non_finite_annotation_files_are_one_line(tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    write_shapes(coco, task="detect", n=4, size=32, seed=0)
    (coco / "annotations.json").write_bytes(good_png())
    assert_refused(
        cli("detect", "train", coco, "--out", tmp_path / "r1"), "annotations.json", "not UTF-8"
    )
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "classes.txt").write_text("blob\n")
    for i in range(3):
        (yolo / "images" / f"{i}.png").write_bytes(good_png(i, 32))
        (yolo / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo / "labels" / "1.txt").write_text("0 0.5 nan 0.2 0.2\n")
    assert_refused(cli("detect", "train", yolo, "--out", tmp_path / "r2"), "1.txt:1", "not finite")
    (yolo / "labels" / "1.txt").write_bytes(b"\x00\xff\xfe binary")
    assert_refused(cli("detect", "train", yolo, "--out", tmp_path / "r3"), "1.txt", "not UTF-8")


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (
            ["summary", "resnet18", "--bogus", "1"],
            "resnet18 does not take --bogus (it takes: --zero-init-residual)",
        ),
        (["summary", "convnet", "--dropout", "2"], "dropout must be a rate in [0, 1)"),
        (["summary", "alexnet", "--dropout", "-0.1"], "dropout must be a rate"),
        (["train", "DATA", "--out", "RUN", "--weight-decay", "-1"], "weight_decay must be"),
        (["train", "DATA", "--out", "RUN", "--lr", "nan"], "lr must be a positive number"),
        (["train", "DATA", "--out", "RUN", "--epochs", "x"], "invalid int value"),
        (
            ["detect", "predict", "RUN", "IMG", "--score-threshold", "nan"],
            "score_threshold must be a number, got nan",
        ),
        (
            ["detect", "eval", "RUN", "--score-threshold", "1.5"],
            "score_threshold must be between 0 and 1, got 1.5",
        ),
    ],
)
def test_out_of_range_arguments_are_refused_where_they_are_parsed(
    classes_dir: Path, tmp_path: Path, args: list[str], complaint: str, capsys
) -> None:
    cli = functools.partial(run_cli_here, capsys)  # arguments alone: in this process
    args = [
        str(classes_dir) if a == "DATA" else str(tmp_path / "run") if a == "RUN" else a
        for a in args
    ]
    assert_refused(cli(*args), complaint)
    assert not (tmp_path / "run").exists()


def test_reader_fuzz_returns_an_image_or_the_projects_error() -> None:
    """Single-byte and multi-byte mutations of small valid PNG, JPEG, BMP and GIF files,
    with and without the PNG CRCs repaired (so the decoder itself sees the damage): the
    reader returns an image or raises BadImageError, in a child process that must not die.
    Hypothesis drives the mutations; the count is the examples run."""
    script = Path(__file__).parent / "data" / "fuzz_reader.py"
    done = subprocess.run(
        [sys.executable, str(script), "400"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tried = json.loads(done.stdout.strip().splitlines()[-1])
    assert tried["examples"] >= 4 * 400 and tried["images"] > 0 and tried["refused"] > 0


def test_reader_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    from cnnlab.data.images import BadImageError, read_image

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(BadImageError, match="not a regular file"):
        read_image(tmp_path / "pipe.png")
    with pytest.raises(BadImageError, match="not a regular file"):
        read_image(tmp_path)
    assert read_image_of(good_png()).shape == (3, 16, 16)


def read_image_of(data: bytes) -> torch.Tensor:
    from cnnlab.data.images import decode_bytes

    return decode_bytes(data)[0]
