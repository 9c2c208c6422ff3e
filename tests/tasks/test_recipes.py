"""timm's training recipes from torchvision and torch: TrivialAugment and RandAugment,
MixUp and CutMix, an EMA of the weights, and test-time augmentation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.transforms import v2

from cnnlab import checkpoint, cli, load_run
from cnnlab.data.classify import MixingCollate
from cnnlab.data.transforms import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_mix,
    classify_train,
    segment_train,
)
from cnnlab.engine.optim import ema_model
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.tasks.classify import ClassifyTask
from cnnlab.tasks.tta import TTA
from cnnlab.training import resume, train
from tests.conftest import read_metrics, tiny_config

# ---------------------------------------------------------------------------- augment


@pytest.mark.parametrize(
    ("augment", "policy"), [("trivial", v2.TrivialAugmentWide), ("randaugment", v2.RandAugment)]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_trivial_and_randaugment_are_torchvision_s_policies(augment, policy, channels):
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    transform = classify_train(24, augment, True, mean, std)
    assert any(isinstance(step, policy) for step in transform.transforms)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (channels, 40, 30), dtype=torch.uint8)
    outputs = torch.stack([transform(image) for _ in range(8)])
    assert outputs.shape == (8, channels, 24, 24) and outputs.dtype == torch.float32
    assert len({tuple(o.flatten()[:50].tolist()) for o in outputs}) > 1  # random each time


def test_segmentation_refuses_the_classification_policies():
    with pytest.raises(CnnlabError, match="unknown augment 'trivial'"):
        segment_train(32, "trivial", True, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------- mixing


def test_mixup_mixes_images_and_labels_by_the_same_weight():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, soft = batch_mix(0.4, 0.0, 5)(images, labels)
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(dim=1), torch.ones(4))
    lam = soft[0, 0].item()  # image 0 keeps lam of itself and takes 1 - lam of image 3
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, dims=0), atol=1e-6)
    assert soft[0, 3].item() == pytest.approx(1 - lam)


def test_cutmix_label_weights_are_the_pasted_area():
    torch.manual_seed(3)
    images = torch.zeros(2, 1, 20, 20)
    images[1] = 1.0
    mixed, soft = batch_mix(0.0, 1.0, 2)(images, torch.tensor([0, 1]))
    pasted = mixed[0].mean().item()  # image 0 is zeros: what is 1 came from image 1
    assert 0 < pasted < 1
    assert soft[0].tolist() == pytest.approx([1 - pasted, pasted], abs=1e-6)


def test_both_mixes_take_one_per_batch_and_none_is_off():
    both = batch_mix(0.8, 1.0, 3)
    assert isinstance(both, v2.RandomChoice)
    assert [type(t) for t in both.transforms] == [v2.MixUp, v2.CutMix]
    assert batch_mix(0.0, 0.0, 3) is None


def test_mixing_collate_skips_unreadable_images_and_passes_an_empty_batch():
    collate = MixingCollate(batch_mix(0.4, 0.0, 3))
    images, labels = collate([(torch.rand(1, 4, 4), 0), None, (torch.rand(1, 4, 4), 2)])
    assert images.shape == (2, 1, 4, 4) and labels.shape == (2, 3)
    images, labels = collate([None])
    assert len(images) == 0 and labels.dtype == torch.long


def test_soft_targets_give_the_cross_entropy_against_the_mixture():
    task = ClassifyTask(["a", "b", "c"], 1, 8, GRAY_MEAN, GRAY_STD)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]])
    loss, (right, scored) = task.forward_loss(lambda x: x, logits, soft)
    expected = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert loss.item() == pytest.approx(expected.item())
    assert (right.item(), scored) == (1, 2)  # the larger share: a (right), b (c predicted)


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_mixing_is_refused_outside_classification(task: str, tmp_path: Path):
    # The command line has no --mixup there (tests/cli/test_ux.py); the Python API and a
    # config of one's own still reach the task's setup, which refuses it in one line.
    from cnnlab.data.shapes import write_shapes

    write_shapes(tmp_path / "data", task=task, n=4, size=32, seed=0)
    with pytest.raises(CnnlabError, match="mixup"):
        train(tmp_path / "data", tmp_path / "r2", task=task, mixup=0.2, device="cpu")
    assert not (tmp_path / "r2").exists()


def test_a_mixed_run_trains_records_its_recipe_and_shows_mixed_labels(
    digits_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = ["train", str(digits_dir), "--out", str(out), "--model", "convnet", "--cdims", "8,16"]
    args += ["--hdims", "32", "--img-size", "16", "--epochs", "1", "--no-flip", "--quiet"]
    args += ["--mixup", "0.2", "--cutmix", "1.0", "--augment", "randaugment"]
    assert cli.main(args) == 0
    assert "top-1" in capsys.readouterr().out
    saved = checkpoint.read_model_json(out)  # the run is whole
    assert saved.task == "classify"
    config = (out / "config.yaml").read_text()
    assert "mixup: 0.2" in config and "cutmix: 1.0" in config and "augment: randaugment" in config
    assert (out / "batch.png").stat().st_size > 0


def test_mixed_batch_pictures_name_both_classes():
    task = ClassifyTask(["cat", "dog", "fox"], 1, 8, GRAY_MEAN, GRAY_STD)
    images = torch.zeros(2, 1, 8, 8)
    soft = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]])
    captions = [caption for _, caption in task.batch_pictures(images, soft)]
    assert captions == ["dog 0.75 + cat 0.25", "cat 1.00"]


def test_bad_recipe_values_are_one_line_errors():
    for changes, message in (
        ({"mixup": -1.0}, "mixup must be 0"),
        ({"cutmix": float("nan")}, "cutmix must be 0"),
        ({"ema": 1.0}, "ema must be a decay"),
        ({"ema": 0.0}, "ema must be a decay"),
    ):
        with pytest.raises(CnnlabError, match=message):
            tiny_config(Path("d"), Path("o"), **changes)


# ---------------------------------------------------------------------------- EMA


def test_ema_warms_up_as_timm_and_copies_counters():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    ema = ema_model(model, 0.9)
    weights = []
    for value in (1.0, 3.0, 5.0, 7.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked += 1
        ema.update_parameters(model)
        weights.append(value)
    expected = weights[0]  # the first update copies
    for t, value in enumerate(weights[1:], start=1):
        rate = min(0.9, (1 + t) / (10 + t))
        expected = rate * expected + (1 - rate) * value
    assert ema.module[0].weight[0, 0].item() == pytest.approx(expected)
    assert ema.module[1].num_batches_tracked.item() == 4
    # last.pt keeps torch's AveragedModel layout: runs saved before resume with it.
    from torch.optim.swa_utils import AveragedModel

    assert ema.state_dict().keys() == AveragedModel(model, use_buffers=True).state_dict().keys()


def test_ema_run_saves_the_average_and_resumes_to_the_same_metrics(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(few_digits, tmp_path / "straight", ema=0.9, epochs=3, batch_size=16)
    report = train(cfg)
    last = checkpoint.load_state(tmp_path / "straight" / "last.pt")
    best = load_file(tmp_path / "straight" / "best.safetensors")
    if report["best_epoch"] == 3:  # best.safetensors is the average, not the raw weights
        averaged = {k.removeprefix("module."): v for k, v in last["ema"].items()}
        assert all(torch.equal(best[k], averaged[k]) for k in best)
        assert any(not torch.equal(best[k], last["model"][k]) for k in best)

    real_loss = ClassifyTask.loss
    steps = []

    def ctrl_c_in_epoch_2(self, outputs, targets):
        steps.append(1)
        if len(steps) > 8:  # one epoch is 6 steps of 16 digits
            raise KeyboardInterrupt
        return real_loss(self, outputs, targets)

    monkeypatch.setattr(ClassifyTask, "loss", ctrl_c_in_epoch_2)
    with pytest.raises(TrainingInterrupted):
        train(replace(cfg, out=str(tmp_path / "stopped")))
    monkeypatch.undo()
    resume(tmp_path / "stopped")
    stopped = read_metrics(tmp_path / "stopped", timed=False)
    assert stopped == read_metrics(tmp_path / "straight", timed=False)


# ---------------------------------------------------------------------------- TTA


class Linear(nn.Module):
    """A classifier whose answer depends on where the image is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, 2)
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], 1) * 8


