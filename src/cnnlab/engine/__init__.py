"""Training: one loop (``loop.fit``) for every task, its run-folder state, progress and
processes. ``train`` and ``resume`` are the entry points."""

from cnnlab.engine.loop import resume, train

__all__ = ["resume", "train"]
