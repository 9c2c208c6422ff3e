"""The two task contracts and the declared prediction options: every task implements
what is declared, every consumer uses only what is declared, and an option declared once
reaches the command line, the web API and ``Run`` alike."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from pathlib import Path

import pytest

import cnnlab
from cnnlab import cli
from cnnlab.engine.task import TrainingTask
from cnnlab.errors import CnnlabError
from cnnlab.tasks import TASKS, task_class
from cnnlab.tasks.inference import InferenceTask
from cnnlab.tasks.options import Option, resolve_options
from cnnlab.tasks.spec import Figure, MetricSpec
from cnnlab.training import task_of_model

SRC = Path(cnnlab.__file__).parent


def members(protocol: type) -> set[str]:
    """What a Protocol declares: its annotated attributes and its methods."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))
    }
    return names


def missing_members(cls: type, protocol: type) -> list[str]:
    """What ``protocol`` declares that the dataclass ``cls`` lacks."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return sorted(m for m in members(protocol) if not hasattr(cls, m) and m not in fields)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("protocol", [TrainingTask, InferenceTask])
def test_every_task_implements_both_contracts(name: str, protocol: type) -> None:
    cls = task_class(name)
    missing = missing_members(cls, protocol)
    assert not missing, f"{cls.__name__} lacks {missing} of {protocol.__name__}"
    assert cls.name == name
    assert cls.options == TASKS[name].options and cls.eval_split == TASKS[name].eval_split


@pytest.mark.parametrize("protocol", [TrainingTask, InferenceTask])
def test_the_multi_label_mode_implements_both_contracts(protocol: type) -> None:
    """``ClassifyTask`` hands a multi-label run to its own class, which the loop, load_run
    and export then call as they call any task."""
    from cnnlab.tasks.multilabel import MultiLabelClassifyTask

    assert not missing_members(MultiLabelClassifyTask, protocol)
    assert MultiLabelClassifyTask.name == "classify"


def attributes_of(path: Path, holders: set[str]) -> set[str]:
    """Attributes read from a name in ``holders`` (``task.x``) or from an attribute named
    so (``run.task.x``, ``self.task.x``) anywhere in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        named = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
        if named in holders:
            found.add(node.attr)
    return found


def test_consumers_use_only_what_the_contracts_declare() -> None:
    inference = [SRC / "runs.py", SRC / "heatmap.py", *SRC.glob("export/*.py")]
    inference += [*SRC.glob("serve/*.py"), *SRC.glob("cli/*.py")]
    for path in inference:
        used = attributes_of(path, {"task"}) - {"__name__"}
        assert used <= members(InferenceTask), f"{path.name}: {used - members(InferenceTask)}"
    for path in [*SRC.glob("engine/*.py"), SRC / "lr_find.py"]:
        used = attributes_of(path, {"task", "job", "kind"})
        assert used <= members(TrainingTask), f"{path.name}: {used - members(TrainingTask)}"


