import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab import checkpoint, create_model, files, model_info
from cnnlab.data.classify import make_splits
from cnnlab.data.images import read_image
from cnnlab.data.transforms import classify_eval, default_stats
from cnnlab.errors import CnnlabError
from cnnlab.runs import load_run
from tests.conftest import tiny_config

ARCH = "convnet"
CLASSES = ["cat", "dog", "fox"]


def write_images(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(np.asarray(pixels)).save(root / name / f"{i:03d}.png")
    return root


def make_run(
    run_dir: Path,
    classes: list[str] = CLASSES,
    winner: str | None = "fox",
    data: Path | None = None,
    in_channels: int = 3,
) -> Path:
    """A run folder written by hand: model.json, best.safetensors and maybe split.json."""
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=len(classes), in_channels=in_channels)
    if winner is not None:
        # Zero classifier weights and a large bias: ``winner`` wins whatever the image.
        state = model.state_dict()
        head = [key for key in state if key.endswith(".weight")][-1].removesuffix(".weight")
        state[f"{head}.weight"].zero_()
        state[f"{head}.bias"].copy_(torch.eye(len(classes))[classes.index(winner)] * 5)
    run_dir.mkdir(parents=True)
    checkpoint.save_weights(run_dir / "best.safetensors", model)
    mean, std = default_stats(in_channels)
    _, height, width = model_info(ARCH).input_size
    meta = {
        "task": "classify",
        "architecture": ARCH,
        "model_args": {"num_classes": len(classes), "in_channels": in_channels},
        "classes": classes,
        "input_size": [in_channels, height, width],
        "mean": list(mean),
        "std": list(std),
        "cnnlab_version": cnnlab.__version__,
    }
    checkpoint.save_model_json(run_dir, checkpoint.ModelMeta(**meta))
    if data is not None:
        splits = make_splits(data, val_split=0.25, test_split=0.25, seed=0)
        files.write_json(run_dir / "split.json", splits.to_json())
    return run_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("data"), {"cat": 8, "dog": 4, "fox": 12})


@pytest.fixture(scope="module")
def fox_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "fox", data=data)


def assert_top(result: dict, k: int) -> None:
    probs = [entry["prob"] for entry in result["top"]]
    assert len(probs) == k
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6


def test_predict_paths_pil_and_tensors(fox_run: Path, data: Path) -> None:
    run = cnnlab.load_run(fox_run)  # the package-level name the README uses
    path = data / "cat" / "000.png"
    results = run.predict([path, Image.open(path), read_image(path)], topk=2)
    assert [r["file"] for r in results] == [str(path), None, None]
    for result in results:
        assert_top(result, 2)
        assert result["top"][0]["class"] == "fox" and result["top"][0]["prob"] > 0.9
    # topk larger than the class count is clipped; then the probabilities sum to 1.
    (everything,) = run.predict([path], topk=10)
    assert_top(everything, 3)
    assert sum(e["prob"] for e in everything["top"]) == pytest.approx(1.0, abs=1e-5)
    assert {e["class"] for e in everything["top"]} == set(CLASSES)
    json.dumps(results)
    # One image on its own, or a (B, C, H, W) batch tensor, work too.
    assert run.predict(path, topk=1)[0]["file"] == str(path)
    assert len(run.predict(torch.zeros(4, 3, 20, 20, dtype=torch.uint8))) == 4


def test_predict_preprocesses_like_evaluation(tmp_path: Path, data: Path) -> None:
    run = load_run(make_run(tmp_path / "run", winner=None))  # random weights: input matters
    paths = sorted((data / "dog").glob("*.png"))
    results = run.predict(paths, topk=3)
    _, size, _ = run.meta.input_size
    transform = classify_eval(size, run.meta.mean, run.meta.std)
    batch = torch.stack([transform(read_image(p, 3)) for p in paths])
    with torch.inference_mode():
        expected = run.model(batch).softmax(dim=1)
    for result, probs in zip(results, expected, strict=True):
        for entry in result["top"]:
            assert entry["prob"] == pytest.approx(float(probs[CLASSES.index(entry["class"])]))
    # The same image as a file, a PIL image and a tensor gets the same answer.
    same = run.predict([paths[0], Image.open(paths[0]), read_image(paths[0])])
    assert same[0]["top"] == same[1]["top"] == same[2]["top"]


def test_predict_grayscale_run_accepts_colour_images(tmp_path: Path, data: Path) -> None:
    run = load_run(make_run(tmp_path / "gray", in_channels=1))
    (result,) = run.predict([data / "fox" / "001.png"], topk=1)
    assert result["top"][0]["class"] == "fox"


def test_predict_rejects_float_tensors_and_bad_topk(fox_run: Path) -> None:
    run = load_run(fox_run)
    with pytest.raises(CnnlabError, match="uint8"):
        run.predict([torch.rand(3, 20, 20)])
    with pytest.raises(CnnlabError, match="topk"):
        run.predict([torch.zeros(3, 20, 20, dtype=torch.uint8)], topk=0)


