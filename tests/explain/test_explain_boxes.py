"""``cnnlab explain`` on detection runs: one map per box, each of the box's own score.

A YOLOv1 trained for a few seconds on planted patterns (the crosses and rings of
``test_pointing``, two per image among clutter of the same size) must point each box's
saliency map into that box on at least 90% of boxes, and the same boxes' scores read from a
detector with random weights must not (a map that falls in the box because of the
architecture alone would pass both). The R-CNN family is checked on fresh tiny models: the
module ``scored_detections`` returns reproduces each box's score, and two boxes get two
maps. The run-level command (JSON, drawing, refusals) runs on the session's tiny YOLOv1 run
(``serve_runs``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cnnlab import cli
from cnnlab.attribution.maps import attribute, peak_of
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.explain.audit import audit, audit_table
from cnnlab.explain.box_maps import draw_boxes
from cnnlab.explain.inputs import check_run
from cnnlab.explain.predictions import explain
from cnnlab.models.detection import EVAL_LIMITS
from cnnlab.models.detection.yolov1 import YOLOv1
from cnnlab.models.factory import create_model
from cnnlab.runs import Run, load_run
from tests.explain.test_pointing import shapes

SIDE, PATTERN = 32, 7
FOUND = EVAL_LIMITS.with_score(0.25)  # predict's threshold


def scenes(count: int, seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Normalised images (N, 1, 32, 32), each with two patterns (a cross, class 0, or a
    ring, class 1) and two clutter shapes (a block, a bar) apart from each other, and the
    patterns' boxes and labels."""
    g = torch.Generator().manual_seed(seed)
    patterns, clutter = shapes()
    x = torch.rand((count, 1, SIDE, SIDE), generator=g) * 0.5
    targets = []
    for i in range(count):
        placed: list[tuple[int, int]] = []
        while len(placed) < 4:
            top, left = torch.randint(0, SIDE - PATTERN, (2,), generator=g).tolist()
            if all(abs(top - t) > PATTERN or abs(left - u) > PATTERN for t, u in placed):
                placed.append((top, left))
        labels = torch.randint(0, 2, (2,), generator=g)
        drawn = [patterns[int(label)] for label in labels] + clutter[:2]
        for (top, left), shape in zip(placed, drawn, strict=True):
            x[i, 0, top : top + PATTERN, left : left + PATTERN][shape] = 1.0
        boxes = [[u, t, u + PATTERN, t + PATTERN] for t, u in placed[:2]]
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels})
    return (x - 0.3) / 0.25, targets


