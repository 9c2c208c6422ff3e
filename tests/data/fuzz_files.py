"""Fuzz every reader of a file cnnlab is given or reads back: ``python
tests/data/fuzz_files.py N [READER...]`` runs about N hypothesis examples for each reader
(COCO JSON, YOLO txt, masks, config.yaml, model.json, split.json, proposal files; or only
those named) and prints a JSON line of counts per reader. Each reader must return or raise
CnnlabError with one line; any other exception fails the run (hypothesis prints the
smallest example that raised it).

The same approach as fuzz_reader.py (the image decoder's fuzzer): valid seed files,
mutated by hypothesis, derandomized so that a run is repeatable. Documents are mutated
both as structures (any value replaced by any JSON value, any key dropped) and as text
(bytes changed, the file cut). Run in a child process with its memory capped by
tests/test_hardening_readers.py, so that a runaway allocation fails rather than swaps.
"""

from __future__ import annotations

import copy
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from fuzz_reader import apply, mutations, repeatable
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cnnlab import checkpoint
from cnnlab.config import TrainConfig
from cnnlab.data.classify import Splits
from cnnlab.data.detect import read_coco, read_yolo
from cnnlab.data.proposals import ProposalSource
from cnnlab.data.segment import read_mask
from cnnlab.errors import CnnlabError
from cnnlab.files import read_yaml, write_json
from cnnlab.models.factory import create_model
from cnnlab.runs import load_run

counts: dict[str, dict[str, int]] = {}
DROP = object()  # a mutation that removes the key or item instead of replacing it

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["../x.png", "/etc/hostname", "a\x00b.png", "0.png", "=cmd", ""])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


def attempt(reader: str, call) -> None:
    """Run ``call``: a result or a one-line CnnlabError count; anything else propagates."""
    tally = counts.setdefault(reader, {"examples": 0, "parsed": 0, "refused": 0})
    tally["examples"] += 1
    try:
        call()
    except CnnlabError as error:
        assert "\n" not in str(error), f"{reader}: message of several lines: {error}"
        tally["refused"] += 1
        return
    tally["parsed"] += 1


def paths_of(value, prefix=()) -> list[tuple]:
    """Every place in a JSON document, as key/index paths (the root is ())."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_of(item, (*prefix, index))
    return found


def replaced(document, path: tuple, value):
    if not path:
        return value
    changed = copy.deepcopy(document)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    if value is DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return changed


def document_texts(seed):
    """Text of ``seed`` after a structural change (a value replaced, a key dropped), or
    the seed's text with bytes changed or cut."""
    text = json.dumps(seed)

    @st.composite
    def structural(draw):
        path = draw(st.sampled_from(paths_of(seed)))
        value = draw(json_values | st.just(DROP)) if path else draw(json_values)
        return json.dumps(replaced(seed, path, value))

    raw = mutations(text.encode()).map(lambda m: apply(text.encode(), m))
    return st.just(text) | structural() | raw


