"""The model zoo: every registered model runs at its smallest input; the classic ones against
torchvision (same parameters, state_dict, logits and init), the declared input sizes and
feature maps, and the notes' ConvNet against its hand formula."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.feature_extraction import create_feature_extractor

from cnnlab import CnnlabError, InputSizeError, create_model, list_models, model_info
from cnnlab.models.detection import DetectLimits
from cnnlab.registry import check_input_size

Extractor = Callable[[nn.Module, list[str], Tensor], dict[str, Tensor]]
CLASSIC = [name for name in list_models() if model_info(name).torchvision]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    # Every float tensor from a tiled random pool (fast even for VGG's 100M-weight layer), with
    # BN statistics away from 0/1 so that an eval-mode BN is no identity and a wrong eps or
    # branch order would show in the logits. Weights ~ 1/sqrt(fan_in) keep logits O(1).
    pool = torch.randn(65_537, generator=torch.Generator().manual_seed(seed))  # prime length
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if key.endswith("running_var"):
                values = 0.5 + pool.abs()
            elif tensor.dim() > 1:
                values = pool * tensor[0].numel() ** -0.5
            elif key.endswith("weight"):
                values = 0.5 + 0.1 * pool
            else:
                values = 0.1 * pool
            flat, size = tensor.view(-1), pool.numel()
            rows = tensor.numel() // size
            flat[: rows * size].view(rows, size).copy_(values.expand(rows, size))
            flat[rows * size :].copy_(values[: tensor.numel() - rows * size])
    return model


def _ours(name: str, **kwargs: object) -> nn.Module:
    # Built on the meta device, then filled: skips the random init of 100M+ parameters.
    with torch.device("meta"):
        defaults = {} if "ydim" in kwargs else {"num_classes": 10}
        model = create_model(name, **{**defaults, **kwargs})
    return _randomize(model.to_empty(device="cpu")).eval()


def _torchvision(name: str, **kwargs: object) -> nn.Module:
    if name == "googlenet":  # torchvision's defaults differ from ours (and warn)
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    return tvm.get_model(model_info(name).torchvision, **{"num_classes": 10, **kwargs})


def _assert_same_tensors(ours: nn.Module, theirs: nn.Module) -> None:
    expected = theirs.state_dict()
    actual = ours.state_dict()
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_at_its_smallest_input(name: str) -> None:
    """Nothing is left out: each task's promise at the model's smallest side (its fixed
    size, if it has one) and the channels its registry entry declares: class scores, a
    score map the input's size, or (in eval mode) one detection dict per image."""
    info, classes, batch = model_info(name), 3, 2
    model = _ours(name, num_classes=classes)
    assert model.model_name == name
    height, width = getattr(model, "fixed_input_size", None) or (model.min_input_size,) * 2
    x = torch.randn(batch, info.input_size[0], height, width)
    with torch.no_grad():
        if info.task == "detect":
            # Every candidate kept; the R-CNN family before Faster R-CNN is given proposals.
            proposals = None
            if model.proposal_settings is not None:
                boxes = [[0.0, 0.0, width / 2, height / 2], [0.0, 0.0, width, height]]
                proposals = [torch.tensor(boxes)] * batch
            out = model.detect(x, DetectLimits(score_threshold=0.0), proposals)
        else:
            out = model(x)
    if info.task == "classify":
        assert isinstance(out, Tensor) and out.shape == (batch, classes)
    elif info.task == "segment":
        assert isinstance(out, Tensor) and out.shape == (batch, classes, height, width)
    else:
        assert isinstance(out, list) and len(out) == batch
        for found in out:
            boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
            assert boxes.dtype.is_floating_point and boxes.shape == (len(scores), 4)
            assert not labels.dtype.is_floating_point and labels.shape == scores.shape
            assert ((labels >= 0) & (labels < classes)).all()
            assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
    if isinstance(out, Tensor):
        assert torch.isfinite(out).all()


def test_zoo_has_every_classic_model() -> None:
    assert sorted(CLASSIC) == sorted(
        ["alexnet", "googlenet"]
        + [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
        + [f"resnet{d}" for d in (18, 34, 50, 101, 152)]
        + [f"densenet{d}" for d in (121, 161, 169, 201)]
    )
    assert all(model_info(name).torchvision == name for name in CLASSIC)


@pytest.mark.parametrize("name", CLASSIC)
def test_matches_torchvision(name: str) -> None:
    with torch.device("meta"):
        ours = create_model(name, num_classes=10)
        theirs = _torchvision(name)
    assert _count(ours) == _count(theirs)
    _randomize(theirs.to_empty(device="cpu")).eval()
    ours.to_empty(device="cpu").load_state_dict(theirs.state_dict())  # strict
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet50", 25_557_032),
        ("vgg16", 138_357_544),
        ("densenet121", 7_978_856),
        ("googlenet", 6_624_904),
    ],
)
def test_parameter_counts_at_1000_classes(name: str, params: int) -> None:
    with torch.device("meta"):
        assert _count(create_model(name)) == params


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("alexnet", {}),
        ("vgg11_bn", {}),
        ("googlenet", {}),
        ("resnet18", {"zero_init_residual": True}),
        ("resnet50", {}),
        ("densenet121", {}),
    ],
)
def test_same_init_as_torchvision(name: str, kwargs: dict[str, object]) -> None:
    # Same seed, same modules in the same order, same init calls: the very same tensors.
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10, **kwargs)
    torch.manual_seed(0)
    theirs = _torchvision(name, **kwargs)
    _assert_same_tensors(ours, theirs)


