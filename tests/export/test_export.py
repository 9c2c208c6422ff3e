"""`cnnlab export` and the ONNX Runtime backend on tiny runs of every task: parity proven
before a file counts as written, the metadata carried inside, a stale or corrupted export
caught, and predictions through ONNX Runtime equal to the torch backend's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import cnnlab
from cnnlab import checkpoint, cli
from cnnlab.errors import CnnlabError
from cnnlab.export import export_run
from cnnlab.export.parity import check_parity
from cnnlab.models.detection import EVAL_LIMITS
from cnnlab.models.detection.yolov1 import decode
from cnnlab.runs import load_run
from cnnlab.runtime import onnx_model, pt2_model, read_metadata

TINY = {  # the smallest models of each family that still train (see tests/test_compat.py)
    "classify": {"model": "convnet", "model_args": {"cdims": [4], "hdims": [8]}, "img_size": 16},
    "segment": {
        "model": "fcn32s",
        "model_args": {"backbone": "convnet", "backbone_args": {"cdims": [4] * 5, "img_size": 32}},
    },
    "detect": {
        "model": "yolov1",
        "model_args": {
            "backbone": "vgg11",
            "reduction": 2,
            "head": "conv",
            "grid": 32,
            "head_channels": 8,
            "rescore": False,
        },
        "img_size": 64,
    },
}


def train_tiny(task: str, data: Path, out: Path, **settings) -> Path:
    settings = {**TINY[task], "epochs": 1, "batch_size": 4, "device": "cpu", **settings}
    cnnlab.train(data, out, task=task, quiet=True, val_split=0.34, **settings)
    return out


@pytest.fixture(scope="module")
def data(
    tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, shapes_dir: Callable[..., Path]
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    for digit in ("0", "1", "2"):
        (root / "digits" / digit).mkdir(parents=True)
        for path in sorted((digits_dir / digit).iterdir())[:8]:
            shutil.copy(path, root / "digits" / digit / path.name)
    segment, detect = shapes_dir("segment", 6, 32), shapes_dir("detect", 6, 64)
    return {"classify": root / "digits", "segment": segment, "detect": detect}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {task: train_tiny(task, data[task], root / task) for task in TINY}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each run copied and exported to its default RUN/model.onnx and RUN/model.pt2."""
    root = tmp_path_factory.mktemp("exported")
    done = {}
    for task, run in runs.items():
        copy = Path(shutil.copytree(run, root / task))
        done[task] = (copy, {fmt: export_run(copy, fmt) for fmt in ("onnx", "pt2")})
    return done


def copy_run(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where / run.name))


