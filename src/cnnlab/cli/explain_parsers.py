"""The parsers of the commands that show where a run looks (``heatmap``, ``explain``,
``features``; their handlers: ``cnnlab.cli.explain_commands``)."""

from __future__ import annotations

from cnnlab.attribution import METHODS
from cnnlab.cli.explain_commands import cmd_explain, cmd_features, cmd_heatmap
from cnnlab.cli.flags import Group, add_command, add_device, add_format, add_overwrite, positive


def add_heatmap_command(commands: Group) -> None:
    """``heatmap``: a classification run's class maps."""
    sub = add_command(
        commands, "heatmap", cmd_heatmap, "where a classification run sees each class"
    )
    sub.add_argument("run", help="a classification run folder")
    sub.add_argument("image", help="an image, best larger than the training size")
    sub.add_argument("--class", dest="class_name", help="class to map (default: highest peak)")
    sub.add_argument("--out", help="write the map over the image to this PNG")
    add_overwrite(sub, "an existing --out PNG")
    add_device(sub)
    add_format(sub)


def add_explain_command(commands: Group) -> None:
    """``explain``: attribution maps and their audit."""
    sub = add_command(
        commands,
        "explain",
        cmd_explain,
        "where a run's evidence lies in each image (Grad-CAM and other maps), and --audit:"
        " the sanity checks of those maps",
    )
    sub.add_argument(
        "run", help="a classification, segmentation or detection run folder (one map per box)"
    )
    sub.add_argument("paths", nargs="*", metavar="IMAGE", help="image files")
    sub.add_argument(
        "--method",
        choices=METHODS,
        help="the map (default: gradcam; --audit: every method)",
    )
    sub.add_argument(
        "--class",
        dest="class_name",
        help="class to explain (default: predicted; detection: only its boxes)",
    )
    sub.add_argument(
        "--layer", help="layer as `cnnlab summary` names it (default: the last conv stage)"
    )
    sub.add_argument("--out", metavar="DIR", help="draw each map to DIR/IMAGE_METHOD.png")
    sub.add_argument(
        "--score-threshold",
        type=float,
        help="detection: map the boxes scoring at least this (default: predict's, 0.25)",
    )
    sub.add_argument(
        "--audit", action="store_true", help="randomisation and deletion/insertion checks"
    )
    sub.add_argument(
        "--images", type=positive, default=8, help="--audit without IMAGE: the run's first N"
    )
    add_device(sub)
    add_format(sub)


def add_features_command(commands: Group) -> None:
    """``features``: a layer's activations, or the first kernels."""
    sub = add_command(
        commands,
        "features",
        cmd_features,
        "a layer's activation maps for an image, or (--filters) the first convolution's kernels",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument("image", nargs="?", help="an image (not needed with --filters)")
    sub.add_argument(
        "--layer", help="layer as `cnnlab summary` names it (default: the last conv stage)"
    )
    sub.add_argument("--top", type=positive, default=16, help="the K most active channels")
    sub.add_argument("--filters", action="store_true", help="draw the first conv's kernels")
    sub.add_argument("--out", metavar="FILE", help="the PNG (default: features.png/filters.png)")
    add_device(sub)
    add_format(sub)
