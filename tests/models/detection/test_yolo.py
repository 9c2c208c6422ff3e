"""YOLOv1: target encoding, the paper's loss on hand-made cases, decoding + NMS, the model."""

from __future__ import annotations

import pytest
import torch

from cnnlab import create_model
from cnnlab.errors import CnnlabError
from cnnlab.inspect import summarize
from cnnlab.models.detection import EVAL_LIMITS, DetectLimits
from cnnlab.models.detection.yolov1 import YOLOLoss, decode, encode_targets

S, B, C = 2, 2, 2  # a 2x2 grid, two boxes per cell, two classes: small enough to reason about


def _target(cx: float, cy: float, w: float, h: float, label: int) -> torch.Tensor:
    """One object in a 100x100 image, encoded on the 2x2 grid: (1, S, S, 5 + C)."""
    box = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]) * 100
    return encode_targets([{"boxes": box, "labels": torch.tensor([label])}], S, C, (100, 100))


def _prediction(cells: dict[tuple[int, int], list[float]]) -> torch.Tensor:
    """(1, S, S, B*5 + C) zeros except the given cells' full vectors."""
    pred = torch.zeros(1, S, S, B * 5 + C)
    for (row, col), values in cells.items():
        pred[0, row, col] = torch.tensor(values)
    return pred


def test_targets_land_in_the_cell_of_the_box_centre():
    # centre (0.75, 0.25) of the image -> row 0, column 1, at the middle of that cell
    target = _target(0.75, 0.25, 0.4, 0.2, label=1)
    assert target.shape == (1, S, S, 5 + C)
    torch.testing.assert_close(target[0, 0, 1], torch.tensor([0.5, 0.5, 0.4, 0.2, 1, 0, 1]))
    assert target[..., 4].sum() == 1  # no other cell holds an object


def test_two_centres_in_one_cell_keep_the_larger_box():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 48.0, 48.0], [5.0, 5.0, 15.0, 15.0]])
    target = encode_targets([{"boxes": boxes, "labels": torch.tensor([0, 1, 0])}], S, C, (100, 100))
    torch.testing.assert_close(target[0, 0, 0, 2:], torch.tensor([0.48, 0.48, 1, 0, 1]))


def test_perfect_prediction_has_zero_loss():
    target = _target(0.75, 0.25, 0.4, 0.2, label=1)
    # box 0 exact with confidence 1 (its IoU); box 1 silent; class 1 certain
    pred = _prediction({(0, 1): [0.5, 0.5, 0.4, 0.2, 1.0, 0.3, 0.3, 0.1, 0.1, 0.0, 0.0, 1.0]})
    losses = YOLOLoss(S, B, C)(pred, target)
    for part in ("loss", "coord", "obj", "noobj", "class"):
        assert losses[part].item() == pytest.approx(0.0, abs=1e-6), part


def test_only_the_box_with_the_highest_iou_is_responsible():
    target = _target(0.75, 0.25, 0.4, 0.2, label=1)
    poor = [0.2, 0.5, 0.2, 0.2, 0.7]  # overlaps the truth less
    good = [0.5, 0.6, 0.4, 0.2, 0.9]  # shifted down by 0.1 of a cell = 0.05 of the image
    pred = _prediction({(0, 1): [*poor, *good, 0.0, 1.0]})
    losses = YOLOLoss(S, B, C, rescore=False)(pred, target)
    # coordinates: only the good box's y error counts, times lambda_coord 5
    assert losses["coord"].item() == pytest.approx(5 * 0.1**2, abs=1e-6)
    # confidence: the good box towards 1, the poor one towards 0 with lambda_noobj 0.5
    assert losses["obj"].item() == pytest.approx((1 - 0.9) ** 2, abs=1e-6)
    assert losses["noobj"].item() == pytest.approx(0.5 * 0.7**2, abs=1e-6)
    assert losses["class"].item() == pytest.approx(0.0, abs=1e-6)


def test_rescore_makes_the_confidence_target_the_iou():
    target = _target(0.75, 0.25, 0.4, 0.2, label=1)
    good = [0.5, 0.6, 0.4, 0.2, 0.9]  # IoU with the truth: overlap 0.15/0.2 of the height
    pred = _prediction({(0, 1): [*good, 0.5, 0.5, 0.1, 0.1, 0.0, 0.0, 1.0]})
    iou = 0.15 / 0.25  # intersection 0.4 x 0.15, union 2 x 0.4 x 0.2 - 0.4 x 0.15
    losses = YOLOLoss(S, B, C, rescore=True)(pred, target)
    assert losses["obj"].item() == pytest.approx((0.9 - iou) ** 2, abs=1e-5)


def test_noobj_weighting_on_an_empty_image():
    target = encode_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], S, C, (8, 8))
    pred = torch.zeros(1, S, S, B * 5 + C)
    pred[..., 4] = 0.5  # every box's confidence, class scores anything
    pred[..., 9] = 0.2
    pred[..., 10:] = 0.5
    losses = YOLOLoss(S, B, C, lambda_noobj=0.5)(pred, target)
    expected = 0.5 * S * S * (0.5**2 + 0.2**2)
    assert losses["noobj"].item() == pytest.approx(expected)
    assert losses["loss"].item() == pytest.approx(expected)  # nothing else without objects


