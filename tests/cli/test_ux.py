"""What a person sees: honest labels, the lines around training, help, pipes, data checks."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from cnnlab import cli
from cnnlab.data.loaders import train_loader
from cnnlab.engine.progress import unwrapped
from cnnlab.tasks.segment import SegmentTask
from tests.conftest import run_cli

TINY = ["--model", "convnet", "--cdims", "4,8", "--hdims", "16", "--img-size", "16"]


@pytest.fixture(scope="module")
def three_digits(tmp_path_factory: pytest.TempPathFactory, few_digits: Path) -> Path:
    """Digits 0, 1 and 2 (40 of each), and one image lying beside the class folders."""
    root = tmp_path_factory.mktemp("three") / "digits"
    shutil.copytree(few_digits, root)
    shutil.copy(root / "0" / sorted(p.name for p in (root / "0").iterdir())[0], root / "x.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, three_digits: Path) -> dict:
    """A small classification run trained through the command line, with what it printed."""
    run = tmp_path_factory.mktemp("runs") / "run"
    done = run_cli(
        "train", str(three_digits), *TINY, "--epochs", "2", "--batch-size", "16",
        "--no-flip", "--out", str(run),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Piped: messages wrapped at words to 80 columns; read here as the lines they were.
    return {"run": run, "out": done.stdout, "err": unwrapped(done.stderr)}


def test_train_says_what_it_trains_and_prints_the_result_once(trained: dict) -> None:
    err, out = trained["err"], trained["out"]
    first = err.splitlines()[1]  # after the warning about the loose image
    assert "x.png" in err.splitlines()[0] and "in no class" in err.splitlines()[0]
    assert first.startswith("96 train / 12 val / 12 test images, 3 classes; convnet, ")
    assert "parameters; cpu (" in first and "2 epochs of batches of 16" in first
    # The CPU rule's choice and why: "cpu (1 thread, 0 workers (2 cores, 0.8 busy))".
    assert re.search(r"cpu \(\d+ threads?, 0 workers \(.*\d+ cores?, \d+\.\d busy\)\)", first)
    assert out.count("top-1") == 1 and "top-1" not in err  # the figures once, on stdout
    assert out.startswith("test top-1 ")
    assert "top-5" not in out  # with 3 classes top-5 is always 100%
    assert f"report, weights and plots in {trained['run']}" in err


def printed(capsys: pytest.CaptureFixture, *args: str) -> tuple[str, str]:
    """``cnnlab ARGS`` run in this process (no child paying for ``import torch`` again):
    stdout and stderr, once it succeeded."""
    assert cli.main(list(args)) == 0, capsys.readouterr().err
    done = capsys.readouterr()
    return done.out, done.err


def test_eval_says_which_split_or_folder_it_measured(
    trained: dict, three_digits: Path, capsys
) -> None:
    run = str(trained["run"])
    assert printed(capsys, "eval", run, "--split", "val")[0].startswith("val top-1 ")
    report = json.loads(printed(capsys, "eval", run, str(three_digits), "--format", "json")[0])
    assert report["split"] is None and report["data"] == str(three_digits)
    assert report["n"] == 120
    text = printed(capsys, "eval", run, str(three_digits))[0]
    assert text.startswith(f"{three_digits} top-1 ")
    own = json.loads(printed(capsys, "eval", run, "--format", "json")[0])
    assert own["split"] == "test" and "data" not in own


def test_segmentation_reports_percentages_like_classification() -> None:
    line = SegmentTask.headline({"split": "val", "miou": 0.8873, "pixel_acc": 0.97, "n": 30})
    assert line == "val mIoU 88.73%  pixel accuracy 97.00%  (30 images)"


@pytest.mark.parametrize(
    ("images", "batch", "steps"),
    [(93, 64, 2), (1257, 32, 39), (65, 64, 1), (9, 64, 1), (64, 64, 1)],
    ids=["a-third-left-trains", "a-small-rest-drops", "one-image-drops", "all-in-one", "exact"],
)
def test_the_last_partial_batch_trains_unless_tiny(images: int, batch: int, steps: int) -> None:
    dataset = TensorDataset(torch.zeros(images, 1))
    assert len(train_loader(dataset, batch, torch.Generator(), None)) == steps


def test_a_batch_larger_than_the_training_split_is_said(
    three_digits: Path, tmp_path, capsys
) -> None:
    quiet, _ = printed(
        capsys, "train", str(three_digits), *TINY, "--epochs", "1", "--batch-size", "128",
        "--quiet", "--out", str(tmp_path / "run"), "--format", "json",
    )  # fmt: skip
    assert json.loads(quiet)["n"] == 12
    _, loud = printed(
        capsys, "train", str(three_digits), *TINY, "--epochs", "1", "--batch-size", "128",
        "--out", str(tmp_path / "loud"),
    )  # fmt: skip
    assert "(more than the 96 training images: one step per epoch)" in unwrapped(loud)


def test_help_shows_defaults_the_models_and_their_own_flags(capsys) -> None:
    for args in (["detect", "train", "--help"], ["train", "--help"], ["predict", "--help"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(args)
        assert stop.value.code == 0
    detect_help, train_help, predict_help = capsys.readouterr().out.split("usage: ")[1:]
    assert "models (--model): fasterrcnn, fastrcnn, rcnn, sppnet, yolov1" in detect_help
    for flag in ("--head fc", "--grid 7", "--reduction 32", "--rescore true", "--roi-pool false"):
        assert flag in detect_help
    assert "resnet101, resnet152, resnet18, resnet34, resnet50:" in train_help
    assert "--aux-logits false" in train_help and "(default: adamw)" in train_help
    assert "(default: auto)" in predict_help and "(default: 5)" in predict_help
    assert all(len(line) <= 80 for line in train_help.splitlines())


def command_parser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """The parser of ``cnnlab NAMES...`` inside ``parser``."""
    for name in names:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[name]
    return parser


def test_serve_and_explore_take_the_same_upload_limits(tmp_path: Path, capsys) -> None:
    """One declaration (``flags.add_upload_limits``): the same help, default, type and
    check in both commands (explore's --max-memory once had help of its own)."""
    parser = cli.build_parser()

    def declared(command: str) -> dict[str, tuple]:
        return {
            action.option_strings[0]: (action.help, action.default, action.type, action.metavar)
            for action in command_parser(parser, command)._actions
            if action.dest in ("max_upload_mb", "upload_timeout", "max_memory")
        }

    assert len(declared("serve")) == 3 and declared("serve") == declared("explore")
    for command in (["serve", str(tmp_path)], ["explore", "convnet"]):
        assert cli.main([*command, "--max-upload-mb", "nan"]) == 2
        assert capsys.readouterr().err == "error: --max-upload-mb nan: expected a positive size\n"


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("cnnlab 0.")


def test_a_closed_pipe_ends_quietly() -> None:
    # `cnnlab summary resnet18 --format json | head -c 100`: the reader leaves early.
    # The reading end is closed before the child writes, so every write meets a closed
    # pipe (with `| head` the outcome would depend on how much the pipe buffers first).
    child = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "summary", "resnet18", "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.close()
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def write_folder(root: Path) -> Path:
    """Two classes with a tiny image, a CMYK JPEG, an RGBA PNG, an image outside any class
    and two copies named as copies."""
    rng = np.random.default_rng(0)

    def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
        return rng.integers(0, 255, (height, width, channels), dtype=np.uint8)

    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(noise(40, 48)).save(root / name / f"{i}.jpg")
    Image.fromarray(noise(9, 12)).save(root / "cat" / "tiny.png")
    Image.fromarray(noise(40, 40)).convert("CMYK").save(root / "dog" / "cmyk.jpg")
    Image.fromarray(noise(40, 40, 4), "RGBA").save(root / "dog" / "alpha.png")
    Image.fromarray(noise(40, 40)).save(root / "loose.jpg")
    shutil.copy(root / "cat" / "0.jpg", root / "cat" / "0 (copy).jpg")
    shutil.copy(root / "cat" / "1.jpg", root / "cat" / "a (1).jpg")
    return root


def test_data_check_flags_tiny_images_stored_modes_and_loose_files(tmp_path: Path, capsys) -> None:
    root = write_folder(tmp_path / "photos")
    report = json.loads(printed(capsys, "data", "check", str(root), "--format", "json")[0])
    assert report["tiny"] == [{"path": "cat/tiny.png", "width": 12, "height": 9}]
    assert report["sizes"]["modes"] == {"CMYK": 1, "RGB": 9, "RGBA": 1}
    assert report["sizes"]["channels"] == {"3": 11}
    assert report["ignored_files"] == ["loose.jpg"]
    text = printed(capsys, "data", "check", str(root))[0]
    assert "CMYK 1 (converted to RGB)" in text and "RGBA 1 (alpha dropped)" in text
    assert "tiny (a side under 32 px): cat/tiny.png (12x9)" in text
    assert "ignored: 1 image(s) outside any class folder: loose.jpg" in text


def test_data_clean_keeps_the_original_not_the_copy(tmp_path: Path, capsys) -> None:
    root = write_folder(tmp_path / "photos")
    cleaned = printed(
        capsys, "data", "clean", str(root), str(tmp_path / "clean"), "--format", "json"
    )
    left_out = {item["path"]: item["reason"] for item in json.loads(cleaned[0])["left_out"]}
    assert left_out == {
        "cat/0 (copy).jpg": "duplicate of cat/0.jpg (kept)",
        "cat/a (1).jpg": "duplicate of cat/1.jpg (kept)",
    }


# ------------------------------------------------------------ pictures and mistakes (fastai)


def test_eval_lists_the_most_confused_pairs(trained: dict, three_digits: Path, capsys) -> None:
    run = str(trained["run"])
    report = json.loads(printed(capsys, "eval", run, str(three_digits), "--format", "json")[0])
    wrong = round(report["n"] * (1 - report["top1"]))
    assert sum(m["count"] for m in report["most_confused"]) == wrong
    counts = [m["count"] for m in report["most_confused"]]
    assert counts == sorted(counts, reverse=True)
    assert all(m["true"] != m["pred"] for m in report["most_confused"])
    text = printed(capsys, "eval", run, str(three_digits))[0].splitlines()
    # Under the headline, each class's precision, recall, F1 and support (issue 25).
    header = next(line for line in text if "precision" in line)
    cells = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    assert cells == ["class", "precision", "recall", "F1", "support"]
    for name, figures in report["per_class"].items():
        row = next(line for line in text if line.startswith(f"│ {name} "))
        assert f"{figures['recall']:.3f}" in row and f"{figures['support']:,}" in row
    confused = [line for line in text if line.startswith("most confused")]
    if wrong:
        first = report["most_confused"][0]
        assert confused[0].startswith("most confused (true as predicted): ")
        assert f"{first['true']} as {first['pred']} ({first['count']})" in unwrapped(
            "\n".join(text[text.index(confused[0]) :])
        )
    else:
        assert not confused


def test_most_confused_counts_off_diagonal_cells() -> None:
    from cnnlab.metrics import most_confused

    confusion = torch.tensor([[5, 2, 0], [0, 4, 3], [1, 0, 6]])
    assert most_confused(confusion, ["a", "b", "c"]) == [
        {"true": "b", "pred": "c", "count": 3},
        {"true": "a", "pred": "b", "count": 2},
        {"true": "c", "pred": "a", "count": 1},
    ]
    assert most_confused(torch.eye(3, dtype=torch.long), ["a", "b", "c"]) == []


def test_errors_show_the_misclassified_first_then_the_highest_loss() -> None:
    from torch.utils.data import DataLoader

    from cnnlab.tasks.classify import evaluate

    # Logits chosen by hand: images 1 and 3 are wrong (3 with the lower loss), 0 is right
    # but unsure (the highest loss among the right ones), 2 is right and sure.
    logits = torch.tensor([[0.2, 0.0], [0.0, 3.0], [5.0, 0.0], [0.0, 0.5]])
    targets = torch.tensor([0, 0, 0, 0])

    class Lookup(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return logits[images[:, 0, 0, 0].long()]

    images = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    loader = DataLoader(TensorDataset(images.clone(), targets), batch_size=3)
    report = evaluate(Lookup(), loader, torch.device("cpu"), ["a", "b"], worst=3)
    shown = report["_worst"]
    assert shown["images"][:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0]
    assert shown["preds"].tolist() == [1, 1, 0]
    assert shown["probs"][0] == pytest.approx(torch.tensor([0.0, 3.0]).softmax(0)[1].item())
    assert report["most_confused"] == [{"true": "a", "pred": "b", "count": 2}]


def test_a_run_folder_shows_a_training_batch(trained: dict) -> None:
    batch = Image.open(trained["run"] / "batch.png")
    assert batch.mode in ("RGB", "RGBA") and min(batch.size) >= 200
    errors = Image.open(trained["run"] / "errors.png")
    assert min(errors.size) >= 200


def test_drawn_boxes_are_capped_and_the_rest_counted() -> None:
    from cnnlab.draw import MAX_BOXES_DRAWN, draw_boxes

    image = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    boxes = [
        {"box": [i % 8 * 8, i // 8 * 8, i % 8 * 8 + 6, i // 8 * 8 + 6], "class": "a",
         "score": 1 - i / 100}
        for i in range(64)
    ]  # fmt: skip
    few = draw_boxes(image, boxes[:1], ["a"])
    many = draw_boxes(image, boxes, ["a"])
    assert few.shape == many.shape == (3, 256, 256)  # enlarged by 4 to be legible
    cap = min(MAX_BOXES_DRAWN, 256 * 256 // (64 * 64))
    # The boxes beyond the cap (the lowest scores, the bottom rows) leave their pixels as
    # they were, except where the "+N more" note sits in the bottom right corner.
    last_row = many[:, 7 * 32 + 4 : 7 * 32 + 20, 0:100]
    assert (last_row == 128).all()
    assert not (many[:, 0:32, 0:32] == 128).all()  # the best box is drawn
    assert cap < 64


def test_a_predicted_mask_png_keeps_class_indices_and_shows_colours(tmp_path: Path) -> None:
    from cnnlab.data.segment import read_mask
    from cnnlab.draw import mask_colour, mask_png

    mask = torch.tensor([[0, 1, 2], [3, 0, 1]], dtype=torch.uint8)
    path = tmp_path / "mask.png"
    path.write_bytes(mask_png(mask))
    assert torch.equal(read_mask(path, 4), mask.long())  # readable back as training labels
    shown = Image.open(path).convert("RGB")
    assert shown.getpixel((1, 0)) == mask_colour(1) and shown.getpixel((2, 0)) == mask_colour(2)
    assert mask_colour(1) != mask_colour(2) and shown.getpixel((0, 0)) == (0, 0, 0)


def test_a_models_own_flag_is_not_taken_for_a_longer_training_flag(tmp_path: Path) -> None:
    # --backbone once matched --backbone-lr-mult as an abbreviation and its value was refused.
    parser = cli.build_parser()
    args, rest = parser.parse_known_args(
        ["detect", "train", str(tmp_path), "--model", "yolov1", "--backbone", "vgg11"]
    )
    assert rest == ["--backbone", "vgg11"]  # left for the model's own flags
    assert "backbone_lr_mult" not in vars(args)  # not given (nor a detector's setting)


CLASSIFICATION_ONLY = ("images", "multi_label", "label_smoothing", "mixup", "cutmix", "balance")


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_train_flags_of_classification_appear_only_where_they_apply(task: str, capsys) -> None:
    """A label CSV's --images and --multi-label, and the class-label recipes (--mixup,
    --cutmix, --label-smoothing, --balance) are classification's (config.py's ``tasks``):
    not listed by the other tasks' train, and refused there in argparse's one line rather
    than passed on to the model as one of its own flags. --split-file is every task's
    (each reads its own split.json)."""
    parser = cli.build_parser()
    args = parser.parse_known_args([task, "train", "DIR"])[0]
    assert not [name for name in CLASSIFICATION_ONLY if hasattr(args, name)]
    assert hasattr(args, "split_file")
    args = parser.parse_known_args(["train", "DIR"])[0]
    assert all(hasattr(args, name) for name in CLASSIFICATION_ONLY)

    for command in ([task, "train", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            parser.parse_known_args(command)
    task_help, classify_help = capsys.readouterr().out.split("usage: ")[1:]
    for name in CLASSIFICATION_ONLY:
        flag = f"--{name.replace('_', '-')}"
        assert flag not in task_help and flag in classify_help
    for given in (["--mixup", "0.2"], ["--balance=weights"], ["--no-multi-label"]):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_known_args([task, "train", "DIR", *given])
        assert stopped.value.code == 2
        flag = given[0].partition("=")[0]
        assert capsys.readouterr().err == (
            f"error: argument {flag}: only `cnnlab train` takes it"
            f" (see `cnnlab {task} train --help`)\n"
        )


def first_image(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*.png") if p.parent.name != "proposals")[0]


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_predict_save_and_save_csv_for_every_task(
    task: str, serve_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = first_image(serve_runs[f"{task}_data"])
    shutil.copy(image, tmp_path / "pic.png")
    command = [] if task == "classify" else [task]
    table = tmp_path / "out" / "pred.csv"
    args = [*command, "predict", str(serve_runs[task]), str(tmp_path / "pic.png")]
    if task == "detect":  # the tiny run's boxes score low; keep them so there are rows
        args += ["--score-threshold", "0"]
    assert cli.main([*args, "--save", str(tmp_path / "drawn"), "--save-csv", str(table)]) == 0
    capsys.readouterr()
    assert (tmp_path / "drawn" / "pic.png").stat().st_size > 0
    rows = table.read_text().splitlines()
    header = rows[0].split(",")
    body = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
    assert body and all(row["file"] == str(tmp_path / "pic.png") for row in body)
    if task == "classify":
        assert header == ["file", "rank", "class", "prob"]
        assert [int(row["rank"]) for row in body] == list(range(1, len(body) + 1))
        probs = [float(row["prob"]) for row in body]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    elif task == "segment":
        assert header == ["file", "class", "fraction"]
        assert abs(sum(float(row["fraction"]) for row in body) - 1) < 1e-4
    else:
        assert header == ["file", "class", "score", "x1", "y1", "x2", "y2"]
        width, height = Image.open(image).size
        for row in body:
            assert 0 <= float(row["x1"]) <= float(row["x2"]) <= width
            assert 0 <= float(row["y1"]) <= float(row["y2"]) <= height
    # The same command again: the CSV is refused before any drawing is replaced.
    drawn_before = (tmp_path / "drawn" / "pic.png").stat().st_mtime_ns
    assert cli.main([*args, "--save", str(tmp_path / "drawn"), "--save-csv", str(table)]) == 2
    assert "pred.csv: already exists; choose another --save-csv" in capsys.readouterr().err
    assert (tmp_path / "drawn" / "pic.png").stat().st_mtime_ns == drawn_before
    assert cli.main([*args, "--save-csv", str(tmp_path)]) == 2
    assert "is a folder; --save-csv takes a file name" in capsys.readouterr().err
    assert cli.main([*args, "--save-csv", str(tmp_path / "pic.png")]) == 2
    assert "would replace this input" in capsys.readouterr().err
