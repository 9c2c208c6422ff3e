"""What `cnnlab data clean` tells the user, and the folder it makes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.cli import main


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_clean_counts_each_reason_and_makes_an_ordinary_folder(tmp_path: Path, capsys) -> None:
    src = tmp_path / "photos"
    for i in range(4):
        picture(src / "n02085620-cat" / f"{i}.png", i)
        picture(src / "dog" / f"{i}.png", 10 + i)
    picture(src / "cat_copy" / "x.png", 99)  # a class of its own, copied into dog too
    picture(src / "dog" / "x.png", 99)
    picture(src / "dog" / "0 (copy).png", 10)  # the same picture twice in one class
    (src / "dog" / "broken.png").write_bytes(b"not a picture")
    assert main(["data", "clean", str(src), str(tmp_path / "clean")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].endswith("clean: 8 files copied")
    left = lines[1].removeprefix("4 files left out: ").split(", ")
    assert sorted(left) == ["1 duplicate", "1 unreadable", "2 duplicate across classes"]
    assert lines[2].endswith("clean_report.json")
    mode = stat.S_IMODE((tmp_path / "clean").stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's private 0700
