"""The detector contract (``cnnlab.models.detection``): every registered detector implements
it, ``DetectLimits`` holds the defaults detect, eval and export use, and the ONNX Runtime
backend decodes an exported graph through the class that declared it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnlab import create_model
from cnnlab.data.detect import read_detection_folder
from cnnlab.data.shapes import write_shapes
from cnnlab.errors import CnnlabError
from cnnlab.models.detection import (
    EVAL_LIMITS,
    PREDICT_LIMITS,
    DetectLimits,
    Detector,
    graph_decoder,
)
from cnnlab.models.detection.contract import DetectionsGraph
from cnnlab.models.detection.yolov1 import YOLOv1, decode
from cnnlab.models.factory import list_models, model_info
from cnnlab.runtime import ExportedModel
from cnnlab.tasks.detect import DetectTask, proposal_source_of

FAMILIES = {  # registered name -> the file under models/detection/ it lives in
    "rcnn": "rcnn",
    "sppnet": "sppnet",
    "fastrcnn": "fast_rcnn",
    "fasterrcnn": "faster_rcnn",
    "yolov1": "yolov1",
}
SMALL = {  # narrow heads, so that building and one detect call take a moment
    "rcnn": {"crop_size": 64, "context_padding": 8, "representation_size": 16},
    "sppnet": {"representation_size": 16},
    "fastrcnn": {"representation_size": 16},
    "fasterrcnn": {"representation_size": 16, "anchor_sizes": [16, 32]},
    "yolov1": {"head": "conv", "grid": 4, "head_channels": 8},
}


def _empty(count: int) -> list[dict[str, torch.Tensor]]:
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    return [{**none, "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(count)]


class Recorder(Detector):
    """A detector that finds nothing and remembers the limits it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[DetectLimits] = []

    def detect(self, images, limits=EVAL_LIMITS, proposals=None):
        self.seen.append(limits)
        return _empty(len(images))


class Points(Detector):
    """A detector of a graph kind of its own: one box per image, scored by its mean."""

    graph_is_forward = True
    graph_output = "test_contract_points"
    graph_outputs = ("means",)

    @classmethod
    def decode_graph(cls, outputs, images, limits, settings, name):
        (means,) = outputs(images)
        found = []
        for mean in means:
            keep = (mean > limits.score_threshold).reshape(1)  # (1,): the one box or none
            box = torch.tensor([[0.0, 0.0, settings["side"], settings["side"]]])
            labels = torch.zeros(1, dtype=torch.int64)[keep]
            found.append({"boxes": box[keep], "scores": mean[None][keep], "labels": labels})
        return found


def test_the_registered_detectors_are_the_five_families() -> None:
    assert list_models(task="detect") == sorted(FAMILIES)
    assert {name: model_info(name).family for name in FAMILIES} == FAMILIES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_registered_detector_implements_the_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **SMALL[name]).eval()
    assert isinstance(model, Detector)
    assert type(model).detect is not Detector.detect  # its own, not the base's refusal
    (found,) = model.detect(torch.rand(1, 3, 64, 64), EVAL_LIMITS.with_score(0.0))
    assert set(found) == {"boxes", "scores", "labels"}
    count = len(found["scores"])
    assert found["boxes"].shape == (count, 4) and found["labels"].shape == (count,)
    assert ((found["labels"] >= 0) & (found["labels"] < 3)).all()
    assert model.fitted is (name != "rcnn")  # only R-CNN fits (its SVMs) after training
    # External proposals exactly for the models before Faster R-CNN, and those refuse export.
    needs_proposals = name in ("rcnn", "sppnet", "fastrcnn")
    assert (model.proposal_settings is not None) is needs_proposals
    assert (proposal_source_of(model) is not None) is needs_proposals
    assert (model.export_refusal is not None) is needs_proposals
    if needs_proposals:
        assert model.proposal_settings == {"mode": "fast", "max_boxes": 2000, "file": None}
        assert "\n" not in model.export_refusal
    if name == "rcnn":
        with pytest.raises(CnnlabError, match="no training images"):
            model.fit_after_training([])
    else:
        assert model.fit_after_training([]) is None  # the no-op default
    assert model.onnx_exporter == ("torchscript" if name == "fasterrcnn" else "dynamo")
    assert graph_decoder(model.graph_output) is (YOLOv1 if name == "yolov1" else Detector)


def test_the_limits_are_stated_once_with_the_defaults_of_before() -> None:
    assert (EVAL_LIMITS.score_threshold, EVAL_LIMITS.nms_threshold) == (0.001, 0.5)
    assert EVAL_LIMITS.max_detections == 100 and DetectLimits() == EVAL_LIMITS
    assert DetectLimits(score_threshold=0.25) == PREDICT_LIMITS
    assert EVAL_LIMITS.with_score(0.3) == DetectLimits(0.3, 0.5, 100)
    with pytest.raises(AttributeError):  # frozen: nobody changes the shared defaults
        EVAL_LIMITS.score_threshold = 0.5


