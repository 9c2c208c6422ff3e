"""A training command lists only the flags it honours: a setting its task or the command
has no use for is refused in argparse's one line naming the command (exit 2), never
passed on to the model builder as if it were one of the model's own flags; the Python API
refuses the same settings at the task's setup, from the same declarations (config.py's
``tasks``, ``instead`` and ``task_choices``)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from cnnlab import cli
from cnnlab.cli.flags import RefusedFlag
from cnnlab.config import TrainConfig, check_task_settings, make_config
from cnnlab.errors import CnnlabError
from tests.conftest import run_cli_here

TRAIN_COMMANDS = (["train"], ["segment", "train"], ["detect", "train"], ["cv"], ["lr-find"])
TASK_OF = {"train": "classify", "segment": "segment", "detect": "detect"}


def command_parser(words: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def listed_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        flag
        for action in parser._actions
        if action.help is not argparse.SUPPRESS
        for flag in action.option_strings
    }


def refusal(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.build_parser().parse_known_args(list(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_other_tasks_train_commands_list_no_head_only_or_test_split_settings(
    task: str, capsys: pytest.CaptureFixture
) -> None:
    """--freeze-backbone and --backbone-lr-mult need a classifier head (no segmentation or
    detection model names one), --test-split a third split (those tasks have train and
    val): `cnnlab TASK train --help` once listed them and setup refused them later."""
    listed = listed_flags(command_parser([task, "train"]))
    for flag in ("--freeze-backbone", "--backbone-lr-mult", "--test-split"):
        assert flag not in listed
        err = refusal(capsys, task, "train", "DIR", flag, "0.1")
        assert err.startswith(f"error: argument {flag}: only `cnnlab train` takes it")
        assert err.rstrip().endswith(f"(see `cnnlab {task} train --help`)")
    # A segmentation model starts from a whole-model file; a detector from a backbone's.
    assert ("--weights" in listed) is (task == "segment")
    if task == "detect":
        err = refusal(capsys, "detect", "train", "DIR", "--weights", "w.pth")
        assert "only `cnnlab train` and `cnnlab segment train` take it" in err
        assert "--backbone-weights FILE" in err


def test_augment_lists_the_recipes_of_the_task(capsys: pytest.CaptureFixture) -> None:
    choices = {
        task: next(
            a.choices for a in command_parser(words)._actions if "--augment" in a.option_strings
        )
        for task, words in (("detect", ["detect", "train"]), ("segment", ["segment", "train"]))
    }
    assert choices == {"detect": ("none", "light"), "segment": ("none", "light", "strong")}
    err = refusal(capsys, "detect", "train", "DIR", "--augment", "strong")
    assert "invalid choice: 'strong'" in err
    assert "trivial" in command_parser(["train"]).format_help()


@pytest.mark.parametrize(
    ("task", "settings", "named"),
    [
        ("detect", {"weights": "w.pth"}, ("weights", "--backbone-weights FILE")),
        ("segment", {"weights": "w.pth", "freeze_backbone": True}, ("freeze_backbone",)),
        ("segment", {"backbone_lr_mult": 0.1}, ("backbone_lr_mult",)),
        ("segment", {"label_smoothing": 0.1, "test_split": 0.2}, ("label_smoothing, test_split",)),
        ("detect", {"augment": "trivial"}, ("augment of a detect run must be one of none, light",)),
        ("segment", {"augment": "randaugment"}, ("none, light, strong, got 'randaugment'",)),
    ],
)
def test_setup_refuses_what_the_command_line_does_not_list(
    task: str, settings: dict, named: tuple[str, ...], tmp_path: Path
) -> None:
    """The Python API: before any data is read (the folder here does not exist), the
    task's setup refuses another task's setting in one line (segmentation once took
    label_smoothing and test_split silently, and refused a head-only recipe only when
    building the optimizer)."""
    from cnnlab.tasks import task_class

    cfg = make_config(task, data=str(tmp_path / "none"), out=str(tmp_path / "run"), **settings)
    with pytest.raises(CnnlabError) as refused:
        task_class(task).setup(cfg)
    assert all(part in str(refused.value) for part in named)


@pytest.mark.parametrize("words", TRAIN_COMMANDS, ids=" ".join)
def test_every_listed_setting_and_choice_passes_the_tasks_setup_check(words: list[str]) -> None:
    """What a training command lists, its task's setup takes: each listed TrainConfig
    flag at a value other than its default, and each listed choice."""
    task = TASK_OF.get(words[0], "classify")
    parser = command_parser(words)
    listed = listed_flags(parser)
    hints = typing.get_type_hints(TrainConfig)
    probe = {float: 0.5, int: 2, str: "x", bool: True}
    for item in fields(TrainConfig):
        flag = f"--{item.name.replace('_', '-')}"
        if flag not in listed or not item.metadata.get("cli", True) or item.name == "model":
            continue
        action = next(a for a in parser._actions if flag in a.option_strings)
        kind = next(
            t
            for t in typing.get_args(hints[item.name]) or (hints[item.name],)
            if t is not type(None)
        )
        # A frozen backbone needs weights to start from (TrainConfig's own rule).
        extra = {"weights": "w.pth"} if item.name == "freeze_backbone" else {}
        for value in action.choices or [probe[kind]]:
            cfg = make_config(task, data="DIR", out="RUN", **{item.name: value}, **extra)
            check_task_settings(cfg, task)


def test_lr_find_and_cv_refuse_the_settings_they_have_no_use_for(
    capsys: pytest.CaptureFixture,
) -> None:
    """`lr-find --epochs 3` once reached the model builder ("resnet18 does not take
    --epochs"); now the command says it has no use for it, and why."""
    refused = {
        "lr-find": ("--epochs", "--lr", "--warmup-epochs", "--lr-interval", "--patience"),
        "cv": ("--split-file", "--multi-label"),
    }
    refused["lr-find"] += ("--min-delta", "--ema", "--compile", "--split-file")
    for command, flags in refused.items():
        parser = command_parser([command])
        declared = {
            f for a in parser._actions if isinstance(a, RefusedFlag) for f in a.option_strings
        }
        assert set(flags) <= declared and not set(flags) & listed_flags(parser)
        for flag in flags:
            err = refusal(capsys, command, "DIR", flag, "3")
            assert err.startswith(f"error: argument {flag}: `cnnlab {command}` has no use for it (")
    assert "--steps optimizer steps" in refusal(capsys, "lr-find", "DIR", "--epochs", "3")


def test_a_model_flag_error_names_the_command_and_tells_a_setting_from_a_model_flag(
    capsys: pytest.CaptureFixture,
) -> None:
    unknown = run_cli_here(capsys, "summary", "resnet18", "--bogus", "1")
    assert unknown.returncode == 2
    assert unknown.stderr == (
        "error: cnnlab summary: resnet18 does not take --bogus (it takes: --zero-init-residual)\n"
    )
    setting = run_cli_here(capsys, "summary", "resnet18", "--epochs", "3")
    assert setting.returncode == 2
    assert setting.stderr.startswith("error: cnnlab summary has no use for --epochs: a training")
    assert "resnet18 does not take" not in setting.stderr
    stray = run_cli_here(capsys, "lr-find", "DIR", "--bogus", "1")
    assert stray.stderr.startswith("error: cnnlab lr-find: resnet18 does not take --bogus")


def test_lr_find_sweeps_a_segmentation_model_with_its_tasks_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """lr-find takes any task's model: its config is that task's (no test split, which a
    segmentation run refuses), not classification's."""
    import cnnlab.lr_find

    seen = []

    def capture(cfg: TrainConfig, **_: object) -> None:
        seen.append(cfg)
        raise CnnlabError("captured")

    monkeypatch.setattr(cnnlab.lr_find, "lr_find", capture)
    (tmp_path / "data").mkdir()
    args = ["lr-find", str(tmp_path / "data"), "--model", "fcn8s", "--out", str(tmp_path)]
    assert run_cli_here(capsys, *args).stderr == "error: captured\n"
    assert seen[0].test_split == 0.0 and seen[0].model_args == {"backbone": "resnet18"}


def test_a_resumed_run_refuses_the_settings_it_would_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`train --resume RUN --epochs 20` continued with the saved epochs and said nothing;
    the flags a resumed run reads (where it runs) stay taken."""
    train = run_cli_here(capsys, "segment", "train", "--resume", tmp_path, "--epochs", "20")
    assert train.returncode == 2
    assert train.stderr == (
        "error: --resume RUN continues with its saved settings; --epochs would change nothing"
        " (it takes --device, --threads, --workers, --compile, --quiet)\n"
    )
    kept = run_cli_here(capsys, "train", "--resume", tmp_path, "--threads", "1", "--quiet")
    assert kept.returncode == 2 and "would change nothing" not in kept.stderr  # no run there
    cv = run_cli_here(capsys, "cv", "--resume", tmp_path, "--lr", "0.1", "--no-flip", "--folds", 3)
    assert cv.stderr == (
        "error: cv --resume OUT continues with its saved settings; --lr --flip --folds would"
        " change nothing\n"
    )