def images_of(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.png") if "masks" not in p.parts)[:6]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("task", list(TINY))
def test_export_passes_parity_on_the_runs_own_val_images(exported, task: str, fmt: str) -> None:
    run, records = exported[task]
    record = records[fmt]
    parity = record["parity"]
    assert parity["passed"] and parity["failure"] is None
    assert parity["inputs"].endswith("of the run's val split") or "and a random" in parity["inputs"]
    assert record["file"] == str(run / f"model.{fmt}") and Path(record["file"]).is_file()
    assert json.loads((run / "export.json").read_text())[f"model.{fmt}"] == record
    assert record["exporter"] == ("dynamo" if fmt == "onnx" else "torch.export")
    assert parity["max_abs_diff"] <= parity["tolerance"] <= 1e-4 * max(1.0, 1e3)
    if task == "classify":
        assert parity["top1_same"] == parity["top1_total"] == parity["images"]
    elif task == "segment":
        # Any size: the val images (32x32) and a random 39x45 one.
        assert record["input"]["shape"] == [1, 3, "height", "width"]
        assert parity["mask_pixels_same"] == parity["mask_pixels_total"] == 2 * 32 * 32 + 39 * 45
    else:
        assert record["output"] == "yolov1_grid" and record["outputs"] == ["grid"]
        assert parity["matched"] == parity["detections"] > 0
        assert parity["min_iou"] >= 0.99 and parity["max_score_diff"] <= 1e-4


@pytest.mark.parametrize("task", list(TINY))
def test_the_file_carries_what_it_needs_to_be_used_alone(exported, task: str) -> None:
    run, records = exported[task]
    meta = checkpoint.read_model_json(run)
    for fmt in ("onnx", "pt2"):
        metadata = read_metadata(run / f"model.{fmt}")
        assert metadata == records[fmt]["metadata"]
        assert metadata["classes"] == meta.classes and metadata["input_size"] == meta.input_size
        assert metadata["mean"] == meta.mean and metadata["std"] == meta.std
    # ONNX Runtime alone, no cnnlab: every metadata value is a JSON document.
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    props = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert props["classes"] == meta.classes and props["task"] == meta.task
    channels, size, _ = meta.input_size
    x = torch.randn(1, channels, size, size)
    (out,) = session.run(None, {"images": x.numpy()})
    program = torch.export.load(run / "model.pt2").module()
    assert torch.allclose(torch.from_numpy(out), program(x), atol=1e-5)
    if task == "detect":  # the documented decoding, applied by hand to the raw grid
        limits = EVAL_LIMITS.with_score(0.01)
        assert props["decoding"].startswith("output (N, S, S, B*5 + C)")
        mine = decode(torch.from_numpy(out), props["detect"]["boxes"], (size, size), limits)
        theirs = load_run(run, "cpu").model.detect(x, limits)
        assert torch.allclose(mine[0]["scores"], theirs[0]["scores"], atol=1e-5)


@pytest.mark.parametrize("task", list(TINY))
def test_onnxruntime_backend_predicts_what_the_torch_backend_does(exported, data, task) -> None:
    run, _ = exported[task]
    files = images_of(data[task])
    options = {"score_threshold": 0.01} if task == "detect" else {}
    torch_results = load_run(run, "cpu").predict(files, **options)
    ort_run = load_run(run, "cpu", backend="onnxruntime")
    assert ort_run.model.metadata["task"] == task
    ort_results = ort_run.predict(files, **options)
    for mine, theirs in zip(ort_results, torch_results, strict=True):
        if task == "classify":
            assert mine["top"][0]["class"] == theirs["top"][0]["class"]
            assert abs(mine["top"][0]["prob"] - theirs["top"][0]["prob"]) < 1e-5
        elif task == "segment":
            assert torch.equal(mine["_mask"], theirs["_mask"])
        else:
            assert [d["class"] for d in mine["detections"]] == [
                d["class"] for d in theirs["detections"]
            ]
            assert len(mine["detections"]) > 0
    if task != "detect":  # evaluation runs on the exported model too
        mine, theirs = ort_run.evaluate(), load_run(run, "cpu").evaluate()

        # Numbers within rounding; lists (most_confused) alike.
        def numbers(report: dict) -> dict:
            return {k: v for k, v in report.items() if not isinstance(v, dict | list)}

        assert numbers(mine) == pytest.approx(numbers(theirs))
        assert mine.get("most_confused") == theirs.get("most_confused")


def test_cli_export_then_predict_with_onnxruntime(runs, data, tmp_path, capsys) -> None:
    run = copy_run(runs["classify"], tmp_path)
    files = [str(p) for p in images_of(data["classify"])]
    assert cli.main(["predict", str(run), *files, "--backend", "onnxruntime"]) == 2
    assert f"run `cnnlab export {run}` first" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--dynamic-batch", "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert record["input"]["shape"] == ["batch", 1, 16, 16] and record["parity"]["passed"]
    batch = torch.randn(5, 1, 16, 16)  # any batch size now
    assert onnx_model(run / "model.onnx")(batch).shape == (5, 3)
    answers = {}
    for backend in ("torch", "onnxruntime"):
        args = ["predict", str(run), *files, "--backend", backend, "--format", "json"]
        assert cli.main(args) == 0
        answers[backend] = [r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)]
    assert answers["onnxruntime"] == answers["torch"]
    # A second export is refused unless asked for; --to names the file's format (the old
    # --format pt2 still works, with a note).
    assert cli.main(["export", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--format", "xml"]) == 2
    assert "expected text or json" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(tmp_path / "m.onnx"), "--to", "pt2"]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(tmp_path / "m.onnx"), "--format", "pt2"]) == 2
    err = capsys.readouterr().err
    assert "--format pt2 is now --to pt2" in err and "must end in .pt2" in err
    # The opset asked for is the one written (dynamo down to 17; older: TorchScript).
    assert export_run(run, out=tmp_path / "opset17.onnx", opset=17)["opset"] == 17
    old = export_run(run, out=tmp_path / "opset11.onnx", opset=11)
    assert (old["opset"], old["exporter"]) == (11, "torchscript")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "m.pt2")]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"exported {tmp_path / 'm.pt2'}: pt2 (torch.export exporter)")
    assert "top-1 the same on" in text[1] and text[2] == f"record: {tmp_path / 'export.json'}"