def test_predict_and_eval_ask_the_detector_for_the_default_limits(tmp_path: Path) -> None:
    write_shapes(tmp_path, task="detect", n=2, size=32, seed=0)
    _, classes, samples = read_detection_folder(tmp_path)
    task = DetectTask(classes, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = Recorder()
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    cpu = torch.device("cpu")
    assert task.predict(model, [image], cpu) == [{"detections": []}]
    assert model.seen[-1] == PREDICT_LIMITS
    task.predict(model, [image], cpu, score_threshold=0.6)
    assert model.seen[-1] == PREDICT_LIMITS.with_score(0.6)
    task.evaluate(model, samples, cpu)
    assert model.seen[-1] == EVAL_LIMITS
    task.evaluate(model, samples, cpu, score_threshold=0.01)
    assert model.seen[-1] == EVAL_LIMITS.with_score(0.01)


def test_export_builds_the_limits_into_the_graph_and_its_metadata() -> None:
    torch.manual_seed(0)
    model = create_model("fasterrcnn", num_classes=2, **SMALL["fasterrcnn"]).eval()
    graph = model.graph(EVAL_LIMITS)
    assert isinstance(graph, DetectionsGraph) and graph.limits == EVAL_LIMITS
    x = torch.rand(1, 3, 64, 64)
    boxes, scores, labels = graph(x)
    (found,) = model.detect(x, EVAL_LIMITS)
    assert torch.equal(boxes, found["boxes"]) and torch.equal(scores, found["scores"])
    assert torch.equal(labels, found["labels"])
    metadata = model.graph_metadata(EVAL_LIMITS)
    assert metadata["detect"] == {
        "score_threshold": 0.001,
        "nms_threshold": 0.5,
        "max_detections": 100,
    }
    assert metadata["decoding"].endswith("at IoU 0.5, scores >= 0.001, at most 100")
    yolo = create_model("yolov1", num_classes=2, **SMALL["yolov1"]).eval()
    assert yolo.graph(EVAL_LIMITS) is yolo  # its raw grid, decoded outside the graph
    wider = yolo.graph_metadata(DetectLimits(nms_threshold=0.6, max_detections=7))
    assert "NMS at IoU 0.6, at most 7 per image" in wider["decoding"]
    assert wider["detect"] == {"boxes": yolo.boxes, "grid": yolo.grid}


def _exported(run, output: str, detect: dict, dynamic: list[str]) -> ExportedModel:
    metadata = {"output": output, "input_size": [3, 64, 64], "dynamic": dynamic, "detect": detect}
    return ExportedModel(run, metadata, "model.onnx")


def test_the_exported_model_decodes_through_the_class_that_declared_the_graph() -> None:
    means = _exported(lambda x: [x.mean((1, 2, 3))], Points.graph_output, {"side": 64}, ["batch"])
    images = torch.stack([torch.full((3, 64, 64), 0.2), torch.full((3, 64, 64), 0.7)])
    found = means.detect(images, EVAL_LIMITS.with_score(0.5))
    assert [len(f["scores"]) for f in found] == [0, 1]
    assert found[1]["boxes"].tolist() == [[0.0, 0.0, 64.0, 64.0]]
    assert means.proposal_settings is None  # a task asks it as it asks any detector

    torch.manual_seed(0)
    yolo = create_model("yolov1", num_classes=2, **SMALL["yolov1"]).eval()
    settings = yolo.graph_metadata(EVAL_LIMITS)["detect"]
    with torch.no_grad():
        grid = _exported(lambda x: [yolo(x)], YOLOv1.graph_output, settings, [])
        x = torch.rand(2, 3, 64, 64)
        limits = EVAL_LIMITS.with_score(0.05)
        ours, theirs = grid.detect(x, limits), yolo.detect(x, limits)
        assert [len(f["scores"]) for f in ours] == [len(f["scores"]) for f in theirs]
        for mine, its in zip(ours, theirs, strict=True):
            assert torch.allclose(mine["scores"], its["scores"])
        # one image per graph call (a fixed batch of 1), as the file's decoding describes
        direct = decode(yolo(x[:1]), yolo.boxes, (64, 64), limits)
        assert torch.equal(direct[0]["boxes"], ours[0]["boxes"])


def test_an_exported_detection_graph_filters_within_the_limits_built_in() -> None:
    torch.manual_seed(0)
    model = create_model("fasterrcnn", num_classes=2, **SMALL["fasterrcnn"]).eval()
    graph = model.graph(EVAL_LIMITS.with_score(0.0))
    settings = {**model.graph_metadata(EVAL_LIMITS)["detect"], "score_threshold": 0.0}
    exported = _exported(lambda x: list(graph(x)), "detections", settings, [])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        found = exported.detect(x, DetectLimits(0.0, max_detections=5))
        full = model.detect(x[:1], EVAL_LIMITS.with_score(0.0))[0]
    assert len(found) == 2 and len(found[0]["scores"]) == min(5, len(full["scores"]))
    assert torch.equal(found[0]["scores"], full["scores"][:5])
    with pytest.raises(CnnlabError, match=r"NMS at IoU 0\.5 built in, not 0\.7"):
        exported.detect(x, DetectLimits(nms_threshold=0.7))
    logits = ExportedModel(lambda x: [x], {"output": "logits", "input_size": [3, 8, 8]}, "m")
    with pytest.raises(CnnlabError, match="is not a detector"):
        logits.detect(torch.zeros(1, 3, 8, 8))
