"""The entry points for any run: ``explain`` maps a run's predictions on images (a
classifier's or segmenter's class, ``class_maps``; a detector's boxes, ``box_maps``), and
``explain_files`` is ``cnnlab explain``: image files in, one document (and drawing) each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from cnnlab.attribution import maps as attribution
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.explain.box_maps import BoxesExplanation, draw_boxes, explain_boxes
from cnnlab.explain.class_maps import Explanation, draw, explain_classes
from cnnlab.explain.inputs import check_run
from cnnlab.runs import Run, load_run


def explain(
    run: Run,
    images: Sequence[Tensor],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    files: Sequence[str | None] | None = None,
    score_threshold: float | None = None,
) -> list[Explanation] | list[BoxesExplanation]:
    """The ``method`` map of each uint8 image (in_channels, H, W) for ``class_name``
    (default: the predicted class) at ``layer`` (default: ``default_layer``); a detection
    run's, one map per box (``explain_boxes``, boxes scoring ``score_threshold`` or more,
    default ``cnnlab predict``'s)."""
    check_run(run)
    if method not in attribution.METHODS:
        raise CnnlabError(
            f"unknown method {method!r}; choose one of {', '.join(attribution.METHODS)}"
        )
    if run.task.name == "detect":
        return explain_boxes(run, images, method, class_name, layer, files, score_threshold)
    if score_threshold is not None:
        raise CnnlabError("a score threshold picks a detector's boxes; this is not a detection run")
    return explain_classes(run, images, method, class_name, layer, files)


def explain_files(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    score_threshold: float | None = None,
) -> list[dict]:
    """``cnnlab explain``: each image file's map (``explain``), drawn to ``OUT/STEM_METHOD.png``
    when ``out`` is given; one document per image (``Explanation.to_dict`` or, for a
    detection run, ``BoxesExplanation.to_dict``, with ``"drawing"``)."""
    run = load_run(run_dir, device, fast=False)
    check_run(run)
    images = [read_image(Path(path), run.task.in_channels) for path in paths]
    files = [str(p) for p in paths]
    results = explain(run, images, method, class_name, layer, files, score_threshold)
    documents = []
    for result in results:
        document = result.to_dict()
        if out is not None:
            target = Path(out) / f"{Path(str(result.file)).stem}_{method}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(result, BoxesExplanation):
                draw_boxes(result, target)
            else:
                draw(result, target)
            document["drawing"] = str(target)
        documents.append(document)
    return documents
