"""Fast R-CNN and SPPNet: proposals pooled from one feature map, the regression targets,
the spatial pyramid, truncated SVD, and both through `detect train|eval|predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab import create_model
from cnnlab.data import transforms
from cnnlab.data.detect import DetectionDataset, read_coco
from cnnlab.metrics import mean_average_precision
from cnnlab.models.detection.sppnet import SpatialPyramidPool

SMALL = {"representation_size": 64, "max_proposals": 200}


@pytest.fixture(scope="module")
def shapes(shapes_dir) -> Path:
    return shapes_dir("detect", 12, 64)


def test_a_box_round_trips_through_the_regression_targets():
    torch.manual_seed(0)
    model = create_model("fastrcnn", num_classes=3, **SMALL).train()
    truth = torch.tensor([[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 60.0, 25.0]])
    proposals = [torch.tensor([[8.0, 10.0, 38.0, 47.0], [33.0, 6.0, 58.0, 28.0]])]
    targets = [{"boxes": truth, "labels": torch.tensor([1, 2])}]
    heads = model.roi_heads
    sampled, _, labels, regression = heads.select_training_samples(proposals, targets)
    foreground = labels[0] > 0
    decoded = heads.box_coder.decode(regression[0][foreground], [sampled[0][foreground]])
    # Each foreground RoI (the two proposals and the objects themselves) decodes to its object.
    matched = truth[box_match(sampled[0][foreground], truth)]
    torch.testing.assert_close(decoded.reshape(-1, 4), matched, atol=1e-4, rtol=0)
    # RoIHeads sees labels with background at 0 (the model adds 1 to the user's labels).
    assert foreground.sum() == 4 and set(labels[0][foreground].tolist()) == {1, 2}
    # The targets are Fast R-CNN's normalised ones: (dx, dy) scaled by 10, (dw, dh) by 5.
    first = (sampled[0] == proposals[0][0]).all(dim=1).nonzero()[0, 0]
    dx = 10 * ((10 + 40) / 2 - (8 + 38) / 2) / 30
    assert regression[0][first, 0].item() == pytest.approx(dx, rel=1e-5)


def box_match(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(boxes, truth).argmax(dim=1)


def test_pyramid_pooling_equals_adaptive_max_pooling_of_the_window():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 12, 12)
    pool = SpatialPyramidPool((6, 3, 2, 1), spatial_scale=1 / 4)
    # Boxes on the stride-4 grid; RoIPool's window is inclusive of the last cell.
    boxes = [torch.tensor([[0.0, 0.0, 44.0, 44.0], [8.0, 4.0, 28.0, 40.0]]), torch.tensor(
        [[20.0, 12.0, 32.0, 20.0]]
    )]  # fmt: skip
    pooled = pool({"0": features}, boxes, [(48, 48)] * 2)
    assert pooled.shape == (3, 5 * (36 + 9 + 4 + 1))
    row = 0
    for image, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in (image_boxes / 4).long().tolist():
            window = features[image, :, y1 : y2 + 1, x1 : x2 + 1]
            expected = torch.cat(
                [torch.nn.functional.adaptive_max_pool2d(window, n).flatten() for n in pool.levels]
            )
            # roi_pool lays out (channels, bins) per level, as the flattened adaptive pool.
            torch.testing.assert_close(pooled[row], expected)
            row += 1


def test_truncated_svd_changes_the_test_time_layers_not_the_weights():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 10.0, 60.0, 50.0]])]
    full = create_model("sppnet", num_classes=3, levels=(2, 1), **SMALL).eval()
    exact = create_model("sppnet", num_classes=3, levels=(2, 1), svd_rank=64, **SMALL).eval()
    exact.load_state_dict(full.state_dict())
    low = create_model("sppnet", num_classes=3, levels=(2, 1), svd_rank=8, **SMALL).eval()
    low.load_state_dict(full.state_dict())
    with torch.no_grad():
        features = torch.randn(2, 256 * 5)
        torch.testing.assert_close(
            exact.roi_heads.box_head(features), full.roi_heads.box_head(features)
        )
        assert not torch.allclose(
            low.roi_heads.box_head(features), full.roi_heads.box_head(features)
        )
        # A rank set after a forward pass is the one used next (the factors follow it).
        exact.roi_heads.box_head.svd_rank = 8
        torch.testing.assert_close(
            exact.roi_heads.box_head(features), low.roi_heads.box_head(features)
        )
    assert low.detect(images, proposals=proposals)[0]["boxes"].shape[1] == 4
    assert set(low.state_dict()) == set(full.state_dict())
    low.train()  # training uses the full layers
    torch.testing.assert_close(low.roi_heads.box_head(features), full.roi_heads.box_head(features))


def test_proposals_move_with_the_image(shapes):
    _, samples = read_coco(shapes)
    sample = samples[0]
    proposals = {sample.path: np.array([[0, 0, 32, 16], [8, 8, 64, 64]], np.float32)}
    flip = transforms.v2.Compose(
        [transforms.v2.Resize((128, 128)), transforms.v2.RandomHorizontalFlip(1.0)]
    )
    image, target = DetectionDataset([sample], flip, 3, proposals)[0]
    assert image.shape[-1] == 128 and len(target["labels"]) == len(sample.boxes)
    assert (target["labels"] >= 0).all()
    torch.testing.assert_close(
        target["proposals"], torch.tensor([[64.0, 0, 128, 32], [0, 16, 112, 128]])
    )


@pytest.fixture(scope="module", params=["fastrcnn", "sppnet"])
def run(request, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / request.param
    report = cnnlab.train(
        shapes,
        out,
        task="detect",
        model=request.param,
        epochs=1,
        batch_size=2,
        img_size=64,
        device="cpu",
        quiet=True,
        val_split=0.25,
        model_args=SMALL,
    )
    return out, report


def test_it_trains_and_the_shared_evaluator_scores_it(run, shapes):
    out, report = run
    assert 0 <= report["map50"] <= 1 and report["n_images"] == 3
    assert (shapes / "proposals" / "selective_search-fast-200.json").is_file()
    loaded = cnnlab.load_run(out, "cpu")
    evaluated = loaded.evaluate()
    assert evaluated["map50"] == pytest.approx(report["map50"])
    data = loaded.task.eval_data(out / "split.json", None, "val")
    from cnnlab.data.images import read_image
    from cnnlab.models.detection import EVAL_LIMITS
    from cnnlab.tasks.detect import proposal_source_of

    source = proposal_source_of(loaded.model)
    boxes = source.boxes([s.path for s in data])
    found = loaded.task.detect(
        loaded.model,
        [read_image(s.path, 3) for s in data],
        loaded.device,
        EVAL_LIMITS,
        proposals=[boxes[s.path] for s in data],
    )
    again = mean_average_precision(found, data, loaded.task.classes)
    assert again["map50"] == pytest.approx(report["map50"])


def test_predict_gives_boxes_in_the_images_pixels(run, shapes, tmp_path):
    out, _ = run
    source = sorted((shapes / "images").iterdir())[0]
    big = tmp_path / "big.png"
    Image.open(source).resize((192, 128)).save(big)
    results = cnnlab.load_run(out, "cpu").predict([big], score_threshold=0.0)
    boxes = np.array([d["box"] for d in results[0]["detections"]]).reshape(-1, 4)
    assert len(boxes) > 0
    assert boxes[:, [0, 2]].max() <= 192 and boxes[:, [1, 3]].max() <= 128
    assert boxes[:, [0, 2]].max() > 64  # the image's pixels, not the 64 px input's
