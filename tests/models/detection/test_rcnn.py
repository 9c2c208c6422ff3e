"""Faster R-CNN assembled from torchvision's parts on a zoo backbone."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from cnnlab import create_model
from cnnlab.errors import CnnlabError
from cnnlab.inspect import summarize
from cnnlab.models.detection import EVAL_LIMITS, DetectLimits
from cnnlab.models.features import backbone

SMALL = {  # a cheap configuration for 64x64 inputs
    "anchor_sizes": (8, 16, 32),
    "rpn_post_nms_top_n_train": 64,
    "rpn_post_nms_top_n_test": 32,
    "box_batch_size_per_image": 16,
    "representation_size": 64,
}
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0]]), "labels": torch.tensor([0])},
    {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [0, 30, 20, 50]]),
        "labels": torch.tensor([2, 1]),
    },
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("fasterrcnn", num_classes=3, **SMALL)


def test_user_class_count_plus_background_inside(model):
    assert model.roi_heads.box_predictor.cls_score.out_features == 3 + 1
    assert model.roi_heads.box_head.fc6.in_features == 256 * 7 * 7  # layer3 of resnet18
    assert model.roi_heads.box_head.fc7.out_features == 64
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)


def test_anchors_are_every_size_times_every_ratio(model):
    assert model.rpn.anchor_generator.sizes == ((8, 16, 32),)
    assert model.rpn.head.cls_logits.out_channels == 3 * 3  # sizes x aspect ratios per position


def test_training_forward_returns_the_loss_dict(model):
    model.train()
    losses = model(torch.rand(2, 3, 64, 64), TARGETS)
    parts = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == {"loss"} | parts
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(losses[k] for k in parts))
    losses["loss"].backward()
    assert model.backbone.conv1.weight.grad is not None


def test_eval_takes_a_batched_tensor_and_returns_0_based_labels(model):
    model.eval()
    found = model.detect(torch.rand(2, 3, 64, 64), DetectLimits(0.0, max_detections=50))
    assert len(found) == 2
    for detections in found:
        assert set(detections) == {"boxes", "scores", "labels"}
        assert 0 < len(detections["boxes"]) <= 50
        assert detections["boxes"].min() >= 0 and detections["boxes"].max() <= 64
    labels = torch.cat([d["labels"] for d in found])
    # torchvision's labels are 1..3 (0 is background); ours are the user's 0..2. Which
    # classes an untrained head picks is chance; the range is not.
    assert labels.min() >= 0 and labels.max() <= 2


def test_eval_on_list_input_matches_the_batched_tensor(model):
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        batched, listed = model(images), model(list(images))
    torch.testing.assert_close(batched[1]["boxes"], listed[1]["boxes"])


def test_original_roi_pool_can_replace_roi_align():
    torch.manual_seed(0)
    model = create_model("fasterrcnn", num_classes=3, roi_pool=True, **SMALL).eval()
    (found,) = model.detect(torch.rand(1, 3, 64, 64), EVAL_LIMITS.with_score(0.0))
    assert found["boxes"].shape[1] == 4 and len(found["boxes"]) > 0
    model.train()
    assert torch.isfinite(model(torch.rand(2, 3, 64, 64), TARGETS)["loss"])


def test_backbone_cut_follows_feature_info():
    body, taps = backbone("resnet18", [16])
    assert body.out_channels == taps[0]["num_chs"] == 256
    assert body(torch.rand(1, 3, 64, 64))["0"].shape == (1, 256, 4, 4)
    assert not any(name.startswith(("layer4", "fc")) for name, _ in body.named_parameters())
    with pytest.raises(CnnlabError, match="no stride-7 stage"):
        backbone("resnet18", [7])


def test_summary_runs_on_a_batched_tensor(model):
    summary = summarize(model, input_size=(3, 128, 128))
    names = [row.name for row in summary.layers]
    assert "rpn.head.cls_logits" in names and "roi_heads.box_head.fc6" in names
    assert summary.total_params == sum(p.numel() for p in model.parameters())
