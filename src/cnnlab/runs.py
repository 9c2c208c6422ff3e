"""Use a finished run folder of any task: rebuild its model, predict, evaluate, save.

``load_run(RUN)`` validates ``model.json``, rebuilds the model with ``create_model``, loads
``best.safetensors`` and takes the run's task (``cnnlab.tasks``), which preprocesses
exactly as evaluation did (same size, crop, normalisation and channel count), so a
prediction here matches the run's report. The CLI, the web page and export all load runs
through here; nothing here imports the trainer.

The loaded model is made fast for inference without changing its answers beyond float
rounding: each BatchNorm folded into the convolution before it (``fold_batchnorm``), and,
where the task trains that way, weights and batches in channels_last layout, which oneDNN
(CPU) and cuDNN convolve faster; on the CPU, predict and evaluate then run a copy
(``Run.predictor``, sharing the weights) whose convolutions are fused with the ReLU and
residual add after them and packed once per input shape (``cnnlab.cpu_fusion``), while
``Run.model`` stays the module itself for explanations, export and features.
torch.compile is used only when asked (``compile="on"``:
``cnnlab.compiling.CompiledOnFirstCall``): on a CPU it needs 20 s to a minute and more
before the first image, which the measured models win back only after tens of thousands of
images (docs/speed.md), more than a command predicts or evaluates, so ``auto`` leaves the
model eager. ``backend="onnxruntime"`` swaps the model for the run's exported
``model.onnx`` in ONNX Runtime (``cnnlab.runtime``), ``"onnxruntime-int8"`` for its int8
``model.int8.onnx`` (``cnnlab export --int8``); the task runs it unchanged.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnlab import checkpoint
from cnnlab.checkpoint import ModelMeta
from cnnlab.compiling import COMPILE_SETTINGS, CompiledOnFirstCall
from cnnlab.cpu_fusion import fuse_for_cpu
from cnnlab.data.images import BadImageError, from_pil, read_image, to_channels, to_uint8
from cnnlab.data.listing import list_images
from cnnlab.data.splits import split_folder
from cnnlab.device import pick_device
from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_bytes, csv_text, read_json, read_yaml
from cnnlab.models.factory import create_model
from cnnlab.tasks import task_class
from cnnlab.tasks.inference import InferenceTask
from cnnlab.tasks.options import resolve_options

if TYPE_CHECKING:
    from PIL import Image

ImageInput = str | Path | torch.Tensor  # or a PIL.Image.Image
FILE_BATCH = 64  # image files decoded and predicted at a time
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
# The exported file each ONNX Runtime backend runs (``cnnlab.runtime.FILES``' kinds).
BACKEND_FILES = {"onnxruntime": "onnx", "onnxruntime-int8": "onnx-int8"}


@dataclass
class Run:
    """A trained model loaded from a run folder, ready to predict and evaluate."""

    path: Path
    meta: ModelMeta
    task: InferenceTask  # preprocessing, prediction, metrics, drawing (cnnlab.tasks)
    model: nn.Module  # eval mode, best weights, on ``device``
    device: torch.device
    # On the CPU, ``model``'s convolutions fused with their ReLUs and residual adds and
    # packed per input shape (``cnnlab.cpu_fusion``), sharing its weights: what predict and
    # evaluate run. None: they run ``model``. Not an __init__ field, so that
    # ``dataclasses.replace(run, model=other)`` runs the other model.
    fused: nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def predictor(self) -> nn.Module:
        """The module ``predict`` and ``evaluate`` call: ``fused`` when there is one."""
        return self.fused if self.fused is not None else self.model

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    def predict(
        self,
        images: Sequence[ImageInput | Image.Image] | ImageInput | Image.Image,
        **options: Any,
    ) -> list[dict]:
        """The task's prediction for each image, with ``"file"`` (the path, or None).

        Images are paths, PIL images or uint8 tensors (C, H, W) (a single one is taken as a
        list of one, a (B, C, H, W) tensor as B images); an unreadable file raises
        CnnlabError naming it (``predict_files`` collects such errors instead). ``options``
        are the task's declared ``predict`` options (``cnnlab.tasks.TASKS``: ``topk`` for
        classification, ``score_threshold`` for detection), checked here. Entries whose
        name starts with ``_`` (a segmentation's mask tensor) are not JSON.
        """
        options = self.call_options("predict", options)
        items = _as_list(images)
        decoded = [self._decode(item) for item in items]
        files = [str(item) if isinstance(item, str | Path) else None for item in items]
        results = self.task.predict(self.predictor, decoded, self.device, **options)
        return [{"file": file, **result} for file, result in zip(files, results, strict=True)]

    def predict_files(
        self, paths: Sequence[str | Path], **options: Any
    ) -> tuple[list[dict], list[str]]:
        """Predict image files and folders (searched recursively, sorted).

        Returns ``(results, errors)``: a path that cannot be read becomes an error line
        ``"path: reason"`` and the others are still predicted; nothing is raised for them.
        """
        options = self.call_options("predict", options)
        files, errors = list_images(paths)
        results: list[dict] = []
        for start in range(0, len(files), FILE_BATCH):
            readable = []
            for file in files[start : start + FILE_BATCH]:
                try:
                    readable.append((file, read_image(file, self.task.in_channels)))
                except BadImageError as error:
                    errors.append(str(error))
            if readable:
                found = self.task.predict(
                    self.predictor, [image for _, image in readable], self.device, **options
                )
                results += [
                    {"file": str(file), **result}
                    for (file, _), result in zip(readable, found, strict=True)
                ]
        return results, errors

    def evaluate(
        self, data_dir: str | Path | None = None, split: str | None = None, **options: Any
    ) -> dict:
        """The task's metrics on the run's own ``split`` (default: classification's test
        split, the others' val) or, with ``data_dir``, on that folder (its ``split`` part
        when it has one). The report says what it measured: ``"split"`` (None for a whole
        folder that has no such part) and, for a folder, ``"data"`` (the folder read).
        ``options`` are the task's declared ``eval`` options (detection's
        ``score_threshold``)."""
        options = self.call_options("eval", options)
        split = split or self.task.eval_split
        folder = Path(data_dir) if data_dir is not None else None
        data = self.task.eval_data(self.path / "split.json", folder, split)
        report = self.task.evaluate(self.predictor, data, self.device, **options)
        where: dict[str, Any] = {"split": split}
        if folder is not None:
            read = split_folder(folder, split)
            where = {"split": split if read != folder else None, "data": str(read)}
        return {**where, **{k: v for k, v in report.items() if not k.startswith("_")}}

    def data_folder(self) -> Path | None:
        """The data folder the run was trained on (split.json's root) when it recorded
        one: no output goes inside it, where the next training would read it as data."""
        try:
            recorded = read_json(self.path / "split.json")
        except CnnlabError:
            return None
        root = recorded.get("root") if isinstance(recorded, dict) else None
        return Path(root) if isinstance(root, str) else None

    def call_options(self, command: str, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` checked against the task's ``command`` options (``predict`` or
        ``eval``), each unset one at its declared default; the options that change the
        loaded model (``tta``) are ``load_run``'s."""
        per_call = [option for option in self.task.options if not option.at_load]
        return resolve_options(per_call, command, given, self.task.name)

    def table(self, results: Sequence[dict]) -> str:
        """CSV text of predictions (from ``predict``/``predict_files``), long format: a
        header of the task's ``csv_columns`` (classify: file, rank, class, prob; detect:
        file, class, score, x1, y1, x2, y2 in the image's pixels; segment: file, class,
        fraction), then the task's rows for each result in turn. Names that a spreadsheet
        would run as a formula (``=cmd.png``) are written after a single quote
        (``files.spreadsheet_cell``)."""
        rows = (
            [round(v, 6) if isinstance(v, float) else v for v in row]
            for result in results
            for row in self.task.csv_rows(result)
        )
        return csv_text(self.task.csv_columns, rows)

    def output_files(self, stem: Path) -> dict[str, Path]:
        """The PNGs ``save`` writes for one prediction, by drawing name: ``STEM.png`` for
        the task's first drawing, ``STEM_NAME.png`` for the others."""
        names = self.task.drawings
        return {
            name: stem.with_name(f"{stem.name}.png" if i == 0 else f"{stem.name}_{name}.png")
            for i, name in enumerate(names)
        }

    def save(self, result: dict, stem: str | Path) -> dict[str, str]:
        """Write the task's drawings of one prediction (``result`` from ``predict``, with a
        ``file``) to ``output_files(stem)``, creating folders. Returns {name: path}."""
        if result.get("file") is None:
            raise CnnlabError("only predictions of image files can be saved")
        image = read_image(result["file"], self.task.in_channels)
        targets = self.output_files(Path(stem))
        written = {}
        for name, drawing in self.task.draw(image, result).items():
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(targets[name], drawing)
            written[name] = str(targets[name])
        return written

    def _decode(self, image: ImageInput | Image.Image) -> torch.Tensor:
        """uint8 (in_channels, H, W) of a path, a uint8 tensor or a PIL image."""
        channels = self.task.in_channels
        if isinstance(image, str | Path):
            return read_image(image, channels)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3, 4):
                raise CnnlabError(
                    f"expected a uint8 image tensor (C, H, W), got {image.dtype} "
                    f"{tuple(image.shape)}"
                )
            return to_channels(image, channels)
        # As a file of it would be read: upright by its EXIF orientation, 16 bits scaled.
        return to_channels(to_uint8(from_pil(image)), channels)


