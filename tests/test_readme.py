"""Every Python snippet in README.md runs, from a folder holding what `make demo` leaves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnnlab

README = Path(__file__).parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/digits16 and a (short) runs/demo, as `make demo` writes them."""
    root = tmp_path_factory.mktemp("readme")
    from cnnlab.data.digits import write_digits

    write_digits(root / "runs" / "digits16", size=16)
    cnnlab.train(
        root / "runs" / "digits16",
        root / "runs" / "demo",
        model="convnet",
        model_args={"cdims": [8, 16], "hdims": [32]},
        img_size=16,
        epochs=1,
        flip=False,
        test_split=0.2,
        quiet=True,
    )
    return root


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(demo_folder: Path, tmp_path: Path, index: int) -> None:
    work = tmp_path / "cwd"
    shutil.copytree(demo_folder, work)
    done = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "a README snippet should show its result"
