import pytest
import torch
from torch import nn

import cnnlab.models.fcn  # noqa: F401  (registers the FCNs; the zoo imports it later)
from cnnlab import create_model
from cnnlab.dense_to_conv import FullyConvolutional, convolutionalize
from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.registry import check_input_size

CLASSES = 5

# (model, builder kwargs, training input (C, H, W), larger input (H, W), the head's kernel on
# the feature map: the window the first Linear flattened, 1 for global-pooling heads)
FAMILIES = [
    ("convnet", {"in_channels": 1, "hdims": (32,)}, (1, 28, 28), (44, 52), 7),
    ("alexnet", {}, (3, 224, 224), (256, 288), 6),
    ("vgg11", {}, (3, 224, 224), (256, 288), 7),
    ("resnet18", {}, (3, 32, 32), (64, 96), 1),
    ("densenet121", {}, (3, 32, 32), (64, 96), 1),
    ("googlenet", {}, (3, 32, 32), (64, 96), 1),
]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "kwargs", "train", "large", "kernel"), FAMILIES)
@torch.no_grad()
def test_same_logits_same_parameters_and_a_score_map(name, kwargs, train, large, kernel):
    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES, **kwargs).eval()
    copy = convolutionalize(model)
    assert isinstance(copy, FullyConvolutional)
    assert _params(copy) == _params(model)

    x = torch.randn(1, *train)
    logits = model(x)  # (1, K)
    scores = copy(x)  # (1, K, h, w)
    assert logits.std() > 1e-3  # a real comparison, not two zero tensors
    if kernel > 1:  # flatten heads: the window covers the whole map at the training size
        assert scores.shape == (1, CLASSES, 1, 1)
    torch.testing.assert_close(scores.mean((-2, -1)), logits, atol=1e-5, rtol=0)

    big = torch.randn(1, train[0], *large)
    features = model.forward_features(big).shape[-2:]
    expected = (features[0] - kernel + 1, features[1] - kernel + 1)
    assert copy(big).shape == (1, CLASSES, *expected)
    assert expected[0] > 1 and expected[1] > 1


@torch.no_grad()
def test_convnet_copy_drops_the_fixed_size_but_keeps_a_minimum():
    model = create_model("convnet", num_classes=3, in_channels=1, hdims=(16,)).eval()
    copy = convolutionalize(model)
    with pytest.raises(InputSizeError):
        check_input_size(model, 40, 40)  # the original still takes 28x28 only
    assert copy(torch.zeros(1, 1, 40, 40)).shape == (1, 3, 4, 4)
    assert copy.min_input_size == 28  # two 2x2 pools, then a 7x7 window
    with pytest.raises(InputSizeError, match="at least 28x28"):
        copy(torch.zeros(1, 1, 27, 40))