def load_run(
    path: str | Path,
    device: str = "auto",
    fast: bool = True,
    backend: str = "torch",
    tta: bool = False,
    compile: str = "off",
) -> Run:
    """Load a run folder of any task: model from ``model.json`` and ``best.safetensors``.

    ``device`` is ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. ``fast``
    folds BatchNorm into convolutions (and uses channels_last where the task trains so);
    without it the model is exactly the trained module. ``backend="onnxruntime"`` runs
    ``RUN/model.onnx`` (``cnnlab export RUN``) in ONNX Runtime on the CPU instead, with
    torch's thread count; it must have been exported from the run's present weights.
    ``tta`` (classification) predicts and evaluates with test-time augmentation: the class
    probabilities averaged over views the run trained on (see ``tasks.tta.TTA``).
    ``compile="on"`` compiles the torch model (inductor) on its first batch, falling back to
    it eagerly with one line on stderr when that fails; ``auto`` and ``off`` do not
    compile: measured, it never paid back its compile time over a command's images.
    """
    if backend not in BACKENDS:
        raise CnnlabError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if compile not in COMPILE_SETTINGS:
        raise CnnlabError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, not {compile!r}")
    if compile == "on" and backend != "torch":
        raise CnnlabError(f"--compile on compiles the torch model; the {backend} backend has none")
    run_dir = checkpoint.require_run_dir(Path(path))
    meta = checkpoint.read_model_json(run_dir)
    run = _load_model(run_dir, meta, device, fast, backend)
    if compile == "on" and run.task.exported_logits is None:
        # A detector predicts through its own methods (``model.detect``), not ``forward``.
        print(
            f"compile: fell back to eager: a {meta.task} model predicts through its own"
            " methods, which torch.compile of the model does not cover",
            file=sys.stderr,
        )
    elif compile == "on":
        run.model, run.fused = CompiledOnFirstCall(run.model), None  # inductor packs its own
    if tta:
        run.model = run.task.test_time_augmented(run.model, run_dir / "config.yaml")
        if run.fused is not None:
            run.fused = run.task.test_time_augmented(run.fused, run_dir / "config.yaml")
    return run


