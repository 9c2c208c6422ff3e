"""``cnnlab explain``, its audit, ``cnnlab features`` and the default explain layer, on the
session's tiny runs (``serve_runs``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from cnnlab.attribution import METHODS
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.explain.audit import audit, audit_images
from cnnlab.explain.predictions import explain, explain_files
from cnnlab.explain.sanity_checks import cascade, spearman
from cnnlab.features import feature_maps_file, filters_file
from cnnlab.models.factory import create_model, list_models, model_info
from cnnlab.runs import load_run
from tests.conftest import run_cli


def first_image(data: Path) -> Path:
    return next(p for p in sorted(data.rglob("*.png")) if "mask" not in p.parts)


def test_every_model_names_an_explain_layer_it_has() -> None:
    for name in list_models():
        layer = model_info(name).explain_layer
        assert layer, name
        with torch.device("meta"):  # the names without a weight
            model = create_model(name, num_classes=3)
        model.get_submodule(layer)  # AttributeError if absent


@pytest.mark.parametrize("method", METHODS)
def test_each_method_maps_the_predicted_class_over_the_image(serve_runs, method) -> None:
    run = load_run(serve_runs["classify"], "cpu", fast=False)
    file = first_image(serve_runs["classify_data"])
    image = read_image(file, run.task.in_channels)
    (result,) = explain(run, [image], method)
    document = result.to_dict()
    assert result.map.shape == (run.task.img_size, run.task.img_size)
    assert float(result.map.min()) >= 0.0 and float(result.map.max()) <= 1.0
    assert document["layer"] == "features"  # the registry's, not a guess
    assert document["class"] == run.predict(file)[0]["top"][0]["class"]
    x, y = document["peak_xy"]  # in the image's own pixels (32x32; the model saw 16x16)
    assert 0 <= x <= image.shape[-1] and 0 <= y <= image.shape[-2]
    assert 0.0 < document["top10_share"] <= 1.0


def test_explain_draws_and_names_a_class(serve_runs, tmp_path) -> None:
    file = first_image(serve_runs["classify_data"])
    (document,) = explain_files(serve_runs["classify"], [file], class_name="7", out=tmp_path)
    assert document["class"] == "7"
    assert Path(document["drawing"]).read_bytes().startswith(b"\x89PNG")


def test_a_segmenter_is_explained_over_its_class_region(serve_runs) -> None:
    run = load_run(serve_runs["segment"], "cpu", fast=False)
    file = first_image(serve_runs["segment_data"] / "images")
    image = read_image(file, run.task.in_channels)
    (result,) = explain(run, [image], "gradcam")
    assert result.map.shape == image.shape[-2:]
    assert result.layer == "score32"


def test_bad_input_is_one_line(serve_runs, tmp_path) -> None:
    run = load_run(serve_runs["classify"], "cpu", fast=False)
    image = read_image(first_image(serve_runs["classify_data"]), 1)
    with pytest.raises(CnnlabError, match=r"features\.conv2d_00, "):
        explain(run, [image], layer="nope")  # lists the valid names
    with pytest.raises(CnnlabError, match="no spatial output"):
        explain(run, [image], layer="classifier.linear_09")
    with pytest.raises(CnnlabError, match="unknown class 'zebra'"):
        explain(run, [image], class_name="zebra")
    with pytest.raises(CnnlabError, match="below convnet's minimum size"):
        explain(run, [image[:, :8, :8]])
    done = run_cli("explain", serve_runs["classify"], tmp_path / "none.png", "--layer", "x")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


def test_the_audit_randomises_from_the_top_and_compares_with_a_random_map(serve_runs) -> None:
    run = load_run(serve_runs["classify"], "cpu", fast=False)
    files = sorted(serve_runs["classify_data"].rglob("*.png"))[::40][:3]
    images = [read_image(file, 1) for file in files]
    steps = cascade(run.model, "features")
    assert steps[0][1] == ["classifier.linear_06", "classifier.linear_09"]  # the head first
    assert all(set(a[1]) < set(b[1]) for a, b in itertools.pairwise(steps))
    report = audit(run, images, ("gradcam", "saliency"))
    assert [row["method"] for row in report["methods"]] == ["gradcam", "saliency"]
    for row in report["methods"]:
        assert len(row["spearman"]) == len(steps)
        assert row["randomisation_passed"] == (row["spearman"][1] < 0.5)
        assert 0.0 <= row["deletion"] <= 1.0 and 0.0 <= row["random_insertion"] <= 1.0
    json.dumps(report)


def test_the_audit_takes_its_images_from_every_part_of_the_split(serve_runs) -> None:
    run = load_run(serve_runs["classify"], "cpu", fast=False)
    files = audit_images(run, 5)
    assert len(files) == 5 and len({file.parent.name for file in files}) == 5


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_map_of_tiny_gradients_still_peaks_at_one(method) -> None:
    # A confident prediction's log-probability has gradients near 1e-7; Grad-CAM++ cubes
    # them. The map is scaled by its own peak however small that is.
    from cnnlab.attribution.maps import attribute

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    with torch.no_grad():
        model[4].weight.abs_()  # every channel adds to the output: a non-zero CAM

    def faint(output: torch.Tensor) -> torch.Tensor:
        return 1e-7 * output[:, 0]

    heat = attribute(model, torch.rand(1, 1, 8, 8), faint, method, "1")
    assert float(heat.max()) == pytest.approx(1.0)


def test_spearman_is_rank_correlation() -> None:
    a = torch.arange(16.0).view(4, 4)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties share their mean rank, as scipy.stats.spearmanr ranks them: two maps zero over
    # the same pixels do not agree there by the pixels' order
    tied = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    other = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 1.0])
    assert spearman(tied, other) == pytest.approx(0.92)  # scipy.stats.spearmanr: 0.92
    assert spearman(torch.zeros(4), torch.arange(4.0)) == 0.0  # no ranks to correlate


def test_features_and_filters_draw(serve_runs, tmp_path) -> None:
    file = first_image(serve_runs["classify_data"])
    document = feature_maps_file(serve_runs["classify"], file, top=2, out=tmp_path / "f.png")
    means = [c["mean"] for c in document["channels"]]
    assert len(means) == 2 and means == sorted(means, reverse=True)
    assert (tmp_path / "f.png").is_file()
    document = filters_file(serve_runs["classify"], tmp_path / "k.png")
    assert document["layer"] == "features.conv2d_00" and document["initial"]
    assert (tmp_path / "k.png").is_file()


def test_the_web_api_returns_where_it_looks_when_asked(serve_runs) -> None:
    from cnnlab.serve.served import Upload, load_served

    (served,) = load_served([serve_runs["classify"]], "cpu").values()
    file = first_image(serve_runs["classify_data"])
    upload = Upload(file.name, file.read_bytes())
    (plain,) = served.predict([upload], {})
    assert "explain" not in plain
    (answer,) = served.predict([upload], {"explain": True})
    assert answer["explain"]["method"] == "gradcam"
    assert answer["explain"]["class"] == answer["top"][0]["class"]
    assert answer["explain"]["map_png"].startswith("data:image/png;base64,")
