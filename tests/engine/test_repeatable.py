"""Runs that repeat to the bit: the same data, seed and thread count give the same
best.safetensors, whether the images are loaded in the main process or in two workers."""

from __future__ import annotations

from pathlib import Path

from cnnlab.files import sha256_of
from cnnlab.training import train
from tests.conftest import read_metrics, tiny_config


def test_same_seed_and_threads_give_the_same_weights_with_any_worker_count(
    few_digits: Path, tmp_path: Path
) -> None:
    # Everything random is on: the shuffle, crops and flips, MixUp in the collate, dropout.
    settings = {
        "augment": "light",
        "flip": True,
        "mixup": 0.2,
        "model_args": {"cdims": [4, 8], "hdims": [16], "dropout": 0.2},
        "batch_size": 32,
        "threads": 1,
        "seed": 3,
        "epochs": 1,
    }
    digests, metrics = {}, {}
    for name, workers in (("first", 0), ("again", 0), ("two_workers", 2)):
        out = tmp_path / name
        train(tiny_config(few_digits, out, workers=workers, **settings))
        digests[name] = sha256_of(out / "best.safetensors")
        metrics[name] = read_metrics(out, timed=False)
    assert digests["first"] == digests["again"] == digests["two_workers"]
    assert metrics["first"] == metrics["again"] == metrics["two_workers"]
    # A different seed trains to other weights: the test can tell runs apart.
    other = tmp_path / "other_seed"
    train(tiny_config(few_digits, other, workers=0, **{**settings, "seed": 4}))
    assert sha256_of(other / "best.safetensors") != digests["first"]
