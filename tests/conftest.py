"""Shared fixtures. Each helper adds its own below, with a name that says what it holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cnnlab.data.digits import write_digits


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tests' layers are tiny and two pytest workers share two cores: with more than one
    thread each, OpenMP threads wait for a core and small ops run ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits as 32x32 grayscale PNGs, DIR/<digit>/NNNN.png, written once per
    session (1,797 files, about 1.5 s). Treat it as read-only: other tests share it."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, size=32)
    return root
