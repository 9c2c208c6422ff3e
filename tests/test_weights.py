"""Weight files into zoo models (cnnlab.weights): torchvision's cache layout, .pth and
.safetensors files, a new head for other classes, a first conv adapted to grayscale, and the
errors a user meets."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision import models as tvm

from cnnlab import CnnlabError, create_model
from cnnlab.weights import torchvision_weight_files


@pytest.fixture(scope="module")
def torchvision_resnet18() -> nn.Module:
    # Random weights standing in for the real file; one training-mode pass moves the BN
    # statistics off 0/1, so buffers that failed to load would change the logits.
    torch.manual_seed(0)
    model = tvm.resnet18()
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


@pytest.fixture
def state(torchvision_resnet18: nn.Module) -> dict[str, Tensor]:
    return torchvision_resnet18.state_dict()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def pth_file(tmp_path: Path, state: dict[str, Tensor]) -> Path:
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_torchvision_weights_come_from_the_torch_hub_cache(
    hub: Path, state: dict[str, Tensor], torchvision_resnet18: nn.Module, torchvision_file
) -> None:
    assert torchvision_weight_files("resnet18")[0] == "resnet18-f37072fd.pth"
    path = torchvision_file(state, hub, "resnet18")
    model = create_model("resnet18", weights="torchvision")
    report = model.pretrained_report
    assert report.source == path
    assert sorted(report.loaded) == sorted(state)
    assert report.adapted == report.skipped == []
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(model, x), _logits(torchvision_resnet18, x), rtol=0, atol=0)


def test_missing_torchvision_weights_name_the_expected_path(hub: Path) -> None:
    with pytest.raises(CnnlabError) as error:
        create_model("resnet50", weights="torchvision")
    expected = hub / torchvision_weight_files("resnet50")[0]
    assert f"expected {expected} " in str(error.value)
    assert "nothing is downloaded" in str(error.value)
    assert f"download https://download.pytorch.org/models/{expected.name} " in str(error.value)


def test_a_file_under_torchvisions_name_must_carry_its_hash(
    hub: Path, state: dict[str, Tensor], tmp_path: Path
) -> None:
    # resnet18-f37072fd.pth: torchvision's file has a SHA-256 starting f37072fd; this one not.
    hub.mkdir(parents=True)
    fake = hub / "resnet18-f37072fd.pth"
    torch.save(state, fake)
    for weights in ("torchvision", str(fake)):
        with pytest.raises(CnnlabError, match=r"SHA-256 starts [0-9a-f]{8}, not f37072fd"):
            create_model("resnet18", weights=weights)
    # Under a name of the user's own, the same tensors load: no hash is claimed.
    renamed = tmp_path / "my-resnet18.pth"
    fake.rename(renamed)
    assert create_model("resnet18", weights=str(renamed)).pretrained_report.loaded


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weight_file_by_path(
    tmp_path: Path, suffix: str, state: dict[str, Tensor], torchvision_resnet18: nn.Module
) -> None:
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = create_model("resnet18", weights=str(path))
    assert model.pretrained_report.source == path
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(model, x), _logits(torchvision_resnet18, x), rtol=0, atol=0)


def test_other_classes_keep_everything_but_a_new_head(
    pth_file: Path,
    state: dict[str, Tensor],
    torchvision_resnet18: nn.Module,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnlab.weights"):
        model = create_model("resnet18", num_classes=10, weights=pth_file)
    report = model.pretrained_report
    assert report.skipped == ["fc.weight", "fc.bias"]
    assert sorted(report.loaded) == sorted(k for k in state if not k.startswith("fc."))
    assert "resnet18.pth" in caplog.text
    assert "fc.weight, fc.bias" in caplog.text
    assert model.fc.weight.shape == (10, 512)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.eval().forward_features(x)
        expected = nn.Sequential(*list(torchvision_resnet18.children())[:-2])(x)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_grayscale_first_conv_sums_the_rgb_filters(
    pth_file: Path, torchvision_resnet18: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    from cnnlab.data.transforms import default_stats, stats_line

    with caplog.at_level(logging.INFO, logger="cnnlab.weights"):
        model = create_model("resnet18", in_channels=1, weights=pth_file)
    # Said, not silent: the adaptation, and the normalisation a gray fine-tune uses.
    assert "conv1.weight: the file's 3-channel filters summed to 1 channel" in caplog.text
    assert default_stats(1, pretrained=True) == ((0.449,), (0.226,))
    assert default_stats(1) == ((0.5,), (0.5,))
    assert "ImageNet's averaged over its 3 channels" in stats_line(1, pretrained=True)
    assert model.pretrained_report.adapted == ["conv1.weight"]
    assert model.pretrained_report.skipped == []
    # A gray image through the summed filters is the RGB model on that image in all three
    # channels (up to the order of the float additions).
    gray = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(
        _logits(model, gray),
        _logits(torchvision_resnet18, gray.expand(-1, 3, -1, -1)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_bad_files_raise_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CnnlabError, match=re.escape(f"{missing}: weight file not found")):
        create_model("resnet18", weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CnnlabError, match=re.escape("garbage.pth: not a readable weight file")):
        create_model("resnet18", weights=garbage)
    other = tmp_path / "convnet.safetensors"
    save_file(create_model("convnet", xdim=(1, 28, 28), ydim=10).state_dict(), str(other))
    with pytest.raises(
        CnnlabError, match=re.escape("convnet.safetensors: no tensor matches resnet18")
    ):
        create_model("resnet18", weights=other)


def test_old_densenet_key_names_load_like_torchvision_renames_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = tvm.densenet121(num_classes=10).eval()
    # torchvision's published file spells "denselayer1.norm1.weight" as "denselayer1.norm.1.weight"
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
        for key, value in reference.state_dict().items()
    }
    assert any(".norm.1." in key for key in old_style)
    path = tmp_path / "densenet121-old.pth"
    torch.save(old_style, path)
    model = create_model("densenet121", num_classes=10, weights=path)
    assert model.pretrained_report.skipped == []
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), rtol=0, atol=1e-5)


def test_googlenet_torchvision_weights_switch_on_input_transform(
    hub: Path, torchvision_file
) -> None:
    source = tvm.googlenet(aux_logits=False, init_weights=False)
    torchvision_file(source.state_dict(), hub, "googlenet")
    model = create_model("googlenet", weights="torchvision")
    assert model.transform_input is True
    grey = create_model("googlenet", in_channels=1, weights="torchvision")
    assert grey.transform_input is False
