"""The data and pictures behind docs/explain.md's ResNet-18 numbers.

    python benchmarks/explain_evidence.py textures OUT [--per-class 150] [--size 64]
    python benchmarks/explain_evidence.py cascade RUN IMAGE --out cascade.png [--methods ...]
    python benchmarks/explain_evidence.py maps RUN IMAGE... --out maps.png [--methods ...]

``textures``: a real-image classification set from scikit-learn's two sample photographs
(no download): random square crops (40 to 80 px, resized to ``--size``) of six regions,
``tower`` (the pagoda's roofs and red walls), ``sky``, ``water`` and ``trees`` from
china.jpg, ``petals`` and ``leaves`` from flower.jpg, as PNG class folders in OUT/data, and
OUT/mosaic.png: a 2x2 mosaic of fresh crops (tower, sky / leaves, tower), the case of a
picture with two quadrants of one class that the window heat map once scored at 7.9%.
Crops of one region overlap, so a test split of this set flatters the model: it is a set
to explain, not to rank models on.

``cascade``: Adebayo et al.'s picture of the cascading randomisation that ``cnnlab explain
--audit`` measures: for one image, each method's map on the trained model and after each
step of the cascade (``cnnlab.explain.sanity_checks.cascade``), one row per method.

``maps``: ``cnnlab explain``'s maps of several images and methods in one small picture, one
row per image (the image as the model sees it, titled with the predicted class, then each
method's map of that class over it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# (image, class, [(x0, y0, x1, y1), ...]): regions that hold one texture each, in the
# photographs' own 640x427 pixels (looked at, not measured).
REGIONS = [
    ("china.jpg", "tower", [(100, 135, 320, 325)]),
    ("china.jpg", "sky", [(360, 0, 640, 170)]),
    ("china.jpg", "water", [(370, 235, 540, 300)]),
    ("china.jpg", "trees", [(390, 320, 640, 427), (560, 150, 640, 320)]),
    ("flower.jpg", "petals", [(200, 110, 410, 330)]),
    ("flower.jpg", "leaves", [(0, 0, 160, 300), (470, 0, 640, 300)]),
]
MOSAIC = [["tower", "sky"], ["leaves", "tower"]]


def crop(
    photo: np.ndarray, boxes: list[tuple[int, int, int, int]], size: int, rng: np.random.Generator
) -> Image.Image:
    """One random square crop (40 to 80 px, at most the region's side) resized to ``size``."""
    x0, y0, x1, y1 = boxes[rng.integers(len(boxes))]
    side = int(rng.integers(40, min(80, x1 - x0, y1 - y0) + 1))
    left = int(rng.integers(x0, x1 - side + 1))
    top = int(rng.integers(y0, y1 - side + 1))
    tile = Image.fromarray(photo[top : top + side, left : left + side])
    return tile.resize((size, size), Image.Resampling.BILINEAR)


def textures(out: Path, per_class: int, size: int, seed: int = 0) -> None:
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {Path(n).name: image for n, image in zip(sample.filenames, sample.images, strict=True)}
    rng = np.random.default_rng(seed)
    regions = {name: (photos[photo], boxes) for photo, name, boxes in REGIONS}
    for name, (photo, boxes) in regions.items():
        folder = out / "data" / name
        folder.mkdir(parents=True, exist_ok=False)
        for i in range(per_class):
            crop(photo, boxes, size, rng).save(folder / f"{name}_{i:04d}.png")
    mosaic = Image.new("RGB", (2 * size, 2 * size))
    for row, names in enumerate(MOSAIC):
        for col, name in enumerate(names):
            mosaic.paste(crop(*regions[name], size, rng), (col * size, row * size))
    mosaic.save(out / "mosaic.png")
    print(f"{len(regions)} classes x {per_class} images of {size}x{size} in {out / 'data'}")
    print(f"mosaic ({MOSAIC}): {out / 'mosaic.png'}")


def model_view(x) -> np.ndarray:
    """A preprocessed image (C, H, W) as (H, W, C) in [0, 1] for imshow."""
    shown = x.permute(1, 2, 0).numpy()
    return (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)


def show(axis, picture: np.ndarray) -> None:
    axis.imshow(picture.squeeze(), cmap="gray" if picture.shape[-1] == 1 else None)


def maps_picture(run_dir: Path, paths: list[Path], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cnnlab.attribution import maps as attribution
    from cnnlab.data.images import read_image
    from cnnlab.explain.inputs import default_layer
    from cnnlab.runs import load_run

    run = load_run(run_dir, "cpu", fast=False)
    layer = default_layer(run)
    figure, axes = plt.subplots(
        len(paths),
        len(methods) + 1,
        figsize=(1.4 * (len(methods) + 1), 1.45 * len(paths) + 0.3),
        squeeze=False,
    )
    for row, path in enumerate(paths):
        x = run.task.preprocess(read_image(path, run.task.in_channels))[None]
        with torch.no_grad():
            probabilities = run.model(x).softmax(dim=1)[0]
        index = int(probabilities.argmax())
        picture = model_view(x[0])
        show(axes[row][0], picture)
        axes[row][0].set_title(f"{run.classes[index]} {probabilities[index]:.0%}", fontsize=7)
        for col, method in enumerate(methods, 1):
            heat = attribution.attribute(
                run.model, x, attribution.class_score(index), method, layer
            )
            show(axes[row][col], picture)
            axes[row][col].imshow(heat[0].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if row == 0:
                axes[row][col].set_title(method, fontsize=7)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"{run_dir.name}: maps of the predicted class (CAMs at {layer})", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    print(f"wrote {out}: {len(paths)} images x {len(methods)} methods")


def cascade_picture(run_dir: Path, image_path: Path, methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cnnlab.attribution import maps as attribution
    from cnnlab.data.images import read_image
    from cnnlab.explain.inputs import default_layer
    from cnnlab.explain.sanity_checks import cascade, randomised
    from cnnlab.runs import load_run

    run = load_run(run_dir, "cpu", fast=False)
    image = read_image(image_path, run.task.in_channels)
    x = run.task.preprocess(image)[None]
    layer = default_layer(run)
    with torch.no_grad():
        index = int(run.model(x).argmax(dim=1))
    steps = cascade(run.model, layer)
    models = [("trained", run.model)] + [
        (f"r{i}", randomised(run.model, names)) for i, (_, names) in enumerate(steps, 1)
    ]
    target = attribution.class_score(index)
    shown = model_view(x[0])
    figure, axes = plt.subplots(
        len(methods),
        len(models) + 1,
        figsize=(1.3 * (len(models) + 1), 1.3 * len(methods)),
        squeeze=False,
    )
    for row, method in enumerate(methods):
        show(axes[row][0], shown)
        axes[row][0].set_ylabel(method, fontsize=7)
        for col, (label, model) in enumerate(models, 1):
            heat = attribution.attribute(model, x, target, method, layer)[0]
            axes[row][col].imshow(heat.numpy(), cmap="jet", vmin=0, vmax=1)
            if row == 0:
                axes[row][col].set_title(label, fontsize=7)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_title(f"{run.classes[index]}", fontsize=7)
    figure.suptitle(f"cascading randomisation, layer {layer} (r1: head first)", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    print(f"wrote {out}: {len(methods)} methods x {len(models)} models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("textures")
    make.add_argument("out", type=Path)
    make.add_argument("--per-class", type=int, default=150)
    make.add_argument("--size", type=int, default=64)
    draw = commands.add_parser("cascade")
    draw.add_argument("run", type=Path)
    draw.add_argument("image", type=Path)
    draw.add_argument("--out", type=Path, required=True)
    draw.add_argument(
        "--methods", nargs="+", default=["gradcam", "gradcam++", "eigencam", "saliency"]
    )
    grid = commands.add_parser("maps")
    grid.add_argument("run", type=Path)
    grid.add_argument("images", type=Path, nargs="+")
    grid.add_argument("--out", type=Path, required=True)
    grid.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "ig", "saliency"])
    args = parser.parse_args()
    if args.command == "textures":
        textures(args.out, args.per_class, args.size)
    elif args.command == "maps":
        maps_picture(args.run, args.images, args.methods, args.out)
    else:
        cascade_picture(args.run, args.image, args.methods, args.out)


if __name__ == "__main__":
    main()
