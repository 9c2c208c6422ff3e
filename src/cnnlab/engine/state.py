"""A run folder's state between epochs: its lock, last.pt and the files kept in step with
it, the RNGs.

``last.pt`` is written first after every epoch: it is the truth a resume starts from, and
metrics.csv and best.safetensors are rebuilt from it if the process dies before writing
them. The three are written under ``hold_ctrl_c`` so that an epoch's files are written
all or none. One process at a time owns a run folder (``cnnlab.files.run_lock``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import nn

import cnnlab.engine.distributed as distributed
from cnnlab import checkpoint
from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_text

if TYPE_CHECKING:
    from cnnlab.engine.step import Step

STATE_KEYS = {
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "best": dict,
    "epochs_without_improvement": int,
    "history": list,
    "rng": dict,
}
T = TypeVar("T")


def restore(saved: dict, source: Path, *parts: object, ema: nn.Module | None = None) -> None:
    """Load last.pt's model, optimizer, scheduler and scaler states into ``parts`` (in that
    order), the weights' moving average into ``ema`` when the run keeps one, and its RNG
    states, after checking its keys and types; a file that does not fit is one line naming
    ``source``."""
    if not isinstance(saved, dict):
        raise CnnlabError(f"{source}: not a cnnlab resume state (not a mapping)")
    for key, kind in STATE_KEYS.items():
        if not isinstance(saved.get(key), kind):
            raise CnnlabError(f"{source}: not a cnnlab resume state ({key!r} missing or wrong)")
    best = saved["best"]
    if not (isinstance(best.get("rank"), list) and isinstance(best.get("epoch"), int)):
        raise CnnlabError(f"{source}: not a cnnlab resume state ('best' has no rank and epoch)")
    try:
        for part, key in zip(parts, ("model", "optimizer", "scheduler", "scaler"), strict=True):
            part.load_state_dict(saved[key])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        set_rng_state(saved["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise CnnlabError(f"{source}: does not fit this run ({reason})") from None


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


# The caught-signal list of the hold in force (at most one: an inner hold adds nothing).
_HELD: list[list[int]] = []


@contextlib.contextmanager
def hold_ctrl_c() -> Iterator[list[int]]:
    """Delay Ctrl-C and SIGTERM until the block ends, so an epoch's files are written all
    or none; yields the signals caught so far. Inside another hold the outer one keeps
    them: the processes of a group hold them through training and stop together
    (``stop_together``). A block that raises ends with its own exception."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    if _HELD:
        yield _HELD[-1]
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in stops
    }
    _HELD.append(caught)
    try:
        yield caught
    finally:
        _HELD.pop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def stop_together(batches: Iterable[T]) -> Iterator[T]:
    """``batches``, left by every process of a group at the same batch once one of them
    caught a Ctrl-C or SIGTERM (held by ``hold_ctrl_c``): they vote at every batch.

    A process that stopped alone would leave the others waiting in a collective it never
    joins (torchrun signals them all, but each notices between its own steps, and one
    blocked in a collective notices nothing), and the collectives it then makes (the
    report's) meet the wrong ones: gloo waits its 30-minute timeout, long past torchrun's
    30 s before SIGKILL. Each process votes as it takes a batch and reads the answer
    before the next one (the vote travels while it trains), so all stop together one or
    two batches after the signal. Outside a group the signal stops at once, as ever."""
    held = _HELD[-1] if _HELD and distributed.context().active else None
    if held is None:
        yield from batches
        return
    answer = None  # each batch's vote is read before the next batch, the last one after it
    for batch in batches:
        if answer is not None and answer():
            held.clear()  # this stop answers them
            raise KeyboardInterrupt
        answer = distributed.any_across(bool(held))
        yield batch
    if answer is not None and answer():
        held.clear()
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


def save_epoch(
    run_dir: Path,
    latest: dict,
    model: nn.Module,
    step: Step,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    evaluated: nn.Module,
    columns: tuple[str, ...],
) -> None:
    """last.pt (everything resume needs) and the epoch's files, Ctrl-C held off meanwhile;
    ``latest``: epoch, best, stale (epochs without improvement) and history."""
    with hold_ctrl_c():
        checkpoint.save_state(
            run_dir / "last.pt",
            {
                "epoch": latest["epoch"],
                "model": model.state_dict(),
                "optimizer": step.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": step.scaler.state_dict(),
                "best": latest["best"],
                "epochs_without_improvement": latest["stale"],
                "stop_mark": latest["mark"],
                "history": latest["history"],
                "rng": rng_state(),
                **({"ema": step.ema.state_dict()} if step.ema is not None else {}),
            },
        )
        sync_epoch_files(run_dir, latest["history"], latest["best"], evaluated, columns)
