"""Errors that reach a user as one clear line (the CLI prints them and exits with 2)."""


class CnnlabError(Exception):
    """Bad input from the user: a file, a name or a setting, explained in one line."""


class InputSizeError(CnnlabError, ValueError):
    """An input tensor smaller than (or different from) what the model accepts."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run after ``epoch`` completed epochs; ``report`` is the
    report of its best weights (already written to the run folder)."""

    def __init__(self, run_dir: str, epoch: int, epochs: int, report: dict | None) -> None:
        super().__init__(f"interrupted after epoch {epoch} of {epochs}")
        self.run_dir = run_dir
        self.epoch = epoch
        self.epochs = epochs
        self.report = report