def test_square_roots_weigh_the_same_width_error_more_on_small_boxes():
    loss = YOLOLoss(S, B, C, rescore=False)
    small, large = _target(0.25, 0.25, 0.1, 0.1, 0), _target(0.25, 0.25, 0.8, 0.8, 0)
    off_small = _prediction({(0, 0): [0.5, 0.5, 0.15, 0.1, 1.0, *[0.0] * 5, 1.0, 0.0]})
    off_large = _prediction({(0, 0): [0.5, 0.5, 0.85, 0.8, 1.0, *[0.0] * 5, 1.0, 0.0]})
    assert loss(off_small, small)["coord"] > 5 * loss(off_large, large)["coord"]


def test_decode_scores_classes_and_applies_per_class_nms():
    box = [0.5, 0.5, 0.5, 0.5]  # centre of cell (0, 0), half the image wide and high
    pred = _prediction({(0, 0): [*box, 0.9, *box, 0.6, 0.2, 0.8]})
    (found,) = decode(pred, B, (100, 200), EVAL_LIMITS.with_score(0.15))
    # scores = confidence x class probability; box 1 duplicates box 0 and is suppressed
    # per class, but class 0 survives next to class 1 on the same box
    torch.testing.assert_close(found["scores"], torch.tensor([0.72, 0.18]))
    assert found["labels"].tolist() == [1, 0]
    torch.testing.assert_close(found["boxes"], torch.tensor([[0.0, 0.0, 100.0, 50.0]] * 2))


def test_decode_keeps_separate_objects_and_the_best_ones():
    pred = _prediction(
        {
            (0, 0): [0.5, 0.5, 0.2, 0.2, 0.9, 0, 0, 0, 0, 0, 1.0, 0.0],
            (1, 1): [0.5, 0.5, 0.2, 0.2, 0.8, 0, 0, 0, 0, 0, 1.0, 0.0],
        }
    )
    (both,) = decode(pred, B, (10, 10), EVAL_LIMITS.with_score(0.5))
    assert both["scores"].tolist() == pytest.approx([0.9, 0.8])
    (best,) = decode(pred, B, (10, 10), DetectLimits(0.5, max_detections=1))
    assert best["scores"].tolist() == pytest.approx([0.9])
    torch.testing.assert_close(best["boxes"], torch.tensor([[1.5, 1.5, 3.5, 3.5]]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("yolov1", num_classes=3, head_channels=32, hidden=64)


def test_output_is_the_papers_tensor_with_valid_ranges(model):
    model.eval()
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 7, 7, 2 * 5 + 3)
    assert out[..., :10].min() >= 0 and out[..., :10].max() <= 1
    torch.testing.assert_close(out[..., 10:].sum(-1), torch.ones(2, 7, 7))


def test_a_few_steps_on_one_batch_lower_the_loss(model):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    targets = [
        {"boxes": torch.tensor([[2.0, 4.0, 15.0, 20.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[15.0, 15.0, 30.0, 25.0]]), "labels": torch.tensor([0])},
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    first = None
    for _ in range(3):
        loss = model(images, targets)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    model.eval()
    found = model.detect(images, EVAL_LIMITS.with_score(0.0))
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4
    assert found[0]["labels"].max() < 3 and len(found[0]["scores"]) <= 100


def test_summary_runs_at_the_papers_input_size(model):
    summary = summarize(model, input_size=(3, 448, 448))
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert summary.layers[-1].output_shape == [7, 7, 13]
    # the backbone's stride-32 map at 448 is 14x14, pooled to the 7x7 grid
    pooled = [row for row in summary.layers if row.type == "AdaptiveAvgPool2d"]
    assert pooled[0].output_shape == [32, 7, 7]


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_a_cut_backbone_has_rows_for_every_layer_at_any_depth(model, depth):
    # torch.fx's GraphModule calls the leaves of layer1-3 directly and keeps bare Module
    # placeholders for their names: those are no rows, the leaves are.
    summary = summarize(model, input_size=(3, 448, 448), depth=depth)
    assert sum(row.params for row in summary.layers) == summary.total_params
    assert all(row.output_shape for row in summary.layers)
    assert "Module" not in {row.type for row in summary.layers}


def test_backbone_is_cut_at_stride_32_without_its_classifier():
    model = create_model("yolov1", num_classes=2, backbone="resnet18", head_channels=8, hidden=8)
    names = {name.split(".")[0] for name, _ in model.backbone.named_parameters()}
    assert "fc" not in names and "layer4" in names
    assert model.backbone(torch.rand(1, 3, 64, 64))["0"].shape == (1, 512, 2, 2)


def test_conv_head_predicts_every_cell_with_one_shared_layer():
    model = create_model(
        "yolov1", num_classes=3, head="conv", reduction=16, grid=4, head_channels=8
    ).eval()
    # 64x64 at stride 16 is a 4x4 map: one cell per feature position, no resampling
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4, 4, 13)
    assert model.head[0].weight.shape == (13, 8, 1, 1)


def test_unknown_head_is_refused():
    with pytest.raises(CnnlabError, match="head must be fc or conv"):
        create_model("yolov1", num_classes=3, head="mlp")
