"""cnnlab.data: digits writer, folder check/clean, splits, datasets, transforms, balancing."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from cnnlab.data import listing
from cnnlab.data.check import check_folder, clean_folder, summarize_check
from cnnlab.data.classify import (
    ImageDataset,
    Splits,
    balanced_sampler,
    class_weights,
    collate_skip_bad,
    make_splits,
)
from cnnlab.data.digits import bundled_digits, write_digits
from cnnlab.data.images import BadImageError, detect_in_channels, read_image, to_channels
from cnnlab.data.transforms import classify_eval, classify_train, default_stats
from cnnlab.errors import CnnlabError


def eval_transform(size: int, in_channels: int = 3):
    return classify_eval(size, *default_stats(in_channels))


def train_transform(size: int, augment: str, flip: bool = True, in_channels: int = 3):
    return classify_train(size, augment, flip, *default_stats(in_channels))


# --- helpers -------------------------------------------------------------------------------


def _noise(seed: int, size: tuple[int, int] = (16, 20), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _touch_tree(root: Path, counts: dict[str, int]) -> Path:
    # make_splits only lists names, so empty files are enough (and fast).
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i:03d}.png").touch()
    return root


CHI, JAP, SHI = "n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"


@pytest.fixture
def messy_tree(tmp_path: Path) -> Path:
    """WordNet-prefixed class folders with every kind of trouble check/clean must catch."""
    src = tmp_path / "src"
    jpeg = _encode(_noise(1), "JPEG")
    png = _encode(_noise(2), "PNG")
    _write(src / CHI / "a.jpg", jpeg)
    _write(src / CHI / "b.png", png)
    _write(src / CHI / "c.jpg", jpeg)  # duplicate within the class
    _write(src / CHI / "d.jpeg", _encode(_noise(3), "JPEG"))
    _write(src / CHI / "trunc.jpg", _encode(_noise(4, (64, 64)), "JPEG")[:600])
    _write(src / CHI / "notes.txt", b"not an image, ignored")
    _write(src / JAP / "e.JPG", _encode(_noise(5), "JPEG"))
    _write(src / JAP / "f.png", _encode(_noise(6, mode="L"), "PNG"))
    _write(src / JAP / "g.jpg", _encode(_noise(7), "PNG"))  # a PNG named .jpg: fine
    _write(src / JAP / "fake.jpg", b"this is text, not a JPEG\n")
    _write(src / JAP / "empty.png", b"")
    _write(src / JAP / "same_as_b.png", png)  # duplicate across classes
    _write(src / SHI / "h.png", _encode(_noise(8), "PNG"))
    _write(src / SHI / "trunc.png", _encode(_noise(9, (64, 64)), "PNG")[:-30])
    _write(src / SHI / ".DS_Store", b"\x00\x01")
    return src


# --- digits --------------------------------------------------------------------------------


def test_write_digits_real_images(digits_dir: Path) -> None:
    files = sorted(digits_dir.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in digits_dir.iterdir()) == [str(d) for d in range(10)]
    with Image.open(files[0]) as first:
        assert (first.mode, first.size) == ("L", (32, 32))  # 8-bit grayscale
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The digits are read from scikit-learn's own file, without importing it: the same data.
    table = torch.from_numpy(bundled_digits())
    assert torch.equal(table[:, :-1].reshape(-1, 8, 8), torch.from_numpy(digits.images))
    assert torch.equal(table[:, -1].long(), torch.from_numpy(digits.target))
    for index in (0, 1, 1000):
        path = digits_dir / str(digits.target[index]) / f"{index:04d}.png"
        image = read_image(path).float()  # (1, 32, 32)
        assert image.shape == (1, 32, 32) and image.max() > 200 and image.min() < 30
        # Averaging 4x4 blocks recovers the 8x8 original (up to bicubic smoothing).
        small = torch.nn.functional.avg_pool2d(image[None], 4)[0, 0] / 255 * 16
        assert (small - torch.from_numpy(digits.images[index]).float()).abs().mean() < 1.0


def test_bundled_digits_fall_back_to_load_digits_without_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scikit-learn whose digits.csv.gz is not where this version keeps it: its reader."""
    import importlib.machinery

    from cnnlab.data import digits as digits_module

    elsewhere = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    elsewhere.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(digits_module.importlib.util, "find_spec", lambda name: elsewhere)
    table = bundled_digits()
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert table.shape == (1797, 65)
    assert torch.equal(torch.from_numpy(table[:, -1]).long(), torch.from_numpy(digits.target))
    assert torch.equal(torch.from_numpy(table[:, :-1]), torch.from_numpy(digits.data))


