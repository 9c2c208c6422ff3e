"""Which files a predict command reads: named files and folders, each file once."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cnnlab.data.listing import list_images


def test_a_file_named_and_inside_a_named_folder_is_listed_once(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    files, errors = list_images([tmp_path / "b.png", tmp_path, tmp_path / "missing.png"])
    assert files == [tmp_path / "b.png", tmp_path / "a.png"] and len(errors) == 1
    # The same file by another spelling of its path is the same file.
    again, _ = list_images([tmp_path / "a.png", tmp_path / "." / "a.png"])
    assert again == [tmp_path / "a.png"]
