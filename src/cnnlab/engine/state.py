"""A run folder's state between epochs: last.pt, the files kept in step with it, the RNGs.

``last.pt`` is written first after every epoch: it is the truth a resume starts from, and
metrics.csv and best.safetensors are rebuilt from it if the process dies before writing
them. The three are written under ``hold_ctrl_c`` so that an epoch's files are written
all or none.
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab import checkpoint
from cnnlab.files import atomic_write_text


def sync_epoch_files(
    run_dir: Path, history: list[dict], best: dict, model: nn.Module, columns: Sequence[str]
) -> None:
    """Make metrics.csv and best.safetensors agree with last.pt (already written)."""
    atomic_write_text(run_dir / "metrics.csv", metrics_csv(history, columns))
    # The model holds the best weights exactly when the best epoch is the last one.
    if best["epoch"] == history[-1]["epoch"]:
        checkpoint.save_weights(
            run_dir / "best.safetensors", model, metadata={"epoch": str(best["epoch"])}
        )


def metrics_csv(history: list[dict], columns: Sequence[str]) -> str:
    """metrics.csv's text: one row per epoch, floats as repr (they read back bit-identical)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


@contextlib.contextmanager
def hold_ctrl_c() -> Iterator[None]:
    """Delay Ctrl-C until the block ends, so an epoch's files are written all or none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state, as tensors and plain values (last.pt loads weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
