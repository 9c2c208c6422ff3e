"""Detection commands end to end on a tiny shapes set, and mAP against pycocotools itself."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file

import cnnlab
from cnnlab.data import transforms
from cnnlab.data.detect import read_coco
from cnnlab.data.images import read_image
from cnnlab.data.shapes import write_shapes
from cnnlab.demo import shapes_demo
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.metrics import mean_average_precision
from cnnlab.models.detection import EVAL_LIMITS
from cnnlab.tasks.detect import DetectTask
from tests.conftest import read_metrics

# metrics.csv's header, a run-folder contract (runs written before keep it).
METRICS_COLUMNS = ("epoch", "lr", "train_loss", "val_map50", "val_map", "seconds")


def detect_train(data: Path, out: Path, model: str = "yolov1", **settings) -> dict:
    return cnnlab.train(data, out, task="detect", model=model, **settings)


def detect_eval(out: Path, **options) -> dict:
    return cnnlab.load_run(out, "cpu").evaluate(**options)


def detect_predict(out: Path, paths: list[Path], **options) -> list[dict]:
    return cnnlab.load_run(out, "cpu").predict(paths, **options)


TINY = {
    "yolov1": {"head_channels": 16, "hidden": 32},
    "fasterrcnn": {
        "anchor_sizes": [16, 32],
        "rpn_post_nms_top_n_train": 64,
        "rpn_post_nms_top_n_test": 32,
        "box_batch_size_per_image": 16,
        "representation_size": 64,
    },
}


@pytest.fixture(scope="module")
def shapes(shapes_dir) -> Path:
    return shapes_dir("detect", 16, 64)


@pytest.fixture(scope="module", params=["yolov1", "fasterrcnn"])
def run(request, shapes, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / request.param
    report = detect_train(
        shapes,
        out,
        request.param,
        epochs=1,
        batch_size=6,
        img_size=64,
        device="cpu",
        quiet=True,
        val_split=0.25,
        model_args=TINY[request.param],
    )
    return out, report


def test_training_writes_the_run_folder(run):
    out, report = run
    for name in ("config.yaml", "split.json", "model.json", "last.pt", "report.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "detect"
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["input_size"] == [3, 64, 64]
    assert meta["model_args"]["num_classes"] == 3 and meta["model_args"]["backbone"] == "resnet18"
    rows = read_metrics(out)
    assert tuple(rows[0]) == METRICS_COLUMNS and len(rows) == 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["best"]["epoch"] == 1
    assert load_file(out / "best.safetensors")  # loadable safetensors weights
    for picture in ("curves.png", "batch.png", "pr_curve.png", "val_predictions.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG", picture
    assert set(report) == {
        "split",
        "best_epoch",
        "map",
        "map50",
        "map75",
        "per_class_ap50",
        "n_images",
    }
    assert report["n_images"] == 4
    assert json.loads((out / "report.json").read_text()) == report


def test_eval_reports_coco_figures_on_the_val_split(run):
    out, report = run
    result = detect_eval(out)
    assert set(result) == {"split", "map", "map50", "map75", "per_class_ap50", "n_images"}
    assert result["n_images"] == 4
    assert set(result["per_class_ap50"]) == {"circle", "square", "triangle"}
    assert 0.0 <= result["map"] <= result["map50"] <= 1.0
    assert result["map50"] == pytest.approx(report["map50"])  # same weights, same images


def test_eval_matches_pycocotools_on_the_same_detections(run, shapes):
    out, _ = run
    split = json.loads((out / "split.json").read_text())
    paths = [shapes / p for p in split["val"]]
    predicted = detect_predict(out, paths, score_threshold=0.001)
    ours = detect_eval(out, score_threshold=0.001)
    stats, per_class = _cocoeval(shapes, predicted)
    assert ours["map"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["map75"] == pytest.approx(stats[2], abs=1e-6)
    for name, ap in ours["per_class_ap50"].items():
        if ap is not None:  # None: no object of the class among these images
            assert ap == pytest.approx(per_class[name], abs=1e-6), name


def _cocoeval(shapes: Path, predicted: list[dict]) -> tuple[np.ndarray, dict[str, float]]:
    """pycocotools' COCOeval run directly on detect_predict's output: (stats, whose [0:3]
    are mAP@[.5:.95], mAP@0.5 and mAP@0.75, and AP@0.5 per class name)."""
    data = json.loads((shapes / "annotations.json").read_text())
    by_name = {image["file_name"]: image["id"] for image in data["images"]}
    ids = [by_name[Path(p["file"]).name] for p in predicted]
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    for a in data["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]  # as torchmetrics: the box's area
    names = {c["name"]: c["id"] for c in data["categories"]}
    results = [
        {
            "image_id": image_id,
            "category_id": names[d["class"]],
            "bbox": [
                d["box"][0],
                d["box"][1],
                d["box"][2] - d["box"][0],
                d["box"][3] - d["box"][1],
            ],
            "score": d["score"],
        }
        for image_id, p in zip(ids, predicted, strict=True)
        for d in p["detections"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = data
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: (IoU thresholds, recall points, classes, areas, max dets); -1 = undefined
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    per_class = {
        c["name"]: float(precision[:, k][precision[:, k] > -1].mean())
        for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))
    }
    return evaluator.stats, per_class


def test_map_equals_cocoeval_on_jittered_boxes(shapes):
    # Realistic detections: every true box jittered, with random scores, plus false alarms,
    # so that mAP is well inside (0, 1) and every part of the computation matters.
    classes, samples = read_coco(shapes)
    rng = np.random.default_rng(0)
    predictions, predicted = [], []
    for sample in samples:
        boxes = np.array(sample.boxes).reshape(-1, 4)
        noisy = boxes + rng.normal(0, 1, boxes.shape)
        alarms = rng.uniform(0, 40, (2, 2))
        noisy = np.concatenate([noisy, np.hstack([alarms, alarms + 20])])
        labels = np.concatenate([sample.labels, rng.integers(0, 3, 2)])
        labels[rng.random(len(labels)) < 0.15] = rng.integers(0, 3)  # some wrong classes
        scores = rng.random(len(labels))
        predictions.append(
            {
                "boxes": torch.tensor(noisy, dtype=torch.float32),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels),
            }
        )
        predicted.append(
            {
                "file": str(sample.path),
                "detections": [
                    {"class": classes[k], "score": float(s), "box": b.tolist()}
                    for b, s, k in zip(predictions[-1]["boxes"], scores, labels, strict=True)
                ],
            }
        )
    ours = mean_average_precision(predictions, samples, classes)
    stats, per_class = _cocoeval(shapes, predicted)
    assert 0.1 < ours["map"] < ours["map50"] < 0.9
    assert [ours["map"], ours["map50"], ours["map75"]] == pytest.approx(stats[:3], abs=1e-6)
    assert ours["per_class_ap50"] == pytest.approx(per_class, abs=1e-6)


def test_predict_maps_boxes_back_to_each_images_own_pixels(run, shapes, tmp_path):
    out, _ = run
    # A 128x96 copy: the model sees it resized to 64x64, so x scales by 2 and y by 1.5.
    large = tmp_path / "00_large.png"
    with Image.open(shapes / "images" / "00.png") as image:
        image.resize((128, 96)).save(large)
    run = cnnlab.load_run(out, "cpu")
    transform = transforms.detect_eval(64, run.meta.mean, run.meta.std)
    raw = run.model.detect(transform(read_image(large, 3))[None], EVAL_LIMITS.with_score(0.01))[0]
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    (result,) = run.predict([large], score_threshold=0.01)
    assert run.save(result, drawn / "00_large") == {"drawing": str(drawn / "00_large.png")}
    assert result["file"] == str(large)
    assert len(result["detections"]) == len(raw["boxes"]) > 0
    boxes = torch.tensor([d["box"] for d in result["detections"]])
    torch.testing.assert_close(boxes, raw["boxes"] * torch.tensor([2.0, 1.5, 2.0, 1.5]))
    assert [d["score"] for d in result["detections"]] == pytest.approx(raw["scores"].tolist())
    assert {d["class"] for d in result["detections"]} <= {"circle", "square", "triangle"}
    assert boxes.min() >= 0 and boxes[:, 0::2].max() <= 128 and boxes[:, 1::2].max() <= 96
    json.dumps(result)  # plain JSON types only
    with Image.open(drawn / "00_large.png") as image:
        # enlarged by a whole factor, so that the labels can be read on a small image
        factor = image.width // 128
        assert factor >= 2 and image.size == (128 * factor, 96 * factor)


def test_predict_on_a_folder_and_a_missing_file(run, shapes):
    out, _ = run
    run = cnnlab.load_run(out, "cpu")
    results, errors = run.predict_files(
        [shapes / "images", shapes / "nope.png"], score_threshold=0.9
    )
    assert len(results) == 16
    assert all(d["score"] >= 0.9 for r in results for d in r["detections"])
    assert errors == [f"{shapes / 'nope.png'}: no such file or folder"]
    with pytest.raises(CnnlabError, match=r"nope\.png: cannot read file"):
        detect_predict(out, [shapes / "nope.png"])


def test_resuming_a_finished_run_reports_again_without_training(run):
    out, report = run
    before = (out / "last.pt").stat().st_mtime_ns
    again = cnnlab.resume(out, "detect", device="cpu", quiet=True)
    assert again["map50"] == pytest.approx(report["map50"])
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_a_run_stopped_by_ctrl_c_resumes_to_the_same_metrics(shapes, tmp_path, monkeypatch):
    settings = {
        "epochs": 2,
        "batch_size": 6,
        "img_size": 64,
        "device": "cpu",
        "quiet": True,
        "val_split": 0.25,
        "model_args": TINY["yolov1"],
    }
    straight = tmp_path / "straight"
    detect_train(shapes, straight, "yolov1", **settings)

    validated = []
    real_evaluate, real_forward_loss = DetectTask.evaluate, DetectTask.forward_loss

    def evaluate_and_count(self, *args, **kwargs):
        validated.append(1)
        return real_evaluate(self, *args, **kwargs)

    def forward_loss_until_ctrl_c(net, images, targets):
        if validated:  # a step of epoch 2
            raise KeyboardInterrupt
        return real_forward_loss(net, images, targets)

    monkeypatch.setattr(DetectTask, "evaluate", evaluate_and_count)
    monkeypatch.setattr(DetectTask, "forward_loss", staticmethod(forward_loss_until_ctrl_c))
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted) as interrupted:
        detect_train(shapes, stopped, "yolov1", **settings)
    report = interrupted.value.report
    assert report["best_epoch"] == 1 and len(read_metrics(stopped, timed=False)) == 1

    monkeypatch.undo()
    cnnlab.resume(stopped, "detect", quiet=True)
    # Model, optimizer, schedule and random numbers all restored: the same epoch 2.
    assert read_metrics(stopped, timed=False) == read_metrics(straight, timed=False)
    assert len(read_metrics(straight, timed=False)) == 2


def test_high_score_threshold_warns_that_map_is_understated(run, caplog):
    out, _ = run
    with caplog.at_level(logging.WARNING, logger="cnnlab.tasks.detect"):
        detect_eval(out, score_threshold=0.3)
    assert any("understated" in r.getMessage() for r in caplog.records)


def test_bad_annotation_file_is_a_clear_error_and_writes_no_run(tmp_path):
    data = tmp_path / "data"
    write_shapes(data, task="detect", n=2, size=32)
    (data / "annotations.json").write_text('{"images": [}')
    with pytest.raises(CnnlabError, match=r"annotations\.json: not valid JSON .*line 1 column 13"):
        detect_train(data, tmp_path / "run", epochs=1, device="cpu", quiet=True)
    assert not (tmp_path / "run" / "model.json").exists()


def test_unknown_setting_and_non_detector_are_refused(shapes, tmp_path):
    with pytest.raises(CnnlabError, match="unknown config key 'colour'"):
        detect_train(shapes, tmp_path / "a", colour=True)
    with pytest.raises(CnnlabError, match="resnet18 is a classify model, not a detect model"):
        detect_train(shapes, tmp_path / "b", model="resnet18")


def test_demo_trains_evaluates_and_reuses_a_finished_run(tmp_path):
    result = shapes_demo("detect", tmp_path, quiet=True, n=8, epochs=1)
    assert set(result) >= {"map", "map50", "per_class_ap50", "n_images", "run", "seconds"}
    assert result["n_images"] == 2 and Path(result["run"], "report.json").is_file()
    before = Path(result["run"], "last.pt").stat().st_mtime_ns
    again = shapes_demo("detect", tmp_path, quiet=True, n=8, epochs=1)
    assert again["map50"] == pytest.approx(result["map50"])
    assert Path(result["run"], "last.pt").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------- the commands

CLI_TINY = {
    "yolov1": ["--head-channels", "16", "--hidden", "32"],
    "fasterrcnn": [
        "--anchor-sizes", "16,32",
        "--rpn-post-nms-top-n-train", "64",
        "--rpn-post-nms-top-n-test", "32",
        "--box-batch-size-per-image", "16",
        "--representation-size", "64",
    ],
    "fastrcnn": ["--backbone", "resnet18", "--representation-size", "64", "--max-proposals", "100"],
    "rcnn": [
        "--crop-size", "32", "--context-padding", "4",
        "--representation-size", "32", "--max-proposals", "100",
    ],
}  # fmt: skip


def _coco_to_yolo_txt(coco_dir: Path, dst: Path) -> Path:
    """The same images and boxes as a YOLO-txt folder (labels/*.txt, classes.txt)."""
    coco = json.loads((coco_dir / "annotations.json").read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    (dst / "classes.txt").write_text("".join(c["name"] + "\n" for c in categories))
    for image in coco["images"]:
        name, width, height = image["file_name"], image["width"], image["height"]
        (dst / "images" / name).write_bytes((coco_dir / "images" / name).read_bytes())
        lines = [
            f"{index[a['category_id']]} {(x + w / 2) / width} {(y + h / 2) / height}"
            f" {w / width} {h / height}\n"
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
            for x, y, w, h in [a["bbox"]]
        ]
        (dst / "labels" / f"{Path(name).stem}.txt").write_text("".join(lines))
    return dst


@pytest.mark.parametrize("model", ["yolov1", "fasterrcnn", "fastrcnn", "rcnn"])
def test_commands_train_eval_and_predict_on_a_yolo_txt_folder(model, shapes, tmp_path, capsys):
    from cnnlab import cli

    data = _coco_to_yolo_txt(shapes, tmp_path / "yolo")
    run = tmp_path / "run"
    common = ["--device", "cpu", "--format", "json"]
    train = ["detect", "train", str(data), "--model", model, "--out", str(run), "--epochs", "1"]
    train += ["--batch-size", "6", "--img-size", "64", "--val-split", "0.25", "--no-flip"]
    assert cli.main([*train, "--quiet", *CLI_TINY[model], *common]) == 0
    trained = json.loads(capsys.readouterr().out)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["flip"] is False and config["model_args"]["backbone"] == "resnet18"
    assert json.loads((run / "split.json").read_text())["format"] == "yolo"

    assert cli.main(["detect", "eval", str(run), *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["n_images"] == 4 and evaluated["map50"] == pytest.approx(trained["map50"])

    image = sorted((data / "images").iterdir())[0]
    predict = ["detect", "predict", str(run), str(image), "--score-threshold", "0.0"]
    assert cli.main([*predict, "--out", str(tmp_path / "drawn"), *common]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["file"] == str(image) and result["detections"]
    for detection in result["detections"]:
        assert detection["class"] in ("circle", "square", "triangle")
        assert all(0 <= v <= 64 for v in detection["box"])  # the 64x64 file's own pixels
    assert (tmp_path / "drawn" / f"{image.stem}.png").read_bytes()[:4] == b"\x89PNG"

    # The classification command resumes any run; this one is finished, so it only reports.
    assert cli.main(["train", "--resume", str(run), "--quiet", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["map50"] == pytest.approx(trained["map50"])
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("val mAP@[.5:.95] ")
