"""Shared fixtures. Each helper adds its own below, with a name that says what it holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnlab.data.digits import write_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits as 32x32 grayscale PNGs, DIR/<digit>/NNNN.png, written once per
    session (1,797 files, about 1.5 s). Treat it as read-only: other tests share it."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, size=32)
    return root
