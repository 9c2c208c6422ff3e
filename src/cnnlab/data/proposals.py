"""Region proposals for the proposal-based detectors (Fast R-CNN, SPPNet): OpenCV's
selective search, its cache beside the data, user-supplied proposal files, and recall.

A proposal file (the cache ``DATA/proposals/selective_search-{mode}-{max}.json``, where
DATA is the folder holding ``images/``, or a file of your own) is JSON::

    {"format": "cnnlab-proposals", "version": 1,
     "method": "selective_search", "mode": "fast", "max": 2000,
     "images": {KEY: {"file": "images/0.png", "size": [H, W],
                      "boxes": [[x1, y1, x2, y2], ...]}, ...}}

KEY is the SHA-256 of the image file (so a changed image is recomputed; other settings
are another file) or, in a user's file, the image's path relative to DATA. Boxes are in
the image's own pixels, best first; only ``images`` and each entry's ``boxes`` are
required in a user's file (an entry may also be the list of boxes itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.images import image_size, read_image
from cnnlab.errors import CnnlabError
from cnnlab.files import read_json, sha256_of, write_json

MODES = ("fast", "quality")
DEFAULT_MAX = 2000
FORMAT = "cnnlab-proposals"
VERSION = 1
RECALL_IOUS = (0.5, 0.7)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_libc = None


_C_RAND_LOCK = threading.Lock()


def _seed_c_rand() -> None:
    """OpenCV's selective search draws from C ``rand()``: seed it for the same boxes on
    every run."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    _libc.srand(0)


def selective_search(image: torch.Tensor, mode: str = "fast", max_boxes: int = DEFAULT_MAX):
    """Selective search boxes (N, 4) float32 ``[x1, y1, x2, y2]`` of a uint8 image (C, H, W),
    best first, at most ``max_boxes``; one OpenCV thread, seeded, so always the same."""
    import cv2

    if mode not in MODES:
        raise CnnlabError(f"unknown proposal mode {mode!r}; choose one of {', '.join(MODES)}")
    cv2.setNumThreads(1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    bgr = np.ascontiguousarray(image[:3].flip(0).permute(1, 2, 0).numpy())
    # C rand() is one sequence for the whole process: two searches at once in two threads
    # (the web server's workers) would draw from each other's and give other boxes.
    with _C_RAND_LOCK:
        _seed_c_rand()
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        if mode == "fast":
            search.switchToSelectiveSearchFast()
        else:
            search.switchToSelectiveSearchQuality()
        found = search.process()
    rects = np.asarray(found, dtype=np.float32).reshape(-1, 4)[:max_boxes]
    rects[:, 2:] += rects[:, :2]  # x, y, w, h -> x1, y1, x2, y2
    return rects


def data_root(image: Path) -> Path:
    """DATA of an image: the folder holding the ``images/`` folder it lies in."""
    for parent in Path(image).parents:
        if parent.name == "images":
            return parent.parent
    return Path(image).parent


def cache_path(root: Path, mode: str, max_boxes: int) -> Path:
    return Path(root) / "proposals" / f"selective_search-{mode}-{max_boxes}.json"


def _worker_init() -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _compute(job: tuple[str, str, int]) -> list[list[float]]:
    path, mode, max_boxes = job
    return selective_search(read_image(path, 3), mode, max_boxes).tolist()


@dataclass
class ProposalSource:
    """Where proposals come from: selective search (cached) or a user's file."""

    mode: str = "fast"
    max_boxes: int = DEFAULT_MAX
    file: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CnnlabError(f"unknown proposal mode {self.mode!r}; choose fast or quality")
        if self.max_boxes < 1:
            raise CnnlabError(f"--max must be at least 1, got {self.max_boxes}")
        if self.workers < 1:
            raise CnnlabError(f"--workers must be at least 1, got {self.workers}")

    def boxes(self, images: Sequence[Path], progress: bool = True) -> dict[Path, np.ndarray]:
        """Proposals (N, 4) in each image's pixels, computing and caching missing ones."""
        if self.file is not None:
            return _from_user_file(Path(self.file), images, self.max_boxes)
        found: dict[Path, np.ndarray] = {}
        groups: dict[Path, list[Path]] = {}
        for image in images:
            groups.setdefault(data_root(image), []).append(Path(image))
        for root, paths in groups.items():
            found.update(self._cached(root, paths, progress))
        return found

    def _cached(self, root: Path, paths: list[Path], progress: bool) -> dict[Path, np.ndarray]:
        path = cache_path(root, self.mode, self.max_boxes)
        entries = _read_file(path)["images"] if path.is_file() else {}
        digests = {image: sha256_of(image) for image in paths}
        missing = [image for image in paths if digests[image] not in entries]
        if missing:
            for image, boxes in zip(missing, self._compute(missing, progress), strict=True):
                entries[digests[image]] = {
                    "file": image.relative_to(root).as_posix(),
                    "size": list(image_size(image))[::-1],
                    "boxes": [[round(v, 1) for v in box] for box in boxes],
                }
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(
                path,
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "method": "selective_search",
                    "mode": self.mode,
                    "max": self.max_boxes,
                    "images": entries,
                },
            )
        return {image: _as_boxes(entries[digests[image]], path) for image in paths}

    def _compute(self, images: list[Path], progress: bool) -> list[list[list[float]]]:
        jobs = [(str(image), self.mode, self.max_boxes) for image in images]
        bar = _bar(progress, len(jobs), f"selective search ({self.mode})")
        results = []
        try:
            if self.workers == 1 or len(jobs) == 1:
                for job in jobs:
                    results.append(_compute(job))
                    if bar:
                        bar.advance(0)
            else:
                import multiprocessing

                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_worker_init
                ) as pool:
                    for boxes in pool.map(_compute, jobs, chunksize=4):
                        results.append(boxes)
                        if bar:
                            bar.advance(0)
        finally:
            if bar:
                bar.stop()
        return results


