"""The learning-rate range test: the exponential sweep, its stop on an exploding loss, the
suggestion rule, the plot and the JSON document of ``cnnlab lr-find``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnnlab.cli import main
from cnnlab.lr_find import DIVERGE, Smoothed, smoothing_for, suggest_lr

MODEL = ["--model", "convnet", "--img-size", "16", "--cdims", "8,16", "--hdims", "32,"]


def _lr_find(digits_dir: Path, capsys: pytest.CaptureFixture, *args: str) -> dict:
    code = main(["lr-find", str(digits_dir), *MODEL, "--no-flip", "--quiet", *args])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_sweep_json_and_plot(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "plots" / "sweep.png"
    steps = 60
    found = _lr_find(
        digits_dir, capsys, "--steps", str(steps), "--batch-size", "32", "--out", str(out),
        "--format", "json",
    )  # fmt: skip
    assert set(found) == {"suggested_lr", "lrs", "losses", "stopped"}
    lrs, losses = found["lrs"], found["losses"]
    assert len(lrs) == len(losses) <= steps
    # Exponential growth from 1e-7 to 10: a constant ratio between neighbours.
    assert lrs[0] == pytest.approx(1e-7)
    ratios = np.diff(np.log(lrs))
    assert ratios == pytest.approx(np.full(len(ratios), math.log(1e8) / (steps - 1)))
    assert lrs[0] <= found["suggested_lr"] <= lrs[-1]
    # On digits the loss falls by well over a tenth before it blows up.
    assert min(losses) < 0.9 * losses[0]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["sweep.png"]


def test_stops_when_the_loss_explodes_and_defaults_to_the_current_folder(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    steps = 40
    found = _lr_find(
        digits_dir, capsys, "--steps", str(steps), "--start-lr", "1e-2", "--end-lr", "1e6",
        "--optimizer", "sgd", "--format", "json",
    )  # fmt: skip
    losses = found["losses"]
    assert len(losses) < steps
    # Why it stopped early is said, not left to guess.
    assert found["stopped"].startswith(f"stopped after step {len(losses)} of {steps}: the ")
    assert "diverged" in found["stopped"] or "the loss became nan" in found["stopped"]
    finite = [x for x in losses if math.isfinite(x)]
    assert not math.isfinite(losses[-1]) or losses[-1] > DIVERGE * min(finite)
    assert all(x <= DIVERGE * min(finite[: i + 1]) for i, x in enumerate(losses[:-1]))
    assert (tmp_path / "lr_find.png").is_file()


def test_text_output_names_the_suggestion_and_the_plot(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["lr-find", str(digits_dir), *MODEL, "--steps", "5", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("suggested lr ")
    assert str(tmp_path / "lr_find.png") in captured.out
    assert "lr-find: 5 steps" in captured.err


def test_suggestion_is_the_steepest_descent_not_the_noise() -> None:
    lrs = np.logspace(-7, 1, 100)
    x = np.log10(lrs)
    # Flat, falls fastest at 1e-3, bottoms out near 1e-1, then explodes; plus a noisy start
    # whose single-step slopes are steeper than the real descent.
    losses = 2.0 - np.tanh(x + 3) + np.where(x > -1, 8 * (x + 1) ** 2, 0.0)
    losses[:12] += np.random.default_rng(0).normal(0, 0.1, 12)
    suggested = suggest_lr(lrs.tolist(), losses.tolist())
    assert 10**-3.3 < suggested < 10**-2.7


def test_suggestion_falls_back_to_a_tenth_of_an_early_minimum() -> None:
    lrs = np.logspace(-4, 0, 50)
    losses = 1.0 + (np.log10(lrs) + 4) ** 2  # rises from the start
    assert suggest_lr(lrs.tolist(), losses.tolist()) == pytest.approx(lrs[0] / 10)


def test_bad_sweeps_are_one_line_errors(
    digits_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    base = ["lr-find", str(digits_dir), *MODEL, "--out", str(tmp_path)]
    assert main([*base, "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "need 0 < start_lr < end_lr" in capsys.readouterr().err
    assert main([*base, "--steps", "1"]) == 2
    assert "steps must be at least 2" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base[:-1], str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_short_sweep_is_not_fooled_by_its_first_batches() -> None:
    # 30 steps from 1e-7 to 10, as `--steps 30`: three lucky batches at the start (1.7 where
    # the plateau is 2.3), the real fall from 1e-4 to 1e-2 down to 1.6, then an explosion.
    # fastai's beta of 0.98 would average almost every loss so far: the fall would never
    # reach below the lucky start, whose minimum / 10 (3e-7) would be the suggestion.
    lrs = np.logspace(-7, 1, 30)
    x = np.log10(lrs)
    raw = 2.3 - 0.35 * (np.tanh(2 * (x + 3)) + 1) + np.where(x > -1.5, 8 * (x + 1.5) ** 2, 0.0)
    raw += np.random.default_rng(0).normal(0, 0.03, 30)
    raw[1:4] = 1.7
    for beta, low, high in ((smoothing_for(30), 1e-4, 1e-2), (0.98, 0, 1e-6)):
        smooth = Smoothed(beta)
        suggested = suggest_lr(lrs.tolist(), [smooth.add(loss) for loss in raw])
        assert low < suggested < high, (beta, suggested)
