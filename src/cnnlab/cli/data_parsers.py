"""The parsers of the commands that make, check and convert data folders (``data ...``,
``detect proposals``; their handlers: ``cnnlab.cli.data_commands``)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from cnnlab.cli.data_commands import cmd_data, cmd_proposals
from cnnlab.cli.flags import Group, add_command, add_format, positive


def add_data_commands(commands: Group) -> None:
    """``data digits``, ``data check``, ``data shapes``, ``data clean``, ``data convert``."""
    data = add_command(commands, "data", None, "make, check and clean image folders")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub = add_command(
        actions, "digits", cmd_data, "write scikit-learn's 1,797 digits as PNG folders"
    )
    sub.add_argument("dst", help="the folder to create, one subfolder per digit")
    sub.add_argument("--size", type=positive, default=32, help="image side in pixels")
    sub = add_command(actions, "check", cmd_data, "counts, sizes, unreadable files and duplicates")
    sub.add_argument(
        "dir", help="class folders, train/ val/ test/ of them, or a CSV of file,label rows"
    )
    _images_flag(sub)
    add_format(sub)
    sub = add_command(actions, "shapes", cmd_data, "synthetic shapes for segmentation or detection")
    sub.add_argument("dst", help="the folder to create")
    sub.add_argument("--task", choices=("segment", "detect"), required=True, help="masks, or boxes")
    sub.add_argument("--n", type=positive, default=400, help="number of images")
    sub.add_argument("--size", type=positive, default=128, help="image side")
    sub.add_argument("--seed", type=int, default=0, help="what the images show")
    sub = add_command(
        actions, "clean", cmd_data, "copy a class-folder tree into a clean new folder"
    )
    sub.add_argument("src", help="class folders or a CSV of file,label rows (left as they are)")
    _images_flag(sub)
    sub.add_argument("dst", help="the new folder")
    sub.add_argument(
        "--strip-prefix",
        default=r"^n\d+[-_]",
        help="regex removed from class folder names (WordNet ids like n02085620-)",
    )
    add_format(sub)
    _convert_command(actions)


def _convert_command(actions: Group) -> None:
    sub = add_command(
        actions,
        "convert",
        cmd_data,
        "write a detection folder (COCO, YOLO txt or Pascal VOC) in another of the three",
    )
    sub.add_argument("src", help="a detection folder (left as it is)")
    sub.add_argument("dst", help="the new folder")
    sub.add_argument("--to", choices=("coco", "voc", "yolo"), required=True, help="DST's format")
    add_format(sub)


def _images_flag(sub: argparse.ArgumentParser) -> None:
    from cnnlab.config import TrainConfig

    help_text = next(f for f in fields(TrainConfig) if f.name == "images").metadata["help"]
    sub.add_argument("--images", metavar="DIR", help=help_text)


def add_proposals_command(group: Group) -> None:
    """``detect proposals`` (a detection task's tool: ``TaskEntry.tools``)."""
    sub = add_command(
        group,
        "proposals",
        cmd_proposals,
        "selective-search region proposals of every image, cached beside the data;"
        " prints boxes per image and their recall of the labelled boxes",
    )
    sub.add_argument("data", metavar="DIR", help="a detection data folder")
    sub.add_argument("--mode", choices=("fast", "quality"), default="fast")
    sub.add_argument("--max", type=positive, default=2000, help="boxes kept per image")
    sub.add_argument("--file", help="read a proposal file of your own instead (docs/proposals.md)")
    sub.add_argument("--workers", type=positive, default=1, help="processes computing")
    add_format(sub)
