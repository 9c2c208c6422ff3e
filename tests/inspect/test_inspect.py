"""The inspector against torchinfo and fvcore, and against receptive fields worked by hand."""

import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchinfo
import torchvision
from fvcore.nn import FlopCountAnalysis
from rich.console import Console
from torch import nn

from cnnlab import create_model, list_models
from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.inspect import model_table_rows, render_summary, summarize
from cnnlab.inspect.compare import compare
from cnnlab.inspect.specs import build_model

TORCHVISION = {
    "alexnet": (torchvision.models.alexnet, (3, 224, 224)),
    "vgg11": (torchvision.models.vgg11, (3, 64, 64)),
    "vgg16": (torchvision.models.vgg16, (3, 64, 64)),
    "resnet18": (torchvision.models.resnet18, (3, 64, 64)),
    "resnet50": (torchvision.models.resnet50, (3, 64, 64)),
    "googlenet": (
        functools.partial(torchvision.models.googlenet, aux_logits=False, init_weights=False),
        (3, 64, 64),
    ),
    "densenet121": (torchvision.models.densenet121, (3, 64, 64)),
}


@functools.cache
def tv_model(name: str) -> nn.Module:
    return zeroed(TORCHVISION[name][0])


def zeroed(build) -> nn.Module:
    """A model with zero weights: counting needs shapes, not values, and skipping the
    random initialisation of 100M+ parameters keeps the tests fast."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()  # uninitialised memory may hold denormals, which are slow
    return model


def rows_by_name(summary):
    return {row.name: row for row in summary.layers}


@pytest.mark.parametrize("name", sorted(set(TORCHVISION) - {"vgg16"}))
def test_params_exact_and_macs_within_one_percent_of_torchinfo(name):
    model, size = tv_model(name), TORCHVISION[name][1]
    ours = summarize(model, size)
    theirs = torchinfo.summary(model, input_size=(1, *size), verbose=0)
    assert ours.total_params == theirs.total_params
    assert ours.trainable_params == theirs.trainable_params
    assert ours.total_macs == pytest.approx(theirs.total_mult_adds, rel=0.01)
    assert sum(row.macs for row in ours.layers) == ours.total_macs


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_conv_and_linear_macs_equal_fvcore(name):
    model, size = tv_model(name).eval(), TORCHVISION[name][1]
    counts = FlopCountAnalysis(model, torch.zeros(1, *size))
    counts.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = counts.by_operator()
    ours = summarize(model, size)
    conv_linear = sum(row.macs for row in ours.layers if row.type in ("Conv2d", "Linear"))
    assert conv_linear == by_op["conv"] + by_op["linear"]


def test_alexnet_and_vgg16_feature_receptive_fields():
    alexnet = summarize(tv_model("alexnet"), (3, 224, 224), depth=1)
    features = rows_by_name(alexnet)["features"]
    assert (features.rf, features.jump) == (195, 32)
    assert features.output_shape == [256, 6, 6]
    assert alexnet.receptive_field == 195  # the adaptive pool to 6x6 is the identity here

    vgg16 = summarize(tv_model("vgg16"), (3, 64, 64))
    pool5 = rows_by_name(vgg16)["features.30"]
    assert (pool5.type, pool5.rf, pool5.jump) == ("MaxPool2d", 212, 32)


def test_hand_computed_receptive_fields_and_shapes():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # r 1+2*1=3, j 1
        nn.MaxPool2d(2),  # r 3+1*1=4, j 2
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # k_eff 5: r 4+4*2=12, j 2
        nn.Conv2d(4, 8, 3, stride=2, padding=1),  # r 12+2*2=16, j 4
        nn.AvgPool2d(3, stride=1, padding=1),  # r 16+2*4=24, j 4
        nn.AdaptiveAvgPool2d(1),  # 4x4 -> 1: r 24+3*4=36, j 16
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    summary = summarize(net, (1, 16, 16))
    fields = [(row.rf, row.jump) for row in summary.layers]
    expected = [(3, 1), (4, 2), (12, 2), (16, 4), (24, 4), (36, 16), (None, None), (None, None)]
    assert fields == expected
    shapes = [row.output_shape for row in summary.layers]
    assert shapes == [[4, 16, 16], [4, 8, 8], [4, 8, 8], [8, 4, 4], [8, 4, 4], [8, 1, 1], [8], [2]]
    # The model's field is that of the last map of more than one position; the global
    # pool's 36 px overhangs the 16 px input (every output sees all of it).
    assert (summary.receptive_field, summary.output_stride) == (24, 4)
    assert summary.features is not None and summary.features.mixed_after
    assert "every output sees the whole input" in " ".join(str(summary).split())


class TwoBranch(nn.Module):
    """Branch a sees 3x3, branch b 7x7 (two 1-stride convs, then a stride-2 pool that is
    undone by upsampling); they meet in an add and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)  # r 3, j 1
        self.b1 = nn.Conv2d(2, 2, 5, padding=2)  # r 5, j 1
        self.b2 = nn.MaxPool2d(2)  # r 6, j 2
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        a = self.a(x)
        b = F.interpolate(self.b2(self.b1(x)), scale_factor=2.0)  # r 6, j 2/2 = 1
        merged = torch.cat([a + b, a], dim=1)  # widest branch wins: r 6, j 1
        return self.head(merged)  # r 6 + 2*1 = 8