def test_original_is_left_unchanged():
    model = create_model("resnet18", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convolutionalize(model)
    assert isinstance(model.fc, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
        create_model("fcn32s", num_classes=3, backbone="resnet18"),
    ],
    ids=["plain-sequential", "fcn32s"],
)
def test_unsupported_models_get_a_clear_error(model):
    with pytest.raises(CnnlabError, match=r"cannot convolutionalize .*only registered classifiers"):
        convolutionalize(model)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run folder holding a tiny convnet trained on the 16x16 digits (a few seconds)."""
    from cnnlab import checkpoint
    from cnnlab.data.digits import digit_images

    torch.manual_seed(0)
    images, labels = digit_images(16)  # uint8 (N, 1, 16, 16), (N,)
    x = (images.float() / 255 - 0.5) / 0.5
    args = {"num_classes": 10, "in_channels": 1, "img_size": 16, "cdims": [16, 32], "hdims": [64]}
    model = create_model("convnet", **args)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == labels).float().mean() > 0.9
    run = tmp_path_factory.mktemp("heat") / "run"
    run.mkdir()
    checkpoint.save_weights(run / "best.safetensors", model)
    meta = {
        "task": "classify",
        "architecture": "convnet",
        "model_args": args,
        "classes": [str(d) for d in range(10)],
        "input_size": [1, 16, 16],
        "mean": [0.5],
        "std": [0.5],
    }
    checkpoint.save_model_json(run, checkpoint.ModelMeta(**meta))
    return run, images, labels


def test_heat_map_peaks_where_the_digit_is(digits_run, tmp_path):
    from PIL import Image

    from cnnlab.heatmap import heatmap

    run, images, labels = digits_run
    three = images[labels == 3][0, 0]  # (16, 16) light strokes on black
    canvas = torch.zeros(48, 48, dtype=torch.uint8)
    top, left = 28, 8
    canvas[top : top + 16, left : left + 16] = three
    Image.fromarray(canvas.numpy()).save(tmp_path / "canvas.png")

    result = heatmap(run, tmp_path / "canvas.png", class_name="3", out=tmp_path / "heat.png")
    # two 2x2 pools: windows of 16 pixels every 4 pixels, (48 - 16) / 4 + 1 = 9 per side
    assert result["shape"] == [9, 9]
    assert len(result["map"]) == 9 and all(len(row) == 9 for row in result["map"])
    assert result["class"] == "3"
    assert result["peak"] == [top // 4, left // 4]
    assert result["peak_box"] == [left, top, left + 16, top + 16]
    assert result["prob"] > 0.5
    assert (tmp_path / "heat.png").stat().st_size > 0
    # The text says (x, y) throughout: the cell's column first, as the pixel's x.
    from cnnlab.cli.explain_commands import heatmap_line

    line = heatmap_line(result, None)
    assert f"cell (x {left // 4}, y {top // 4})" in line
    assert f"the window x {left} to {left + 16}, y {top} to {top + 16}" in line

    # without a class: the one whose map peaks highest
    best = heatmap(run, tmp_path / "canvas.png")
    peaks = {
        name: heatmap(run, tmp_path / "canvas.png", class_name=name)["prob"]
        for name in "0123456789"
    }
    assert best["class"] == max(peaks, key=peaks.get)
    with pytest.raises(CnnlabError, match="unknown class"):
        heatmap(run, tmp_path / "canvas.png", class_name="cat")


def test_the_peak_is_given_in_the_image_s_own_pixels_when_the_map_was_made_smaller(digits_run):
    from cnnlab.heatmap import class_maps
    from cnnlab.runs import load_run

    run, images, labels = digits_run
    three = images[labels == 3][0, 0]
    canvas = torch.zeros(96, 96, dtype=torch.uint8)
    top, left = 56, 16  # the digit drawn twice as large
    canvas[top : top + 32, left : left + 32] = three.repeat_interleave(2, 0).repeat_interleave(2, 1)
    maps = class_maps(load_run(run), canvas[None], max_pixels=48 * 48)
    assert tuple(maps.pixels.shape[-2:]) == (48, 48)  # mapped at half size
    result = maps.result(maps.index("3"))
    assert result["peak"] == [top // 2 // 4, left // 2 // 4]
    assert result["peak_box"] == [left, top, left + 32, top + 32]
    assert result["peak_xy"] == [left + 16, top + 16]


def test_the_package_name_stays_the_function_after_its_module_is_imported():
    import importlib

    import cnnlab

    importlib.import_module("cnnlab.dense_to_conv")
    assert callable(cnnlab.convolutionalize)
    assert cnnlab.convolutionalize.__module__ == "cnnlab.dense_to_conv"


def test_class_maps_of_a_loaded_run_match_the_command_and_respect_max_pixels(digits_run, tmp_path):
    from PIL import Image

    from cnnlab.data.images import read_image
    from cnnlab.heatmap import class_maps, fully_convolutional, heatmap
    from cnnlab.runs import load_run

    run, images, _ = digits_run
    canvas = torch.zeros(40, 96, dtype=torch.uint8)
    canvas[12:28, 8:24] = images[0, 0]
    Image.fromarray(canvas.numpy()).save(tmp_path / "wide.png")
    loaded = load_run(run, "cpu")
    maps = class_maps(loaded, read_image(tmp_path / "wide.png", 1))
    assert maps.probs.shape == (10, 7, 21)  # (40 - 16) / 4 + 1, (96 - 16) / 4 + 1
    assert torch.allclose(maps.probs.sum(0), torch.ones(7, 21), atol=1e-5)
    for name in ("3", None):
        assert maps.result(maps.index(name)) == heatmap(run, tmp_path / "wide.png", name)

    # 40x96 = 3840 pixels shrunk to 960 (aspect kept): 20x48; one model made and reused
    model = fully_convolutional(loaded)
    small = class_maps(loaded, read_image(tmp_path / "wide.png", 1), model, max_pixels=960)
    assert tuple(small.pixels.shape) == (1, 20, 48)
    assert small.probs.shape == (10, 2, 9)
    # the shorter side is then enlarged to the training size: 8x12 -> 16x24
    tiny = class_maps(loaded, torch.zeros(1, 8, 12, dtype=torch.uint8), model, max_pixels=960)
    assert tuple(tiny.pixels.shape) == (1, 16, 24)
    # unless that takes a strip over the bound: 4x400 would be 16x1600
    with pytest.raises(CnnlabError, match="too elongated"):
        class_maps(loaded, torch.zeros(1, 4, 400, dtype=torch.uint8), model, max_pixels=960)
