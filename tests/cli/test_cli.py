"""The `cnnlab` command as a user types it: JSON on stdout, one-line errors with status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnlab import cli, demo
from cnnlab.errors import CnnlabError
from tests.conftest import run_cli_here


def json_out(capsys: pytest.CaptureFixture, *args: str) -> object:
    assert cli.main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_json_has_the_documented_schema_and_resnet50_totals(capsys) -> None:
    document = json_out(capsys, "summary", "resnet50", "--input", "3,224,224", "--format", "json")
    assert set(document) >= {
        "model", "input", "layers", "total_params", "trainable_params", "total_macs",
        "receptive_field",
    }  # fmt: skip
    assert document["model"] == "resnet50"
    assert document["input"] == [3, 224, 224]
    assert document["total_params"] == 25_557_032
    assert abs(document["total_macs"] - 4.09e9) / 4.09e9 < 0.01
    first = document["layers"][0]
    assert set(first) == {
        "name", "type", "output_shape", "params", "formula", "size_formula", "macs", "rf",
        "rf_min", "jump", "flops", "activation_bytes",
    }  # fmt: skip
    assert first["formula"] == "7*7*3*64 = 9,408"
    assert first["size_formula"] == "floor((224 - 7 + 2*3)/2) + 1 = 112"
    assert (first["rf"], first["rf_min"], first["jump"]) == (7, 7, 2)


def test_summary_table_shows_formulas_and_totals(capsys) -> None:
    assert cli.main(["summary", "vgg16", "--input", "3,64,64", "--num-classes", "10"]) == 0
    text = capsys.readouterr().out
    assert "3*3*128*128 + 128 = 147,584" in text
    assert "Parameters:" in text and "Receptive field:" in text


def test_model_arguments_pass_through_to_the_builder(capsys) -> None:
    document = json_out(
        capsys, "summary", "convnet", "--input", "1,28,28", "--cdims", "8,16", "--hdims", "32",
        "--num-classes", "10", "--format", "json",
    )  # fmt: skip
    # 3*3*1*8+8 + 2*8 + 3*3*8*16+16 + 2*16 + (16*7*7)*32+32 + 32*10+10
    assert document["total_params"] == 80 + 16 + 1168 + 32 + 25120 + 330


def test_on_off_builder_settings_read_as_bare_flags() -> None:
    import cnnlab.models.detection  # noqa: F401  (registers the detectors)

    assert cli.builder_args(["--roi-pool"], "fasterrcnn") == {"roi_pool": True}
    assert cli.builder_args(["--roi-pool", "false"], "fasterrcnn") == {"roi_pool": False}
    assert cli.builder_args(["--no-rescore", "--grid", "8"], "yolov1") == {
        "rescore": False,
        "grid": 8,
    }
    with pytest.raises(CnnlabError, match="--grid needs a value"):
        cli.builder_args(["--grid", "--no-rescore"], "yolov1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "resnt50"], "did you mean resnet50"),
        (["summary", "alexnet", "--input", "3,30,30"], "at least 63x63"),
        (["summary", "resnet18", "--input", "3,x"], "expected C,H,W"),
        (["summary", "convnet", "--widths", "3"], "convnet does not take --widths"),
        (["train", "/nonexistent/photos", "--out", "/tmp/never"], "/nonexistent/photos"),
        (["eval", "/tmp"], "not a cnnlab run folder"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str, capsys) -> None:
    # In this process: `python -m cnnlab` exits with main's status (the real command's
    # one-line refusals are checked in a child by test_hardening.py's assert_refused).
    result = run_cli_here(capsys, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_input_size_has_one_reader_and_one_message(capsys) -> None:
    """`summary --input`, `compare --input`, `explore --input` and the explore page's
    ``input`` are read by ``parse_input_size``: one message, the page's limits added."""
    from cnnlab.inspect.specs import parse_input_size
    from cnnlab.serve.explore_api import Explorer

    assert parse_input_size("1x28x28") == (1, 28, 28) and parse_input_size(None) is None
    expected = "input '3,0,8': expected C,H,W as three positive integers (3,224,224)"
    assert run_cli_here(capsys, "compare", "convnet", "--input", "3,0,8").stderr == (
        f"error: {expected}\n"
    )
    with pytest.raises(CnnlabError) as refused:
        Explorer(None, None, {}, None).explored("resnet18", "5,8,8")
    assert str(refused.value) == (
        "input '5,8,8': expected C,H,W as three positive integers, C 1 or 3,"
        " H and W at most 1024 (3,224,224)"
    )


def test_models_lists_every_registered_model_with_figures(capsys) -> None:
    rows = json_out(capsys, "models", "--format", "json")
    by_name = {row["name"]: row for row in rows}
    assert by_name["vgg16"]["params"] == 138_357_544
    assert by_name["densenet121"]["params"] == 7_978_856
    assert by_name["alexnet"]["min_size"] == 63
    assert {"convnet", "googlenet", "resnet152", "fcn8s", "yolov1"} <= set(by_name)


def test_train_eval_predict_on_a_class_folder_tree(tmp_path: Path, capsys) -> None:
    data = tmp_path / "digits"
    assert cli.main(["data", "digits", str(data), "--size", "16"]) == 0
    assert "wrote 1797 digit images (10 classes)" in capsys.readouterr().out
    run = tmp_path / "run"
    report = json_out(
        capsys, "train", str(data), "--model", "convnet", "--hdims", "64", "--img-size", "16",
        "--epochs", "3", "--batch-size", "32", "--warmup-epochs", "0", "--no-flip", "--quiet",
        "--out", str(run), "--format", "json",
    )  # fmt: skip
    assert report["top1"] > 0.8
    assert {"config.yaml", "split.json", "metrics.csv", "best.safetensors", "model.json",
            "last.pt", "report.json", "curves.png", "confusion.png", "errors.png"} <= {
        p.name for p in run.iterdir()
    }  # fmt: skip
    evaluated = json_out(capsys, "eval", str(run), "--device", "cpu", "--format", "json")
    assert evaluated["top1"] == pytest.approx(report["top1"])
    assert set(evaluated["per_class"]["3"]) == {"precision", "recall", "f1", "support"}

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    status = cli.main(["predict", str(run), str(data / "7"), str(broken), "--topk", "3",
                       "--device", "cpu", "--format", "json"])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 2  # the bad file is reported, the others are still predicted
    assert "broken.png" in captured.err
    predictions = json.loads(captured.out)
    assert len(predictions) == len(list((data / "7").iterdir()))
    assert all(len(p["top"]) == 3 for p in predictions)
    hits = sum(p["top"][0]["class"] == "7" for p in predictions)
    assert hits / len(predictions) > 0.8

    assert cli.main(["train", str(data), "--model", "convnet", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_demo_trains_the_digits_and_prints_the_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # The real demo trains 20 epochs (a benchmark's job); two show the whole path works.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(demo.DIGITS_DEMO, "epochs", 2)
    assert cli.main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "runs/demo" in out
    report = json.loads((tmp_path / "runs" / "demo" / "report.json").read_text())
    assert report["n"] == 359
    assert report["top1"] > 0.5
    monkeypatch.setitem(demo.DIGITS_DEMO, "epochs", 1)  # only where it writes is checked
    assert cli.main(["demo", "--quiet"]) == 0  # a second demo never overwrites the first
    assert (tmp_path / "runs" / "demo2" / "report.json").is_file()