def test_branches_take_the_widest_receptive_field():
    rows = rows_by_name(summarize(TwoBranch(), (2, 8, 8)))
    assert (rows["a"].rf, rows["b2"].rf, rows["b2"].jump) == (3, 6, 2)
    assert (rows["head"].rf, rows["head"].jump) == (8, 1)


def test_squeeze_excitation_makes_the_field_global():
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)  # r 3, j 1
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            scale = y.mean((2, 3), keepdim=True).sigmoid()  # (B, 4, 1, 1) sees all: r 3+7
            return self.out(y * scale)  # r 10, and the jump of y, not of the broadcast gate

    rows = rows_by_name(summarize(SE(), (1, 8, 8)))
    assert (rows["conv"].rf, rows["out"].rf, rows["out"].jump) == (3, 10, 1)


def test_formulas_written_out():
    net = nn.Sequential(
        nn.Conv2d(128, 64, 3, bias=False),
        nn.Conv2d(128, 64, 3),
        nn.BatchNorm2d(64),
        nn.Conv2d(128, 64, 3, groups=32, bias=False),
        nn.Linear(4096, 1000),
    )
    formulas = [_formula_of(layer, size) for layer, size in zip(net, SIZES, strict=True)]
    assert formulas == [
        "3*3*128*64 = 73,728",
        "3*3*128*64 + 64 = 73,792",
        "2*64 = 128",
        "3*3*(128/32)*64 = 2,304",
        "4096*1000 + 1000 = 4,097,000",
    ]


SIZES = [(128, 8, 8), (128, 8, 8), (64, 8, 8), (128, 8, 8), (4096,)]


def _formula_of(layer, size):
    (row,) = summarize(layer, size).layers
    assert row.params == sum(p.numel() for p in layer.parameters())
    return row.formula


def test_batchnorm_running_stats_are_buffers_not_params():
    summary = summarize(nn.BatchNorm2d(64), (64, 4, 4))
    assert summary.total_params == 128
    # weight, bias, running mean and var (float32) plus num_batches_tracked (int64)
    assert summary.weight_mb == pytest.approx((4 * 64 * 4 + 8) / 1e6)


def test_depth_collapses_containers_into_summed_rows():
    model = tv_model("resnet18")
    full = summarize(model, (3, 64, 64))
    collapsed = summarize(model, (3, 64, 64), depth=1)
    names = [row.name for row in collapsed.layers]
    assert names == [
        *("conv1", "bn1", "relu", "maxpool"),
        *("layer1", "layer2", "layer3", "layer4"),
        *("avgpool", "fc"),
    ]
    layer2 = rows_by_name(collapsed)["layer2"]
    assert layer2.params == sum(p.numel() for p in model.layer2.parameters())
    inside = [row for row in full.layers if row.name.startswith("layer2.")]
    assert layer2.macs == sum(row.macs for row in inside)
    assert (layer2.rf, layer2.jump) == (inside[-1].rf, inside[-1].jump)
    assert layer2.output_shape == [128, 8, 8]
    assert sum(row.params for row in collapsed.layers) == collapsed.total_params
    assert collapsed.total_macs == full.total_macs

    (whole,) = summarize(model, (3, 64, 64), depth=0).layers
    assert (whole.params, whole.macs, whole.output_shape) == (
        full.total_params,
        full.total_macs,
        [1000],
    )


