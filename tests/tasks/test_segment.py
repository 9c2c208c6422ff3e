import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

import cnnlab
from cnnlab import cli
from cnnlab.data import segment as segdata
from cnnlab.data.shapes import write_shapes
from cnnlab.data.transforms import segment_train
from cnnlab.draw import SIDE_BY_SIDE_GAP
from cnnlab.errors import CnnlabError
from cnnlab.tasks.segment import confusion_matrix, scores
from tests.conftest import read_metrics

# metrics.csv's header, a run-folder contract (runs written before keep it).
METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_pixel_acc",
    "val_loss",
    "val_pixel_acc",
    "val_miou",
    "seconds",
)

# ---------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_scores_match_a_hand_computation():
    targets = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    confusion = confusion_matrix(preds, targets, num_classes=4)
    # rows: true 0, 1, 2, 3; columns: predicted. The ignored pixel (255) is not counted.
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)

    result = scores(confusion, ["bg", "a", "b", "c"])
    # IoU = TP / (row + column - TP): bg 1/(2+2-1), a 2/(3+3-2), b 1/(2+1-1), c 0/(0+1-0)
    iou = {"bg": 1 / 3, "a": 2 / 4, "b": 1 / 2, "c": 0.0}
    assert result["per_class_iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou.values()) / 4)
    assert result["pixel_acc"] == pytest.approx(4 / 7)


def test_classes_absent_from_targets_and_predictions_are_left_out_of_the_mean():
    confusion = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    result = scores(confusion, ["bg", "a", "b"])
    assert result["per_class_iou"]["b"] is None
    assert result["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)


# ---------------------------------------------------------------------------- data


def _write_pair(root, name, mask, mode="L", image_size=None, palette=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    height, width = image_size or mask.shape
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / f"{name}.png")
    picture = Image.fromarray(mask.astype(np.uint8), mode="L")
    if mode == "P":
        picture = picture.convert("P")
        picture.putpalette(palette)
    picture.save(root / "masks" / f"{name}.png")
    return root / "masks" / f"{name}.png"


def test_read_mask_gives_palette_indices_and_keeps_ignore(tmp_path):
    mask = np.array([[0, 1, 2], [255, 2, 0]])
    # VOC-style palette: index 1 is drawn dark red, 2 dark green; reading must give 1 and 2
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]
    path = _write_pair(tmp_path, "voc", mask, mode="P", palette=palette)
    assert Image.open(path).mode == "P"
    assert torch.equal(segdata.read_mask(path, num_classes=3), torch.from_numpy(mask))
    gray = _write_pair(tmp_path, "gray", mask)
    assert torch.equal(segdata.read_mask(gray, num_classes=3), torch.from_numpy(mask))


def test_bad_masks_are_named_errors(tmp_path):
    path = _write_pair(tmp_path, "big", np.array([[0, 5], [1, 0]]))
    with pytest.raises(CnnlabError, match=r"big\.png: mask value 5 but only 3 classes"):
        segdata.read_mask(path, num_classes=3)
    colour = tmp_path / "masks" / "colour.png"
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(colour)
    with pytest.raises(CnnlabError, match="colour mask"):
        segdata.read_mask(colour, num_classes=3)


def test_missing_and_mismatched_masks_are_named(tmp_path):
    _write_pair(tmp_path, "good", np.zeros((8, 8)))
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(CnnlabError, match=r"no mask NAME\.png for lonely\.jpg"):
        segdata.make_seg_splits(tmp_path)
    (tmp_path / "images" / "lonely.jpg").unlink()
    _write_pair(tmp_path, "odd", np.zeros((8, 8)), image_size=(8, 9))
    splits = segdata.make_seg_splits(tmp_path)
    with pytest.raises(CnnlabError, match=r"odd\.png: mask is 8x8 but its image odd\.png is 9x8"):
        segdata.check_pairs(splits.train + splits.val, 2)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(CnnlabError, match=r"classes\.txt: missing"):
        segdata.make_seg_splits(tmp_path)


def test_splits_are_seeded_presplit_folders_respected_and_saved(tmp_path):
    for i in range(10):
        _write_pair(tmp_path / "flat", f"{i}", np.zeros((4, 4)))
    (tmp_path / "flat" / "classes.txt").write_text("background\nthing\n")
    first = segdata.make_seg_splits(tmp_path / "flat", val_split=0.3, seed=1)
    again = segdata.make_seg_splits(tmp_path / "flat", val_split=0.3, seed=1)
    other = segdata.make_seg_splits(tmp_path / "flat", val_split=0.3, seed=2)
    assert len(first.val) == 3 and len(first.train) == 7
    assert first.val == again.val and first.val != other.val
    saved = tmp_path / "split.json"
    saved.write_text(json.dumps(first.to_json()))
    assert segdata.SegSplits.from_json(saved) == first

    for part in ("train", "val"):
        _write_pair(tmp_path / "split" / part, f"{part}0", np.zeros((4, 4)))
    (tmp_path / "split" / "classes.txt").write_text("background\nthing\n")
    presplit = segdata.make_seg_splits(tmp_path / "split")
    assert presplit.presplit
    assert [p[0].name for p in presplit.val] == ["val0.png"]


def test_joint_transform_moves_mask_with_image_and_colours_only_the_image():
    torch.manual_seed(0)
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[10:40, 20:50] = 1
    image = torch.where(mask.bool(), 220, 30).to(torch.uint8).expand(3, -1, -1)
    transform = segment_train(48, "strong", True, (0.5,) * 3, (0.5,) * 3)
    for _ in range(10):
        out, moved = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out.shape == (3, 48, 48) and moved.shape == (48, 48)
        assert set(moved.unique().tolist()) <= {0, 1, 255}  # nearest: no blended labels
        inside, outside = out[0][moved == 1], out[0][moved == 0]
        if len(inside) and len(outside):
            # the bright square is where the label went (all but a blurred edge)
            assert (inside > outside.max() - 0.2).float().mean() > 0.9


def test_collate_pads_images_with_zero_and_masks_with_ignore():
    batch = [
        (torch.ones(3, 4, 5), torch.ones(4, 5, dtype=torch.long)),
        (torch.ones(3, 6, 3), torch.zeros(6, 3, dtype=torch.long)),
    ]
    images, masks = segdata.collate_pad(batch)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert images[0, :, 4:].abs().sum() == 0 and (masks[0, 4:] == 255).all()
    assert (masks[1, :, 3:] == 255).all() and (masks[1, :, :3] == 0).all()


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir("segment", 24, 64)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, shapes):
    root = tmp_path_factory.mktemp("segment")
    report = cnnlab.train(
        shapes,
        root / "run",
        task="segment",
        epochs=1,
        batch_size=8,
        lr=1e-3,
        val_split=0.25,
        device="cpu",
        quiet=True,
    )
    return root, report


