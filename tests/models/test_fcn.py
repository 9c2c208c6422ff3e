import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cnnlab.models.fcn  # noqa: F401  (registers fcn32s/16s/8s until the zoo imports it)
from cnnlab import create_model, list_models, model_info
from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.models.fcn import bilinear_kernel, bilinear_upsampling
from cnnlab.registry import check_input_size

# A five-stage convnet is the cheapest backbone with strides 8, 16 and 32; its floor-rounding
# max-pools make maps smaller than H/stride, ResNet's padded convs make them larger.
TINY = {"backbone": "convnet", "backbone_args": {"img_size": 32, "cdims": [8] * 5, "hdims": []}}


def test_registered_as_segmentation_models():
    assert {"fcn32s", "fcn16s", "fcn8s"} <= set(list_models(task="segment"))
    assert model_info("fcn8s").min_size == 32
    assert "fcn8s" not in list_models(task="classify")


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("backbone", [TINY, {"backbone": "resnet18"}], ids=["convnet", "resnet18"])
@torch.no_grad()
def test_output_is_the_input_size_for_odd_sizes(name, backbone):
    model = create_model(name, num_classes=4, **backbone).eval()
    for height, width in [(97, 131), (32, 32), (65, 40)]:
        assert model(torch.randn(1, 3, height, width)).shape == (1, 4, height, width)


def test_too_small_input_and_missing_stride_are_clear_errors():
    model = create_model("fcn8s", num_classes=2, backbone="resnet18")
    with pytest.raises(InputSizeError, match="at least 32x32"):
        check_input_size(model, 31, 64)
    shallow = {"backbone": "convnet", "backbone_args": {"img_size": 32, "cdims": [8, 8, 8]}}
    with pytest.raises(CnnlabError, match="no stride-32 stage"):
        create_model("fcn8s", num_classes=2, **shallow)


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_transposed_convolution_starts_as_bilinear_interpolation(factor):
    layer = bilinear_upsampling(3, factor)
    x = torch.randn(1, 3, 5, 6)
    with torch.no_grad():
        up = layer(x)
        constant = layer(torch.full((1, 3, 5, 6), 2.5))
    assert up.shape == (1, 3, 5 * factor, 6 * factor)
    inner = (..., slice(factor, -factor), slice(factor, -factor))  # away from the zero border
    torch.testing.assert_close(constant[inner], torch.full_like(constant[inner], 2.5))
    reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[inner], reference[inner], atol=1e-5, rtol=0)


def test_paper_initialisation_of_upsampling_and_skip_scores():
    model = create_model("fcn8s", num_classes=3, backbone="resnet18")
    for layer in (model.up32, model.up16, model.upsample):
        size = layer.kernel_size[0]
        assert torch.equal(layer.weight, bilinear_kernel(3, size))
    for score in (model.score16, model.score8):
        assert not score.weight.any() and not score.bias.any()
    assert model.score32.weight.std() > 0
    assert not model.upsample.weight.requires_grad  # the final upsampling stays bilinear
    assert model.up32.weight.requires_grad


def test_backbone_weights_load_and_the_classifier_head_is_dropped(tmp_path):
    backbone = create_model("resnet18", num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    save_file(backbone.state_dict(), str(path))
    model = create_model("fcn8s", num_classes=3, backbone="resnet18", backbone_weights=str(path))
    state = model.state_dict()
    assert torch.equal(state["backbone.layer3.0.conv1.weight"], backbone.layer3[0].conv1.weight)
    assert not any(key.startswith("backbone.fc") for key in state)
    expected = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("fc"))
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert sum(p.numel() for p in model.parameters()) == expected + head


def test_skips_learn_from_one_step():
    torch.manual_seed(0)
    model = create_model("fcn8s", num_classes=3, **TINY)
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    F.cross_entropy(model(x), target).backward()
    assert model.score8.weight.grad.abs().sum() > 0
    assert model.up16.weight.grad.abs().sum() > 0


def test_inspector_reports_transposed_convolutions():
    from cnnlab.inspect import summarize

    model = create_model("fcn8s", num_classes=3, backbone="resnet18")
    rows = {row.name: row for row in summarize(model, (3, 64, 64)).layers}
    # (name, input H x W, kernel): resnet18 maps a 64x64 input to 2x2 at stride 32, 8x8 at 8
    for name, (h, w), kernel in [
        ("up32", (2, 2), 4),
        ("up16", (4, 4), 4),
        ("upsample", (8, 8), 16),
    ]:
        row = rows[name]
        assert row.type == "ConvTranspose2d"
        stride = kernel // 2
        assert row.output_shape == [3, h * stride, w * stride]
        assert row.macs == h * w * 3 * 3 * kernel * kernel


@torch.no_grad()
def test_a_deep_copy_taps_its_own_backbone():
    import copy

    model = create_model("fcn16s", num_classes=3, **TINY).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(twin(x), model(x))
    twin.backbone.features.conv2d_00.weight.zero_()
    assert not torch.allclose(twin(x), model(x))