def test_to_dict_schema_is_exact_and_json_serialisable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    document = json.loads(json.dumps(summarize(model, (3, 9, 9)).to_dict("tiny")))
    assert set(document) == {
        "model",
        "input",
        "layers",
        "total_params",
        "trainable_params",
        "dense_params",
        "total_macs",
        "receptive_field",
        "receptive_field_min",
        "depth",
        "output_stride",
        "receptive_field_at",
        "whole_input_after",
        "weight_mb",
        "total_flops",
        "flops_by_kind",
        "not_counted",
    }
    assert (document["model"], document["input"]) == ("tiny", [3, 9, 9])
    assert document["layers"][0] == {
        "name": "0",
        "type": "Conv2d",
        "output_shape": [8, 4, 4],
        "size_formula": "(9 - 3 + 2*0)/2 + 1 = 4",
        "params": 3 * 3 * 3 * 8 + 8,
        "formula": "3*3*3*8 + 8 = 224",
        "macs": 8 * 4 * 4 * 3 * 3 * 3,
        "rf": 3,
        "rf_min": 3,
        "jump": 2,
        "flops": 2 * 8 * 4 * 4 * 3 * 3 * 3 + 8 * 4 * 4,  # 2 per multiply-add, 1 per bias
        "activation_bytes": None,  # only with a batch (``with_memory``)
    }
    assert (document["depth"], document["output_stride"]) == (2, 2)
    assert document["layers"][2]["rf"] is None
    assert document["total_macs"] == 8 * 4 * 4 * 27 + 128 * 4
    assert document["receptive_field"] == 3
    assert (document["receptive_field_at"], document["whole_input_after"]) == ("0", True)


