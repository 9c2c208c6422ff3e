"""`cnnlab export --int8` and `cnnlab benchmark` on one tiny classification run: the int8
file is kept with its drop and speed-up recorded, refused with nothing left when it loses
more than allowed, and every benchmark row's metric is what `cnnlab eval` gives with that
backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnlab import cli
from cnnlab.errors import CnnlabError
from cnnlab.export import export_run
from cnnlab.export.benchmark import benchmark_run
from cnnlab.files import read_json
from cnnlab.runs import load_run
from tests.conftest import train_tiny_classifier


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, few_digits: Path) -> Path:
    return train_tiny_classifier(few_digits, tmp_path_factory.mktemp("int8") / "run")


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_export_int8_records_its_drop_and_speedup(run_dir: Path) -> None:
    # A one-epoch model is near chance: any drop is allowed here, what is tested is the record.
    record = export_run(run_dir, int8=True, max_drop=100, calibration=8)
    target = run_dir / "model.int8.onnx"
    assert record["file"] == str(target) and target.is_file()
    int8 = record["int8"]
    assert int8["metric"] == "top-1" and int8["split"] == "test"
    assert int8["drop_points"] == pytest.approx((int8["float"] - int8["int8"]) * 100, abs=1e-3)
    assert int8["speedup"] > 0 and int8["float_ms"] > 0 and int8["int8_ms"] > 0
    assert int8["calibration"] == "8 images of the run's train split"
    assert read_json(run_dir / "export.json")["model.int8.onnx"]["int8"] == int8
    # --backend onnxruntime-int8 runs that file: the metric recorded is what eval gives.
    report = load_run(run_dir, backend="onnxruntime-int8").evaluate()
    assert report["top1"] == int8["int8"]
    assert load_run(run_dir, device="cpu").evaluate()["top1"] == int8["float"]


def test_an_int8_model_losing_more_than_allowed_is_refused_leaving_nothing(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No model can lose less than -100 points of top-1 (it would need 200%): always refused.
    before = listing(run_dir)
    out = tmp_path / "out"
    out.mkdir()
    command = ["export", str(run_dir), "--int8", "--max-drop", "-100.5", "--calibration", "4"]
    assert cli.main([*command, "--out", str(out / "model.int8.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "int8 loses" in lines[0] and "not written" in lines[0], lines
    assert list(out.iterdir()) == [] and listing(run_dir) == before


def test_benchmark_rows_hold_the_metric_eval_gives_for_each_backend(run_dir: Path) -> None:
    if not (run_dir / "model.int8.onnx").exists():  # (run alone: the export test's file)
        export_run(run_dir, int8=True, max_drop=100, calibration=8)
    before = listing(run_dir)
    table = benchmark_run(run_dir, "onnx,onnx-int8,pt2", "1,3", threads=1, images=3)
    rows = {row["format"]: row for row in table["rows"]}
    assert list(rows) == ["torch", "onnx", "onnx-int8", "pt2"]  # torch: always, the reference
    assert listing(run_dir) == before  # files it lacked were built elsewhere
    assert rows["onnx"]["source"] == "built" and rows["onnx-int8"]["source"] == "existing"
    for row in rows.values():
        assert row["error"] is None and row["bytes"] > 0 and row["split"] == "test"
        assert set(row["batches"]) == {"1", "3"}
        for timed in row["batches"].values():
            assert 0 < timed["p50_ms"] <= timed["p90_ms"] and timed["images_per_s"] > 0
    assert rows["torch"]["batches"]["1"]["speedup"] == 1.0
    assert json.loads(json.dumps(table)) == table  # what --format json prints
    # `cnnlab eval`'s figure with each backend (pt2 has none: the torch model's answers).
    export_run(run_dir, "onnx")
    backends = {"torch": "torch", "onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8"}
    for format, backend in {**backends, "pt2": "torch"}.items():
        assert rows[format]["value"] == load_run(run_dir, backend=backend).evaluate()["top1"]


def test_benchmark_refuses_unknown_formats_and_batches(run_dir: Path) -> None:
    with pytest.raises(CnnlabError, match=r"^--formats 'tflite': choose from torch, compile,"):
        benchmark_run(run_dir, "torch,tflite")
    with pytest.raises(CnnlabError, match=r"^--batch '1,0': expected batch sizes >= 1"):
        benchmark_run(run_dir, "torch", "1,0")
