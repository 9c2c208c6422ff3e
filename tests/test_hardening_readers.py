"""Files cnnlab reads back and images it decodes (issue 24, round 2): a run's files are
checked against each other before anything large is built, YAML aliases are capped, JSON
output holds no NaN, CSV cells cannot start a spreadsheet formula, and images decode and
measure alike whatever their byte order or EXIF orientation. Every reader is also fuzzed
(tests/data/fuzz_files.py): it parses or raises one CnnlabError line.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from safetensors.torch import load_file, save_file

import cnnlab
from cnnlab import checkpoint, files
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from tests.conftest import train_tiny_classifier


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def png_file(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def classes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classes") / "data"
    for label, name in enumerate(("cat", "dog", "fox")):
        for i in range(5):
            rng = np.random.default_rng(10 * label + i)
            png_file(root / name / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, classes_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "classify"
    return train_tiny_classifier(classes_dir, out)


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, free to edit."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- CSV


def test_csv_cells_that_would_start_a_formula_are_quoted() -> None:
    text = files.csv_text(
        ["file", "class", "score"],
        [
            ['=HYPERLINK("http://x")', "+cat", -1.5],
            ["-2+3", "@SUM(A1)", 0.5],
            ["\tx", "\rx", 1],
            ["plain.png", "dog", "0"],
        ],
    )
    rows = text.split("\n")  # (a cell holds a carriage return, which splitlines splits at)
    assert rows[1] == '"\'=HYPERLINK(""http://x"")",\'+cat,-1.5'  # -1.5 is a number
    assert rows[2] == "'-2+3,'@SUM(A1),0.5"
    assert rows[3] == "'\tx,'\rx,1"
    assert rows[4] == "plain.png,dog,0"


def test_save_csv_takes_formula_and_undecodable_file_names(
    trained: Path, classes_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    image = (classes_dir / "cat" / "0.png").read_bytes()
    Path("=1+1.png").write_bytes(image)
    Path(os.fsdecode(b"\xfe\xff.png")).write_bytes(image)  # not UTF-8: surrogateescape
    code = main(["predict", str(trained), "=1+1.png", os.fsdecode(b"\xfe\xff.png"),
                 "--save-csv", "out.csv", "--format", "json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = Path("out.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "file,rank,class,prob"
    assert {row.split(",")[0] for row in rows[1:]} == {"'=1+1.png", "\\xfe\\xff.png"}
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_a_class_folder_whose_name_is_not_utf8_is_named_clearly(
    classes_dir: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copytree(classes_dir, tmp_path / "data"))
    (data / "cat").rename(data / os.fsdecode(b"c\xffat"))
    with pytest.raises(CnnlabError) as error:
        cnnlab.train(data, tmp_path / "run", model="convnet", img_size=16, epochs=1, quiet=True)
    assert "c\\xffat: the class folder's name is not UTF-8" in one_line(error)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- YAML, JSON


def test_yaml_aliases_are_capped_before_they_expand(tmp_path: Path) -> None:
    laughs = tmp_path / "config.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(lines) + "\n")
    assert len(laughs.read_bytes()) < 1500  # 9^9 = 387 million strings once expanded
    started = time.perf_counter()
    with pytest.raises(CnnlabError, match="aliases expand to more than 100,000 values") as error:
        files.read_yaml(laughs)
    assert time.perf_counter() - started < 2
    assert str(laughs) in one_line(error)
    laughs.write_text("a: &a [1, *a]\n")
    with pytest.raises(CnnlabError, match="refers to the value that holds it"):
        files.read_yaml(laughs)
    laughs.write_text("[" * 600 + "]" * 600 + "\n")
    with pytest.raises(CnnlabError, match="nested too deeply"):
        files.read_yaml(laughs)
    laughs.write_text("\x00epochs: 1\n")
    with pytest.raises(CnnlabError, match="not valid YAML"):
        files.read_yaml(laughs)
    laughs.write_text("base: &b {cdims: [4]}\nother: *b\n")  # a small alias is YAML as usual
    assert files.read_yaml(laughs) == {"base": {"cdims": [4]}, "other": {"cdims": [4]}}


def test_json_output_holds_null_and_a_warning_for_nan(run: Path, classes_dir: Path, capsys) -> None:
    text, replaced = files.json_text({"a": [1.0, float("nan")], "b": float("-inf"), "c": 2})
    assert replaced == 2 and json.loads(text) == {"a": [1.0, None], "b": None, "c": 2}
    weights = load_file(run / "best.safetensors")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in weights.items()}  # fmt: skip
    save_file(nan, run / "best.safetensors")
    assert main(["predict", str(run), str(classes_dir / "cat" / "0.png"), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    found = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))
    assert found[0]["top"][0]["prob"] is None
    assert "printed as null" in err


# ---------------------------------------------------------------------------- run files


class RunsCode:
    """A pickle that runs a command when unpickled (what weights_only=True refuses)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_last_pt_is_refused_in_one_line_of_ours(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, run / "last.pt")
    with pytest.raises(CnnlabError) as error:
        checkpoint.load_state(run / "last.pt")
    message = one_line(error)
    assert message.endswith("(it holds a Python object (posix.system) that cnnlab never loads)")
    assert "weights_only" not in message and not marker.exists()