def test_training_mode_and_running_stats_are_restored():
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()
    before = {name: m.training for name, m in model.named_modules()}
    mean = model.bn1.running_mean.clone()
    summarize(model, (3, 32, 32), batch_size=2)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model.bn1.running_mean, mean)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_transposed_conv_output_size_macs_and_fractional_jump():
    # (n-1)*s - 2p + d*(k-1) + output_padding + 1 = 4*2 - 2 + 2*2 + 1 + 1 = 12
    layer = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2)
    (row,) = summarize(layer, (8, 5, 5)).layers
    assert row.output_shape == [6, 12, 12]
    assert row.macs == 5 * 5 * 8 * (6 // 2) * 3 * 3  # each input element meets cout/groups*k*k
    assert row.formula == "3*3*8*(6/2) + 6 = 222"
    # j = 1/2, r = 1 + d*(k-1)*j = 1 + 2*2*0.5
    assert (row.rf, row.jump) == (3, 0.5)
    table = _render(summarize(nn.ConvTranspose2d(1, 1, 4, stride=4), (1, 2, 2)))
    assert "0.25" in table


def test_upsampling_path_restores_the_jump():
    # An FCN-like encoder-decoder: down by 4, up by 4 with a transposed conv. Each output of
    # a kernel-4, stride-4 transposed conv copies one input position, so the field stays 4.
    net = nn.Sequential(nn.Conv2d(1, 4, 4, stride=4), nn.ConvTranspose2d(4, 1, 4, stride=4))
    summary = summarize(net, (1, 16, 16))
    assert [(row.rf, row.rf_min, row.jump) for row in summary.layers] == [(4, 4, 4), (4, 4, 1)]
    assert summary.layers[1].macs == 4 * 4 * 4 * 1 * 4 * 4


def test_shared_module_gives_a_row_per_call_and_counts_params_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    summary = summarize(Twice(), (4, 8, 8))
    assert [(row.name, row.rf) for row in summary.layers] == [("conv", 3), ("conv", 5)]
    assert summary.total_params == 4 * 4 * 9 + 4
    assert summary.total_macs == 2 * (4 * 8 * 8 * 4 * 9)


def test_functional_layers_and_frozen_params_in_any_module():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.kernel = nn.Parameter(torch.zeros(8, 4, 3, 3))
            self.stem.requires_grad_(False)

        def forward(self, x):
            return F.conv2d(self.stem(x), self.kernel, stride=2)

    summary = summarize(Functional(), (3, 11, 11))
    own = summary.layers[-1]
    assert (own.name, own.params, own.formula) == ("Functional", 288, "8*4*3*3 = 288")
    assert own.macs == 8 * 4 * 4 * 4 * 9 and (own.rf, own.jump) == (5, 2)
    assert summary.total_params == 288 + 112
    assert summary.trainable_params == 288


def test_meta_device_gives_the_same_counts_as_cpu():
    cpu = summarize(tv_model("resnet18"), (3, 64, 64))
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    meta = summarize(model, (3, 64, 64), device="meta")
    assert (meta.total_params, meta.total_macs) == (cpu.total_params, cpu.total_macs)
    assert meta.receptive_field == cpu.receptive_field


def test_forward_failure_is_one_line_cnnlab_error():
    named = r"^ResNet failed on input 4,32,32 in conv1 \(Conv2d\), whose input is 4x32x32: "
    with pytest.raises(CnnlabError, match=named + ".*channels") as info:
        summarize(tv_model("resnet18"), (4, 32, 32))
    assert "\n" not in str(info.value)


def test_input_size_error_is_not_swallowed():
    def too_small(module, args):
        raise InputSizeError("tiny needs inputs of at least 32x32, got 8x8")

    model = nn.Conv2d(3, 3, 3)
    model.register_forward_pre_hook(too_small)
    with pytest.raises(InputSizeError, match="at least 32x32"):
        summarize(model, (3, 8, 8))
    assert len(model._forward_pre_hooks) == 1  # ours are gone, the model's own stays


def test_render_summary_lists_layers_and_totals():
    text = _render(summarize(tv_model("alexnet"), (3, 224, 224)), title="alexnet")
    assert "alexnet" in text
    assert "11*11*3*64 + 64 = 23,296" in text
    assert "61,100,840" in text  # total parameters
    assert "Receptive field:      195 px" in text
    macs = summarize(tv_model("alexnet"), (3, 224, 224)).total_macs
    assert f"{macs:,} ({macs / 1e9:.2f} G)" in text
    assert text.count("Conv2d") == 5 and text.count("Linear") == 3


def _render(summary, title="t"):
    console = Console(record=True, width=250)
    console.print(render_summary(summary, title))
    return console.export_text()


def test_batch_size_scales_macs_not_params():
    one = summarize(tv_model("resnet18"), (3, 32, 32))
    four = summarize(tv_model("resnet18"), (3, 32, 32), batch_size=4)
    assert four.total_macs == 4 * one.total_macs
    assert four.total_params == one.total_params
    assert four.layers[0].output_shape == one.layers[0].output_shape == [64, 16, 16]


def test_adaptive_pool_window_when_sizes_do_not_divide():
    # 5 -> 3: windows [0,2) [1,4) [3,5): the widest has 3 inputs, the stride is 5/3.
    (row,) = summarize(nn.AdaptiveMaxPool2d(3), (1, 5, 5)).layers
    assert row.rf == 3
    assert math.isclose(row.jump, 5 / 3)


def test_module_list_items_count_as_their_parents_children_for_depth():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()) for _ in range(3)
            )

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Stack()
    collapsed = summarize(model, (2, 8, 8), depth=1)
    assert [(row.name, row.type, row.rf) for row in collapsed.layers] == [
        ("blocks.0", "Sequential", 3),
        ("blocks.1", "Sequential", 5),
        ("blocks.2", "Sequential", 7),
    ]
    names = [row.name for row in summarize(model, (2, 8, 8)).layers]
    assert names == [f"blocks.{i}.{j}" for i in range(3) for j in range(2)]


