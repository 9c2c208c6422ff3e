"""What a task reports per epoch, declared as data (``MetricSpec``): the training loop
derives metrics.csv's columns, the epoch table's columns, the progress bar's running score, the
checkpoint ranking and curves.png's panels from it, so no task writes those out by hand."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One number of an epoch: its key in the task's ``evaluate`` result (or the training
    score), how the epoch line names it, and whether it is shown as a percentage."""

    key: str  # "top1"; the metrics.csv column is val_KEY (train_KEY for the training score)
    label: str  # "top1", "mIoU", "mAP@0.5"
    percent: bool = False  # 12.3% (else 0.123)

    def shown(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.percent else f"{value:.3f}"


@dataclass(frozen=True)
class MetricSpec:
    """A task's epoch figures. ``best`` ranks checkpoints by validation keys, the first
    deciding and the next breaking ties (``-loss``: lower is better); ``curves`` maps each
    panel of curves.png to its metrics.csv columns (a dict of column -> legend label, or a
    tuple of columns)."""

    val: tuple[Figure, ...]  # metrics.csv's val_KEY columns, in order
    best: tuple[str, ...]
    best_label: str  # what picks the best checkpoint, in messages ("val top-1")
    curves: dict
    in_line: tuple[str, ...]  # the validation keys the epoch line shows
    train: Figure | None = None  # a running training score (accuracy of the training batches)

    @property
    def columns(self) -> tuple[str, ...]:
        """metrics.csv's header."""
        train = (f"train_{self.train.key}",) if self.train else ()
        return ("epoch", "lr", "train_loss", *train, *(f"val_{f.key}" for f in self.val), "seconds")

    @property
    def score_label(self) -> str | None:
        """The running training score's name on the progress bar (None: the loss only)."""
        return self.train.label if self.train else None

    def rank(self, val: dict) -> tuple[float, ...]:
        """Validation results as a tuple; the best checkpoint has the highest."""
        return tuple(-val[key[1:]] if key.startswith("-") else val[key] for key in self.best)

    def row(self, train_score: float | None, val: dict) -> dict:
        """The task's metrics.csv columns of one epoch."""
        train = {f"train_{self.train.key}": train_score} if self.train else {}
        return {**train, **{f"val_{figure.key}": val[figure.key] for figure in self.val}}

    def epoch_cells(self, row: dict) -> list[tuple[str, str]]:
        """The task's columns of the epoch table (header, value), from a metrics.csv row:
        the training loss and score, then the validation keys of ``in_line``. Headers are
        short enough that the whole row, with the epoch, lr and speed, fits 80 columns."""
        cells = [("train loss", f"{row['train_loss']:.3f}")]
        if self.train is not None:
            value = self.train.shown(row[f"train_{self.train.key}"])
            cells.append((f"train {self.train.label}", value))
        shown = [f for key in self.in_line for f in self.val if f.key == key]
        cells += [(f"val {f.label}", f.shown(row[f"val_{f.key}"])) for f in shown]
        return cells
