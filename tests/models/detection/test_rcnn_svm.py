"""R-CNN: the warped crops, the SVMs' hard-negative mining, the box regression, and the
model trained, fitted after training and scored by the shared evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cnnlab
from cnnlab import create_model
from cnnlab.export import export_run
from cnnlab.models.detection.rcnn import (
    hard_negatives,
    ridge_regression,
    train_linear_svm,
    warp_regions,
)

SMALL = {"crop_size": 32, "context_padding": 4, "representation_size": 32, "max_proposals": 100}


def test_an_unscaled_box_is_copied_and_a_shrunk_one_averaged():
    image = torch.rand(1, 3, 48, 48)
    crops = warp_regions(
        image,
        [torch.tensor([[4.0, 6.0, 20.0, 22.0], [2.0, 4.0, 34.0, 36.0]])],
        crop_size=16,
        context=0,
    )
    torch.testing.assert_close(crops[0], image[0, :, 6:22, 4:20])
    shrunk = torch.nn.functional.avg_pool2d(image[:, :, 4:36, 2:34], 2)[0]
    torch.testing.assert_close(crops[1], shrunk)


def test_context_padding_widens_the_box_before_warping():
    image = torch.rand(1, 1, 40, 40)
    # crop 24 with 4 px of context: the 16 px box fills the inner 16, so 4 px each side.
    [crop] = warp_regions(image, [torch.tensor([[8.0, 10.0, 24.0, 26.0]])], 24, context=4)
    torch.testing.assert_close(crop, image[0, :, 6:30, 4:28])
    # Beyond the image's edge the crop is 0, the mean of a normalised image.
    [edge] = warp_regions(image, [torch.tensor([[0.0, 0.0, 16.0, 16.0]])], 24, context=4)
    assert edge[:, :2].abs().max() == 0 and edge[:, 4:, 4:].abs().min() > 0


def test_hard_negative_mining_picks_the_highest_scoring_new_negatives():
    scores = torch.tensor([-2.0, 0.5, -0.5, 3.0, 1.0, -1.5, -0.9])
    active = torch.tensor([False, False, False, True, False, False, False])
    # 3.0 is already in the SVM's set; -1.5 and -2.0 are beyond the margin (easy).
    assert hard_negatives(scores, active, limit=2).tolist() == [4, 1]
    assert hard_negatives(scores, active, limit=10).tolist() == [4, 1, 2, 6]
    assert hard_negatives(scores, torch.ones(7, dtype=torch.bool), limit=3).tolist() == []


def test_the_svm_separates_and_puts_positives_past_the_margin():
    torch.manual_seed(0)
    positives = torch.randn(40, 8, dtype=torch.float64) + 3
    negatives = torch.randn(200, 8, dtype=torch.float64) - 3
    x = torch.cat([positives, negatives])
    y = torch.cat([torch.ones(40), torch.zeros(200)]).bool()
    weight, bias = train_linear_svm(x, y, cost=1.0)
    margins = x @ weight + bias
    assert ((margins > 0) == y).all()
    assert margins[y].median() > 0.9 and margins[~y].median() < -0.9


def test_a_box_round_trips_through_the_regression_targets_and_ridge_recovers_them():
    model = create_model("rcnn", num_classes=2, **SMALL)
    proposals = torch.tensor([[10.0, 12.0, 40.0, 50.0], [3.0, 5.0, 20.0, 60.0]])
    objects = torch.tensor([[12.0, 10.0, 44.0, 47.0], [2.0, 6.0, 22.0, 58.0]])
    targets = model.box_coder.encode_single(objects, proposals)
    # The paper's targets: centre shift over the proposal's size, log of the size ratio.
    assert targets[0, 0].item() == pytest.approx((28 - 25) / 30)
    assert targets[0, 3].item() == pytest.approx(torch.log(torch.tensor(37 / 38)).item())
    decoded = model.box_coder.decode_single(targets, proposals)
    torch.testing.assert_close(decoded, objects)

    torch.manual_seed(0)
    features = torch.randn(300, 6, dtype=torch.float64)
    true = torch.randn(7, 4, dtype=torch.float64)
    wanted = torch.cat([features, torch.ones(300, 1, dtype=torch.float64)], 1) @ true
    torch.testing.assert_close(ridge_regression(features, wanted, 1e-6), true)
    # A large penalty shrinks the weights, never the bias: it goes to the targets' mean.
    centred = features - features.mean(0)
    shrunk = ridge_regression(centred, wanted, 1e9)
    assert shrunk[:-1].abs().max() < 1e-3
    torch.testing.assert_close(shrunk[-1], wanted.mean(0))


@pytest.fixture(scope="module")
def shapes(shapes_dir) -> Path:
    return shapes_dir("detect", 12, 64)


def test_it_trains_fits_its_svms_and_the_shared_evaluator_scores_it(shapes, tmp_path):
    out = tmp_path / "rcnn"
    report = cnnlab.train(
        shapes,
        out,
        task="detect",
        model="rcnn",
        epochs=1,
        batch_size=2,
        img_size=64,
        device="cpu",
        quiet=True,
        val_split=0.25,
        model_args=SMALL,
    )
    assert 0 <= report["map50"] <= 1 and report["n_images"] == 3
    saved = load_file(str(out / "best.safetensors"))
    assert saved["fitted"].item() == 1
    assert saved["svm_weight"].abs().sum() > 0 and saved["box_weight"].abs().sum() > 0
    loaded = cnnlab.load_run(out, "cpu")
    assert loaded.model.fitted is True
    assert loaded.evaluate()["map50"] == pytest.approx(report["map50"])
    # The SVMs' scores, not the softmax's: changing the SVMs changes the detections.
    image = sorted((shapes / "images").iterdir())[0]
    before = loaded.predict([image], score_threshold=0.0)[0]["detections"]
    loaded.model.svm_bias -= 5
    after = loaded.predict([image], score_threshold=0.0)[0]["detections"]
    assert before and after and after[0]["score"] < before[0]["score"]
    # An exported graph could not run selective search: refused, nothing written.
    assert "classifies selective-search proposals" in loaded.model.export_refusal
    with pytest.raises(cnnlab.CnnlabError) as refused:
        export_run(out)
    assert str(refused.value) == f"rcnn {loaded.model.export_refusal}"  # the model's words
    assert not (out / "model.onnx").exists()


def test_a_crop_too_small_for_its_context_or_backbone_is_refused():
    with pytest.raises(cnnlab.CnnlabError, match="context_padding 8 takes 16"):
        create_model("rcnn", num_classes=2, crop_size=16, context_padding=8)
    with pytest.raises(cnnlab.CnnlabError, match="below vgg11's 32 px"):
        create_model("rcnn", num_classes=2, backbone="vgg11", crop_size=16, context_padding=2)