def test_zoo_model_matches_torchinfo():
    model = zeroed(functools.partial(create_model, "resnet50"))
    ours = summarize(model, (3, 64, 64))
    theirs = torchinfo.summary(model, input_size=(1, 3, 64, 64), verbose=0)
    assert ours.total_params == theirs.total_params == 25_557_032
    assert ours.total_macs == pytest.approx(theirs.total_mult_adds, rel=0.01)


def test_zoo_input_below_minimum_raises_input_size_error():
    with torch.device("meta"):
        model = create_model("alexnet")
    with pytest.raises(InputSizeError, match="alexnet needs inputs of at least"):
        summarize(model, (3, 16, 16), device="meta")


def test_model_table_has_every_registered_model_with_true_counts():
    rows = {row["name"]: row for row in model_table_rows()}
    assert sorted(rows) == list_models()
    for row in rows.values():
        assert row["params"] > 0 and row["macs"] > 0 and row["min_size"] >= 1
        assert row["task"] in ("classify", "segment", "detect")
    resnet50 = summarize(tv_model("resnet50"), (3, 224, 224))  # real tensors on the CPU
    assert (rows["resnet50"]["params"], rows["resnet50"]["macs"]) == (
        resnet50.total_params,
        resnet50.total_macs,
    )
    assert rows["resnet50"]["input_size"] == [3, 224, 224]


# ---------------------------------------------------------------------------- exact fields