def test_write_digits_refuses_bad_size_and_existing_data(tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match="size"):
        write_digits(tmp_path / "d", size=4)
    _write(tmp_path / "full" / "keep.txt", b"user data")
    with pytest.raises(CnnlabError, match="not empty"):
        write_digits(tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_bytes() == b"user data"


# --- reading -------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_jpeg_is_bad(tmp_path: Path, fraction: float) -> None:
    data = _encode(_noise(0, (96, 96)), "JPEG")
    path = _write(tmp_path / "t.jpg", data[: int(len(data) * fraction)])
    with pytest.raises(BadImageError, match=r"t\.jpg: .*truncated"):
        read_image(path)


def test_read_image_channel_modes(tmp_path: Path) -> None:
    rgb = _noise(0)
    palette = rgb.convert("P")
    cases = {
        "gray.png": (rgb.convert("L"), 1),
        "graya.png": (rgb.convert("LA"), 1),
        "rgba.png": (rgb.convert("RGBA"), 3),
        "palette.png": (palette, 3),
        "pic.bmp": (rgb, 3),  # torchvision cannot decode BMP; the Pillow fallback does
        "pic.tiff": (rgb.convert("L"), 1),
        "pic.webp": (rgb, 3),
    }
    for name, (image, channels) in cases.items():
        image.save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert out.dtype == torch.uint8 and out.shape == (channels, 16, 20), name
    # A palette PNG decodes to its colours, not its palette indices.
    expected = torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "palette.png"), expected)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png").max() == 255


def test_detect_in_channels(tmp_path: Path) -> None:
    gray = [_noise(i, mode="L") for i in range(3)]
    paths = [tmp_path / f"g{i}.png" for i in range(3)]
    for image, path in zip(gray, paths, strict=True):
        image.save(path)
    gray[0].convert("RGB").save(tmp_path / "gray_as_rgb.png")
    _write(tmp_path / "bad.png", b"")
    assert detect_in_channels([*paths, tmp_path / "gray_as_rgb.png", tmp_path / "bad.png"]) == 1
    _noise(9).save(tmp_path / "colour.png")
    assert detect_in_channels([*paths, tmp_path / "colour.png"]) == 3


# --- check and clean -----------------------------------------------------------------------


def test_check_folder_reports_each_problem(messy_tree: Path) -> None:
    report = check_folder(messy_tree)
    json.dumps(report)  # --format json prints it as is
    assert report["classes"] == {CHI: 4, JAP: 4, SHI: 1}
    reasons = {b["path"]: b["reason"] for b in report["bad_files"]}
    assert set(reasons) == {
        f"{CHI}/trunc.jpg",
        f"{JAP}/fake.jpg",
        f"{JAP}/empty.png",
        f"{SHI}/trunc.png",
    }
    assert "truncated" in reasons[f"{CHI}/trunc.jpg"]
    assert "not an image" in reasons[f"{JAP}/fake.jpg"]
    assert reasons[f"{JAP}/empty.png"] == "empty file"
    assert "truncated PNG" in reasons[f"{SHI}/trunc.png"]
    assert sorted(report["duplicates"]) == [
        [f"{CHI}/a.jpg", f"{CHI}/c.jpg"],
        [f"{CHI}/b.png", f"{JAP}/same_as_b.png"],
    ]
    assert report["cross_class_duplicates"] == [[f"{CHI}/b.png", f"{JAP}/same_as_b.png"]]
    assert report["too_small"] == [{"class": SHI, "count": 1}]
    assert report["ignored_files"] == [f"{CHI}/notes.txt"]  # .DS_Store is skipped silently
    assert report["sizes"]["width"] == {"min": 20, "median": 20, "max": 20}
    assert report["sizes"]["channels"] == {"1": 1, "3": 8}
    summary = summarize_check(report)
    assert f"bad file: {JAP}/empty.png: empty file" in summary
    assert f"duplicate across classes: {CHI}/b.png, {JAP}/same_as_b.png" in summary