@pytest.mark.parametrize(
    ("file", "change", "complaint"),
    [
        ("model.json", lambda m: m.update(input_size=[3, 100000, 100000]), "above the limit"),
        (
            "model.json",
            lambda m: m["model_args"].update(img_size=100000),
            "model_args img_size 100000 disagrees with input_size [3, 16, 16]",
        ),
        ("model.json", lambda m: m.update(input_size=[3, 32, 32]), "disagrees with input_size"),
        (
            "model.json",
            lambda m: m["model_args"].update(weights="/etc/passwd"),
            "model_args may not name files to load (weights)",
        ),
        (
            "model.json",
            lambda m: m["model_args"].update(hdims=[100000, 100000]),
            "config.yaml: model_args hdims is [8] but model.json says [100000, 100000]",
        ),
    ],
)
def test_a_model_json_that_disagrees_is_refused_before_the_model_is_built(
    run: Path, file: str, change, complaint: str, monkeypatch
) -> None:
    edit_json(run / file, change)
    built = []
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: built.append(self))
    with pytest.raises(CnnlabError) as error:
        cnnlab.load_run(run, device="cpu")
    assert complaint in one_line(error)
    assert not built  # nothing was initialised: the check ran on the meta device


def test_model_json_and_weights_that_disagree_without_config_yaml(run: Path) -> None:
    (run / "config.yaml").unlink()
    edit_json(run / "model.json", lambda m: (m.update(input_size=[3, 32, 32]),
                                             m["model_args"].update(img_size=32)))  # fmt: skip
    with pytest.raises(CnnlabError, match=r"best\.safetensors: tensor \S+ has shape"):
        cnnlab.load_run(run, device="cpu")


def test_a_config_yaml_that_disagrees_is_refused_before_resuming(run: Path, capsys) -> None:
    config = (run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (run / "config.yaml").write_text(config.replace("img_size: 16", "img_size: 100000"))
    before = (run / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("config.yaml: img_size is 100000 but model.json says 16"
                        " (the files of this run were edited apart)"), err  # fmt: skip
    assert (run / "last.pt").read_bytes() == before


def onnx_file(path: Path, inputs, outputs, nodes, classes=("cat", "dog", "fox")) -> Path:
    metadata = {
        "task": "classify",
        "architecture": "convnet",
        "classes": list(classes),
        "input_size": [3, 8, 8],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "output": "logits",
        "dynamic": [],
    }
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, path)
    return path


def floats(name: str, shape: list[int]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


POOL = [
    helper.make_node("GlobalAveragePool", ["x"], ["p"]),
    helper.make_node("Flatten", ["p"], ["y"]),
]


@pytest.mark.parametrize(
    ("inputs", "outputs", "nodes", "complaint"),
    [
        (
            [floats("x", [1, 3, 8, 8]), floats("z", [1, 3, 8, 8])],
            [floats("y", [1, 3, 8, 8])],
            [helper.make_node("Add", ["x", "z"], ["y"])],
            "the graph takes 2 inputs",
        ),
        (
            [floats("x", [1, 1, 8, 8])],
            [floats("y", [1, 1])],
            POOL,
            "the graph's input is [1, 1, 8, 8] but its metadata says input_size [3, 8, 8]",
        ),
        (
            [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3, 8, 8])],
            [helper.make_node("Identity", ["x"], ["y"])],
            "the graph's input is tensor(int64)",
        ),
        (
            [floats("x", [1, 3, 8, 8])],
            [floats("y", [1, 3, 8, 8])],
            [helper.make_node("Identity", ["x"], ["y"])],
            "the graph's output is tensor(float) [1, 3, 8, 8]",
        ),
    ],
)
def test_an_onnx_file_with_a_runs_metadata_over_another_graph_is_refused(
    tmp_path: Path, inputs, outputs, nodes, complaint: str
) -> None:
    from cnnlab.runtime import onnx_model

    path = onnx_file(tmp_path / "model.onnx", inputs, outputs, nodes)
    with pytest.raises(CnnlabError) as error:
        onnx_model(path)
    assert complaint in one_line(error)


def test_an_onnx_graph_that_fits_its_metadata_runs(tmp_path: Path) -> None:
    from cnnlab.runtime import onnx_model

    inputs, outputs = [floats("x", [1, 3, 8, 8])], [floats("y", [1, 3])]
    model = onnx_model(onnx_file(tmp_path / "good.onnx", inputs, outputs, POOL))
    assert model(torch.ones(1, 3, 8, 8)).tolist() == [[1.0, 1.0, 1.0]]
    two = onnx_file(tmp_path / "two.onnx", inputs, outputs, POOL, classes=("a", "b"))
    with pytest.raises(CnnlabError, match="scores 3 classes but its metadata lists 2"):
        onnx_model(two)


# ---------------------------------------------------------------------------- images


