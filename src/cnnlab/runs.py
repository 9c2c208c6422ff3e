"""Use a finished run folder: rebuild its model, predict images, evaluate on a data set.

``load_run(RUN)`` rebuilds the model from ``model.json`` with ``create_model`` and loads
``best.safetensors``; ``Run.predict`` preprocesses exactly as evaluation did (same size,
crop, normalisation and channel count), so a prediction here matches the test report.

The loaded model is made fast for inference without changing its answers beyond float
rounding: each BatchNorm folded into the convolution before it (``fold_batchnorm``), and
weights and batches in channels_last layout, which oneDNN (CPU) and cuDNN convolve faster.
torch.compile is not used: on a CPU it needs tens of seconds to compile before the first
image, which a command that predicts a few images never wins back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cnnlab import checkpoint
from cnnlab.errors import CnnlabError
from cnnlab.registry import create_model

if TYPE_CHECKING:
    from PIL import Image

ImageInput = str | Path | torch.Tensor  # or a PIL.Image.Image
BATCH_SIZE = 64
SPLITS = ("train", "val", "test")
_META_KEYS = ("architecture", "model_args", "classes", "input_size", "mean", "std")


@dataclass
class Run:
    """A trained classifier loaded from a run folder, ready to predict and evaluate."""

    path: Path
    meta: dict
    classes: list[str]
    model: nn.Module  # eval mode, best weights, on ``device``
    device: torch.device
    transform: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    def predict(
        self, images: Sequence[ImageInput | Image.Image] | ImageInput | Image.Image, topk: int = 5
    ) -> list[dict]:
        """Top-k classes for each image: ``[{"file": str | None, "top": [{"class", "prob"}]}]``.

        Images are paths, PIL images or uint8 tensors (C, H, W) (a single one is taken as a
        list of one); an unreadable file raises CnnlabError naming it (``predict_files``
        collects such errors instead).
        """
        k = self._clip_topk(topk)
        results: list[dict] = []
        for chunk in _chunks(_as_list(images), BATCH_SIZE):
            prepared = [self._prepare(image) for image in chunk]
            results += self._infer(prepared, k)
        return results

    def predict_files(
        self, paths: Sequence[str | Path], topk: int = 5
    ) -> tuple[list[dict], list[str]]:
        """Predict image files and folders (searched recursively, sorted).

        Returns ``(results, errors)``: a file that cannot be read becomes an error line
        ``"path: reason"`` and the others are still predicted; nothing is raised for them.
        """
        k = self._clip_topk(topk)
        files, errors = _expand(paths)
        results: list[dict] = []
        for chunk in _chunks(files, BATCH_SIZE):
            prepared = []
            for file in chunk:
                try:
                    prepared.append(self._prepare(file))
                except CnnlabError as e:
                    errors.append(_error_line(file, e))
            results += self._infer(prepared, k)
        return results, errors

    def evaluate(self, data_dir: str | Path | None = None, split: str = "test") -> dict:
        """Test metrics (``engine.evaluate`` without its private ``_`` keys).

        Without ``data_dir`` the run's own ``split`` from ``split.json`` is used. With it,
        ``DATA/<split>`` when that folder exists, else the whole class-folder tree; its
        classes may be a subset of the run's, matched by name.
        """
        from cnnlab.data.datasets import ImageDataset, collate_skip_bad
        from cnnlab.engine import evaluate

        samples = self._own_split(split) if data_dir is None else self._folder(data_dir, split)
        loader = torch.utils.data.DataLoader(
            ImageDataset(samples, self.transform),
            batch_size=BATCH_SIZE,
            collate_fn=collate_skip_bad,
            pin_memory=self.device.type == "cuda",
        )
        report = evaluate(self.model, loader, self.device, self.classes)
        return {key: value for key, value in report.items() if not key.startswith("_")}

    def _clip_topk(self, topk: int) -> int:
        if topk < 1:
            raise CnnlabError(f"topk must be at least 1, got {topk}")
        return min(topk, len(self.classes))

    def _prepare(self, image: ImageInput | Image.Image) -> tuple[str | None, torch.Tensor]:
        """Decode and preprocess one image: (file name or None, float tensor (C, S, S))."""
        from cnnlab.data.folders import read_image

        if isinstance(image, str | Path):
            return str(image), self.transform(read_image(Path(image)))
        if isinstance(image, torch.Tensor):
            return None, self.transform(_check_tensor(image))
        return None, self.transform(_pil_to_tensor(image))

    @torch.inference_mode()
    def _infer(self, prepared: list[tuple[str | None, torch.Tensor]], k: int) -> list[dict]:
        if not prepared:
            return []
        batch = torch.stack([tensor for _, tensor in prepared]).to(self.device)  # (B, C, S, S)
        batch = batch.contiguous(memory_format=torch.channels_last)
        probs = self.model(batch).float().softmax(dim=1)  # (B, num_classes)
        top_probs, top_indices = probs.topk(k, dim=1)  # (B, k), sorted descending
        return [
            {
                "file": file,
                "top": [
                    {"class": self.classes[i], "prob": p}
                    for i, p in zip(indices.tolist(), values.tolist(), strict=True)
                ],
            }
            for (file, _), values, indices in zip(prepared, top_probs, top_indices, strict=True)
        ]

    def _own_split(self, split: str) -> list[tuple[Path, int]]:
        from cnnlab.data.folders import Splits

        if split not in SPLITS:
            raise CnnlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        split_file = self.path / "split.json"
        data = checkpoint.read_json(split_file)  # missing or malformed: CnnlabError
        try:
            splits = Splits.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            raise CnnlabError(f"{split_file}: not a cnnlab split file ({e!r})") from e
        samples = getattr(splits, split)
        if not samples:
            raise CnnlabError(
                f"{split_file}: the run has no {split} images; pass a data folder instead"
            )
        if not splits.root.is_dir():
            raise CnnlabError(
                f"{split_file}: data folder {splits.root} no longer exists; pass a data folder"
            )
        return self._remap(splits.classes, samples, split_file)

    def _folder(self, data_dir: str | Path, split: str) -> list[tuple[Path, int]]:
        from cnnlab.data.folders import scan_class_folders

        root = Path(data_dir)
        if (root / split).is_dir():
            root = root / split
        classes, samples = scan_class_folders(root)
        return self._remap(classes, samples, root)

    def _remap(
        self, classes: list[str], samples: list[tuple[Path, int]], source: Path
    ) -> list[tuple[Path, int]]:
        """Relabel samples from ``classes`` indices to the model's, by class name."""
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in classes if name not in index]
        if unknown:
            raise CnnlabError(
                f"{source}: class folder {unknown[0]!r} is not one of the run's"
                f" {len(self.classes)} classes"
            )
        return [(path, index[classes[label]]) for path, label in samples]