def test_clean_folder_copies_clean_tree_and_leaves_src_alone(
    messy_tree: Path, tmp_path: Path
) -> None:
    before = _tree_hash(messy_tree)
    dst = tmp_path / "clean"
    report = clean_folder(messy_tree, dst)
    assert _tree_hash(messy_tree) == before
    assert json.loads((dst / "clean_report.json").read_text()) == report
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == [
        "Chihuahua",
        "Japanese_spaniel",
        "Shih-Tzu",
    ]
    assert sorted(p.name for p in (dst / "Chihuahua").iterdir()) == [
        "Chihuahua_0001.jpg",  # a.jpg (c.jpg is its duplicate; b.png went with its twin)
        "Chihuahua_0002.jpg",  # d.jpeg
    ]
    assert sorted(p.name for p in (dst / "Japanese_spaniel").iterdir()) == [
        "Japanese_spaniel_0001.jpg",
        "Japanese_spaniel_0002.png",
        "Japanese_spaniel_0003.png",  # g.jpg holds a PNG
    ]
    assert report["classes"] == {"Chihuahua": 2, "Japanese_spaniel": 3, "Shih-Tzu": 1}
    assert report["renamed_classes"][CHI] == "Chihuahua"
    left = {item["path"]: item["reason"] for item in report["left_out"]}
    assert left[f"{CHI}/c.jpg"] == f"duplicate of {CHI}/a.jpg (kept)"
    assert "across classes" in left[f"{CHI}/b.png"]
    assert "across classes" in left[f"{JAP}/same_as_b.png"]
    assert "not an image" in left[f"{JAP}/fake.jpg"]
    assert {f"{CHI}/trunc.jpg", f"{JAP}/empty.png", f"{SHI}/trunc.png"} <= set(left)
    assert [t["class"] for t in report["too_small"]] == ["Chihuahua", "Shih-Tzu"]
    recheck = check_folder(dst)
    assert recheck["bad_files"] == [] and recheck["duplicates"] == []
    assert recheck["ignored_files"] == []  # clean_report.json sits beside the class folders


