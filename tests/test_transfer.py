"""Fine-tuning from a local torchvision weight file: the head is replaced, a frozen backbone
(BatchNorm statistics included) stays exactly the file's, a slower backbone gets lr x mult,
the run records which file it started from, and a resume never re-reads that file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cnnlab import checkpoint, create_model, files
from cnnlab.cli import main
from cnnlab.config import TrainConfig
from cnnlab.engine.optim import make_optimizer
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.tasks.classify import ClassifyTask
from cnnlab.training import resume, train
from cnnlab.transfer import backbone_norms_eval, freeze_backbone, head_parameter_names
from cnnlab.weights import load_pretrained, read_state_dict, torchvision_weight_files
from tests.conftest import save_torchvision_file, tiny_config

SIZE = 32
CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes told apart by their dominant colour, 12 noisy 32x32 images each."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for channel, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(12):
            image = rng.integers(0, 120, (SIZE, SIZE, 3))
            image[..., channel] += 120
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """torchvision's ResNet-18 with random weights (and BN statistics that are not the
    fresh identity), saved under a private TORCH_HOME with torchvision's file name."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    with pytest.MonkeyPatch.context() as patch:
        path = save_torchvision_file(model.state_dict(), folder, "resnet18", patch)
        patch.setenv("TORCH_HOME", str(torch_home))
        yield path


# What this file's runs change in the shared tiny configuration: a ResNet-18 started from
# the stand-in torchvision file.
SETTINGS = {
    "model": "resnet18",
    "model_args": {},
    "weights": "torchvision",
    "img_size": SIZE,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_epochs": 0,
    "flip": True,
    "val_split": 0.25,
    "test_split": 0.25,
}


def _config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_config(data_dir, out, **{**SETTINGS, **overrides})


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _best(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "best.safetensors"))


def test_frozen_backbone_stays_the_files_and_only_the_head_trains(
    data_dir: Path, weight_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            *("train", str(data_dir), "--out", str(out), "--model", "resnet18"),
            *("--weights", "torchvision", "--freeze-backbone", "--img-size", str(SIZE)),
            *("--epochs", "2", "--batch-size", "8", "--val-split", "0.25", "--test-split", "0.25"),
            *("--quiet", "--format", "json"),
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["n"] == 9

    config = files.read_yaml(out / "config.yaml")
    assert config["weights"] == "torchvision" and config["freeze_backbone"] is True
    assert Path(config["weights_file"]).name == weight_file.name
    assert config["weights_sha256"] == hashlib.sha256(weight_file.read_bytes()).hexdigest()

    source, best = read_state_dict(weight_file), _best(out)
    assert best["fc.weight"].shape == (3, 512)  # the head, replaced for the data's classes
    backbone = _backbone(best)
    assert backbone.keys() == _backbone(source).keys()
    for key, tensor in backbone.items():  # running_mean/var too: BN stayed in eval mode
        assert torch.equal(tensor, source[key]), key

    # The optimizer only ever held the head: its state has two tensors' moments.
    optimizer = checkpoint.load_state(out / "last.pt")["optimizer"]
    params = [i for group in optimizer["param_groups"] for i in group["params"]]
    assert len(params) == 2 and len(optimizer["state"]) == 2


def test_slower_backbone_learns_at_lr_times_mult(
    data_dir: Path, weight_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(data_dir, out, epochs=1, backbone_lr_mult=0.1, optimizer="sgd"))
    groups = checkpoint.load_state(out / "last.pt")["optimizer"]["param_groups"]
    # head (decayed weights, then biases), backbone (the same); each at its own base lr
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert [len(g["params"]) for g in groups[:2]] == [1, 1]  # fc.weight, fc.bias
    source, best = read_state_dict(weight_file), _best(out)
    assert not torch.equal(best["conv1.weight"], source["conv1.weight"])
    assert not torch.equal(best["bn1.running_mean"], source["bn1.running_mean"])


def test_resume_keeps_the_trained_weights_and_never_rereads_the_file(
    data_dir: Path, weight_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_evaluate = ClassifyTask.evaluate
    calls = []

    def evaluate_then_stop(self, *args, **kwargs):
        calls.append(1)
        result = real_evaluate(self, *args, **kwargs)
        if len(calls) == 1:  # Ctrl-C as epoch 1's validation ends
            monkeypatch.setattr(ClassifyTask, "loss", _interrupt)
        return result

    monkeypatch.setattr(ClassifyTask, "evaluate", evaluate_then_stop)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_config(data_dir, out, freeze_backbone=True))
    assert checkpoint.load_state(out / "last.pt")["epoch"] == 1
    monkeypatch.undo()

    # Gone: a resume that tried to load it again would fail.
    moved = weight_file.rename(weight_file.with_suffix(".away"))
    try:
        resume(out)
    finally:
        moved.rename(weight_file)
    assert checkpoint.load_state(out / "last.pt")["epoch"] == 2
    source, best = read_state_dict(weight_file), _best(out)
    for key, tensor in _backbone(best).items():
        assert torch.equal(tensor, source[key]), key


def _interrupt(self, outputs, targets):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("name", "attribute"),
    [
        ("resnet18", "fc"),
        ("googlenet", "fc"),
        ("vgg11", "classifier"),
        ("alexnet", "classifier"),
        ("densenet121", "classifier"),
        ("convnet", "classifier"),
    ],
)
def test_head_is_the_classifier_module(name: str, attribute: str) -> None:
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
    names = {n for n, _ in model.named_parameters() if n.startswith(attribute + ".")}
    assert names and head_parameter_names(model) == names


def test_head_adds_what_the_loader_skipped_and_a_headless_model_is_refused(
    tmp_path: Path,
) -> None:
    class Tiny(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.out = nn.Linear(4, classes)

    file = tmp_path / "tiny.pth"
    torch.save(Tiny(10).state_dict(), file)
    model = Tiny(3)
    model.model_name = "tiny"
    with pytest.raises(CnnlabError, match="tiny: the registry names no classifier head"):
        head_parameter_names(model)
    from cnnlab import model_info

    load_pretrained(model, model_info("resnet18"), file)  # only the shapes matter here
    assert head_parameter_names(model) == {"out.weight", "out.bias"}


def test_frozen_backbone_norms_keep_their_statistics_in_train_mode() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3)
    freeze_backbone(model)
    model.train()
    backbone_norms_eval(model)
    assert not model.bn1.training and not model.layer4[1].bn2.training
    assert model.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)
    assert model.conv1.weight.grad is None and model.fc.weight.grad is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    optimizer = make_optimizer(model, _config(Path("."), Path("."), weights="x"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def test_bad_transfer_settings_are_one_line_errors(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    base = ["train", str(data_dir), "--out", str(tmp_path / "run"), "--img-size", str(SIZE)]
    assert main([*base, "--freeze-backbone"]) == 2
    assert "freeze_backbone needs weights" in capsys.readouterr().err
    assert main([*base, "--weights", "w.pth", "--freeze-backbone", "--backbone-lr-mult", "0.1"])
    assert "exclude each other" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert main([*base, "--weights", "torchvision"]) == 2
    error = capsys.readouterr().err
    assert "no torchvision weights for resnet18" in error
    assert (
        str(tmp_path / "empty" / "hub" / "checkpoints" / torchvision_weight_files("resnet18")[0])
        in error
    )
    assert not (tmp_path / "run").exists()  # nothing written before the weights were found
