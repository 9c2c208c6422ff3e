"""Run folders made before the code took its present shape still work, with the same numbers.

tests/fixtures/legacy_runs holds three small runs (classify, segment, detect) written by
commit ee1d98f, each stopped by Ctrl-C before its last epoch, and expected.json: what that
code's eval and predict printed for them and the metrics.csv of the same runs left to
finish. The data they were trained on is regenerated here (the digits and the shapes are
deterministic) and the runs' recorded paths pointed at it, as a user who moved a data
folder would.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnlab.data.digits import write_digits
from cnnlab.data.shapes import write_shapes
from cnnlab.engine import resume
from cnnlab.runs import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_runs"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RECORDED_WORK = "/tmp/legacy/work"  # where the data lay when the runs were made


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the legacy runs (ROOT/runs/TASK) and their data (ROOT/work)."""
    root = tmp_path_factory.mktemp("legacy")
    work = root / "work"
    full = work / "digits_full"
    write_digits(full, size=16)
    for digit in ("0", "1", "2"):
        (work / "digits3" / digit).mkdir(parents=True)
        for path in sorted((full / digit).iterdir())[:12]:
            shutil.copy(path, work / "digits3" / digit / path.name)
    write_shapes(work / "shapes_seg", task="segment", n=12, size=32, seed=0)
    write_shapes(work / "shapes_det", task="detect", n=12, size=64, seed=0)
    for task in ("classify", "segment", "detect"):
        run = root / "runs" / task
        shutil.copytree(FIXTURES / task, run)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"] = config["data"].replace(RECORDED_WORK, str(work))
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        split = json.loads((run / "split.json").read_text())
        split["root"] = split["root"].replace(RECORDED_WORK, str(work))
        (run / "split.json").write_text(json.dumps(split))
    return root


def assert_close(got: object, want: object, path: str = "") -> None:
    """Equal structure; numbers within 1e-5 (relative) or 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        for key, value in want.items():
            assert key in got, f"{path}.{key} missing"
            assert_close(got[key], value, f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def relative(results: list[dict], root: Path) -> list[dict]:
    return [{**r, "file": str(Path(r["file"]).relative_to(root))} for r in results]


def test_classify_eval_and_predict(legacy: Path) -> None:
    run = load_run(legacy / "runs" / "classify")
    data = legacy / "work" / "digits3"
    expected = EXPECTED["classify"]
    assert_close(run.evaluate(split="test"), expected["eval_test"])
    assert_close(run.evaluate(data, split="test"), expected["eval_folder"])
    files = [data / p["file"] for p in expected["predict"]]
    assert_close(relative(run.predict(files, topk=3), data), expected["predict"])


def test_segment_eval_and_predict(legacy: Path) -> None:
    run = load_run(legacy / "runs" / "segment")
    data = legacy / "work" / "shapes_seg"
    expected = EXPECTED["segment"]
    assert_close(run.evaluate(), expected["eval_val"])
    assert_close(run.evaluate(data), expected["eval_folder"])
    found = run.predict([data / "images" / "00.png"])
    assert_close([found[0]["class_fractions"]], [expected["predict"][0]["class_fractions"]])


def test_detect_eval_and_predict(legacy: Path) -> None:
    run = load_run(legacy / "runs" / "detect")
    data = legacy / "work" / "shapes_det"
    expected = EXPECTED["detect"]
    assert_close(run.evaluate(), expected["eval_val"])
    assert_close(run.evaluate(data), expected["eval_folder"])
    found = run.predict([data / "images" / "00.png"], score_threshold=0.001)
    assert_close(found[0]["detections"][:10], expected["predict"][0]["detections"])


def metric_rows(text: str) -> list[dict]:
    """metrics.csv rows without the wall-clock column."""
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in csv.DictReader(io.StringIO(text))
    ]


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_resume_finishes_like_the_uninterrupted_run(
    legacy: Path, tmp_path: Path, task: str
) -> None:
    run = tmp_path / task
    shutil.copytree(legacy / "runs" / task, run)
    resume(run, quiet=True)
    got = metric_rows((run / "metrics.csv").read_text())
    assert got == metric_rows(EXPECTED[task]["resumed_metrics"])
    assert len(got) == 3


@pytest.mark.parametrize(
    ("command", "key", "expected"),
    [
        (["eval"], "top1", EXPECTED["classify"]["eval_test"]["top1"]),
        (["segment", "eval"], "miou", EXPECTED["segment"]["eval_val"]["miou"]),
        (["detect", "eval"], "map50", EXPECTED["detect"]["eval_val"]["map50"]),
    ],
)
def test_cli_eval_of_legacy_runs(
    legacy: Path, command: list[str], key: str, expected: float
) -> None:
    task = {"eval": "classify"}.get(command[0], command[0])
    done = subprocess.run(
        [sys.executable, "-m", "cnnlab", *command, str(legacy / "runs" / task), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert math.isclose(json.loads(done.stdout)[key], expected, rel_tol=1e-5)
