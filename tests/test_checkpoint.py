"""Run-folder files: atomic writes, safetensors weights, the resume state, model.json."""

from __future__ import annotations

import io
import os
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab import checkpoint, create_model, files
from cnnlab.errors import CnnlabError


def _net(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3),
            bn=nn.BatchNorm2d(4),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, num_classes),
        )
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    files.atomic_write_text(target, "old")
    files.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_failing_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.csv"
    files.atomic_write_text(target, "epoch\n1\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write_text(target, "epoch\n1\n2\n")
    assert target.read_text() == "epoch\n1\n"
    assert _leftovers(tmp_path) == []


def test_interrupted_state_write_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.pt"
    checkpoint.save_state(target, {"epoch": 1})

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_state(target, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load_state(target) == {"epoch": 1}
    assert _leftovers(tmp_path) == []


def test_json_and_yaml_round_trip(tmp_path: Path) -> None:
    data = {"b": [1, 2.5, "x"], "a": None, "nested": {"k": True}}
    files.write_json(tmp_path / "d.json", data)
    files.write_yaml(tmp_path / "d.yaml", data)
    assert files.read_json(tmp_path / "d.json") == data
    assert files.read_yaml(tmp_path / "d.yaml") == data
    # Insertion order is kept, so config.yaml reads in the dataclass's field order.
    assert (tmp_path / "d.yaml").read_text().splitlines()[0] == "b:"


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.json"
    bad.write_text("{not json")
    with pytest.raises(CnnlabError, match=r"model\.json: not valid JSON"):
        files.read_json(bad)


def test_weights_round_trip_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source, target = _net(), _net()
    source.bn.running_mean.normal_()
    checkpoint.save_weights(tmp_path / "w.safetensors", source, metadata={"epoch": "7"})
    checkpoint.load_weights(tmp_path / "w.safetensors", target)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    assert checkpoint.read_weights_metadata(tmp_path / "w.safetensors") == {"epoch": "7"}


def test_channels_last_weights_save(tmp_path: Path) -> None:
    model = _net().to(memory_format=torch.channels_last)
    checkpoint.save_weights(tmp_path / "w.safetensors", model)
    fresh = _net()
    checkpoint.load_weights(tmp_path / "w.safetensors", fresh)
    assert torch.equal(fresh.conv.weight, model.conv.weight)


def test_class_count_mismatch_names_file_and_counts(tmp_path: Path) -> None:
    # The registry says which modules are the classifier, so a mismatch there is a number
    # of classes; any other shape mismatch names the tensor.
    path = tmp_path / "best.safetensors"
    checkpoint.save_weights(path, create_model("convnet", num_classes=10, hdims=[4]))
    with pytest.raises(CnnlabError) as caught:
        checkpoint.load_weights(path, create_model("convnet", num_classes=5, hdims=[4]))
    message = str(caught.value)
    assert str(path) in message
    assert "10 classes" in message and "has 5" in message
    with pytest.raises(CnnlabError, match=r"tensor classifier\.linear_11\.weight has shape"):
        checkpoint.load_weights(path, create_model("convnet", num_classes=10, hdims=[8]))


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(path, nn.Linear(3, 3))
    with pytest.raises(CnnlabError, match=rf"{path}: weights do not fit"):
        checkpoint.load_weights(path, _net())


def test_not_a_weight_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"definitely not safetensors")
    with pytest.raises(CnnlabError, match=rf"{path}: not a readable safetensors"):
        checkpoint.load_weights(path, _net())
    with pytest.raises(CnnlabError, match="not found"):
        checkpoint.load_weights(tmp_path / "missing.safetensors", _net())


def test_state_loads_with_weights_only(tmp_path: Path) -> None:
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 2,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }
    checkpoint.save_state(tmp_path / "last.pt", state)
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert loaded["epoch"] == 2
    assert loaded["rng"]["python"] == random.getstate()
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.conv.weight]["exp_avg"]
    )


class _Sneaky:
    pass


def test_state_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "payload": _Sneaky()}, buffer)
    (tmp_path / "last.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CnnlabError, match=r"last\.pt: not a readable resume state"):
        checkpoint.load_state(tmp_path / "last.pt")


def test_run_dir_is_recognised_by_model_json(tmp_path: Path) -> None:
    assert not checkpoint.is_run_dir(tmp_path)
    with pytest.raises(CnnlabError, match="is not a cnnlab run folder"):
        checkpoint.require_run_dir(tmp_path)
    with pytest.raises(CnnlabError, match="is not a cnnlab run folder"):
        checkpoint.read_model_json(tmp_path)
    meta = checkpoint.ModelMeta(
        "classify", "convnet", {"num_classes": 2}, ["a", "b"], [1, 28, 28], [0.5], [0.5], "0.1.0"
    )
    checkpoint.save_model_json(tmp_path, meta)
    assert checkpoint.is_run_dir(tmp_path)
    assert checkpoint.require_run_dir(str(tmp_path)) == tmp_path
    assert checkpoint.read_model_json(tmp_path) == meta


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"task": "track"}, "unknown task 'track'"),
        ({"architecture": 7}, "architecture must be a model name"),
        ({"model_args": []}, "model_args must be a JSON object"),
        ({"classes": []}, "classes must be a non-empty list"),
        ({"classes": ["a", 2]}, "classes must be a non-empty list"),
        ({"input_size": [2, 28, 28]}, r"input_size must be \[C, H, W\]"),
        ({"input_size": [1, 28]}, r"input_size must be \[C, H, W\]"),
        ({"mean": [0.5, 0.5]}, "mean must be 1 number"),
        ({"std": [0]}, "std must be positive"),
        ({"model_args": {"num_classes": 3}}, "num_classes is 3 but 2 classes"),
    ],
)
def test_model_json_is_validated_field_by_field(
    tmp_path: Path, change: dict, complaint: str
) -> None:
    good = {
        "task": "classify",
        "architecture": "convnet",
        "model_args": {"num_classes": 2},
        "classes": ["a", "b"],
        "input_size": [1, 28, 28],
        "mean": [0.5],
        "std": [0.5],
    }
    files.write_json(tmp_path / "model.json", {**good, **change})
    with pytest.raises(CnnlabError, match=rf"model\.json: {complaint}"):
        checkpoint.read_model_json(tmp_path)
