"""Input pipeline speed: decode + augment images/s from a folder of JPEGs.

The project's pipeline is ``cnnlab.data.classify.ImageDataset`` with ``classify_train(224,
"light", ...)``: torchvision.io decoding (libjpeg-turbo) into a uint8 tensor, then
torchvision's v2 kernels on that tensor (RandomResizedCrop, flip, to float, ColorJitter,
normalise; ``cnnlab.data.transforms.LightAugment``). The
baseline is torchvision's ``ImageFolder`` with its default PIL loader and the equivalent
classic transforms on PIL images (RandomResizedCrop with the same scale and ratio, flip,
ColorJitter with the same strengths, ToTensor, Normalize). Both run in the main process,
one image after the other on one thread (what one DataLoader worker does: PyTorch sets
each worker to one thread), over the same 200 synthetic 320x240 JPEGs written to a
temporary folder. The project's dataset is measured with its decode cache off, so both
decode every image; the cached number (decode once, augment every epoch, the project's
default for small sets) is reported too.

The pipeline must also keep up with training: its images/s are compared with ResNet-18's
training images/s at 224x224 (batch 16, a bare loop like ``train_step.py``'s), measured in
this run with torch's default threads; the target is at least 3x.

The augmentation alone is timed too, in microseconds an image on one thread, at the demo's
1x16x16 gray digit (no flip) and at 3x224x224 RGB (flip on), laid out in memory as
decoded images are (channels last): ``LightAugment`` against
torchvision's ``v2.Compose`` of the same steps (RandomResizedCrop, RandomHorizontalFlip,
ToDtype, ColorJitter on the float image, Normalize), which draws from the same
distributions and gives the same images for the same parameters
(tests/data/test_light_augment.py).

    python benchmarks/loader.py
    python benchmarks/loader.py --format json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from _bench import Row, add_load_flag, interleaved, rate_row, report_loads, under_loads
from cnnlab import create_model
from cnnlab.data.classify import ImageDataset, scan_class_folders
from cnnlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, classify_train, default_stats

SIZE = 224


def write_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """``count`` photo-like 320x240 JPEGs (smooth colour fields, edges and grain) in two
    class folders: random noise alone would compress unlike any photo."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((320, 240), 3))
        pixels = smooth.astype(np.float32) + rng.normal(0, 12, (240, 320, 3))
        x0, y0 = rng.integers(0, 200), rng.integers(0, 140)
        pixels[y0 : y0 + 80, x0 : x0 + 100] = rng.uniform(0, 255, 3)  # a hard-edged block
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:04d}.jpg", quality=90)


def baseline_transform() -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(SIZE, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def v2_light(img_size: int, flip: bool, channels: int) -> v2.Compose:
    """torchvision's v2 pipeline of the ``light`` preset's steps (LightAugment's baseline)."""
    mean, std = default_stats(channels)
    steps = [v2.RandomResizedCrop(img_size, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def augment_rows(repeats: int) -> list[Row]:
    """Microseconds an image of ``classify_train(.., "light", ..)`` against ``v2_light``,
    one thread, on a gray 16x16 digit and a 224x224 RGB image."""
    rows = []
    for channels, size, flip, count in ((1, 16, False, 2000), (3, 224, True, 40)):
        # Laid out as read_image returns decoded files: (C, H, W) over HWC memory.
        pixels = torch.randint(0, 256, (count, size, size, channels), dtype=torch.uint8)
        images = pixels.permute(0, 3, 1, 2)
        ours = classify_train(size, "light", flip, *default_stats(channels))
        baseline = v2_light(size, flip, channels)

        def over_images(transform, images=images):
            return lambda: [transform(image) for image in images]

        seconds = interleaved(
            {"ours": over_images(ours), "baseline": over_images(baseline)}, repeats
        )
        us = {name: s / count * 1e6 for name, s in seconds.items()}
        name = f"light augment {channels}x{size}x{size}, 1 thread"
        unit = "us/image (baseline: v2.Compose)"
        rows.append(Row(name, us["ours"], us["baseline"], unit, us["baseline"] / us["ours"]))
    return rows


def every_item(dataset: torch.utils.data.Dataset):
    def run() -> None:
        for i in range(len(dataset)):
            dataset[i]

    return run


def resnet18_training_rate(repeats: int) -> float:
    """Images/s of bare ResNet-18 training steps at 224x224, batch 16 (median)."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = torch.randn(16, 3, SIZE, SIZE), torch.randint(0, 10, (16,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()

    return 16 / interleaved({"step": step}, repeats)["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per side")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def measure(load: int) -> list[Row]:
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_jpegs(root, args.images)
            _, samples = scan_class_folders(root)
            transform = classify_train(SIZE, "light", True, IMAGENET_MEAN, IMAGENET_STD)
            ours = ImageDataset(samples, transform, 3, cache=False)
            cached = ImageDataset(samples, transform, 3, cache=True)
            baseline = datasets.ImageFolder(str(root), transform=baseline_transform())
            seconds = interleaved(
                {
                    "ours": every_item(ours),
                    "cached": every_item(cached),
                    "baseline": every_item(baseline),
                },
                args.repeats,
            )
        rate = {name: args.images / s for name, s in seconds.items()}
        torch.set_num_threads(threads)
        training = resnet18_training_rate(max(3, args.repeats // 2))
        rows: list[Row] = [
            rate_row("decode + augment, 1 thread", rate["ours"], rate["baseline"], "images/s"),
            rate_row(
                "cached (default): augment only", rate["cached"], rate["baseline"], "images/s"
            ),
            rate_row(
                "decode + augment vs ResNet-18 training",
                rate["ours"],
                training,
                "images/s (baseline: training)",
            ),
        ]
        torch.set_num_threads(1)
        rows += augment_rows(args.repeats)
        torch.set_num_threads(threads)
        return rows

    title = "loader: cnnlab ImageDataset vs torchvision ImageFolder + PIL"
    report_loads(under_loads(args.load, measure), args.format, title)


if __name__ == "__main__":
    main()