class Body(nn.Module):
    """A backbone as ``cnnlab.models.features`` cuts one: a dict of one stride-8 map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": self.features(x)}


def detector() -> YOLOv1:
    """YOLOv1 with a conv head on a 4 x 4 grid, one box per cell."""
    return YOLOv1(Body(), 32, 2, grid=4, boxes=1, head_channels=32, head="conv")


def inside(row: int, col: int, box: list[float]) -> bool:
    """(one pixel of slack: a peak may sit on the box's edge)"""
    return box[0] - 1 <= col <= box[2] and box[1] - 1 <= row <= box[3]


@pytest.fixture(scope="module")
def trained() -> tuple[YOLOv1, torch.Tensor, list]:
    torch.manual_seed(0)
    x, targets = scenes(512, seed=0)
    model = detector()
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        batch = torch.randint(0, len(x), (16,)).tolist()
        loss = model(x[batch], [targets[i] for i in batch])["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    val_x, val_targets = scenes(20, seed=1)
    return model, val_x, val_targets


def test_each_box_map_points_into_its_box_and_random_weights_do_not(trained) -> None:
    model, x, targets = trained
    random = detector().eval()
    hits = random_hits = total = recalled = 0
    for image, truth in zip(x, targets, strict=True):
        found, scorer = model.scored_detections(image[None], FOUND)
        boxes = found[0]["boxes"]
        with torch.no_grad():  # the score explained is the box's own score
            torch.testing.assert_close(scorer(image[None])[0], found[0]["scores"])
        # The same cells' scores read from random weights: the control.
        random_scorer = scorer.on(random)
        for k, box in enumerate(boxes.tolist()):
            column = lambda output, k=k: output[:, k]  # noqa: E731
            heat = attribute(scorer, image[None], column, "saliency", "detector.backbone")
            hits += inside(*peak_of(heat[0]), box)
            heat = attribute(random_scorer, image[None], column, "saliency", "detector.backbone")
            random_hits += inside(*peak_of(heat[0]), box)
            total += 1
        if len(boxes):
            recalled += int((torch.cdist(boxes, truth["boxes"]).min(dim=0).values < 3).sum())
    # (25 of the 40 patterns within 3 pixels when this was written)
    assert recalled >= 0.5 * 2 * len(x), "the detector did not learn to find the patterns"
    assert hits / total >= 0.9
    # Chance: a box is 49 of 1,024 pixels; four shapes of its size in every image.
    assert random_hits / total <= 0.4


def test_two_boxes_get_two_maps(trained) -> None:
    model, x, _ = trained
    image = next(i for i in x if len(model.scored_detections(i[None], FOUND)[0][0]["boxes"]) >= 2)
    _, scorer = model.scored_detections(image[None], FOUND)
    maps = [
        attribute(scorer, image[None], lambda o, k=k: o[:, k], "saliency", "detector.backbone")[0]
        for k in range(2)
    ]
    assert peak_of(maps[0]) != peak_of(maps[1])
    assert (maps[0] - maps[1]).abs().max() > 0.5


@pytest.mark.parametrize("name", ["fasterrcnn", "fastrcnn", "sppnet"])
def test_the_rcnn_family_scores_each_box_from_its_proposal(name) -> None:
    torch.manual_seed(0)
    options = {"representation_size": 32}
    if name == "fasterrcnn":
        options.update(anchor_sizes=[16, 32], rpn_post_nms_top_n_test=32)
    model = create_model(name, num_classes=3, **options).eval()
    x = torch.randn(1, 3, 64, 64)
    proposals = None
    if name != "fasterrcnn":
        proposals = [torch.tensor([[0, 0, 30, 30], [30, 30, 64, 64], [8, 20, 60, 50.0]])]
    found, scorer = model.scored_detections(x, EVAL_LIMITS, proposals)
    scores = found[0]["scores"]
    assert len(scores) >= 2
    with torch.no_grad():
        torch.testing.assert_close(scorer(x)[0], scores)
    # The two best boxes of different places: two targets, two maps.
    far = int((found[0]["boxes"] - found[0]["boxes"][0]).abs().sum(dim=1).argmax())
    maps = [
        attribute(scorer, x, lambda o, k=k: o[:, k], "gradcam", "detector.backbone.layer3")[0]
        for k in (0, far)
    ]
    assert (maps[0] - maps[1]).abs().max() > 0.05


@pytest.fixture(scope="module")
def detect_run(serve_runs) -> tuple[Run, Path, float]:
    """The session's YOLOv1 run (loaded once: each load builds VGG-11 whole before cutting
    it), one of its images and a score threshold that keeps the image's three best boxes
    (the run trained one epoch on six images)."""
    file = sorted((serve_runs["detect_data"] / "images").glob("*.png"))[0]
    run = load_run(serve_runs["detect"], "cpu", fast=False)
    found = run.task.detect(run.model, [read_image(file, 3)], run.device, EVAL_LIMITS)
    return run, file, float(found[0]["scores"][2:4].mean())


def test_explain_maps_each_box_predict_finds(detect_run, tmp_path) -> None:
    run, file, threshold = detect_run
    image = read_image(file, 3)
    (result,) = explain(run, [image], "gradcam", files=[str(file)], score_threshold=threshold)
    document = result.to_dict()
    (prediction,) = run.predict([image], score_threshold=threshold)
    boxes = document["boxes"]
    assert len(boxes) == len(prediction["detections"]) == 3  # one map per box
    assert document["layer"] == "backbone.features.2"  # the backbone's tapped stage
    for box, detection in zip(boxes, prediction["detections"], strict=True):
        assert box["class"] == detection["class"]
        assert box["box"] == pytest.approx(detection["box"], abs=0.01)
        assert box["score"] == pytest.approx(detection["score"], abs=1e-5)
        assert box["method"] == "gradcam"
        if box["peak_xy"] is None:  # an all-zero map (Grad-CAM's ReLU left nothing)
            assert box["peak_in_box"] is None and box["top10_share"] == 0.0
            continue
        x, y = box["peak_xy"]  # in the image's own pixels
        assert 0 <= x <= image.shape[-1] and 0 <= y <= image.shape[-2]
        x0, y0, x1, y1 = box["box"]
        assert box["peak_in_box"] == (x0 <= x <= x1 and y0 <= y <= y1)
        assert 0.0 < box["top10_share"] <= 1.0
    draw_boxes(result, tmp_path / "boxes.png")
    assert (tmp_path / "boxes.png").read_bytes().startswith(b"\x89PNG")
    wanted = boxes[0]["class"]
    (only,) = explain(run, [image], "saliency", wanted, score_threshold=threshold)
    assert [b.class_name for b in only.boxes] == [b["class"] for b in boxes if b["class"] == wanted]


def test_bad_input_is_one_line(detect_run) -> None:
    run, file, _ = detect_run
    image = read_image(file, 3)
    with pytest.raises(CnnlabError, match=r"unknown layer 'nope'; .*backbone\.features\.2"):
        explain(run, [image], layer="nope")
    with pytest.raises(CnnlabError, match="eigencam is class-agnostic"):
        explain(run, [image], "eigencam")
    with pytest.raises(CnnlabError, match="below yolov1's minimum size of 32x32"):
        explain(run, [image[:, :16, :16]])
    rcnn = SimpleNamespace(
        path=Path("runs/rcnn"),
        task=SimpleNamespace(name="detect"),
        model=create_model("rcnn", num_classes=2, representation_size=8),
        meta=SimpleNamespace(architecture="rcnn"),
    )
    with pytest.raises(CnnlabError, match="rcnn runs its backbone once per warped proposal"):
        check_run(rcnn)


def test_the_command_prints_a_line_per_box(detect_run, capsys, tmp_path) -> None:
    run, file, threshold = detect_run
    command = ["explain", str(run.path), str(file), "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main([*command, "--score-threshold", f"{threshold:.6f}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{file}: 3 box(es); drawn to ")
    assert len(lines) == 4 and all(" ms" in line for line in lines[1:])


def test_the_audit_reads_each_box_score_from_the_randomised_copies(detect_run) -> None:
    run, file, threshold = detect_run
    image = read_image(file, 3)
    methods = ("gradcam", "eigencam", "saliency")
    # (seed 1: the run was initialised with seed 0 and barely trained; re-initialising with
    # the same seed would give back nearly its own weights)
    report = audit(run, [image], methods, seed=1, score_threshold=threshold)
    assert report["boxes"] == 3 and report["layer"] == "backbone.features.2"
    assert report["steps"][0] == "head (neck, head)"  # everything after the backbone first
    assert [row["method"] for row in report["methods"]] == ["gradcam", "saliency"]
    for row in report["methods"]:
        assert len(row["spearman"]) == len(report["steps"])
        assert row["randomisation_passed"] == (row["spearman"][1] < 0.5)
        assert 0.0 <= row["deletion"] <= 1.0 and 0.0 <= row["random_insertion"] <= 1.0
    assert "3 boxes, each its own output" in audit_table(report)
    json.dumps(report)