def test_clean_folder_refuses_to_overwrite_or_merge(messy_tree: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    _write(full / "mine.jpg", b"user data")
    with pytest.raises(CnnlabError, match="not empty"):
        clean_folder(messy_tree, full)
    assert _tree_hash(full) == {"mine.jpg": hashlib.sha256(b"user data").hexdigest()}
    (messy_tree / "n09999999-Chihuahua").mkdir()
    with pytest.raises(CnnlabError, match="both clean to 'Chihuahua'"):
        clean_folder(messy_tree, tmp_path / "out")
    with pytest.raises(CnnlabError, match="regex"):
        clean_folder(messy_tree, tmp_path / "out", strip_prefix="(")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging


# --- splits --------------------------------------------------------------------------------


def test_stratified_split_properties(tmp_path: Path) -> None:
    counts = {"ant": 50, "bee": 21, "cat": 3, "dog": 7}
    root = _touch_tree(tmp_path / "d", counts)
    splits = make_splits(root, val_split=0.1, test_split=0.2, seed=0)
    assert splits.classes == sorted(counts) and not splits.presplit
    parts = [splits.train, splits.val, splits.test]
    all_paths = [p for part in parts for p, _ in part]
    assert len(all_paths) == len(set(all_paths)) == sum(counts.values())
    for label, name in enumerate(splits.classes):
        sizes = [sum(1 for _, y in part if y == label) for part in parts]
        n = counts[name]
        assert min(sizes) >= 1, name  # every class in every split
        if n >= 20:
            assert sizes[1] == round(n * 0.1) and sizes[2] == round(n * 0.2), name
    assert [p.parent.name for p, y in splits.train] == [splits.classes[y] for _, y in splits.train]
    again = make_splits(root, val_split=0.1, test_split=0.2, seed=0)
    assert again.to_json() == splits.to_json()
    assert make_splits(root, 0.1, 0.2, seed=1).val != splits.val


def test_split_ignores_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _touch_tree(tmp_path / "d", {"a": 30, "b": 30})
    expected = make_splits(root, seed=3).to_json()
    real_walk = os.walk

    def reversed_walk(*args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(listing.os, "walk", reversed_walk)
    assert make_splits(root, seed=3).to_json() == expected


def test_split_too_small_class_is_named(tmp_path: Path) -> None:
    root = _touch_tree(tmp_path / "d", {"big": 20, "tiny": 2})
    with pytest.raises(CnnlabError, match="'tiny' has 2 image"):
        make_splits(root)
    splits = make_splits(root, val_split=0.1, test_split=0.0)  # two images suffice without test
    assert splits.test == [] and sum(1 for _, y in splits.val if y == 1) == 1


def test_split_json_round_trip(tmp_path: Path) -> None:
    root = _touch_tree(tmp_path / "d", {"a": 10, "b": 10})
    splits = make_splits(root, seed=5)
    data = json.loads(json.dumps(splits.to_json()))
    assert data["train"][0][0] == splits.train[0][0].relative_to(root).as_posix()
    saved = tmp_path / "split.json"
    saved.write_text(json.dumps(data))
    assert Splits.from_json(saved) == splits
    saved.write_text(json.dumps({"root": str(root), "classes": []}))
    with pytest.raises(CnnlabError, match=r"split\.json: not a cnnlab split file \('train'\)"):
        Splits.from_json(saved)
    saved.write_text(json.dumps({**data, "root": str(tmp_path / "gone")}))
    with pytest.raises(CnnlabError, match="gone no longer exists"):
        Splits.from_json(saved)


def test_presplit_folders(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _touch_tree(root / "train", {"a": 8, "b": 8})
    _touch_tree(root / "val", {"a": 2, "b": 2})
    splits = make_splits(root, val_split=0.25, test_split=0.25)
    assert splits.presplit and splits.classes == ["a", "b"]
    assert {p.parent.parent.name for p, _ in splits.val} == {"val"}
    # No test folder: the test part is carved from train, stratified.
    assert len(splits.test) == 4 and {p.parent.parent.name for p, _ in splits.test} == {"train"}
    assert len(splits.train) == 12
    _touch_tree(root / "test", {"a": 1, "c": 1})
    with pytest.raises(CnnlabError, match=r"test: class folders differ.*missing: b; extra: c"):
        make_splits(root)


def test_scan_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match="not found"):
        make_splits(tmp_path / "missing")
    _touch_tree(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(CnnlabError, match="b: class folder has no image files"):
        make_splits(tmp_path / "d")


# --- datasets ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
def test_dataset_skips_bad_file_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cache: bool
) -> None:
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        _noise(i).save(path)
    bad = _write(tmp_path / "broken.jpg", b"garbage")
    samples = [(good[0], 0), (bad, 1), (good[1], 1), (good[2], 0)]
    caplog.set_level(logging.WARNING, logger="cnnlab")
    dataset = ImageDataset(samples, eval_transform(8), cache=cache)
    assert dataset.cached is cache
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad)
    for _ in range(2):  # two epochs
        batches = list(loader)
    assert [len(y) for _, y in batches] == [1, 2]
    images, labels = batches[1]
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [1, 0]
    warnings = [r for r in caplog.records if r.name == "cnnlab"]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0].getMessage()
    images, labels = collate_skip_bad([None, None])  # an all-bad batch does not crash
    assert images.numel() == 0 and labels.numel() == 0 and labels.dtype == torch.long


