"""The one device rule: ``auto`` means CUDA when this machine has it, else the CPU."""

from __future__ import annotations

import torch

from cnnlab.errors import CnnlabError

DEVICES = "auto | cpu | cuda | cuda:N"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CnnlabError(f"device {name!r}: CUDA is not available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CnnlabError(f"device {name!r}: not a valid CUDA device name") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CnnlabError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
        return device
    raise CnnlabError(f"device {name!r}: choose {DEVICES}")