def oracle_sizes(model: nn.Module, input_size: tuple[int, int, int]) -> set[int]:
    """Receptive field heights, by backpropagation, of the output positions whose field
    lies inside the input (positive weights, no nonlinearity: no gradient cancels)."""
    model = model.double().eval()
    for parameter in model.parameters():
        with torch.no_grad():
            parameter.copy_(parameter.abs() + 0.1)
    x = torch.ones(1, *input_size, dtype=torch.float64, requires_grad=True)
    out = model(x)
    height = input_size[1]
    column = next(  # a column near the middle that sees the input (a dilated up-conv has gaps)
        c
        for c in range(out.shape[3] // 2, out.shape[3])
        if torch.autograd.grad(out[0, 0, :, c].sum(), x, retain_graph=True)[0].any()
    )
    sizes = set()
    for row in range(out.shape[2]):
        x.grad = None
        out[0, 0, row, column].backward(retain_graph=True)
        seen = x.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
        if len(seen) and seen.min() > 0 and seen.max() < height - 1:  # not cut by a border
            sizes.add(int(seen.max() - seen.min() + 1))
    return sizes


class FCNLike(nn.Module):
    """Down by 8, up by 2 twice with learned transposed convs, a skip from stride 4, then
    a bilinear upsampling: fields that depend on the output position."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.down3 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)
        self.skip = nn.Conv2d(2, 2, 1)
        self.up2 = nn.ConvTranspose2d(2, 1, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        a = self.down2(self.down1(x))  # stride 4
        b = self.up1(self.down3(a)) + self.skip(a)  # stride 4 again
        return F.interpolate(self.up2(b), scale_factor=2, mode="bilinear")


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (
            nn.Sequential(
                nn.Conv2d(1, 1, 7, stride=4, padding=3),
                nn.ConvTranspose2d(1, 1, 4, stride=2, padding=1),
            ),
            64,
        ),
        (nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.ConvTranspose2d(1, 1, 3, stride=2)), 33),
        (
            nn.Sequential(
                nn.Conv2d(1, 1, 5, stride=3), nn.ConvTranspose2d(1, 1, 2, stride=3, dilation=2)
            ),
            61,
        ),
        (nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Upsample(scale_factor=3)), 32),
        (FCNLike(), 64),
    ],
    ids=["issue-example", "k3s2", "dilated-k<s", "nearest-x3", "fcn-like"],
)
def test_fields_through_upsampling_equal_a_gradient_oracle(model: nn.Module, size: int) -> None:
    summary = summarize(model, (1, size, size))
    sizes = oracle_sizes(model, (1, size, size))
    assert (summary.receptive_field_min, summary.receptive_field) == (min(sizes), max(sizes))


def test_the_issue_cases_transposed_conv_and_fcn8s():
    net = nn.Sequential(
        nn.Conv2d(1, 1, 7, stride=4, padding=3), nn.ConvTranspose2d(1, 1, 4, stride=2, padding=1)
    )
    assert summarize(net, (1, 64, 64)).receptive_field == 11  # the old rule said 13
    with torch.device("meta"):
        fcn = create_model("fcn8s", num_classes=4, backbone="resnet18")
    summary = summarize(fcn, (3, 224, 224), device="meta")
    assert (summary.receptive_field_min, summary.receptive_field) == (467, 499)


# ---------------------------------------------------------------------------- size formulas


def test_every_row_says_why_it_has_its_size():
    rows = rows_by_name(summarize(tv_model("alexnet"), (3, 224, 224)))
    assert rows["features.0"].size_formula == "floor((224 - 11 + 2*2)/4) + 1 = 55"
    assert rows["features.2"].size_formula == "(55 - 3 + 2*0)/2 + 1 = 27"
    assert rows["features.3"].size_formula == "27 - 5 + 2*2 + 1 = 27"
    assert rows["features.1"].size_formula == "unchanged"
    assert rows["avgpool"].size_formula == "adaptive 6x6 -> 6x6"
    assert rows["classifier.1"].size_formula == "9,216 -> 4,096"
    ceil = summarize(nn.MaxPool2d(3, stride=2, ceil_mode=True), (1, 28, 28)).layers[0]
    assert ceil.size_formula == "ceil((28 - 3 + 2*0)/2) + 1 = 14"
    dilated = summarize(nn.Conv2d(1, 1, 3, stride=2, dilation=2), (1, 17, 11)).layers[0]
    assert (
        dilated.size_formula
        == "H: (17 - 2*(3 - 1) - 1 + 2*0)/2 + 1 = 7; W: (11 - 2*(3 - 1) - 1 + 2*0)/2 + 1 = 4"
    )
    up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, dilation=2)
    assert (
        summarize(up, (8, 5, 5)).layers[0].size_formula
        == "(5 - 1)*2 - 2*1 + 2*(3 - 1) + 1 + 1 = 12"
    )
    flat = summarize(nn.Flatten(), (3, 4, 5)).layers[0]
    assert flat.size_formula == "3*4*5 = 60"


def test_branch_rows_give_the_merge_rule_and_dense_blocks_have_rows():
    googlenet = rows_by_name(summarize(tv_model("googlenet"), (3, 64, 64), depth=1))
    assert googlenet["inception3a"].size_formula == "concat 64 + 128 + 32 + 32 = 256 channels"
    resnet = rows_by_name(summarize(tv_model("resnet18"), (3, 64, 64), depth=2))
    assert resnet["layer1.0"].size_formula == "add 64x16x16 + 64x16x16 -> 64x16x16"
    dense = summarize(create_model("densenet121"), (3, 64, 64), depth=2)
    assert len(dense.layers) == 14  # as torchinfo: the DenseBlocks are rows of their own
    block = rows_by_name(dense)["features.denseblock1"]
    assert block.size_formula == "concat 64 + 6x32 = 256 channels"
    assert sum(row.params for row in dense.layers) == dense.total_params


def test_layers_that_do_not_run_in_eval_still_add_up():
    summary = summarize(create_model("googlenet", aux_logits=True), (3, 64, 64))
    rows = rows_by_name(summary)
    assert rows["aux1"].size_formula == "not run in eval mode"
    assert sum(row.params for row in summary.layers) == summary.total_params == 13_004_888


def test_render_fits_80_columns_and_never_cuts_a_number():
    summary = summarize(create_model("resnet50"), (3, 224, 224))
    for width in (80, 100):
        text = _render_at(summary, width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "2,359,296" in text and "floor((224 - 7 + 2*3)/2) + 1 = 112" in text
    assert "…" not in _render_at(summary, 80)
    wide = _render_at(summary, None)
    assert "layer4.2.conv2 (Conv2d)" in wide and "3*3*512*512 = 2,359,296" in wide
    assert str(summary).startswith("\nLayer (type)") or "Layer (type)" in str(summary)
    assert "<table>" in summary._repr_html_() and "2,359,296" in summary._repr_html_()


def _render_at(summary, width):
    console = Console(width=width or 1000, record=True, file=io.StringIO())
    console.print(render_summary(summary, "t", width=width))
    return console.export_text()


# ---------------------------------------------------------------------------- compare


def test_compare_tells_the_ilsvrc_story():
    rows = {
        r["model"]: r for r in compare(["alexnet", "vgg16", "googlenet", "resnet50", "densenet121"])
    }
    assert [rows[m]["depth"] for m in rows] == [8, 16, 22, 50, 121]
    assert rows["alexnet"]["fc_share"] > 0.95 and rows["resnet50"]["fc_share"] < 0.1
    assert rows["googlenet"]["params"] == 6_624_904
    assert rows["vgg16"]["params_vs_first"] == pytest.approx(138_357_544 / 61_100_840)
    assert (rows["alexnet"]["receptive_field"], rows["resnet50"]["receptive_field"]) == (195, 427)
    assert all(rows[m]["output_stride"] == 32 for m in rows)


def test_alexnet_of_the_paper_has_its_documented_parameters_and_lrn_costs():
    summary = summarize(create_model("alexnet_paper"), (3, 227, 227))
    assert summary.total_params == 60_965_224
    rows = rows_by_name(summary)
    assert rows["features.4"].formula == "5*5*(96/2)*256 + 256 = 307,456"  # one GPU's half
    assert rows["features.2"].macs == 96 * 55 * 55 * 5  # LRN: 5 per output
    assert rows["classifier.2"].params == 9216 * 4096 + 4096


def test_models_named_by_file_module_or_torchvision(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, width, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
        "built = Tiny(2)\n"
    )
    model, size = build_model(f"{tmp_path / 'mine.py'}:Tiny", {"width": 8})
    assert (model.conv.out_channels, size) == (8, (3, 224, 224))
    assert build_model(f"{tmp_path / 'mine.py'}:built")[0].conv.out_channels == 2
    assert isinstance(
        build_model("torch.nn:Conv2d", {"in_channels": 1, "out_channels": 2, "kernel_size": 3})[0],
        nn.Conv2d,
    )
    assert sum(p.numel() for p in build_model("torchvision:resnet18")[0].parameters()) == 11_689_512
    (tmp_path / "broken.py").write_text("def f(:\n")
    for spec, message in [
        (f"{tmp_path / 'broken.py'}:f", "broken.py:1: syntax error"),
        (f"{tmp_path / 'mine.py'}:Nope", "has no 'Nope'"),
        (f"{tmp_path / 'missing.py'}:Net", "no such file"),
        ("no.such.module:Net", "cannot import no.such.module"),
        ("torchvision:resnett", "did you mean"),
        ("math:pi", "not a torch nn.Module"),
    ]:
        with pytest.raises(CnnlabError, match=message):
            build_model(spec)


def test_models_table_is_cached_and_a_changed_key_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cnnlab.inspect.cache as cache

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path))
    computed = []
    real = cache.model_table_rows

    def counting(pattern=None):
        computed.append(pattern)
        return real(pattern)

    monkeypatch.setattr(cache, "model_table_rows", counting)
    first = cache.cached_model_table_rows("densenet121")
    assert "counting parameters and MACs of 1 models" in capsys.readouterr().err
    assert [row["name"] for row in first] == ["densenet121"]
    assert first[0]["params"] == 7_978_856
    assert (tmp_path / cache.CACHE_FILE).is_file()
    second = cache.cached_model_table_rows("densenet121")  # read back, not computed
    assert second == first and computed == ["densenet121"]
    assert capsys.readouterr().err == ""
    # Another key (torch's version, a source file, the pattern) computes again.
    monkeypatch.setattr(cache, "torch_version", lambda: "0.0-other")
    assert cache.cached_model_table_rows("densenet121") == first
    assert computed == ["densenet121", "densenet121"]
    assert cache.table_key("vgg1?") != cache.table_key("densenet121")
    assert [r["name"] for r in cache.cached_model_table_rows("vgg1?")] == [
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
    ]
    with pytest.raises(CnnlabError, match="no registered model matches"):
        cache.cached_model_table_rows("nothing-like-this")