def _bar(progress: bool, total: int, description: str):
    if not progress or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        description, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip
    bar.add_task(description, total=total)
    bar.start()
    return bar


def _read_file(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise CnnlabError(f"{path}: not a proposal file (needs an 'images' object)")
    return data


def _as_boxes(entry: object, path: Path) -> np.ndarray:
    boxes = entry.get("boxes") if isinstance(entry, dict) else entry
    try:
        array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        raise CnnlabError(f"{path}: boxes must be lists of [x1, y1, x2, y2] numbers") from None
    if not np.isfinite(array).all():
        raise CnnlabError(f"{path}: boxes must be finite numbers")
    return array


def _from_user_file(path: Path, images: Sequence[Path], max_boxes: int) -> dict[Path, np.ndarray]:
    """Proposals of a user's file, matched by the image's digest or by its path (a key
    that ends the image's path, as "images/0.png" relative to DATA)."""
    entries = _read_file(path)["images"]
    by_path = {key.strip("/"): value for key, value in entries.items() if not _DIGEST.match(key)}
    found = {}
    for image in images:
        image = Path(image)
        entry = entries.get(sha256_of(image))
        if entry is None:
            parts = image.as_posix().split("/")
            suffixes = ("/".join(parts[i:]) for i in range(len(parts)))
            entry = next((by_path[s] for s in suffixes if s in by_path), None)
        if entry is None:
            raise CnnlabError(f"{path}: no proposals for {image} (by its SHA-256 or its path)")
        found[image] = _as_boxes(entry, path)[:max_boxes]
    return found


def recall(
    proposals: Sequence[np.ndarray], truths: Sequence[Sequence[Sequence[float]]]
) -> dict[str, float | None]:
    """The share of ground-truth boxes some proposal overlaps at IoU >= 0.5 and 0.7
    (``{"recall50", "recall70"}``, None without ground truth)."""
    from torchvision.ops import box_iou

    covered = dict.fromkeys(RECALL_IOUS, 0)
    total = 0
    for boxes, truth in zip(proposals, truths, strict=True):
        if not len(truth):
            continue
        total += len(truth)
        if not len(boxes):
            continue
        best = box_iou(torch.tensor(truth, dtype=torch.float32), torch.from_numpy(boxes))
        best = best.max(dim=1).values
        for threshold in RECALL_IOUS:
            covered[threshold] += int((best >= threshold).sum())
    return {f"recall{round(t * 100)}": (covered[t] / total if total else None) for t in RECALL_IOUS}


def proposal_report(data: Path, source: ProposalSource) -> dict:
    """What ``cnnlab detect proposals DATA`` prints: boxes per image, recall@0.5/0.7 and
    seconds per image (computing, or reading the cache)."""
    from cnnlab.data.detect import make_detection_splits

    splits = make_detection_splits(Path(data))
    samples = splits.train + splits.val
    start = time.perf_counter()
    found = source.boxes([s.path for s in samples])
    seconds = time.perf_counter() - start
    boxes = [found[s.path] for s in samples]
    report = {
        "data": str(data),
        "source": source.file
        or str(cache_path(data_root(samples[0].path), source.mode, source.max_boxes)),
        "mode": None if source.file else source.mode,
        "max": source.max_boxes,
        "n_images": len(samples),
        "boxes_per_image": sum(len(b) for b in boxes) / len(samples),
        **recall(boxes, [s.boxes for s in samples]),
        "seconds_per_image": seconds / len(samples),
        "workers": source.workers,
    }
    return report