def test_weights_changed_after_export_are_caught(exported, tmp_path: Path) -> None:
    run = copy_run(exported["classify"][0], tmp_path)
    model = load_run(run, "cpu", fast=False).model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    checkpoint.save_weights(run / "best.safetensors", model)
    for exported_model in (onnx_model(run / "model.onnx"), pt2_model(run / "model.pt2")):
        parity = check_parity(load_run(run, "cpu"), exported_model)
        assert not parity["passed"] and "max |output difference|" in parity["failure"]
    with pytest.raises(CnnlabError, match=r"exported from other weights.*cnnlab export"):
        load_run(run, backend="onnxruntime")


def test_a_failed_parity_check_exits_2_and_leaves_no_file(
    runs, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = copy_run(runs["classify"], tmp_path)
    translate = torch.onnx.export

    def corrupting(program, *args, **kwargs):
        # The exporter writes other weights than the run's: each tensor shifted by 0.5.
        for name, tensor in program.state_dict.items():
            program.state_dict[name] = torch.nn.Parameter(tensor + 0.5, requires_grad=False)
        return translate(program, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", corrupting)
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'model.onnx'}: parity check failed (max |output")
    assert err.endswith("not written") and len(err.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before  # no file, no partial, no record


def test_what_an_exporter_cannot_handle_is_refused_in_one_line(data, tmp_path, capsys) -> None:
    args = {"anchor_sizes": [16, 32], "rpn_post_nms_top_n_test": 32, "representation_size": 16}
    run = train_tiny(
        "detect", data["detect"], tmp_path / "rcnn", model="fasterrcnn", model_args=args
    )
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["export", str(run), "--to", "pt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fasterrcnn cannot be exported to pt2: torch.export fails")
    assert "depends on the data" in err and "--to onnx" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == before
    assert cli.main(["export", str(run), "--dynamic-batch"]) == 2
    assert "one image per call" in capsys.readouterr().err
    # ONNX through the TorchScript exporter: boxes, scores and labels, parity proven.
    record = export_run(run, "onnx")
    assert load_run(run, "cpu").model.onnx_exporter == "torchscript"  # declared, not tried
    assert record["exporter"] == "torchscript" and record["outputs"] == [
        "boxes",
        "scores",
        "labels",
    ]
    assert (
        record["parity"]["passed"] and record["parity"]["matched"] == record["parity"]["detections"]
    )
    files = images_of(data["detect"])[:2]
    mine = load_run(run, backend="onnxruntime").predict(files, score_threshold=0.05)
    theirs = load_run(run, "cpu").predict(files, score_threshold=0.05)
    assert [len(r["detections"]) for r in mine] == [len(r["detections"]) for r in theirs]
