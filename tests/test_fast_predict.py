"""The fast inference path of a loaded run: BatchNorm folded into convolutions,
channels_last, and on the CPU the convolutions fused with their ReLUs and residual adds and
packed per input shape (``cnnlab.cpu_fusion``) give the trained model's logits (within 1e-4)
and the same top-1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab import checkpoint, create_model
from cnnlab.cpu_fusion import PackedConv2d, fuse_for_cpu
from cnnlab.runs import fold_batchnorm, load_run

SIZE = 64
CLASSES = ["a", "b", "c", "d", "e"]


def _trained_looking(name: str, **args: object) -> nn.Module:
    """A model whose BatchNorms hold non-trivial statistics and affine parameters, as after
    training (fresh ones are the identity, which would make folding trivially right)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASSES), in_channels=3, **args)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # He init: GoogLeNet's tiny one loses the signal
            nn.init.kaiming_normal_(module.weight)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


def _run_folder(model: nn.Module, name: str, root: Path, **args: object) -> Path:
    root.mkdir()
    checkpoint.save_weights(root / "best.safetensors", model)
    meta = {
        "task": "classify",
        "architecture": name,
        "model_args": {"num_classes": len(CLASSES), "in_channels": 3, **args},
        "classes": CLASSES,
        "input_size": [3, SIZE, SIZE],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    checkpoint.save_model_json(root, checkpoint.ModelMeta(**meta))
    return root


# VGG-BN folds like the ConvNet (Sequential conv, BN, ReLU) but weighs 500 MB on disk.
@pytest.mark.parametrize(
    ("name", "args", "folds"),
    [
        ("resnet18", {}, 20),
        ("googlenet", {}, 57),
        ("densenet121", {}, 59),
        ("convnet", {"img_size": SIZE, "cdims": [8, 16], "hdims": [32]}, 2),
    ],
)
def test_loaded_run_folds_batchnorm_and_keeps_logits(
    name: str, args: dict, folds: int, tmp_path: Path
) -> None:
    model = _trained_looking(name, **args)
    run = load_run(_run_folder(model, name, tmp_path / "run", **args))
    norms_left = sum(isinstance(m, nn.BatchNorm2d) for m in run.model.modules())
    norms_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert norms_before - norms_left == folds
    images = torch.randn(4, 3, SIZE, SIZE)
    assert run.fused is not None and run.predictor is run.fused
    for size_rule in ("model_name", "min_input_size", "fixed_input_size"):  # read by tasks
        assert getattr(run.fused, size_rule, None) == getattr(run.model, size_rule, None)
    with torch.inference_mode():
        expected = model(images)
        got = run.model(images.contiguous(memory_format=torch.channels_last))
        fused = run.predictor(images.contiguous(memory_format=torch.channels_last))
    assert expected.std(dim=0).max() > 0.01  # the logits depend on the image
    for logits in (got, fused):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_predict_gives_the_unfolded_models_answers(tmp_path: Path) -> None:
    model = _trained_looking("resnet18")
    folder = _run_folder(model, "resnet18", tmp_path / "run")
    images = [torch.randint(0, 256, (3, 80, 70), dtype=torch.uint8) for _ in range(6)]
    fast = load_run(folder).predict(images, topk=3)
    plain = load_run(folder, fast=False).predict(images, topk=3)
    for a, b in zip(fast, plain, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        for x, y in zip(a["top"], b["top"], strict=True):
            assert x["prob"] == pytest.approx(y["prob"], abs=1e-5)


def test_fold_batchnorm_maths_on_a_hand_built_pair() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, bias=True)
    norm = nn.BatchNorm2d(4)
    norm.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    norm.weight.data.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    norm.bias.data.copy_(torch.tensor([0.0, 1.0, 3.0, -2.0]))
    model = nn.Sequential(conv, norm, nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert fold_batchnorm(model) == 1
    assert isinstance(model[1], nn.Identity)
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    torch.testing.assert_close(model[0].weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_fold_batchnorm_leaves_a_shared_conv_output_alone() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y  # folding would change the second use of y

    model = TwoUses().eval()
    assert fold_batchnorm(model) == 0
    assert isinstance(model.norm, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(TwoUses())


class _Blocks(nn.Module):
    """Every pattern the fusion knows: conv+ReLU (module and function), conv+add+ReLU whose
    residual is another convolution's output (overwritten in place), conv+add whose
    residual is the model's input (never overwritten), and a conv used twice (not fused
    with what follows)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.relu(self.stem(x))
        y = torch.relu(self.a(stem))
        y = self.relu(self.b(y) + stem)  # residual block
        z = self.c(y) + x  # the input as residual
        twice = self.d(z)
        return twice * torch.relu(twice)


def test_fusion_covers_relu_and_residual_adds_and_keeps_the_answers() -> None:
    torch.manual_seed(2)
    model = _Blocks().eval()
    fused = fuse_for_cpu(model)
    assert fused is not None
    kinds = {
        name: (m.relu, m.add, m.in_place)
        for name, m in fused.named_modules()
        if isinstance(m, PackedConv2d)
    }
    assert sorted(kinds.values()) == [
        (False, False, False),  # d: its output is used twice
        (False, True, False),  # c + x: the input is never overwritten
        (True, False, False),  # stem
        (True, False, False),  # a
        (True, True, True),  # b + stem: stem is read by nothing after
    ]
    for shape in [(1, 4, 9, 9), (3, 4, 9, 9), (1, 4, 12, 10), (2, 4, 9, 9), (1, 4, 8, 8)]:
        x = torch.randn(shape)
        for layout in (torch.contiguous_format, torch.channels_last):
            given = x.contiguous(memory_format=layout)
            with torch.inference_mode():
                expected, got = model(given), fused(given)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert torch.equal(given, x)  # the input is not written to
    # With autograd on (an explanation's backward), the plain ops run, gradients and all.
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    fused(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Each shape packed once, and only the last PACKED_SHAPES (4) shapes kept.
    assert list(fused.get_submodule(next(iter(kinds))).packed) == [
        (3, 4, 9, 9),
        (1, 4, 12, 10),
        (2, 4, 9, 9),
        (1, 4, 8, 8),
    ]
    assert not any(isinstance(m, PackedConv2d) for m in model.modules())


def test_an_untraceable_model_is_not_fused() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace

    assert fuse_for_cpu(Branching().eval()) is None


def test_a_run_given_another_model_predicts_with_that_model(tmp_path: Path) -> None:
    """``dataclasses.replace(run, model=other)`` (how the benchmark and int8 checks evaluate
    an exported model through a run) runs ``other``, not the run's fused torch model."""
    args = {"img_size": SIZE, "cdims": [8], "hdims": [16]}
    run = load_run(
        _run_folder(_trained_looking("convnet", **args), "convnet", tmp_path / "r", **args)
    )
    assert run.fused is not None

    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.eye(len(CLASSES))[[3] * len(x)]

    other = dataclasses.replace(run, model=Constant())
    assert other.fused is None
    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
    assert other.predict(image, topk=1)[0]["top"][0]["class"] == CLASSES[3]
