"""The CPU rule (cnnlab.device): threads and workers from the free cores, overrides, the
setup line, and --threads / --workers on the command line and through --resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.config import TrainConfig
from cnnlab.device import (
    choose_threads,
    choose_workers,
    cpu_plan,
    free_cores,
    threads_for,
)
from cnnlab.errors import CnnlabError


@pytest.fixture
def no_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_free_cores_subtracts_the_load_and_keeps_one() -> None:
    assert free_cores(2, 0.0) == 2
    assert free_cores(2, 0.8) == 1  # 1.2 free rounds to 1
    assert free_cores(2, 0.3) == 2
    assert free_cores(2, 5.7) == 1  # never 0
    assert free_cores(16, -1.0) == 16  # never more than the cores
    assert free_cores() >= 1


def test_threads_and_workers_follow_the_free_cores() -> None:
    assert choose_threads(2) == 2
    assert choose_threads(1) == 1
    assert choose_threads(8, processes=2) == 4
    assert choose_threads(1, processes=4) == 1
    assert choose_workers(2, "cpu", threads=2) == 0  # scarce: load in the training process
    assert choose_workers(16, "cpu", threads=8) == 4
    assert choose_workers(8, "cuda") == 4
    assert choose_workers(1, "cuda") == 0


def test_plan_on_a_busy_machine_says_what_and_why(no_omp: None) -> None:
    plan = cpu_plan(total=2, load=0.8)
    assert (plan.threads, plan.workers) == (1, 0)
    assert plan.describe() == "1 thread, 0 workers (2 cores, 0.8 busy)"
    idle = cpu_plan(total=2, load=0.0)
    assert idle.describe() == "2 threads, 0 workers (2 cores, 0.0 busy)"


def test_given_values_and_omp_num_threads_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = cpu_plan(threads=3, workers=0, total=2, load=4.0)
    assert (plan.threads, plan.workers) == (3, 0)
    assert plan.reason.startswith("--threads 3, --workers 0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_plan(total=8, load=0.0).threads == 1
    assert "OMP_NUM_THREADS=1" in cpu_plan(total=8, load=0.0).reason


def test_threads_for_restores_the_callers_count() -> None:
    before = torch.get_num_threads()
    with threads_for(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_config_fields_default_to_the_rule_and_are_checked() -> None:
    cfg = TrainConfig(data="d", out="o")
    assert (cfg.threads, cfg.workers) == (None, None)
    assert TrainConfig(data="d", out="o", workers=0).workers == 0
    with pytest.raises(CnnlabError, match="threads"):
        TrainConfig(data="d", out="o", threads=0)
    with pytest.raises(CnnlabError, match="workers"):
        TrainConfig(data="d", out="o", workers=-1)


def test_flags_come_from_the_fields_and_workers_0_survives_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnlab.checkpoint
    import cnnlab.training

    seen: dict = {}

    class Meta:
        task = "classify"

    def fake_resume(run_dir, task=None, **overrides):
        seen.update(overrides)
        raise CnnlabError("stopped here")

    monkeypatch.setattr(cnnlab.checkpoint, "read_model_json", lambda path: Meta())
    monkeypatch.setattr(cnnlab.training, "resume", fake_resume)
    status = main(["train", "--resume", str(tmp_path), "--workers", "0", "--threads", "1"])
    assert status == 2
    assert seen["workers"] == 0 and seen["threads"] == 1

    def fake_train(cfg, task=None):
        seen["cfg"] = cfg
        raise CnnlabError("stopped here")

    monkeypatch.setattr(cnnlab.training, "train", fake_train)
    main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--workers", "0"])
    assert (seen["cfg"].workers, seen["cfg"].threads) == (0, None)