def test_the_engine_names_no_task() -> None:
    for path in SRC.glob("engine/*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
        imported |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        tasks = {m for m in imported if m.startswith("cnnlab.tasks")}
        assert tasks <= {"cnnlab.tasks.spec"}, f"{path.name} imports {tasks}"
        for name in TASKS:
            assert f'"{name}"' not in path.read_text(), f"{path.name} names the task {name}"


def test_every_registered_model_names_a_listed_task() -> None:
    from cnnlab.models.factory import list_models, model_info

    assert {model_info(name).task for name in list_models()} == set(TASKS)


def test_task_of_model_resolves_and_refuses_another_task() -> None:
    assert task_of_model("resnet18").name == "classify"
    assert task_of_model("fcn8s", "segment").name == "segment"
    with pytest.raises(CnnlabError, match="yolov1 is a detect model, not a classify model"):
        task_of_model("yolov1", "classify")


# ---------------------------------------------------------------------------- the metric spec

SPEC = MetricSpec(
    val=(Figure("loss", "loss"), Figure("acc", "acc", True), Figure("iou", "IoU", True)),
    best=("iou", "-loss"),
    best_label="val IoU",
    curves={"loss": ("train_loss", "val_loss")},
    in_line=("loss", "iou"),
    train=Figure("acc", "acc", True),
)


def test_metric_spec_derives_columns_rows_line_and_rank() -> None:
    assert SPEC.columns == (
        "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_iou", "seconds"
    )  # fmt: skip
    val = {"loss": 0.5, "acc": 0.75, "iou": 0.25}
    row = SPEC.row(0.8, val)
    assert row == {"train_acc": 0.8, "val_loss": 0.5, "val_acc": 0.75, "val_iou": 0.25}
    assert SPEC.epoch_cells({"train_loss": 1.0, **row}) == [
        ("train loss", "1.000"),
        ("train acc", "80.0%"),
        ("val loss", "0.500"),
        ("val IoU", "25.0%"),
    ]
    # The first key decides, the loss (lower is better) breaks ties.
    assert SPEC.rank(val) == (0.25, -0.5)
    assert SPEC.rank({**val, "loss": 0.4}) > SPEC.rank(val)
    assert SPEC.rank({**val, "iou": 0.3, "loss": 9.0}) > SPEC.rank(val)
    assert SPEC.score_label == "acc"
    bare = dataclasses.replace(SPEC, train=None)
    assert "train_acc" not in bare.columns and bare.score_label is None


@pytest.mark.parametrize("name", list(TASKS))
def test_each_tasks_curves_name_its_own_columns(name: str) -> None:
    spec = task_class(name).metrics
    for columns in spec.curves.values():
        assert set(columns) <= set(spec.columns)
    assert set(spec.in_line) <= {f.key for f in spec.val}
    assert {key.lstrip("-") for key in spec.best} <= {f.key for f in spec.val}


# ---------------------------------------------------------------------------- options


def test_an_option_checks_type_and_range_in_one_place() -> None:
    topk = next(o for o in TASKS["classify"].options if o.name == "topk")
    assert topk.check(3) == 3 and topk.parse("3") == 3
    for bad in (0, -1, 2.5, True, "3", math.nan):
        with pytest.raises(CnnlabError, match="topk must be"):
            topk.check(bad)
    with pytest.raises(ValueError, match="topk must be a whole number, got 'x'"):
        topk.parse("x")
    threshold = next(o for o in TASKS["detect"].options if o.name == "score_threshold")
    assert threshold.default_in("predict") == 0.25 and threshold.default_in("eval") == 0.001
    with pytest.raises(CnnlabError, match="between 0 and 1"):
        threshold.check(1.5)
    assert threshold.check(0) == 0.0


def test_the_detection_options_default_to_the_detectors_limits() -> None:
    from cnnlab.models.detection import EVAL_LIMITS, PREDICT_LIMITS

    (threshold,) = TASKS["detect"].options
    assert threshold.default_in("predict") == PREDICT_LIMITS.score_threshold
    assert threshold.default_in("serve") == PREDICT_LIMITS.score_threshold
    assert threshold.default_in("eval") == EVAL_LIMITS.score_threshold


def test_resolve_options_fills_defaults_and_refuses_another_tasks() -> None:
    options = TASKS["detect"].options
    assert resolve_options(options, "eval", {}, "detect") == {"score_threshold": 0.001}
    assert resolve_options(options, "predict", {"score_threshold": 0.5}, "detect") == {
        "score_threshold": 0.5
    }
    with pytest.raises(CnnlabError, match="topk does not apply to predict of a detect run"):
        resolve_options(options, "predict", {"topk": 3}, "detect")


def test_the_command_line_refuses_a_value_out_of_the_declared_range(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["predict", "RUN", "x.png", "--topk", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "topk must be at least 1, got 0" in err and err.count("\n") == 1


def test_a_declared_option_reaches_the_cli_and_the_web_form(monkeypatch, capsys) -> None:
    from cnnlab.serve.app import predict_signature

    extra = Option(
        "temperature", float, 1.0, "divide the logits by this", ("predict", "serve"), 0.01
    )
    entry = TASKS["classify"]
    monkeypatch.setitem(
        TASKS, "classify", dataclasses.replace(entry, options=(*entry.options, extra))
    )
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    shown = capsys.readouterr().out
    assert "--temperature TEMPERATURE" in shown and "at least 0.01 (default: 1)" in shown
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "--temperature" not in capsys.readouterr().out  # a predict option only
    field = predict_signature().parameters["temperature"]
    assert field.default is None
    (form,) = field.annotation.__metadata__
    assert form.description.startswith("classify runs: divide the logits")
    assert any(getattr(m, "ge", None) == 0.01 for m in form.metadata)


def bounds(schema: object) -> dict:
    """The ``minimum`` and ``maximum`` anywhere inside a JSON schema."""
    found = {}
    if isinstance(schema, dict):
        found.update({k: v for k, v in schema.items() if k in ("minimum", "maximum")})
        for value in schema.values():
            found.update(bounds(value))
    elif isinstance(schema, list):
        for value in schema:
            found.update(bounds(value))
    return found


def test_the_openapi_form_carries_every_declared_serve_option(serve_runs) -> None:
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    with TestClient(create_app([serve_runs["classify"]]), base_url="http://127.0.0.1") as client:
        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
        reference = body["multipart/form-data"]["schema"]["$ref"]  # the predict form's
        form = schema["components"]["schemas"][reference.rsplit("/", 1)[1]]["properties"]
        for task in TASKS.values():
            for option in task.options:
                if "serve" not in option.commands:
                    continue
                assert option.name in form
                found = bounds(form[option.name])
                assert found.get("minimum") == option.minimum
                assert found.get("maximum") == option.maximum
        # A value out of the declared range is refused by the form, one line.
        answer = client.post(
            "/api/predict",
            data={"run": "digits", "topk": "0"},
            files={"file": ("a.png", b"x", "image/png")},
        )
        assert answer.status_code == 422 and "topk" in answer.json()["detail"]
        # Another task's option is refused by name.
        answer = client.post(
            "/api/predict",
            data={"run": "digits", "score_threshold": "0.5"},
            files={"file": ("a.png", b"x", "image/png")},
        )
        assert answer.status_code == 400
        assert (
            answer.json()["detail"] == "score_threshold does not apply to 'digits', a classify run"
        )


def test_run_checks_its_options_against_the_declaration(serve_runs) -> None:
    run = cnnlab.load_run(serve_runs["classify"])
    images = run.task.split_images(serve_runs["classify"] / "split.json", "val")[:1]
    assert len(run.predict(images, topk=1)[0]["top"]) == 1
    assert len(run.predict(images)[0]["top"]) == 5  # the declared default
    with pytest.raises(CnnlabError, match="topk must be at least 1, got 0"):
        run.predict([], topk=0)
    with pytest.raises(CnnlabError, match="score_threshold does not apply to eval of a classify"):
        run.evaluate(score_threshold=0.5)
    assert (
        inspect.signature(run.predict).parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
    )