def test_tta_averages_the_probabilities_of_the_views():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 10, 10)
    model = Linear()
    got = TTA(model, mirror=True, zoom=0.8)(x).exp()
    part = F.interpolate(x[..., 1:9, 1:9], size=(10, 10), mode="bilinear")
    views = [x, x.flip(-1), part]
    expected = torch.stack([model(v).softmax(1) for v in views]).mean(0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(3))
    only_mirror = TTA(model, mirror=True, zoom=None)(x).exp()
    assert torch.allclose(only_mirror, (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2)


def test_eval_and_predict_tta_through_the_cli(
    serve_runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    run = serve_runs["classify"]  # trained with augment light and flips
    assert cli.main(["eval", str(run), "--format", "json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(run), "--tta", "--format", "json"]) == 0
    averaged = json.loads(capsys.readouterr().out)
    assert averaged["n"] == plain["n"] and averaged["loss"] != plain["loss"]
    model = load_run(run, tta=True).model
    assert isinstance(model, TTA) and model.mirror and model.zoom == 0.9

    image = sorted(serve_runs["classify_data"].rglob("*.png"))[0]
    assert cli.main(["predict", str(run), str(image), "--tta", "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert sum(entry["prob"] for entry in top) <= 1.0001

    with pytest.raises(SystemExit) as refused:
        cli.main(["segment", "eval", str(serve_runs["segment"]), "--tta"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --tta" in capsys.readouterr().err


def test_tta_is_refused_for_other_tasks_and_for_a_run_with_no_views(
    serve_runs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(CnnlabError, match="not for segment runs"):
        load_run(serve_runs["segment"], tta=True)
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(serve_runs["classify"], copy)
    config = (copy / "config.yaml").read_text()
    config = config.replace("flip: true", "flip: false").replace("augment: light", "augment: none")
    (copy / "config.yaml").write_text(config)
    with pytest.raises(CnnlabError, match="trained without flips or crops"):
        load_run(copy, tta=True)