def test_16_bit_tiffs_scale_alike_in_both_byte_orders() -> None:
    from cnnlab.data.images import decode_bytes

    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200).astype(np.uint16)
    decoded = []
    for mode, order in (("I;16", "<u2"), ("I;16B", ">u2")):
        image = Image.frombuffer(mode, (16, 16), pixels.astype(order).tobytes(), "raw", mode, 0, 1)
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
        decoded.append(decode_bytes(buffer.getvalue())[0])
    little, big = decoded
    assert little.shape == big.shape == (1, 16, 16)
    assert torch.equal(little, big) and int(big.max()) == 51000 >> 8


def rotated_file(path: Path, fmt: str, width: int = 20, height: int = 10) -> Path:
    """An image stored ``width`` x ``height`` whose EXIF orientation (6) turns it upright."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, exif=exif)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_sizes_are_read_as_the_pixels_are_decoded_under_exif_orientation(
    tmp_path: Path, fmt: str
) -> None:
    from cnnlab.data.detect import read_yolo
    from cnnlab.data.images import image_size, read_image
    from cnnlab.data.segment import check_pairs

    image = rotated_file(tmp_path / "yolo" / "images" / f"0.{fmt.lower()}", fmt)
    assert read_image(image).shape[1:] == (20, 10)  # turned upright: 10 wide, 20 high
    assert image_size(image) == (10, 20)
    (tmp_path / "yolo" / "labels").mkdir()
    (tmp_path / "yolo" / "classes.txt").write_text("ball\n")
    (tmp_path / "yolo" / "labels" / "0.txt").write_text("0 0.5 0.5 0.2 0.1\n")
    (sample,) = read_yolo(tmp_path / "yolo")[1]
    assert (sample.width, sample.height) == (10, 20)
    assert sample.boxes == ((4.0, 9.0, 6.0, 11.0),)  # on the upright pixels
    mask = png_file(tmp_path / "mask.png", np.zeros((20, 10), np.uint8))
    check_pairs([(image, mask)], num_classes=2)  # the mask drawn on the upright image fits


# ---------------------------------------------------------------------------- annotations


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    from cnnlab.data.shapes import write_shapes

    root = tmp_path / "coco"
    write_shapes(root, task="detect", n=3, size=32, seed=0)
    return root


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d["images"][0].update(id=[1, 2]), "image 0: id must be an integer or a string"),
        (lambda d: d["categories"][0].update(id={"a": 1}), "id must be an integer or a string"),
        (lambda d: d["categories"][0].update(id="one"), "category ids mix integers and strings"),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "is used twice"),
        (lambda d: d["images"][0].update(file_name="a\x00b.png"), "holds a NUL byte"),
        (lambda d: d["annotations"][0].update(image_id=[0]), "unknown image_id [0]"),
        (lambda d: d["categories"][0].update(name={"x": 1}), "not a non-empty string"),
        (lambda d: d["categories"].append(7), "category 3 is not an object"),
        (lambda d: d["images"][0].pop("file_name"), "image 0 lacks 'file_name'"),
    ],
)
def test_coco_ids_and_names_that_break_parsers_are_one_line(
    coco: Path, change, complaint: str
) -> None:
    from cnnlab.data.detect import read_coco

    edit_json(coco / "annotations.json", change)
    with pytest.raises(CnnlabError) as error:
        read_coco(coco)
    assert complaint in one_line(error) and "annotations.json" in str(error.value)


def test_labels_drawing_of_an_image_with_many_boxes() -> None:
    from cnnlab.draw import draw_boxes

    truth = [{"class": "ball", "box": [i, i, i + 4, i + 4]} for i in range(40)]
    drawn = draw_boxes(torch.zeros(3, 64, 64, dtype=torch.uint8), truth, ["ball"])
    assert drawn.shape[0] == 3 and drawn.dtype == torch.uint8


# ---------------------------------------------------------------------------- fuzzing


def test_every_reader_parses_or_refuses_in_one_line_under_fuzzing() -> None:
    """Hypothesis mutates a valid COCO file, YOLO labels, a mask, config.yaml, model.json,
    split.json and a proposal file (tests/data/fuzz_files.py); in a child process with
    its address space capped, each reader must return or raise one CnnlabError line."""
    script = Path(__file__).parent / "data" / "fuzz_files.py"
    limit = 6 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [sys.executable, str(script), "100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=cap,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tried = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(tried) == {"coco", "yolo", "mask", "config.yaml", "model.json", "split.json",
                          "proposals"}  # fmt: skip
    for reader, tally in tried.items():
        assert tally["examples"] >= 100 and tally["parsed"] > 0 and tally["refused"] > 0, reader


def test_a_pil_image_is_predicted_as_its_file_would_be(trained: Path, tmp_path: Path) -> None:
    """The Python API's PIL input is turned upright by its EXIF orientation, as the file."""
    path = rotated_file(tmp_path / "turned.jpg", "JPEG", width=24, height=12)
    run = cnnlab.load_run(trained, device="cpu")
    with Image.open(path) as image:
        from_pil, from_file = run.predict([image, path])
    assert from_pil["top"] == from_file["top"]
