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


def save_torchvision_file(
    state: dict, folder: Path, torchvision_name: str, patch: pytest.MonkeyPatch
) -> Path:
    """Save ``state`` into the torch hub cache ``folder`` as cnnlab's stand-in for
    torchvision's weight file. torchvision's names carry the first hex digits of the real
    file's SHA-256, which cnnlab checks, so the file gets a name carrying its own and cnnlab
    is pointed at that name (nothing can be downloaded here)."""
    import hashlib

    from cnnlab import weights

    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    path = staged.rename(folder / f"{torchvision_name}-{digest[:8]}.pth")
    real = weights.torchvision_weight_urls
    patch.setattr(
        weights,
        "torchvision_weight_urls",
        lambda name: (
            [f"https://example.invalid/{path.name}"] if name == torchvision_name else real(name)
        ),
    )
    return path


@pytest.fixture
def torchvision_file(monkeypatch: pytest.MonkeyPatch):
    """``save_torchvision_file`` with this test's monkeypatch."""
    return lambda state, folder, name: save_torchvision_file(state, folder, name, monkeypatch)
