"""Every Python snippet in README.md and the docs/ pages runs, from a folder holding what
`make demo` leaves; the README names only files that are in the repository or that its own
commands write, and links only to pages of the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnnlab

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    (page, snippet)
    for page in PAGES
    for snippet in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
]
# What the README's commands write (make demo, the demos, the commands' --out): the files
# it names below these are made by the tour itself.
WRITTEN = ("runs/", "masks/", "drawn/", "heat5.png", ".venv/")


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


def test_the_readme_and_the_docs_have_python_snippets() -> None:
    assert sum(page == README for page, _ in SNIPPETS) >= 2
    assert any(page != README for page, _ in SNIPPETS)


@pytest.mark.parametrize(
    "index", range(len(SNIPPETS)), ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(SNIPPETS)]
)
def test_snippet_runs(demo_folder: Path, tmp_path: Path, index: int) -> None:
    work = tmp_path / "cwd"
    shutil.copytree(demo_folder, work)
    done = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index][1]],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"{SNIPPETS[index][0].name}: {done.stderr}"
    assert done.stdout.strip(), "a snippet should show its result"


def test_the_readme_names_only_files_that_exist_or_that_its_commands_write() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links, "the tour links its pictures and pages"
    for link in links:
        assert "://" not in link, f"README links outside the repository: {link}"
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", text, flags=re.S))
    commands = re.sub(r"\S+://\S+", "", commands)  # the server's own address
    named = re.findall(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]*|[\w.-]+\.(?:png|jpg|md|py))", commands)
    for name in named:
        if name.startswith(WRITTEN):
            continue
        assert (ROOT / name).exists(), f"a README command uses {name}, which is not there"
    for page in PAGES[1:]:
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            assert "://" not in link and (page.parent / link).exists(), f"{page.name}: {link}"