def load_run(path: str | Path, device: str = "cpu", fast: bool = True) -> Run:
    """Load a classification run folder: model from ``model.json``, ``best.safetensors``.

    ``device`` is ``cpu`` (default), ``cuda`` or ``auto`` (CUDA when available). ``fast``
    folds BatchNorm into convolutions and uses channels_last (see the module doc); without
    it the model is exactly the trained module.
    """
    from cnnlab.data.transforms import eval_transform
    from cnnlab.engine import pick_device

    run_dir = checkpoint.require_run_dir(Path(path))
    meta = checkpoint.read_model_json(run_dir)
    _check_meta(meta, run_dir / "model.json")
    model = _build_model(meta, run_dir)
    target = pick_device(device)
    model.to(target).eval()
    if fast:
        fold_batchnorm(model)
        model.to(memory_format=torch.channels_last)
    in_channels, height, _ = meta["input_size"]
    transform = eval_transform(
        height, mean=tuple(meta["mean"]), std=tuple(meta["std"]), in_channels=in_channels
    )
    return Run(run_dir, meta, list(meta["classes"]), model, target, transform)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place, and return
    how many were folded (the model must be in eval mode).

    With the running statistics, BN is an affine map per channel: ``y = (x - mean) * s +
    beta`` with ``s = gamma / sqrt(var + eps)``, so the conv's weight scales by ``s`` and its
    bias becomes ``(b - mean) * s + beta``; the BN module becomes ``nn.Identity``. Pairs come
    from tracing the forward with torch.fx: a BN whose input is a conv output used nowhere
    else (DenseNet's BN-before-conv layers are left alone). A model fx cannot trace is left
    as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow: not every forward can be traced
        return 0
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, norm = model.get_submodule(source.target), model.get_submodule(node.target)
        alone = len(source.users) == 1 and calls[source.target] == calls[node.target] == 1
        if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and alone:
            if norm.running_mean is None:  # BN without running statistics: nothing fixed
                continue
            _set_submodule(model, source.target, fuse_conv_bn_eval(conv, norm))
            _set_submodule(model, node.target, nn.Identity())
            folded += 1
    return folded


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _check_meta(meta: dict, source: Path) -> None:
    if not isinstance(meta, dict):
        raise CnnlabError(f"{source}: expected a JSON object")
    task = meta.get("task", "classify")
    if task != "classify":
        raise CnnlabError(f"{source}: a {task} run; only classification runs can be loaded")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise CnnlabError(f"{source}: missing {', '.join(missing)}")
    if not isinstance(meta["model_args"], dict):
        raise CnnlabError(f"{source}: model_args must be a JSON object")
    num_classes = meta["model_args"].get("num_classes")
    if num_classes is not None and num_classes != len(meta["classes"]):
        raise CnnlabError(
            f"{source}: num_classes is {num_classes} but {len(meta['classes'])} classes are listed"
        )


def _build_model(meta: dict, run_dir: Path) -> nn.Module:
    model_json = run_dir / "model.json"
    try:
        model = create_model(meta["architecture"], **meta["model_args"])
    except CnnlabError as e:
        raise CnnlabError(f"{model_json}: {e}") from e
    checkpoint.load_weights(run_dir / "best.safetensors", model)  # mismatch: CnnlabError
    return model


def _expand(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files named directly plus image files found under folders (sorted), and errors."""
    files: list[Path] = []
    errors: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image_file(p, path))
            files += found
            if not found:
                errors.append(f"{path}: no image files in this folder")
        elif path.exists():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


def _is_image_file(path: Path, folder: Path) -> bool:
    from cnnlab.data.folders import IMAGE_EXTENSIONS

    # Like the data scanner: hidden names (macOS "._x.jpg") and __MACOSX are never images.
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in path.relative_to(folder).parts)
    return not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _as_list(images: object) -> list:
    from PIL import Image

    single = isinstance(images, str | Path | Image.Image)
    if single or (isinstance(images, torch.Tensor) and images.dim() == 3):
        return [images]
    return list(images)  # a (B, C, H, W) tensor becomes B images


def _check_tensor(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise CnnlabError(
            f"expected a uint8 image tensor (C, H, W), got {image.dtype} {tuple(image.shape)}"
        )
    return image


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return pil_to_tensor(image)  # uint8 (C, H, W)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_line(path: Path, error: Exception) -> str:
    message = str(error)
    return message if str(path) in message else f"{path}: {message}"
