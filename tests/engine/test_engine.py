"""The training loop: a real short training, the run folder, best/early stopping, Ctrl-C,
and a SIGKILLed run that resumes to exactly the metrics of an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cnnlab import checkpoint, create_model, files, load_run
from cnnlab.config import TrainConfig
from cnnlab.data.classify import Splits
from cnnlab.data.transforms import default_stats
from cnnlab.device import pick_device
from cnnlab.engine.optim import warmup_cosine
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.tasks.classify import ClassifyTask, evaluate
from cnnlab.training import resume, train
from tests.conftest import read_metrics, tiny_config

# metrics.csv's header, a run-folder contract (runs written before keep it).
METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "seconds",
)

CLASSES = ("blob", "left", "top")
PER_CLASS = 100
SIZE = 16
BAD_FILE = "left/zz_broken.png"


def _draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 grey image whose bright region tells the class, under noise."""
    image = rng.normal(60, 25, (SIZE, SIZE))
    jitter = rng.integers(-2, 3)
    if label == 0:
        image[5 + jitter : 11 + jitter, 5:11] += 140
    elif label == 1:
        image[:, : 8 + jitter] += 140
    else:
        image[: 8 + jitter, :] += 140
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(_draw(label, rng)).save(root / name / f"{i:03d}.png")
    # One unreadable file: training and evaluation must skip it, not crash.
    (root / BAD_FILE).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


# What this file's runs change in the shared tiny configuration.
SETTINGS = {
    "model_args": {"cdims": [8, 16], "hdims": [64], "dropout": 0.1},
    "img_size": SIZE,
    "epochs": 3,
    "batch_size": 16,
    "warmup_epochs": 1,
    "augment": "none",
    "val_split": 0.2,
    "test_split": 0.2,
}


def _config(data_dir: Path, out: Path, **changes: object) -> TrainConfig:
    return tiny_config(data_dir, out, **{**SETTINGS, **changes})


@pytest.fixture(scope="module")
def run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "run"
    return out, train(_config(data_dir, out))


# ---------------------------------------------------------------------------- a real run


def test_short_training_learns(run: tuple[Path, dict]) -> None:
    _, report = run
    assert report["split"] == "test"
    assert report["top1"] >= 0.9  # chance is 1/3
    assert report["top5"] == 1.0  # top-min(5, 3) always holds the true class
    # The broken file is skipped wherever the split put it.
    split = json.loads((run[0] / "split.json").read_text())
    assert report["n"] == len(split["test"]) - sum(p == BAD_FILE for p, _ in split["test"])