def test_zero_init_residual_zeroes_the_last_bn_of_each_block() -> None:
    model = create_model("resnet18", num_classes=10, zero_init_residual=True)
    blocks = [block for stage in (model.layer1, model.layer2, model.layer4) for block in stage]
    assert all(torch.count_nonzero(block.bn2.weight) == 0 for block in blocks)
    assert all(torch.count_nonzero(block.bn1.weight) == block.bn1.num_features for block in blocks)


def test_googlenet_aux_logits_and_transform_input_match_torchvision() -> None:
    kwargs = {"aux_logits": True, "transform_input": True}
    torch.manual_seed(0)
    ours = create_model("googlenet", num_classes=10, **kwargs)
    torch.manual_seed(0)
    theirs = _torchvision("googlenet", **kwargs)
    _assert_same_tensors(ours, theirs)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)  # the same dropout masks
    outputs = ours.train()(x)
    torch.manual_seed(1)
    expected = theirs.train()(x)
    assert outputs._fields == ("logits", "aux_logits2", "aux_logits1")
    for output, wanted in zip(outputs, expected, strict=True):
        assert output.shape == (2, 10)
        torch.testing.assert_close(output, wanted, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=1e-5)


def test_googlenet_transform_input_needs_rgb() -> None:
    with pytest.raises(CnnlabError, match="in_channels=1"):
        create_model("googlenet", in_channels=1, transform_input=True)


@pytest.mark.parametrize("name", CLASSIC)
def test_in_channels(name: str) -> None:
    model = _ours(name, in_channels=1)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("name", CLASSIC)
def test_min_input_size_is_the_true_minimum(name: str) -> None:
    model = _ours(name)
    size = model_info(name).min_size
    assert model.min_input_size == size
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)
        with pytest.raises(RuntimeError):  # one pixel less and the layers fail
            model(torch.randn(1, 3, size - 1, size - 1))
    check_input_size(model, size, size)
    with pytest.raises(InputSizeError, match=f"at least {size}x{size}, got"):
        check_input_size(model, size - 1, size - 1)


def _extract_with_torchvision(model: nn.Module, nodes: list[str], x: Tensor) -> dict[str, Tensor]:
    return create_feature_extractor(model, return_nodes=nodes)(x)


def _extract_with_hooks(model: nn.Module, nodes: list[str], x: Tensor) -> dict[str, Tensor]:
    features: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(node).register_forward_hook(
            lambda module, args, output, node=node: features.setdefault(node, output)
        )
        for node in nodes
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return features


def _check_features(model: nn.Module, x: Tensor, extract: Extractor) -> None:
    # Each feature_info entry names a module whose output has the declared channels and
    # H/reduction x W/reduction; the last is forward_features, and the head completes it.
    height, width = x.shape[-2:]
    nodes = [info["module"] for info in model.feature_info]
    with torch.no_grad():
        features = extract(model, nodes, x)
        for info in model.feature_info:
            r = info["reduction"]
            assert features[info["module"]].shape == (1, info["num_chs"], height // r, width // r)
        last = model.forward_features(x)
        torch.testing.assert_close(features[nodes[-1]], last, rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.forward_head(last), rtol=0, atol=0)


@pytest.mark.parametrize("name", CLASSIC)
def test_feature_info(name: str) -> None:
    # AlexNet's unpadded pools fall short of H/reduction except at H = 32k - 1.
    size = 63 if name == "alexnet" else 64
    _check_features(_ours(name), torch.randn(1, 3, size, size), _extract_with_torchvision)


def test_convnet_feature_info_on_non_square_input() -> None:
    model = _ours("convnet", xdim=(2, 24, 40), cdims=(4, 8, 16), hdims=(12,), ydim=5)
    assert [info["module"] for info in model.feature_info] == [
        "features.maxpool2d_03",
        "features.maxpool2d_08",
        "features.maxpool2d_13",
    ]
    # torchvision's create_feature_extractor cannot reach these: it strips a trailing "_<int>"
    # from every node name (taking it for torch.fx's de-duplication suffix) and renumbers,
    # so "features.maxpool2d_08" becomes "features.maxpool2d_1". Forward hooks on the named
    # modules, which is what cnnlab's own consumers use, see the true names.
    _check_features(model, torch.randn(1, 2, 24, 40), _extract_with_hooks)


def test_convnet_notes_example() -> None:
    model = create_model(
        "convnet", xdim=(1, 28, 28), ksize=3, cdims=(32, 64), hdims=(1024, 128), ydim=10
    ).eval()
    stage = ["conv2d", "batchnorm2d", "relu", "maxpool2d", "dropout2d"]
    assert list(dict(model.features.named_children())) == [
        f"{kind}_{i:02d}" for i, kind in enumerate(stage * 2)
    ]
    dense = ["flatten", "linear", "relu", "dropout", "linear", "relu", "dropout", "linear"]
    assert list(dict(model.classifier.named_children())) == [
        f"{kind}_{i:02d}" for i, kind in enumerate(dense, start=10)
    ]
    assert model.classifier.linear_11.in_features == 64 * 7 * 7
    assert model.features.conv2d_00.padding == (1, 1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.fixed_input_size == (28, 28)
    assert model.min_input_size == 28
    with pytest.raises(InputSizeError, match="built for 28x28 inputs, got 32x32"):
        check_input_size(model, 32, 32)
    with pytest.raises(InputSizeError, match="built for 28x28 inputs, got 27x27"):
        check_input_size(model, 27, 27)


def test_convnet_init_follows_the_notes() -> None:
    model = create_model("convnet", xdim=(1, 28, 28), ydim=10, dropout=0.4)
    layers = list(model.modules())
    for layer in layers:
        if isinstance(layer, nn.Conv2d | nn.Linear):
            assert torch.count_nonzero(layer.bias) == 0
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))
            assert torch.count_nonzero(layer.bias) == 0
        if isinstance(layer, nn.Dropout | nn.Dropout2d):
            assert layer.p == 0.4
    # kaiming_normal_: std sqrt(2 / fan_in), here for 3136 -> 1024 and 32 -> 64 (3x3)
    linear, conv = model.classifier.linear_11.weight, model.features.conv2d_05.weight
    assert linear.std().item() == pytest.approx((2 / 3136) ** 0.5, rel=0.02)
    assert conv.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)


