"""The inspector's books: training-step memory against the measured peak of real steps,
FLOPs against fvcore, the operations it could not count, and their command-line flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from cnnlab import cli, create_model
from cnnlab.inspect import summarize
from cnnlab.inspect.cache import model_table_rows
from cnnlab.inspect.compare import compare
from cnnlab.inspect.measure import BATCHES, CASES, measure_training_steps
from cnnlab.inspect.memory import estimate_memory, max_batch_size, parse_bytes
from cnnlab.inspect.specs import build_model
from tests.conftest import run_cli_here
from tests.inspect.test_inspect import zeroed

# ---------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def measured() -> dict[str, list[int]]:
    """The peaks of real AdamW steps of every case at every batch, in one fresh process."""
    return measure_training_steps(CASES, BATCHES)


@pytest.mark.parametrize(("name", "size"), CASES)
def test_training_step_estimate_within_15_percent_of_the_measured_peak(
    name, size, measured
) -> None:
    """At the small inputs of ``CASES`` (their weights, gradients and AdamW state are those
    of 224x224; the activations fewer), to keep CI fast."""
    with torch.device("meta"):
        model, _ = build_model(name, None, size)
    for batch, peak in zip(BATCHES, measured[name], strict=True):
        estimated = estimate_memory(model, size, batch).training_step
        assert estimated == pytest.approx(peak, rel=0.15), (name, batch, estimated, peak)


def test_the_parts_of_a_training_step_add_up_and_follow_the_optimizer() -> None:
    model = create_model("convnet", cdims=(8, 16), hdims=(32,), num_classes=10, in_channels=1)
    params = sum(p.numel() * 4 for p in model.parameters())
    adamw = estimate_memory(model, (1, 28, 28), 8, "adamw")
    sgd = estimate_memory(model, (1, 28, 28), 8, "sgd")
    assert adamw.gradients == sgd.gradients == params
    assert sgd.optimizer_state == params
    steps = 4 * len(list(model.parameters()))  # AdamW's step count, one float per tensor
    assert adamw.optimizer_state == 2 * params + steps
    assert adamw.weights >= params  # and the batch norms' running statistics
    # Every part is alive at some moment; the peak never exceeds all of them together.
    assert (
        adamw.step_peak
        <= sum((adamw.weights, adamw.gradients, adamw.optimizer_state, adamw.activations))
        + 2 * adamw.largest_transient
        + 8 * 28 * 28 * 4
    )
    assert adamw.step_peak >= adamw.weights + adamw.optimizer_state + adamw.activations
    # Activations: conv1 keeps its input (8x1x28x28 float32), max pool its int64 indices.
    assert adamw.activation_by_dtype["int64"] > 0
    assert estimate_memory(model, (1, 28, 28), 16).activations == pytest.approx(
        2 * adamw.activations, rel=0.01
    )  # less a few per-channel statistics
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model is untouched


def test_max_memory_finds_the_largest_batch_that_fits() -> None:
    with torch.device("meta"):
        model, size = build_model("resnet18", None, (3, 64, 64))

    def estimate_at(batch: int):
        return estimate_memory(model, size, batch)

    limit = parse_bytes("400MB")
    batch, found = max_batch_size(estimate_at, limit)
    assert found.training_step <= limit < estimate_at(batch + 1).training_step
    assert 16 < batch < 1000
    assert max_batch_size(estimate_at, parse_bytes("100MB")) == (0, None)  # weights alone
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29


def test_summary_train_and_max_memory_in_json_and_table(capsys) -> None:
    args = ["summary", "resnet18", "--input", "3,64,64", "--batch", "8", "--train"]
    assert cli.main([*args, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    step = document["training_step"]
    assert document["batch"] == step["batch_size"] == 8
    assert step["optimizer"] == "adamw" and step["training_step"] > step["weights"] > 46e6
    assert document["activation_bytes"] == sum(document["activation_by_dtype"].values())
    rows = sum(layer["activation_bytes"] for layer in document["layers"])
    assert rows == pytest.approx(document["activation_bytes"], rel=0.01)  # the loss's rest
    assert cli.main([*args, "--max-memory", "1GB"]) == 0
    text = capsys.readouterr().out
    assert "Training step:" in text and "Saved MB" in text and "Legend: memory" in text
    assert "Max batch in 1GB:" in text and "FLOPs:" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-memory", "8XB"), "--max-memory '8XB': expected a size"),
        (("--batch", "0"), "argument --batch: invalid positive value: '0'"),
    ],
)
def test_bad_memory_flags_are_one_line_and_status_2(args, message, capsys) -> None:
    result = run_cli_here(capsys, "summary", "convnet", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", ["convnet", "alexnet", "vgg11", "resnet18", "densenet121"])
def test_multiply_add_flops_are_twice_fvcores_macs(name) -> None:
    size = (1, 28, 28) if name == "convnet" else (3, 64, 64)
    if name == "alexnet":
        size = (3, 224, 224)
    model = zeroed(lambda: create_model(name, in_channels=size[0])).eval()
    counts = FlopCountAnalysis(model, torch.zeros(1, *size))
    counts.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = counts.by_operator()
    ours = summarize(model, size)
    assert ours.flops_by_kind["multiply_add"] == 2 * (by_op["conv"] + by_op["linear"])
    assert ours.total_flops == sum(ours.flops_by_kind.values())
    assert ours.not_counted == {}
    # A convolution row: twice its MACs, and one per output element for its bias.
    for row in ours.layers:
        if row.type == "Conv2d":
            bias = math.prod(row.output_shape) if row.formula.count("+") else 0
            assert row.flops == 2 * row.macs + bias, row.name


def test_models_and_compare_show_flops_and_training_memory(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: columns give way, whole
    (row,) = model_table_rows("resnet18")
    assert row["flops"] == pytest.approx(2 * row["macs"], rel=0.01)
    rows = compare(["convnet", "resnet18"], batch=4)
    assert all(r["flops"] > 2 * r["macs"] * 0.99 and r["batch"] == 4 for r in rows)
    assert rows[1]["training_step_bytes"] > 4 * 46e6  # weights, gradients, two moments
    command = ["compare", "convnet", "resnet18", "--input", "3,64,64", "--batch", "2"]
    assert cli.main(command) == 0
    narrow = capsys.readouterr().out
    assert "hidden at 80 columns: " in narrow and "FLOPs" in narrow.split("hidden at")[1]
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert cli.main([*command, "--wide"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "┃ model" in line)
    assert "train MB @2" in header and "FLOPs" in header and "MACs x" in header


# ---------------------------------------------------------------------------- coverage

USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class RoundThrough(torch.autograd.Function):
    """Rounds in the forward pass, passes the gradient through (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        x = torch.einsum("bchw,cd->bdhw", x, self.mix)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = RoundThrough.apply(x)
        return self.fc(x.mean(dim=(2, 3)))
'''


def test_operations_not_counted_are_listed_and_strict_fails(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine.py").write_text(USER_MODEL)
    spec = f"{tmp_path / 'mine.py'}:Net"
    assert cli.main(["summary", spec, "--input", "3,16,16", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    # The einsum runs as a bmm and is counted: 2 x 16*16 positions x 8x8 weights.
    conv = 2 * 8 * 16 * 16 * 27 + 8 * 16 * 16
    einsum, fc = 2 * 16 * 16 * 8 * 8, 2 * 8 * 4 + 4
    assert document["flops_by_kind"]["multiply_add"] + document["flops_by_kind"]["bias"] == (
        conv + einsum + fc
    )
    # The bilinear resampling and the custom Function's rounding are not: listed, with
    # how many times they ran.
    assert document["not_counted"] == {"aten.round": 1, "aten.upsample_bilinear2d": 1}
    assert cli.main(["summary", spec, "--input", "3,16,16"]) == 0
    table = capsys.readouterr().out
    assert "Not counted:          aten.round (1x), aten.upsample_bilinear2d (1x)" in table
    strict = run_cli_here(capsys, "summary", spec, "--input", "3,16,16", "--strict")
    assert strict.returncode == 2 and strict.stdout == ""
    assert strict.stderr.strip().splitlines() == [
        f"error: {spec}: FLOPs not counted for aten.round (1x), aten.upsample_bilinear2d (1x)"
        " (--strict)"
    ]
    assert cli.main(["summary", "resnet18", "--input", "3,32,32", "--strict"]) == 0