def test_digits_load_fast_and_cached(digits_dir: Path) -> None:
    splits = make_splits(digits_dir)
    assert detect_in_channels(p for p, _ in splits.train) == 1
    dataset = ImageDataset(splits.train, eval_transform(32, in_channels=1), in_channels=1)
    assert dataset.cached  # 1,797 tiny images: decoded once
    image, label = dataset[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label == splits.train[0][1]


# --- transforms ----------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("source_channels", [1, 3])
@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_transform_shapes(in_channels: int, source_channels: int, augment: str) -> None:
    # Channels are matched when an image is read; the transforms see the run's channels.
    image = to_channels(
        torch.randint(0, 256, (source_channels, 40, 30), dtype=torch.uint8), in_channels
    )
    for transform in (
        train_transform(24, augment, in_channels=in_channels),
        eval_transform(24, in_channels=in_channels),
    ):
        out = transform(image)
        assert out.shape == (in_channels, 24, 24) and out.dtype == torch.float32


def test_train_is_random_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    for augment in ("light", "strong"):
        transform = train_transform(32, augment)
        assert not torch.equal(transform(image), transform(image)), augment
    evaluate = eval_transform(32)
    assert torch.equal(evaluate(image), evaluate(image))
    white = eval_transform(8, in_channels=1)(torch.full((1, 8, 8), 255, dtype=torch.uint8))
    assert torch.allclose(white, torch.ones(1, 8, 8))  # (1 - 0.5) / 0.5
    # crop_pct 1.0: a square image at the target size passes through untouched.
    digit = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    out = eval_transform(32, in_channels=1)(digit)
    assert torch.allclose(out, digit.float() / 255 * 2 - 1, atol=1e-6)


def test_flip_false_never_mirrors() -> None:
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    image[..., :8] = 255  # bright left half

    def mirrored(transform: Callable) -> int:
        outputs = [transform(image) for _ in range(40)]
        return sum(int(out[..., :8].mean() < out[..., 8:].mean()) for out in outputs)

    # Each preset from seed 0: one preset's draws must not move the next one's stream.
    torch.manual_seed(0)
    assert mirrored(train_transform(16, "light", flip=False, in_channels=1)) == 0
    torch.manual_seed(0)
    assert mirrored(train_transform(16, "strong", flip=False, in_channels=1)) == 0
    torch.manual_seed(0)
    assert 5 < mirrored(train_transform(16, "light", flip=True, in_channels=1)) < 35
    with pytest.raises(CnnlabError, match="unknown augment"):
        train_transform(16, "heavy")


@pytest.mark.parametrize("channels", [1, 3])
def test_evaluation_transform_equals_torchvision_compose(channels: int) -> None:
    # The evaluation transform calls v2's kernels directly; it must give what the v2.Compose
    # of the same steps gives (the light preset: tests/data/test_light_augment.py).
    mean, std = default_stats(channels)
    image = torch.randint(0, 256, (channels, 30, 23), dtype=torch.uint8)
    evaluation = v2.Compose(
        [
            v2.Resize(16, antialias=True),
            v2.CenterCrop(16),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
    assert torch.equal(eval_transform(16, channels)(image), evaluation(image))


# --- balancing -----------------------------------------------------------------------------


def test_class_weights_and_balanced_sampler() -> None:
    samples = [(Path(f"{i}.png"), 0) for i in range(30)] + [(Path("x.png"), 1)] * 10
    weights = class_weights(samples, 3)
    assert weights[2] == 0  # absent from training
    assert torch.isclose(weights[:2].mean(), torch.tensor(1.0))
    assert torch.isclose(weights[1] / weights[0], torch.tensor(3.0))
    draws = list(balanced_sampler(samples, 3, torch.Generator().manual_seed(0)))
    assert len(draws) == 40
    share = sum(samples[i][1] for i in draws) / len(draws)
    assert 0.3 < share < 0.7  # about half from the 10-sample class instead of a quarter
    assert draws == list(balanced_sampler(samples, 3, torch.Generator().manual_seed(0)))