@st.composite
def _convnet_configs(draw: st.DrawFn) -> dict[str, object]:
    cdims = draw(st.lists(st.integers(1, 12), max_size=3))
    smallest = 2 ** len(cdims)
    return {
        "num_classes": draw(st.integers(1, 12)),
        "in_channels": draw(st.integers(1, 4)),
        "img_size": (draw(st.integers(smallest, 33)), draw(st.integers(smallest, 33))),
        "ksize": draw(st.sampled_from([1, 3, 5])),
        "cdims": draw(st.sampled_from([tuple, list]))(cdims),
        "hdims": draw(st.lists(st.integers(1, 24), max_size=2)),
    }


@settings(max_examples=40, deadline=None)
@given(config=_convnet_configs())
def test_convnet_parameter_count_matches_the_hand_formula(config: dict[str, object]) -> None:
    model = create_model("convnet", **config)
    k, (height, width) = config["ksize"], config["img_size"]
    expected, channels = 0, config["in_channels"]
    for cdim in config["cdims"]:
        expected += k * k * channels * cdim + cdim  # conv weight and bias
        expected += 2 * cdim  # BN gamma and beta
        channels = cdim
    n = len(config["cdims"])
    features = channels * (height // 2**n) * (width // 2**n)
    for width_out in [*config["hdims"], config["num_classes"]]:
        expected += features * width_out + width_out
        features = width_out
    assert _count(model) == expected
    with torch.no_grad():
        x = torch.randn(2, config["in_channels"], height, width)
        assert model.eval()(x).shape == (2, config["num_classes"])


def test_convnet_xdim_and_ydim_stand_in_for_channels_size_and_classes() -> None:
    default = create_model("convnet")
    assert default.features.conv2d_00.in_channels == 1
    assert default.classifier[-1].out_features == 10
    assert default.fixed_input_size == (28, 28)
    model = create_model("convnet", xdim=(1, 20, 24), ydim=7, cdims=(4,), hdims=())
    assert model.features.conv2d_00.in_channels == 1
    assert model.classifier.linear_06.out_features == 7
    assert model.fixed_input_size == (20, 24)
    same = create_model("convnet", in_channels=1, img_size=(20, 24), xdim=(1, 20, 24))
    assert same.fixed_input_size == (20, 24)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xdim": (1, 28, 28), "img_size": 32}, "img_size=32 conflicts with xdim"),
        ({"xdim": (1, 28, 28), "in_channels": 2}, "in_channels=2 conflicts with xdim"),
        ({"ydim": 10, "num_classes": 5}, "num_classes=5 conflicts with ydim"),
        ({"xdim": (28, 28)}, "xdim must be 3 positive ints"),
        ({"cdims": "32"}, "cdims must be positive ints"),
        ({"cdims": (32, 0)}, "cdims must be positive ints"),
        ({"hdims": (1.5,)}, "hdims must be positive ints"),
        ({"ksize": 4}, "ksize must be a positive odd int"),
        ({"img_size": 4, "cdims": (8, 8, 8)}, "too small for 3 max-pools"),
    ],
)
def test_convnet_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CnnlabError, match=message):
        create_model("convnet", **kwargs)