def test_train_writes_a_segmentation_run(shapes_run):
    root, report = shapes_run
    run = root / "run"
    for name in (
        "config.yaml",
        "split.json",
        "metrics.csv",
        "best.safetensors",
        "model.json",
        "last.pt",
        "report.json",
        "curves.png",
        "batch.png",
        "val_predictions.png",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "segment" and meta["architecture"] == "fcn8s"
    assert meta["classes"] == ["background", "circle", "square", "triangle"]
    assert meta["model_args"]["backbone"] == "resnet18" and meta["input_size"] == [3, 64, 64]
    rows = read_metrics(run)
    assert tuple(rows[0]) == METRICS_COLUMNS and len(rows) == 1
    assert json.loads((run / "report.json").read_text())["miou"] == pytest.approx(report["miou"])
    assert set(report) >= {"miou", "pixel_acc", "per_class_iou", "loss", "n"}
    assert report["n"] == 6 and 0 <= report["miou"] <= 1
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_eval_on_the_run_split_and_on_a_folder(shapes_run, shapes):
    root, report = shapes_run
    run = cnnlab.load_run(root / "run")
    own = run.evaluate()
    assert own["miou"] == pytest.approx(report["miou"]) and own["n"] == 6
    assert list(own["per_class_iou"]) == ["background", "circle", "square", "triangle"]
    folder = run.evaluate(shapes)
    assert folder["n"] == 24
    json.dumps(folder)  # plain JSON for --format json


def test_predict_writes_index_masks_and_overlays(shapes_run, shapes, tmp_path, capsys):
    root, _ = shapes_run
    images = sorted((shapes / "images").iterdir())[:2]
    out = tmp_path / "pred"
    command = ["segment", "predict", str(root / "run"), *map(str, images), "--out", str(out)]
    assert cli.main([*command, "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [str(p) for p in images]
    for result, image in zip(results, images, strict=True):
        mask = Image.open(result["mask"])
        assert result["mask"] == str(tmp_path / "pred" / image.name)
        # A palette PNG: its pixels are the class indices, its palette their colours.
        assert mask.mode == "P" and mask.size == Image.open(image).size
        indices = np.array(mask)
        assert indices.max() <= 3
        palette = mask.getpalette()
        assert (
            palette[:3] == [0, 0, 0] and len(set(map(tuple, np.reshape(palette[:12], (4, 3))))) == 4
        )
        shares = np.bincount(indices.ravel(), minlength=4) / indices.size
        classes = ["background", "circle", "square", "triangle"]
        for k, name in enumerate(classes):
            assert shares[k] == pytest.approx(result["class_fractions"].get(name, 0.0), abs=1e-6)
        overlay = Image.open(result["overlay"])
        # 64x64 is enlarged by a whole factor to be legible: the image with its classes
        # outlined beside the class map, a legend band below them.
        width, height = mask.size
        factor = (overlay.width - SIDE_BY_SIDE_GAP) // (2 * width)
        assert overlay.mode == "RGB" and factor >= 2
        assert overlay.width == 2 * width * factor + SIDE_BY_SIDE_GAP
        assert overlay.height > height * factor
        # the class map is the mask in pure palette colours, never blended with the image
        shown = np.asarray(overlay)[: height * factor, width * factor + SIDE_BY_SIDE_GAP :]
        expected = np.asarray(mask.convert("RGB")).repeat(factor, 0).repeat(factor, 1)
        assert np.array_equal(shown, expected)
        assert result["overlay"].endswith(f"{image.stem}_overlay.png")
        assert sum(result["class_fractions"].values()) == pytest.approx(1.0)
    json.dumps(results)


def test_resume_continues_to_more_epochs(shapes_run, tmp_path):
    import shutil

    root, _ = shapes_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    cnnlab.resume(run, task="segment", quiet=True)
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2"]


def test_a_classification_run_or_other_classes_are_refused(shapes_run, tmp_path):
    root, _ = shapes_run
    meta = json.loads((root / "run" / "model.json").read_text())
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.json").write_text(json.dumps({**meta, "task": "classify"}))
    with pytest.raises(CnnlabError, match="fcn8s is a segment model but the file says classify"):
        cnnlab.load_run(fake)
    other = tmp_path / "other"
    write_shapes(other, n=2, size=32)
    (other / "classes.txt").write_text("background\nblob\n")
    with pytest.raises(CnnlabError, match="differ from the run's"):
        cnnlab.load_run(root / "run").evaluate(other)


def test_commands_eval_predict_and_resume_a_finished_run(shapes_run, shapes, tmp_path, capsys):
    root, report = shapes_run
    run = str(root / "run")
    assert cli.main(["segment", "eval", run, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(report["miou"])
    image = sorted((shapes / "images").iterdir())[0]
    assert cli.main(["segment", "predict", run, str(image), "--out", str(tmp_path)]) == 0
    assert "overlay" in capsys.readouterr().out
    assert (tmp_path / image.name).is_file()
    # `train --resume` resumes a run of any task; a finished one only reports again.
    assert cli.main(["train", "--resume", run, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("val mIoU ")


def test_an_image_below_the_models_minimum_is_one_line(shapes_run, tmp_path, capsys, monkeypatch):
    """Segmented at its own size, an 8x8 image cannot pass five poolings: a named
    refusal, not torch's "Output size is too small"."""
    root, _ = shapes_run
    monkeypatch.chdir(tmp_path)  # were it drawn, ./predictions lands here, not in the checkout
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    assert cli.main(["segment", "predict", str(root / "run"), str(tmp_path / "tiny.png")]) == 2
    assert "needs images of at least 32x32, got 8x8" in capsys.readouterr().err