def write(path: Path, content: str | bytes) -> None:
    path.write_bytes(
        content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    )


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def fixtures(root: Path) -> dict:
    """Seed files: a COCO and a YOLO folder, a class folder and its split.json, a run
    folder of a tiny model (model.json, config.yaml, best.safetensors), a proposal file."""
    images = root / "det" / "images"
    images.mkdir(parents=True)
    for i in range(2):
        (images / f"{i}.png").write_bytes(png(np.full((8, 10, 3), 40 * i, np.uint8)))
    coco = {
        "images": [
            {"id": 1, "file_name": "0.png", "width": 10, "height": 8},
            {"id": 2, "file_name": "1.png"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4]},
            {"id": 2, "image_id": 2, "category_id": 9, "bbox": [0.5, 2, 3, 5], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "ball"}, {"id": 9, "name": "box"}],
    }
    (root / "det" / "labels").mkdir()
    (root / "det" / "classes.txt").write_text("ball\nbox\n")
    for name in ("cat", "dog"):
        (root / "cls" / name).mkdir(parents=True)
        (root / "cls" / name / "0.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    split = {
        "root": str(root / "cls"),
        "classes": ["cat", "dog"],
        "seed": 0,
        "val_split": 0.5,
        "test_split": 0.0,
        "presplit": False,
        "train": [["cat/0.png", 0]],
        "val": [["dog/0.png", 1]],
        "test": [],
    }
    run = root / "run"
    run.mkdir()
    args = {"num_classes": 2, "in_channels": 3, "img_size": 8, "cdims": [2], "hdims": [4]}
    checkpoint.save_weights(run / "best.safetensors", create_model("convnet", **args))
    meta = {
        "task": "classify",
        "architecture": "convnet",
        "model_args": args,
        "classes": ["cat", "dog"],
        "input_size": [3, 8, 8],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    config = {
        "data": str(root / "cls"),
        "model": "convnet",
        "model_args": {"cdims": [2], "hdims": [4]},
        "epochs": 2,
        "img_size": 8,
        "in_channels": 3,
        "val_split": 0.5,
    }
    proposals = {"images": {"0.png": [[0, 0, 4, 4]], "1.png": {"boxes": [[1, 1, 2, 2]]}}}
    return {"coco": coco, "split": split, "meta": meta, "config": config, "proposals": proposals}


def main(examples: int, only: list[str]) -> None:
    """Run each search (or those named in ``only``: coco, yolo, mask, config, model_json,
    split, proposals)."""

    def wanted(name: str) -> bool:
        return not only or name in only

    common = repeatable(examples)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        seeds = fixtures(root)
        det, run = root / "det", root / "run"

        @common
        @given(document_texts(seeds["coco"]))
        def coco(text) -> None:
            write(det / "annotations.json", text)
            attempt("coco", lambda: read_coco(det))

        if wanted("coco"):
            coco()

        @common
        @given(
            st.lists(
                st.text(max_size=30)
                | st.sampled_from(["0 0.5 0.5 0.2 0.2", "1 nan 0 1 1", "5 0 0 1 1"]),
                max_size=4,
            ),
            st.text(max_size=20) | st.just("ball\nbox\n"),
        )
        def yolo(lines, classes) -> None:
            write(det / "labels" / "0.txt", "\n".join(lines))
            write(det / "classes.txt", classes)
            attempt("yolo", lambda: read_yolo(det))

        if wanted("yolo"):
            yolo()

        mask_seed = png(np.array([[0, 1, 2], [255, 1, 0]], np.uint8), "P")

        @common
        @given(
            mutations(mask_seed).map(lambda m: apply(mask_seed, m))
            | st.tuples(
                st.integers(1, 6),
                st.integers(1, 6),
                st.sampled_from(["L", "P", "RGB", "I;16", "LA"]),
            ).map(lambda s: png(np.full((s[0], s[1]), 2, np.uint8), s[2]))
        )
        def mask(data) -> None:
            write(root / "mask.png", data)
            attempt("mask", lambda: read_mask(root / "mask.png", 3))

        if wanted("mask"):
            mask()

        def resume_reads() -> None:  # what `train --resume` reads before it builds anything
            saved = read_yaml(run / "config.yaml")
            if not isinstance(saved, dict):
                raise CnnlabError("config.yaml: not a mapping of settings")
            meta = checkpoint.read_model_json(run)
            checkpoint.check_run_files(run, meta, saved)
            TrainConfig.from_dict({**saved, "out": str(run)})

        def yaml_texts():
            text = yaml.safe_dump(seeds["config"], sort_keys=False)
            structural = document_texts(seeds["config"]).map(
                lambda t: yaml.safe_dump(json.loads(t)) if isinstance(t, str) else t
            )
            laughs = st.tuples(st.integers(1, 12), st.integers(1, 12)).map(
                lambda s: (
                    "a0: &a0 [x]\n"
                    + "".join(
                        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * s[1])}]\n"
                        for i in range(1, s[0])
                    )
                )
            )
            anchored = st.sampled_from(
                ["model_args: &m {cdims: [2], hdims: *m}\n", "epochs: &e 2\nlr: *e\n", "a: *nope\n"]
            )
            raw = mutations(text.encode()).map(lambda m: apply(text.encode(), m))
            return st.just(text) | structural | laughs | anchored | raw

        write_json(run / "model.json", seeds["meta"])

        @common
        @given(yaml_texts())
        def config(text) -> None:
            write(run / "config.yaml", text)
            attempt("config.yaml", resume_reads)

        if wanted("config"):
            config()

        (run / "config.yaml").unlink(missing_ok=True)

        @common
        @given(document_texts(seeds["meta"]))
        def model_json(text) -> None:
            write(run / "model.json", text)
            attempt("model.json", lambda: load_run(run, device="cpu"))

        if wanted("model_json"):
            model_json()

        @common
        @given(document_texts(seeds["split"]))
        def split(text) -> None:
            write(root / "split.json", text)
            attempt("split.json", lambda: Splits.from_json(root / "split.json"))

        if wanted("split"):
            split()

        images = [det / "images" / "0.png", det / "images" / "1.png"]

        @common
        @given(document_texts(seeds["proposals"]))
        def proposals(text) -> None:
            write(root / "proposals.json", text)
            source = ProposalSource(file=str(root / "proposals.json"), max_boxes=5)
            attempt("proposals", lambda: source.boxes(images, progress=False))

        if wanted("proposals"):
            proposals()

    print(json.dumps(counts))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