def test_run_folder_contents(run: tuple[Path, dict]) -> None:
    out, _ = run
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.yaml",
        "split.json",
        "metrics.csv",
        "best.safetensors",
        "initial.safetensors",  # the first conv's starting weights (cnnlab features --filters)
        "model.json",
        "last.pt",
        "report.json",
        "curves.png",
        "confusion.png",
        "errors.png",
        "batch.png",
    }
    for png in ("curves.png", "confusion.png", "errors.png", "batch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_yaml_rebuilds_the_resolved_config(run: tuple[Path, dict], data_dir: Path) -> None:
    out, _ = run
    saved = files.read_yaml(out / "config.yaml")
    assert list(saved) == list(asdict(_config(data_dir, out)))  # field order kept
    cfg = TrainConfig.from_dict(saved)
    assert cfg.in_channels == 1  # detected from the grayscale PNGs
    assert cfg.weight_decay == 0.05  # adamw's default, written out
    # What the unset device, threads and workers became, recorded beside the user's None.
    assert cfg.resolved["device"] == "cpu" and cfg.threads is None
    assert cfg.resolved["threads"] >= 1 and cfg.resolved["workers"] >= 0
    assert cfg == replace(
        _config(data_dir, out), in_channels=1, weight_decay=0.05, resolved=cfg.resolved
    )


def test_split_json_and_metrics_csv(run: tuple[Path, dict], data_dir: Path) -> None:
    out, _ = run
    splits = Splits.from_json(out / "split.json")
    assert splits.classes == list(CLASSES)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 3 * PER_CLASS + 1
    rows = read_metrics(out)
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(METRICS_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert 0 <= float(row["val_top1"]) <= float(row["val_top5"]) <= 1
        assert float(row["lr"]) > 0 and float(row["train_loss"]) > 0


def test_model_json_rebuilds_the_model_and_best_weights(run: tuple[Path, dict]) -> None:
    out, report = run
    meta = checkpoint.read_model_json(out)
    assert meta.task == "classify" and meta.architecture == "convnet"
    assert meta.classes == list(CLASSES)
    assert meta.input_size == [1, SIZE, SIZE]
    assert meta.mean == [0.5] and meta.std == [0.5]
    assert meta.model_args == {
        "num_classes": 3,
        "in_channels": 1,
        "img_size": SIZE,
        "cdims": [8, 16],
        "hdims": [64],
        "dropout": 0.1,
    }
    model = create_model(meta.architecture, **meta.model_args)
    checkpoint.load_weights(out / "best.safetensors", model)
    # Best = highest val top-1, ties to the lower val loss; report.json names that epoch.
    rows = read_metrics(out)
    best = max(rows, key=lambda r: (float(r["val_top1"]), -float(r["val_loss"])))
    assert report["best_epoch"] == int(best["epoch"])
    stored = checkpoint.read_weights_metadata(out / "best.safetensors")
    assert stored["epoch"] == best["epoch"]


def test_report_json(run: tuple[Path, dict]) -> None:
    out, report = run
    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    assert set(saved) == {
        "split", "best_epoch", "top1", "top5", "loss", "n", "per_class", "most_confused"
    }  # fmt: skip
    assert set(saved["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in saved["per_class"].values()) == saved["n"]
    for stats in saved["per_class"].values():
        assert set(stats) == {"precision", "recall", "f1", "support"}


def test_last_pt_loads_with_weights_only(run: tuple[Path, dict]) -> None:
    out, _ = run
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 3
    assert set(state) >= {"model", "optimizer", "scheduler", "best", "rng"}
    assert state["scheduler"]["last_epoch"] > 0
    assert state["epochs_without_improvement"] == 3 - state["best"]["epoch"]


def test_refuses_to_overwrite_a_run(run: tuple[Path, dict], data_dir: Path) -> None:
    out, _ = run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CnnlabError, match="already holds a run; use --resume or another --out"):
        train(_config(data_dir, out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_class_count_mismatch_names_the_weight_file(run: tuple[Path, dict]) -> None:
    out, _ = run
    args = {**checkpoint.read_model_json(out).model_args, "num_classes": 5}
    with pytest.raises(CnnlabError, match=rf"{out / 'best.safetensors'}: .*3 classes"):
        checkpoint.load_weights(out / "best.safetensors", create_model("convnet", **args))


def test_googlenet_trains_with_its_auxiliary_classifiers(data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("googlenet", num_classes=3, aux_logits=True).train()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    task = ClassifyTask(list(CLASSES), 3, 32, *default_stats(3))
    torch.manual_seed(1)  # the same dropout masks for both forward passes
    loss, (right, scored) = task.forward_loss(model, images, targets)
    torch.manual_seed(1)
    main, aux2, aux1 = model(images)
    expected = F.cross_entropy(main, targets) + 0.3 * (
        F.cross_entropy(aux2, targets) + F.cross_entropy(aux1, targets)
    )
    assert torch.allclose(loss, expected)
    # Only the main logits are scored.
    assert scored == 4 and right == (main.argmax(dim=1) == targets).sum()

    out = tmp_path / "run"
    model_args = {"aux_logits": True}
    report = train(_config(data_dir, out, model="googlenet", model_args=model_args, epochs=1))
    assert report["n"] > 0 and 0.0 <= report["top1"] <= 1.0
    assert load_run(out).model.aux1 is not None  # the run rebuilds with its aux heads


# ---------------------------------------------------------------------------- rules


def test_best_tie_rule() -> None:
    best = ClassifyTask.metrics.rank({"top1": 0.9, "loss": 0.30})

    def better(val: dict) -> bool:  # the loop's rule: a strictly higher rank
        return ClassifyTask.metrics.rank(val) > best

    assert better({"top1": 0.91, "loss": 0.90})
    assert not better({"top1": 0.89, "loss": 0.01})
    assert better({"top1": 0.9, "loss": 0.29})  # tie: lower loss wins
    assert not better({"top1": 0.9, "loss": 0.30})  # a full tie keeps the older
    assert not better({"top1": 0.9, "loss": 0.31})


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(step, warmup=3, total=13) for step in range(13)]
    assert factors[:3] == [0.25, 0.5, 0.75]  # linear, never 0
    assert factors[3] == 1.0
    assert factors[8] == pytest.approx(0.5)  # half way through the cosine
    assert all(a > b for a, b in itertools.pairwise(factors[3:]))
    assert warmup_cosine(13, warmup=3, total=13) == pytest.approx(0.0)
    assert warmup_cosine(0, warmup=0, total=1) == 1.0


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(CnnlabError, match="unknown config key 'epoch'"):
        TrainConfig.from_dict({"data": "d", "out": "o", "epoch": 3})
    with pytest.raises(CnnlabError, match="config key 'epochs'"):
        TrainConfig.from_dict({"data": "d", "out": "o", "epochs": "3"})
    with pytest.raises(CnnlabError, match="optimizer must be one of adam, adamw, sgd"):
        TrainConfig(data="d", out="o", optimizer="rmsprop")
    with pytest.raises(CnnlabError, match="balance must be one of"):
        TrainConfig(data="d", out="o", balance="oversample")
    cfg = TrainConfig.from_dict({"data": "d", "out": "o", "lr": 1, "model_args": {"c": (1, 2)}})
    assert cfg.lr == 1 and cfg.model_args == {"c": [1, 2]}


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CnnlabError, match=r"choose auto \| cpu"):
        pick_device("tpu")
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
    else:
        with pytest.raises(CnnlabError, match="CUDA is not available"):
            pick_device("cuda")


def test_too_small_images_fail_before_training(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(
        CnnlabError, match=r"alexnet needs images of at least 63x63; img_size is 32"
    ):
        train(_config(data_dir, out, model="alexnet", model_args={}, img_size=32))
    with pytest.raises(CnnlabError, match="too small for 5 max-pools"):
        train(_config(data_dir, out, model_args={"cdims": [4, 4, 4, 4, 4]}))
    assert not checkpoint.is_run_dir(out)


# ---------------------------------------------------------------------------- evaluate


class _Logits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the "images" are the logits themselves


def test_evaluate_against_hand_computed_metrics() -> None:
    # Rows are log-probabilities, so each sample's cross-entropy is -log p(true class).
    probs = torch.tensor(
        [
            [0.70, 0.10, 0.05, 0.05, 0.05, 0.05],  # true 0: right
            [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # true 1: right
            [0.50, 0.20, 0.04, 0.20, 0.05, 0.01],  # true 2: wrong (0), rank 5 -> in top-5
            [0.30, 0.40, 0.10, 0.10, 0.09, 0.01],  # true 5: wrong (1), rank 6 -> not in top-5
        ]
    )
    targets = torch.tensor([0, 1, 2, 5])
    loader = DataLoader(TensorDataset(probs.log(), targets), batch_size=3)
    classes = list("abcdef")
    result = evaluate(_Logits(), loader, torch.device("cpu"), classes, worst=2)
    assert result["n"] == 4
    assert result["top1"] == pytest.approx(2 / 4)
    assert result["top5"] == pytest.approx(3 / 4)
    expected_loss = -(math.log(0.70) + math.log(0.60) + math.log(0.04) + math.log(0.01)) / 4
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    # Predictions 0, 1, 0, 1: a gets 2 predictions (1 right), b gets 2 (1 right).
    per_class = result["per_class"]
    assert per_class["a"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert per_class["b"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per_class["e"]["support"] == 0
    confusion = result["_confusion"]
    assert confusion[2, 0] == 1 and confusion[5, 1] == 1 and confusion.sum() == 4
    # The two highest-loss samples, worst first: true 5 (p=0.01), then true 2 (p=0.04).
    assert result["_worst"]["targets"].tolist() == [5, 2]
    assert result["_worst"]["preds"].tolist() == [1, 0]
    assert result["_worst"]["images"].shape == (2, 6)


# ---------------------------------------------------------------------------- stopping


def _scripted_val(monkeypatch: pytest.MonkeyPatch, script: list[tuple[float, float]]) -> None:
    """Replace the validation numbers (top1, loss) epoch by epoch; the final test is real."""
    real = ClassifyTask.evaluate
    scripted = iter(script)

    def fake(self, model, loader, device, autocast_dtype=None, worst=0):
        result = real(self, model, loader, device, autocast_dtype, worst)
        if not worst:
            result["top1"], result["loss"] = next(scripted)
        return result

    monkeypatch.setattr(ClassifyTask, "evaluate", fake)


def test_early_stopping_with_patience_and_ties(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = [(0.5, 1.0), (0.6, 0.9), (0.6, 0.8), (0.6, 0.85), (0.55, 0.7), (0.9, 0.1)]
    _scripted_val(monkeypatch, script)
    out = tmp_path / "run"
    report = train(
        _config(data_dir, out, epochs=8, patience=2, lr_interval="epoch", balance="weights")
    )
    # Epoch 3 ties epoch 2 on top-1 with a lower loss, so it is the best; 4 and 5 are not
    # better, so patience 2 stops the run before epoch 6.
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    # An epoch-wise schedule: each row's lr is the one its whole epoch used.
    factors = [warmup_cosine(epoch, warmup=1, total=8) for epoch in range(5)]
    assert [float(r["lr"]) for r in rows] == pytest.approx([3e-3 * f for f in factors])
    assert report["best_epoch"] == 3
    assert checkpoint.read_weights_metadata(out / "best.safetensors")["epoch"] == "3"
    state = checkpoint.load_state(out / "last.pt")
    assert state["epochs_without_improvement"] == 2
    assert state["best"] == {"rank": [0.6, -0.8], "epoch": 3}
    # Why and when it stopped is kept with the figures.
    assert report["early_stop"]["epoch"] == 5
    assert "for 2 epochs (patience 2; best weights: epoch 3)" in report["early_stop"]["reason"]
    assert json.loads((out / "report.json").read_text())["early_stop"] == report["early_stop"]


def test_min_delta_counts_only_larger_gains_yet_keeps_the_best_weights(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Epochs 2 and 3 beat the best by less than 0.05: patience runs out, yet epoch 3's
    # weights are the best kept.
    _scripted_val(monkeypatch, [(0.5, 1.0), (0.52, 0.9), (0.54, 0.8), (0.9, 0.1)])
    out = tmp_path / "run"
    report = train(_config(data_dir, out, epochs=4, patience=2, min_delta=0.05))
    assert [r["epoch"] for r in read_metrics(out)] == ["1", "2", "3"]
    assert report["best_epoch"] == 3
    assert report["early_stop"]["min_delta"] == 0.05
    assert "did not improve by more than 0.05 for 2 epochs" in report["early_stop"]["reason"]
    saved = files.read_yaml(out / "config.yaml")
    assert (saved["patience"], saved["min_delta"]) == (2, 0.05)


def test_ctrl_c_reports_on_best_then_resume_finishes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = ClassifyTask.loss
    validated = []
    real_evaluate = ClassifyTask.evaluate

    def evaluate_and_count(self, *args, **kwargs):
        validated.append(1)
        return real_evaluate(self, *args, **kwargs)

    def loss_until_ctrl_c(self, outputs, targets):
        if validated:  # a step of epoch 2
            raise KeyboardInterrupt
        return real_loss(self, outputs, targets)

    monkeypatch.setattr(ClassifyTask, "evaluate", evaluate_and_count)
    monkeypatch.setattr(ClassifyTask, "loss", loss_until_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(data_dir, out, balance="sampler"))
    report = stopped.value.report
    assert (stopped.value.epoch, stopped.value.epochs, stopped.value.run_dir) == (1, 3, str(out))
    assert report["best_epoch"] == 1
    assert json.loads((out / "report.json").read_text()) == report
    assert len(read_metrics(out)) == 1
    assert (out / "curves.png").is_file()

    monkeypatch.undo()
    resumed = resume(out)
    assert [r["epoch"] for r in read_metrics(out)] == ["1", "2", "3"]
    assert resumed["top1"] >= 0.9


def test_ctrl_c_while_writing_an_epoch_keeps_its_files_consistent(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save_state = checkpoint.save_state

    def ctrl_c_during_epoch_2(path: Path, state: dict) -> None:
        if state["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives before last.pt is written
        real_save_state(path, state)

    monkeypatch.setattr(checkpoint, "save_state", ctrl_c_during_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_config(data_dir, out))
    # Held until the epoch's files were all written, then training stopped.
    assert checkpoint.load_state(out / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(out)] == ["1", "2"]
    assert (out / "report.json").is_file()


def test_ctrl_c_in_the_first_epoch_says_how_to_go_on(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self, outputs, targets):
        raise KeyboardInterrupt

    monkeypatch.setattr(ClassifyTask, "loss", interrupted)
    with pytest.raises(CnnlabError, match="interrupted before the first epoch finished"):
        train(_config(data_dir, tmp_path / "run"))


# ---------------------------------------------------------------------------- SIGKILL


def test_sigkilled_run_resumes_to_identical_metrics(data_dir: Path, tmp_path: Path) -> None:
    epochs = 4
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    cfg = _config(data_dir, killed, epochs=epochs, augment="light", batch_size=8)
    script = textwrap.dedent(
        f"""
        import torch
        from cnnlab.config import TrainConfig
        from cnnlab.training import train
        torch.set_num_threads({torch.get_num_threads()})
        train(TrainConfig(**{asdict(cfg)!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        metrics = killed / "metrics.csv"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(read_metrics(killed)) >= 2):
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "training too slow to reach epoch 3"
            time.sleep(0.01)
        # Kill a third of the way into epoch 3 (an epoch takes about as long as epoch 2).
        time.sleep(float(read_metrics(killed)[1]["seconds"]) / 3)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoint.load_state(killed / "last.pt")["epoch"] == 2  # killed inside epoch 3
    assert not (killed / "report.json").exists()

    resume(killed)
    train(replace(cfg, out=str(straight)))
    assert len(read_metrics(killed)) == epochs
    assert read_metrics(killed, timed=False) == read_metrics(straight, timed=False)
    assert json.loads((killed / "report.json").read_text()) == json.loads(
        (straight / "report.json").read_text()
    )


def test_epoch_rows_fit_80_columns_and_messages_wrap_at_words(capsys, monkeypatch) -> None:
    from cnnlab.engine.progress import Reporter, unwrapped, wrapped
    from cnnlab.tasks.classify import ClassifyTask
    from cnnlab.tasks.segment import SegmentTask

    monkeypatch.delenv("COLUMNS", raising=False)
    for spec in (ClassifyTask.metrics, SegmentTask.metrics):
        say = Reporter(quiet=False, score_label=None)
        row = {"train_loss": 24.6, **{c: 1.0 for c in spec.columns if c != "train_loss"}}
        for epoch in (1, 100):
            say.epoch([("epoch", f"{epoch}/100"), *spec.epoch_cells(row), ("lr", "2.5e-4"),
                       ("img/s", "12345")])  # fmt: skip
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 3 and lines[0].split()[:3] == ["epoch", "train", "loss"]
        assert max(map(len, lines)) <= 80 and lines[2].startswith("100/100 ")
    text = "a_long_word " * 20 + "/a/very/long/run/folder/path/that/must/stay/whole/at/any/width"
    out = wrapped(text, 40)
    assert all(len(line) <= 40 or "/" in line for line in out.splitlines())
    assert "/a/very/long/run/folder/path/that/must/stay/whole/at/any/width" in out
    assert unwrapped(out) == text


def test_a_hint_when_validation_stays_far_below_training(tmp_path) -> None:
    from cnnlab.engine.messages import overfitting_hint
    from cnnlab.tasks.classify import ClassifyTask

    spec = ClassifyTask.metrics
    cfg = tiny_config(tmp_path, tmp_path / "run", batch_size=64, epochs=5)
    apart = [{"train_top1": 0.99, "val_top1": 0.23}]
    hint = overfitting_hint(spec, apart, cfg, 389)
    assert "val top1 23.0% is far below train top1 99.0%" in hint
    assert "7 steps an epoch" in hint and "--weights torchvision" in hint and "--lr" in hint
    assert overfitting_hint(spec, [{"train_top1": 0.9, "val_top1": 0.8}], cfg, 389) == ""
