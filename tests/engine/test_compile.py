"""``--compile auto|on|off``: torch.compile never turns a working run into a failing one, a
compiled training step leaves what a run computes and saves as it was, and the engine runs
only batches of the compiled shape through the compiled model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cnnlab import checkpoint
from cnnlab.compiling import CompiledOnFirstCall, compile_model
from cnnlab.config import TrainConfig
from cnnlab.engine.step import Step, compile_step
from cnnlab.errors import CnnlabError
from cnnlab.runs import load_run
from cnnlab.tasks.classify import ClassifyTask
from tests.conftest import train_tiny_classifier

FELL_BACK = "compile: fell back to eager: "


def cnnlab_without_compiler(tmp_path: Path, *args: object) -> subprocess.CompletedProcess:
    """``cnnlab ARGS`` on a machine without a C++ compiler, as inductor sees it: CXX names
    one that does not exist, and a fresh inductor cache holds no kernel built before."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_compile_on_without_a_compiler_trains_eagerly(tmp_path: Path, few_digits: Path) -> None:
    run = tmp_path / "run"
    trained = cnnlab_without_compiler(
        tmp_path,
        *("train", few_digits, "--out", run, "--model", "convnet", "--cdims", "4"),
        *("--hdims", "8", "--img-size", "16", "--epochs", "1", "--batch-size", "32"),
        *("--compile", "on", "--quiet", "--format", "json"),
    )
    assert trained.returncode == 0, trained.stderr
    fell_back = [line for line in trained.stderr.splitlines() if line.startswith(FELL_BACK)]
    assert len(fell_back) == 1, trained.stderr
    assert "Traceback" not in trained.stderr
    assert "compiler" in fell_back[0].lower()  # the reason names what was missing
    assert (run / "report.json").is_file()


def test_compile_setting_is_checked() -> None:
    with pytest.raises(CnnlabError, match="compile must be one of auto, on, off"):
        TrainConfig(data="d", out="o", compile="always")


class Counting(nn.Module):
    """Stands in for a compiled model: the module it wraps, counting its calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(images)


def tiny_step(model: nn.Module) -> Step:
    task = ClassifyTask(["a", "b"], 1, 8, (0.5,), (0.25,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Step(model, task, optimizer, scaler, torch.device("cpu"), None, 1.0)


def test_only_batches_of_the_compiled_shape_run_compiled() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    step = tiny_step(model)
    step.compiled, step.compiled_shape = Counting(model), (4, 1, 8, 8)
    step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    step(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 0]))  # the smaller last batch
    assert step.compiled.calls == 1


def test_a_compiled_run_saves_the_models_own_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, few_digits: Path
) -> None:
    """torch.compile's module holds the model as ``_orig_mod``: the run must still save
    the model's own keys, the ones an eager run saves and ``load_run`` reads. The stand-in
    here prefixes them the same way ("module.") and counts the steps it ran."""
    wrappers: list[Counting] = []

    def stand_in(model: nn.Module, **settings: object) -> nn.Module:
        wrappers.append(Counting(model))
        return wrappers[-1]

    monkeypatch.setattr(torch, "compile", stand_in)
    run = train_tiny_classifier(few_digits, tmp_path / "run", compile="on")
    assert wrappers[0].calls > 1  # the trial, then the training steps of a full batch
    expected = set(wrappers[0].module.state_dict())
    assert set(load_file(run / "best.safetensors")) == expected
    assert set(checkpoint.load_state(run / "last.pt")["model"]) == expected
    assert set(load_run(run, fast=False).model.state_dict()) == expected
    # Prediction with --compile on: compiled on the first batch, the keys still the model's.
    loaded = load_run(run, compile="on", fast=False)
    image = sorted((few_digits / "0").iterdir())[0]
    assert loaded.predict(image)[0]["top"][0]["class"] in {"0", "1", "2"}
    assert wrappers[-1].calls == 2  # the compile's trial, then the prediction
    assert set(loaded.model.state_dict()) == expected


def test_no_compile_under_torchrun(capsys: pytest.CaptureFixture) -> None:
    step = tiny_step(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)))
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))]
    compile_step(step, "on", batches, processes=2, say=print)
    assert step.compiled is None
    assert "compile: off under torchrun" in capsys.readouterr().err


def test_auto_leaves_a_cpu_training_eager() -> None:
    step = tiny_step(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)))
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))]
    compile_step(step, "auto", batches, processes=1, say=print)
    assert step.compiled is None


def test_the_training_trial_changes_nothing_a_run_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiling for training runs an example forward and backward (inductor compiles
    both), which must leave the running statistics, the gradients and the random
    generator as they were. The model is "compiled" to itself here: what is tested is the
    trial around it, not inductor (benchmarks/compile.py compiles real ones)."""
    monkeypatch.setattr(torch, "compile", lambda model, **settings: model)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.5), nn.Flatten()
    ).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    example = torch.randn(2, 1, 5, 5)
    rng = torch.get_rng_state()
    result = compile_model(model, example, grad=True)
    assert result.compiled, result.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_model_that_fails_to_compile_predicts_eagerly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fails(model: nn.Module, **settings: object) -> nn.Module:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", fails)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()).eval()
    wrapped = CompiledOnFirstCall(model)
    images = torch.randn(3, 1, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(images), model(images))
        wrapped(images[:1])
    err = capsys.readouterr().err
    assert err == f"{FELL_BACK}RuntimeError: InvalidCxxCompiler: No working C++ compiler found\n"
    assert wrapped.state_dict().keys() == model.state_dict().keys()