def test_predict_files_expands_folders_and_reports_bad_files(tmp_path: Path, fox_run: Path) -> None:
    images = write_images(tmp_path / "images", {"b": 2, "a/nested": 2})
    (images / "notes.txt").write_text("not an image")  # not an image extension: skipped
    (images / "broken.png").write_bytes(b"\x89PNG this is not really a png")
    (images / "b" / "._000.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    single = write_images(tmp_path / "single", {"x": 1}) / "x" / "000.png"
    missing = tmp_path / "missing.jpg"
    run = load_run(fox_run)
    results, errors = run.predict_files([images, single, missing], topk=1)
    assert [r["file"] for r in results] == [
        str(images / "a/nested/000.png"),
        str(images / "a/nested/001.png"),
        str(images / "b/000.png"),
        str(images / "b/001.png"),
        str(single),
    ]
    assert all(r["top"][0]["class"] == "fox" for r in results)
    assert len(errors) == 2
    assert any(e.startswith(str(images / "broken.png")) for e in errors)
    assert any(e.startswith(str(missing)) for e in errors)
    json.dumps(results)


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match=r"is not a cnnlab run folder \(no model\.json\)"):
        load_run(tmp_path)


def test_weights_for_other_classes(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    meta = files.read_json(run_dir / "model.json")
    meta["classes"].append("wolf")  # as if the data gained a class after training
    meta["model_args"]["num_classes"] = 4
    files.write_json(run_dir / "model.json", meta)
    with pytest.raises(CnnlabError, match=r"best\.safetensors"):
        load_run(run_dir)


def test_classes_disagree_with_num_classes(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    meta = files.read_json(run_dir / "model.json")
    meta["classes"] = ["cat", "dog"]
    files.write_json(run_dir / "model.json", meta)
    with pytest.raises(CnnlabError, match=r"model\.json"):
        load_run(run_dir)


def test_evaluate_own_split(fox_run: Path, data: Path) -> None:
    run = load_run(fox_run)
    splits = make_splits(data, val_split=0.25, test_split=0.25, seed=0)
    report = run.evaluate()
    labels = [label for _, label in splits.test]
    assert report["n"] == len(labels)
    # Every image is predicted "fox", so top-1 is the share of foxes in the test split.
    assert report["top1"] == pytest.approx(labels.count(CLASSES.index("fox")) / len(labels))
    assert not any(key.startswith("_") for key in report)
    json.dumps(report)
    val = run.evaluate(split="val")
    assert val["n"] == len(splits.val)


def test_evaluate_data_dir_subset_mapped_by_name(tmp_path: Path, fox_run: Path) -> None:
    # Folder index 1 is "fox" here but 2 in the model: mapping by index would score 0.
    data = write_images(tmp_path / "new", {"dog": 3, "fox": 1}, seed=1)
    report = load_run(fox_run).evaluate(data)
    assert report["n"] == 4
    assert report["top1"] == pytest.approx(0.25)


def test_evaluate_data_dir_prefers_split_subfolder(tmp_path: Path, fox_run: Path) -> None:
    write_images(tmp_path / "data" / "train", {"cat": 5, "fox": 5})
    write_images(tmp_path / "data" / "test", {"cat": 2, "fox": 2})
    report = load_run(fox_run).evaluate(tmp_path / "data")
    assert report["n"] == 4
    assert report["top1"] == pytest.approx(0.5)


def test_evaluate_unknown_class_folder(tmp_path: Path, fox_run: Path) -> None:
    data = write_images(tmp_path / "new", {"dog": 1, "wolf": 1})
    with pytest.raises(CnnlabError, match="wolf"):
        load_run(fox_run).evaluate(data)


def test_evaluate_without_split_json(tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match=r"split\.json"):
        load_run(make_run(tmp_path / "run")).evaluate()


def test_device_auto(fox_run: Path) -> None:
    run = load_run(fox_run, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.device.type == expected
    assert next(run.model.parameters()).device.type == expected
    assert not run.model.training


def test_trained_run_matches_its_report(tmp_path: Path, data: Path) -> None:
    from cnnlab.training import train

    out = tmp_path / "run"
    cfg = tiny_config(
        data,
        out,
        model_args={"cdims": [4], "hdims": [8]},
        batch_size=8,
        val_split=0.25,
        test_split=0.25,
    )
    report = train(cfg)
    run = load_run(out)
    mine = run.evaluate()
    assert mine["n"] == report["n"]
    assert mine["top1"] == pytest.approx(report["top1"])
    assert mine["loss"] == pytest.approx(report["loss"], rel=1e-5)
    saved = files.read_json(out / "report.json")
    assert {k: saved[k] for k in ("top1", "top5", "n")} == {
        k: mine[k] for k in ("top1", "top5", "n")
    }
    assert saved["per_class"] == json.loads(json.dumps(mine["per_class"]))
    # predict and evaluate preprocess alike: predict's answers give the same top-1.
    splits = make_splits(data, val_split=0.25, test_split=0.25, seed=0)
    results = run.predict([path for path, _ in splits.test], topk=1)
    predicted = [r["top"][0]["class"] for r in results]
    truth = [run.classes[label] for _, label in splits.test]
    right = sum(p == t for p, t in zip(predicted, truth, strict=True))
    assert right / len(truth) == pytest.approx(report["top1"])