def _load_model(run_dir: Path, meta: ModelMeta, device: str, fast: bool, backend: str) -> Run:
    # config.yaml, model.json and best.safetensors must agree before anything is built.
    config_file = run_dir / "config.yaml"
    config = read_yaml(config_file) if config_file.is_file() else None
    checkpoint.check_run_files(run_dir, meta, config if isinstance(config, dict) else None)
    weights = run_dir / "best.safetensors"
    if not weights.is_file():  # (checked against model.json above when it exists)
        raise CnnlabError(f"{weights}: weight file not found")
    if backend in BACKEND_FILES:
        if device not in ("auto", "cpu"):
            raise CnnlabError(f"the {backend} backend runs on the CPU, not {device}")
        task = task_class(meta.task).from_meta(meta)
        model = _onnx_model(run_dir, meta, BACKEND_FILES[backend])
        return Run(run_dir, meta, task, model, torch.device("cpu"))
    model = create_model(meta.architecture, **meta.model_args)
    checkpoint.load_weights(weights, model)
    task = task_class(meta.task).from_meta(meta)
    target = pick_device(device)
    model.to(target).eval()
    fused = None
    if fast:
        fold_batchnorm(model)
        if task.channels_last:
            model.to(memory_format=torch.channels_last)
        # A detector predicts through its own methods, which the fused forward lacks.
        if target.type == "cpu" and task.exported_logits is not None:
            fused = fuse_for_cpu(model)
    run = Run(run_dir, meta, task, model, target)
    run.fused = fused
    return run


def _onnx_model(run_dir: Path, meta: ModelMeta, kind: str = "onnx") -> nn.Module:
    """RUN/model.onnx (``kind`` "onnx-int8": RUN/model.int8.onnx) in ONNX Runtime, refused
    when it was exported from other weights or for other classes than the run has now (a
    retrained run must be exported again)."""
    from cnnlab.files import sha256_of
    from cnnlab.runtime import FILES, onnx_model

    file = run_dir / FILES[kind]
    command = f"cnnlab export {run_dir}" + (" --int8" if kind == "onnx-int8" else "")
    again = f"export it again with `{command}`"
    if not file.is_file():
        raise CnnlabError(f"{file}: not found; run `{command}` first")
    model = onnx_model(file)
    exported = model.metadata
    weights = run_dir / "best.safetensors"
    if exported.get("weights_sha256") != sha256_of(weights):
        raise CnnlabError(f"{file}: exported from other weights than {weights}; {again}")
    if exported.get("classes") != meta.classes or exported.get("task") != meta.task:
        raise CnnlabError(f"{file}: exported for other classes than the run's; {again}")
    return model


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


def _as_list(images: object) -> list:
    from PIL import Image

    single = isinstance(images, str | Path | Image.Image)
    if single or (isinstance(images, torch.Tensor) and images.dim() == 3):
        return [images]
    return list(images)  # a (B, C, H, W) tensor becomes B images
